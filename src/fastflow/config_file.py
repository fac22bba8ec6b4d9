"""``--config FILE``: a command's options read from a TOML or YAML file, as if typed before the others.

    # bottle.toml                              fastflow train --config bottle.toml --epochs 3
    data = "data/mvtec_ad"
    category = "bottle"
    output = "runs/bottle"
    input-size = 256            # keys: the long option names, with dashes or underscores
    augment = true              # a switch: true gives it, false leaves it out
    normal-dir = ["a/", "b/"]   # a repeatable option: a list

    [predict]                   # a table named after a command applies to that command only
    threshold = 1.5

Options given on the command line win over the file's (a repeatable option given there replaces the file's
list). Positional arguments (RUN_DIR, images) are not read from the file. An unknown key is an error that
lists the known ones. TOML is read with the standard library (Python >= 3.11, else the ``tomli`` package);
YAML needs PyYAML (``pip install pyyaml``).
"""

from __future__ import annotations

import argparse
import os

SKIPPED = ("--help", "--config")  # options a file cannot set


def config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in a command's arguments (after the verb), or None."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    return known.config


def read_options(path: str) -> dict:
    """The mapping in a .toml, .yaml or .yml file; a ValueError (one line) when it cannot be read."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"--config {path}: expected a .toml, .yaml or .yml file, got {ext or 'no extension'!r}")
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: file not found")
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError(f"--config {path}: reading TOML on Python < 3.11 needs tomli: pip install tomli")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: YAML needs PyYAML: pip install pyyaml, or write the file as "
                             f"TOML (.toml)") from None
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got a "
                         f"{type(data).__name__}")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--") and s not in SKIPPED}


def config_argv(parser: argparse.ArgumentParser, verb: str, verbs: list[str], values: dict, given: list[str],
                path: str) -> list[str]:
    """The options of ``values`` (the file's keys for ``verb``'s ``parser``) as command-line tokens;
    repeatable options also in ``given`` (the command line) are left to the command line."""
    own = values.get(verb) if isinstance(values.get(verb), dict) else {}
    merged = {**{k: v for k, v in values.items() if k not in verbs}, **own}
    options = _options(parser)
    tokens = []
    for key, value in merged.items():
        name = "--" + str(key).replace("_", "-")
        action = options.get(name)
        if action is None:
            known = ", ".join(sorted(o[2:] for o in options))
            raise ValueError(f"--config {path}: unknown option {key!r} for fastflow {verb}; known: {known}")
        tokens += _tokens(name, action, value, path, given)
    return tokens


def _tokens(name: str, action: argparse.Action, value, path: str, given: list[str]) -> list[str]:
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {name[2:]} is a switch: give true or false, got {value!r}")
        return [name] if value else []
    if action.nargs == "?" and isinstance(value, bool):  # an option whose value may be left out: true = given bare
        return [name] if value else []
    if isinstance(action, argparse._AppendAction):
        if any(g == name or g.startswith(name + "=") for g in given):
            return []
        return [f"{name}={_text(v)}" for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, bool) or isinstance(value, dict):
        raise ValueError(f"--config {path}: {name[2:]} takes a value, got {value!r}")
    text = ",".join(map(_text, value)) if isinstance(value, list) else _text(value)
    return [f"{name}={text}"]


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
