"""The README is a user's guide: short, and every command it shows is one the CLI has.

The verbs and their options are read from the CLI's own parser at run time (``fastflow.cli._build_parser``),
so a verb added to the CLI or dropped from it, or an option renamed, shows up here without editing the test.
Commands are taken from the README's code: fenced blocks, indented blocks and inline code spans, wherever
``fastflow VERB`` stands in command position (line start, after ``python -m`` / ``torchrun ... -m``, after
environment assignments or ``&&``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fastflow.cli import _build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_LINES = 300  # issue 18: the README is a user's guide; logs and timings live in bench/README.md
CORE_VERBS = {"train", "evaluate", "predict", "export"}  # the quick start's: the scan must find at least these


def _code(text: str) -> list[str]:
    """Every line of code in a Markdown text: fenced and indented block lines, and inline code spans."""
    out, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():  # shell line continuations joined
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            out.append(line)
        else:
            out.extend(re.findall(r"`([^`]+)`", line))
    return out


def _commands(text: str) -> list[tuple[str, list[str], str]]:
    """(verb, options, source line) for each ``fastflow VERB ...`` in the code of ``text``."""
    found = []
    for line in _code(text):
        line = re.sub(r"\s+#\s.*$", "", line.strip())  # shell comments
        for segment in re.split(r"\s(?:&&|\|\||\||;)\s", line):
            tokens = segment.split()
            for i, token in enumerate(tokens):
                if token != "fastflow" or i + 1 >= len(tokens):
                    continue
                before = tokens[:i]
                in_command_position = (not before or before[-1] == "-m"
                                       or all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", t) for t in before))
                if not in_command_position or tokens[i + 1].startswith("-"):
                    continue  # prose such as "import fastflow", or `fastflow --help`
                options = [re.sub(r"=.*$", "", t.strip("[]")) for t in tokens[i + 2:] if t.strip("[").startswith("--")]
                found.append((tokens[i + 1], options, line))
    return found


def _cli_verbs() -> dict[str, argparse.ArgumentParser]:
    """The CLI's verbs and their parsers, from the parser ``fastflow`` itself uses."""
    parser = _build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("fastflow's parser has no subcommands")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_is_under_300_lines():
    n = len(_readme().splitlines())
    assert n < MAX_LINES, (f"README.md has {n} lines; the user's guide must stay under {MAX_LINES}: move "
                           f"measurements, dated timings and logs to bench/README.md")


def test_readme_commands_are_found():
    """The scan itself works: the quick start's four verbs are among the commands it finds."""
    named = {verb for verb, _, _ in _commands(_readme())}
    assert CORE_VERBS <= named, f"README commands found: {sorted(named)}; expected at least {sorted(CORE_VERBS)}"


def test_readme_verbs_are_cli_verbs():
    cli = _cli_verbs()
    commands = _commands(_readme())
    named = sorted({verb for verb, _, _ in commands})
    unknown = {verb: line for verb, _, line in commands if verb not in cli}
    assert not unknown, (f"README.md names verbs the CLI does not have: "
                         + "; ".join(f"{v!r} in `{line}`" for v, line in sorted(unknown.items()))
                         + f". The CLI's verbs: {sorted(cli)}; the README's: {named}")


def test_every_cli_verb_is_in_the_readme():
    cli = _cli_verbs()
    named = {verb for verb, _, _ in _commands(_readme())}
    missing = sorted(set(cli) - named)
    assert not missing, (f"CLI verbs with no command line in README.md: {missing} (the README's: {sorted(named)}); "
                         f"show each in the user's guide")


def test_readme_options_exist():
    cli = _cli_verbs()
    wrong = []
    for verb, options, line in _commands(_readme()):
        if verb not in cli:
            continue  # reported by test_readme_verbs_are_cli_verbs
        known = cli[verb]._option_string_actions
        wrong += [f"{option} in `{line}`" for option in options if option not in known]
    assert not wrong, "README.md shows options its verb does not take: " + "; ".join(wrong)


def test_scan_reads_command_positions_only():
    """The scanner on a made-up text: commands in every position it should read, and none in prose or code."""
    text = "\n".join([
        "    fastflow train --data d [--json]   # a comment --not-an-option",
        "```bash",
        "OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m fastflow evaluate run --report && fastflow info run",
        "from fastflow import Predictor",
        "```",
        "Prose with `fastflow predict run x --output o` inline, `fastflow[export]`, `python -m fastflow`, and",
        "`fastflow.data.synthetic`, and `fastflow --help`.",
        "    fastflow export run --format onnx \\",
        "                    --output m.onnx",
    ])
    assert [(v, o) for v, o, _ in _commands(text)] == [
        ("train", ["--data", "--json"]), ("evaluate", ["--report"]), ("info", []), ("predict", ["--output"]),
        ("export", ["--format", "--output"])]


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_links_resolve():
    """Every relative link of the README names a file of the repository, and a heading there when it has #."""
    root = README.parent
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _readme()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s): not checked offline
        path, _, anchor = target.partition("#")
        file = root / path if path else README
        if not file.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {path or 'README.md'})")
    assert not broken, "README.md links that lead nowhere: " + "; ".join(broken)
