"""--config FILE (TOML / YAML options of a command, the command line winning) and --log-file FILE (what a
command prints, with progress bars as one line, not one per redraw), through ``fastflow.cli.main``."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from fastflow.cli import _build_parser, _check_resume_options, _subparsers, _with_config_file, main
from fastflow.log_file import LineLog, command_output
from helpers import cli




def _image(tiny_run) -> str:
    return os.path.join(tiny_run[1], "test", "good", "000.png")


def test_toml_options_apply_and_the_command_line_wins(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = tmp_path / "predict.toml"
    cfg.write_text(f'quiet = true\n[predict]\noutput = "{out}"\nthreshold = 123.5\nbatch_size = 2\n'
                   f'[train]\nepochs = 99   # another command\'s table is not read\n')
    rc, stdout, err = cli(capsys, "predict", tiny_run[0], _image(tiny_run), "--config", cfg)
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["threshold"]["value"] == 123.5
    assert "1 image(s) scored" in stdout and "threshold 123.5" in stdout
    rc, stdout, err = cli(capsys, "predict", tiny_run[0], _image(tiny_run), "--config", cfg, "--threshold", "7",
                          "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["threshold"]["value"] == 7.0


def test_config_values_become_the_options_they_name(tmp_path):
    parser = _build_parser()
    cfg = tmp_path / "train.toml"
    cfg.write_text('normal-dir = ["a", "b"]\ninput_size = [64, 48]\nlevels = [1, 2]\naugment = true\n'
                   'no-cache = false\nautocontrast = 2.5\nlr = 0.002\noutput = "runs/x"\n')
    args = parser.parse_args(_with_config_file(parser, ["train", "--config", str(cfg), "--lr", "0.1"]))
    assert args.normal_dir == ["a", "b"] and args.input_size == (64, 48) and args.levels == (1, 2)
    assert args.augment == "paper" and args.no_cache is False and args.autocontrast == 2.5  # true: --augment bare
    assert args.lr == 0.1 and args.output == "runs/x"  # the command line wins ...
    args = parser.parse_args(_with_config_file(parser, ["train", "--config", str(cfg), "--normal-dir", "c"]))
    assert args.normal_dir == ["c"]  # ... a repeatable option's list too
    cfg.write_text('augment = "pose"\nautocontrast = true\n')
    args = parser.parse_args(_with_config_file(parser, ["train", "--config", str(cfg)]))
    assert args.augment == "pose" and args.autocontrast == 1.0  # a value, or true for the option's bare form


def test_yaml_file_with_underscore_keys(tmp_path):
    parser = _build_parser()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 3\nruntime: torch\nimages: some/dir\n")
    args = parser.parse_args(_with_config_file(parser, ["benchmark", "RUN", "--config", str(cfg)]))
    assert (args.batch_size, args.runtime, args.images, args.run_dir) == (3, "torch", "some/dir", "RUN")


def test_yaml_without_pyyaml_says_to_install_it_or_use_toml(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    cfg = tmp_path / "c.yml"
    cfg.write_text("quiet: true\n")
    rc, _, err = cli(capsys, "info", "RUN", "--config", cfg)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pip install pyyaml" in err and "TOML" in err


@pytest.mark.parametrize("text, expected", [
    ("bach-size = 4\n", "unknown option 'bach-size' for fastflow predict; known: "),
    ("quiet = 1\n", "quiet is a switch: give true or false"),
    ("threshold = [\n", "not valid TOML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    rc, _, err = cli(capsys, "predict", "RUN", "x.png", "--config", cfg)
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
    if "unknown" in expected:
        assert "batch-size" in err and "threshold" in err and "output" in err  # the known keys are listed
    rc, _, err = cli(capsys, "predict", "RUN", "x.png", "--config", tmp_path / "c.json")
    assert rc == 2 and ".toml, .yaml or .yml" in err


def test_every_command_takes_config_and_log_file():
    for name, verb in _subparsers(_build_parser()).items():
        options = {s for a in verb._actions for s in a.option_strings}
        assert {"--config", "--log-file"} <= options, name


def test_resume_accepts_config_and_log_file(tmp_path):
    args = _build_parser().parse_args(["train", "--resume", str(tmp_path), "--log-file", str(tmp_path / "l.txt")])
    _check_resume_options(args)  # raises if refused


def test_line_log_keeps_a_progress_bars_last_state_not_every_redraw():
    buf = io.StringIO()
    log = LineLog(buf, interval=3600.0)
    for i in range(1, 101):
        log.write(f"\rtrain: {i}/100 |###|")
    log.write("\n")
    log.write("done in 2 s\n")
    log.write("partial")
    log.close_line()
    assert buf.getvalue() == "train: 100/100 |###|\ndone in 2 s\npartial\n"
    buf = io.StringIO()
    log = LineLog(buf, interval=0.0)  # a long bar: its state every `interval` seconds
    for i in range(1, 4):
        log.write(f"\repoch {i}/3")
    log.write("\n")
    assert buf.getvalue() == "epoch 1/3\nepoch 2/3\nepoch 3/3\n"


def test_log_file_gets_what_predict_prints_without_progress_bar_spam(tiny_run, tmp_path, capsys):
    log = tmp_path / "logs" / "predict.log"
    images = [_image(tiny_run)] * 1 + [os.path.join(tiny_run[1], "test", "good", "001.png")]
    rc, out, err = cli(capsys, "predict", tiny_run[0], *images, "--output", tmp_path / "o", "--batch-size", 1,
                       "--log-file", log)
    assert rc == 0, err
    text = log.read_text()
    assert "\r" not in text and "\r" not in err  # stderr here is not a terminal: collapsed as well
    assert "2 image(s) scored" in text and "2 image(s) scored" in out
    bar_lines = [line for line in text.splitlines() if line.startswith("predict:")]
    assert len(bar_lines) == 1 and "2/2" in bar_lines[0]
    # errors go to the log too, appended
    rc, _, err = cli(capsys, "predict", tiny_run[0], tmp_path / "nope.png", "--output", tmp_path / "o",
                     "--log-file", log)
    assert rc == 2 and "nope.png" in log.read_text().splitlines()[-1] and text in log.read_text()


def test_unwritable_log_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, _, err = cli(capsys, "info", "RUN", "--log-file", tmp_path / "file" / "log.txt")
    assert rc == 2 and len(err.splitlines()) == 1 and "--log-file" in err


def test_command_output_restores_the_streams(tmp_path):
    out, err = sys.stdout, sys.stderr
    with command_output(str(tmp_path / "l.txt")):
        print("hello")
        assert sys.stdout is not out
    assert (sys.stdout, sys.stderr) == (out, err)
    assert (tmp_path / "l.txt").read_text() == "hello\n"
