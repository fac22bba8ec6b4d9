"""What a command prints, as a file would want it: ``--log-file FILE`` and output that is not a terminal.

A progress bar (tqdm) redraws its line with a carriage return many times a second: right on a terminal,
thousands of lines of noise in a file. ``LineLog`` keeps what a terminal would end up showing: a line
rewritten after ``\\r`` is written only when it ends (the bar's last state) or, for a long bar, at most
once every ``interval`` seconds (a training's progress, epoch by epoch, without a line per redraw).

``command_output(log_file)`` is the context a command runs in: stdout and stderr also go to ``log_file``
(appended; progress bars as above) and, when stderr is not a terminal (redirected to a file, a pipe, a CI
log), stderr gets the same treatment.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time


class LineLog:
    """A text stream writing finished lines to ``stream``; carriage-return redraws collapsed (see the module).

    ``stream`` must have ``write`` and ``flush``; other attributes (``isatty``, ``encoding``, ...) are read
    from it, so that libraries treat a LineLog like the stream it wraps."""

    def __init__(self, stream, interval: float = 30.0):
        self.stream, self.interval = stream, interval
        self._line, self._logged_at = "", time.monotonic()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for char_run in _split(text):
                if char_run == "\n":
                    self.stream.write(self._line + "\n")
                    self._line = ""
                elif char_run == "\r":
                    self._redraw()
                else:
                    self._line += char_run
        return len(text)

    def _redraw(self) -> None:
        """A carriage return: the line so far is replaced; it is kept only when ``interval`` seconds have passed
        since the last line kept this way (or since the stream was made)."""
        now = time.monotonic()
        if self._line.strip() and now - self._logged_at >= self.interval:
            self.stream.write(self._line.rstrip() + "\n")
            self._logged_at = now
        self._line = ""

    def flush(self) -> None:
        self.stream.flush()

    def close_line(self) -> None:
        """Write an unfinished line (a command's output that did not end with a newline)."""
        with self._lock:
            if self._line.strip():
                self.stream.write(self._line.rstrip() + "\n")
            self._line = ""
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _split(text: str) -> list[str]:
    out, start = [], 0
    for i, c in enumerate(text):
        if c in "\r\n":
            if i > start:
                out.append(text[start:i])
            out.append(c)
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


class Tee:
    """Writes to a terminal-side stream as it is and to a LineLog of a file."""

    def __init__(self, stream, log: LineLog):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def command_output(log_file: str | None = None, interval: float = 30.0):
    """stdout/stderr for one command: also written to ``log_file`` (appended) when given, and with progress
    bars collapsed where stderr is not a terminal."""
    out, err = sys.stdout, sys.stderr
    logs = []
    new_err = err if err is None or _isatty(err) else LineLog(err, interval)  # None: pythonw, no console
    logs += [] if new_err is err else [new_err]
    f = None
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        f = open(log_file, "a", encoding="utf-8")
        out_log, err_log = LineLog(f, interval), LineLog(f, interval)  # one line buffer per stream
        logs += [out_log, err_log]
        sys.stdout, new_err = (Tee(out, out_log) if out is not None else out_log,
                               Tee(new_err, err_log) if new_err is not None else err_log)
    sys.stderr = new_err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for log in logs:
            log.close_line()
        if f is not None:
            f.close()
