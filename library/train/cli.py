"""kohya-compatible command line: argv (+ --config_file TOML) -> a plain dict of values.

Precedence is kohya's: command line > --config_file > argparse defaults. Unlike kohya, unknown flags and
unknown config-file keys are errors with a suggestion, and abbreviations are not accepted (a typo must
not silently select another flag). `parse_args` also reports which flags the user actually gave, so the
dataset layer can apply kohya's "first non-None of subset, dataset, general, CLI" chain with only real
CLI values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import toml

from library.atomic import write_text_atomic
from library.errors import UserError, closest
from library.train.flags import FLAGS, Flag

# Keys never written by --output_config or beside the outputs (kohya drops the first three; tokens are secrets).
_NOT_SAVED = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}


def int_or_float(text: str) -> int | float:
    """kohya's int_or_float: '10' -> 10, '0.1' -> 0.1 (a ratio), '10%' -> 0.1."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, a float or N%, got {text!r}") from None


_TYPES = {"str": str, "int": int, "float": float, "int_or_float": int_or_float}


def _add(parser: argparse.ArgumentParser, flag: Flag, suppress_defaults: bool) -> None:
    default = argparse.SUPPRESS if suppress_defaults else flag.default
    if flag.kind == "flag":
        parser.add_argument(f"--{flag.name}", action="store_true", default=default, help=flag.help)
        return
    kwargs: dict[str, Any] = {"type": _TYPES[flag.kind], "default": default, "help": flag.help}
    if flag.choices is not None:
        kwargs["choices"] = flag.choices
    if flag.nargs is not None:
        kwargs["nargs"] = flag.nargs
    parser.add_argument(f"--{flag.name}", **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2 through run_main) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"command line: {message}")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flux_train_network.py",
        description="Train a FLUX.1 LoRA (kohya sd-scripts compatible flags).",
        allow_abbrev=False,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        group = groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        _add(group, flag, suppress_defaults)  # type: ignore[arg-type]
    return parser


FLAG_BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}


def suggest(name: str) -> str:
    """' (did you mean --x?)' for the closest known flag, or ''."""
    close = closest(name.lstrip("-").split("=")[0], FLAG_BY_NAME)
    return f" (did you mean --{close}?)" if close else ""


@dataclass(frozen=True)
class ParsedArgs:
    values: dict[str, Any]  # every flag, with defaults filled in
    given: frozenset[str]  # flags set on the command line or in --config_file


def _reject_unknown(argv: Sequence[str]) -> None:
    parser = build_parser(suppress_defaults=True)
    _, unknown = parser.parse_known_args(list(argv))
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        raise UserError(f"command line: unknown argument {flags[0]}{suggest(flags[0])}")
    if unknown:
        raise UserError(f"command line: unexpected value {unknown[0]!r}; flags take the form --name value")


def read_config_file(path: str) -> dict[str, Any]:
    """kohya's --config_file: '.toml' is appended when missing; [sections] are flattened."""
    file = Path(path if path.endswith(".toml") else path + ".toml")
    if not file.is_file():
        raise UserError(f"{file}: --config_file not found")
    try:
        data = toml.load(file)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            if sub_key not in FLAG_BY_NAME or sub_key in ("config_file", "output_config"):
                raise UserError(f"{file}: unknown key {sub_key!r}{suggest(sub_key)}")
            flat[sub_key] = _coerce(file, FLAG_BY_NAME[sub_key], sub_value)
    return flat


def _coerce(file: Path, flag: Flag, value: Any) -> Any:
    """Check a TOML value against the flag's type (argparse never sees file values)."""
    def one(v: Any) -> Any:
        if flag.kind == "flag":
            if not isinstance(v, bool):
                raise UserError(f"{file}: {flag.name}: expected true or false, got {v!r}")
            return v
        if flag.kind in ("int", "float", "int_or_float") and isinstance(v, str):
            try:
                v = _TYPES[flag.kind](v)
            except (ValueError, argparse.ArgumentTypeError):
                raise UserError(f"{file}: {flag.name}: expected a number, got {v!r}") from None
        if flag.kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise UserError(f"{file}: {flag.name}: expected an integer, got {v!r}")
        if flag.kind == "float" and not isinstance(v, (int, float)):
            raise UserError(f"{file}: {flag.name}: expected a number, got {v!r}")
        if flag.kind == "float":
            v = float(v)
        if flag.kind == "str" and not isinstance(v, str):
            v = str(v)
        if flag.choices is not None and v not in flag.choices:
            raise UserError(f"{file}: {flag.name}: {v!r} is not one of {[c for c in flag.choices if c is not None]}")
        return v

    if flag.nargs == "*":
        return [one(v) for v in (value if isinstance(value, list) else [value])]
    return one(value)


def parse_args(argv: Sequence[str]) -> ParsedArgs:
    """argv (without the program name) -> all values + the set of flags the user gave."""
    _reject_unknown(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(list(argv)))
    # --output_config writes the command line to --config_file; it does not read the file
    reading = explicit.get("config_file") and not explicit.get("output_config")
    file_values = read_config_file(explicit["config_file"]) if reading else {}
    parser = build_parser()
    parser.set_defaults(**file_values)
    values = vars(parser.parse_args(list(argv)))
    given = frozenset(explicit) | frozenset(file_values)
    return ParsedArgs(values=values, given=given)


def non_default_values(parsed: ParsedArgs) -> dict[str, Any]:
    """The values that differ from the argparse defaults (what --output_config and the saved config hold)."""
    return {
        k: v for k, v in parsed.values.items()
        if k not in _NOT_SAVED and v != FLAG_BY_NAME[k].default and v is not None
    }


def write_config_file(parsed: ParsedArgs) -> Path:
    """--output_config: write the non-default arguments to --config_file; never overwrite."""
    path = parsed.values.get("config_file")
    if not path:
        raise UserError("command line: --output_config needs --config_file PATH to write to")
    file = Path(path if path.endswith(".toml") else path + ".toml")
    if file.exists():
        raise UserError(f"{file}: already exists; --output_config does not overwrite, choose another path")
    write_toml_atomic(file, non_default_values(parsed))
    return file


def write_toml_atomic(file: Path, values: dict[str, Any]) -> None:
    write_text_atomic(file, toml.dumps(values))
