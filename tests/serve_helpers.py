"""HTTP helpers for the tests of ``fastflow serve``: a real server process on a free port, and plain
urllib requests (no client library needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``python -m fastflow serve ARGS`` on a free port; returns (process, base URL) once /health answers."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "fastflow", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout} s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
            timeout: float = 120.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict]:
    """(field, file name or None for a text field, bytes) parts -> (body, headers) of a multipart request."""
    boundary = uuid.uuid4().hex
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        body += (b"Content-Type: image/png\r\n" if filename else b"") + b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_images(url: str, images: list[tuple[str, bytes]], query: str = "") -> tuple[int, dict, bytes]:
    body, headers = multipart([("file", name, data) for name, data in images])
    return request(f"{url}/predict{query}", body, headers)


