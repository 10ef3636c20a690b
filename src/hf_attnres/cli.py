"""`hf-attnres`: a thin command line over the library; each subcommand lives beside the code it drives.

A subcommand module exposes `register(subparsers)`. A job's options are generated from the dataclass its
Python entry point takes (`add_job`): the field's type, default and `metadata["help"]` are written once, in
the dataclass, and `--config FILE.yaml|.json` fills the same fields (flags on the command line win).
Errors a user can fix (bad values, unreadable files, a read-only folder, a full disk) end in one line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import importlib
import importlib.util
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Modules that provide subcommands; a module that is not (yet) part of the install is skipped.
SUBCOMMAND_MODULES = (
    "hf_attnres.demo",
    "hf_attnres.conversion.cli",
    "hf_attnres.training.cli",
    "hf_attnres.inspection.cli",
    "hf_attnres.ab.cli",
)
# Field metadata read here, beside HfArgumentParser's "help", "aliases", "choices" and "metavar":
# "positional": the option is the positional argument of that name (e.g. MODEL); "flag": the option's name when
# it is not the field's (e.g. --verify for convert_verify); "group": its --help section.
POSITIONAL, FLAG, GROUP = "positional", "flag", "group"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error reported in one line (what was wrong, where to look)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclasses.dataclass
class _Option:
    """One dataclass field as a command-line option."""

    name: str
    action: argparse.Action
    required: bool
    default: Any = dataclasses.MISSING  # a default the subcommand gives a field that has none (overrides)


def _argument_kwargs(field: dataclasses.Field, metadata: dict, hint: Any) -> dict:
    """add_argument keywords of a field from its type hint, as HfArgumentParser derives them, plus what it lacks:
    `--x/--no-x` for booleans, `--data a --data b` for lists. Written here rather than calling HfArgumentParser's
    private `_parse_dataclass_field`, whose signature is not a public contract."""
    kwargs = {k: v for k, v in metadata.items() if k in ("help", "choices", "metavar") and v is not None}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    origin, inner = typing.get_origin(base), typing.get_args(base)
    if base is bool:  # --flag / --no-flag, never a value that could eat the positional MODEL
        return {"action": argparse.BooleanOptionalAction, "help": kwargs.get("help")}
    if origin is tuple:
        kwargs.update(type=inner[0], nargs=len(inner))
    elif origin is list:  # lists: `--data a b` and `--data a --data b` alike
        kwargs.update(type=inner[0], nargs="+", action="extend")
    elif base in (int, float, str):
        kwargs["type"] = base
    else:  # e.g. `str | int`: the text is passed on, the library accepts either
        kwargs["type"] = str
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    return kwargs


def _default_text(field: dataclasses.Field) -> str | None:
    """The default as --help shows it, from the dataclass (None: nothing worth showing)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    if value is None or value is False or value == [] or value == ():
        return None
    if value is True:
        return "on"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            overrides: dict[str, dict] | None = None) -> dict[str, _Option]:
    """Add an option per field of `cls` to `parser`; `overrides` changes a field's help, choices, metavar,
    default or `cli` (False: no option).

    Options default to SUPPRESS, so the parsed namespace holds only what the command line gave: the
    dataclass's own defaults then apply, after the values of a --config file.
    """
    overrides = overrides or {}
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    options = {}
    for field in dataclasses.fields(cls):
        extra = overrides.get(field.name, {})
        if not field.init or {**field.metadata, **extra}.get("cli") is False:
            continue
        metadata = {**field.metadata, **{k: v for k, v in extra.items() if k in ("help", "choices", "metavar")}}
        kwargs = _argument_kwargs(field, metadata, hints[field.name])
        required = kwargs.pop("required", False) and "default" not in extra
        if extra.get("required") is False:
            required = False
        shown = str(extra["default"]) if extra.get("default") is not None else _default_text(field)
        help_text = kwargs.get("help") or ""
        if shown is not None and "default:" not in help_text:
            help_text = f"{help_text} (default: {shown})".strip()
        kwargs.update(help=help_text.replace("%", "%%") or None, default=argparse.SUPPRESS)
        target = parser
        if group := metadata.get(GROUP):
            target = groups.get(group) or groups.setdefault(group, parser.add_argument_group(group))
        if positional := metadata.get(POSITIONAL):
            kwargs.pop("required", None)
            if kwargs.get("nargs") is None:
                kwargs["nargs"] = "?"  # optional to argparse: a --config file may give it
            action = target.add_argument(field.name, metavar=positional, **kwargs)
        else:
            aliases = field.metadata.get("aliases", [])
            flag = field.metadata.get(FLAG) or f"--{field.name.replace('_', '-')}"
            names = [flag, *([aliases] if isinstance(aliases, str) else aliases)]
            action = target.add_argument(*names, dest=field.name, **kwargs)
        options[field.name] = _Option(field.name, action, required, extra.get("default", dataclasses.MISSING))
    return options


def _coerce(value: Any, action: argparse.Action, where: str) -> Any:
    """A --config value converted and checked as the command line would convert and check it."""
    if value is None:
        return None
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)
    items = list(value) if many and isinstance(value, (list, tuple)) else [value]
    convert = action.type
    if isinstance(action, argparse.BooleanOptionalAction):
        from transformers.hf_argparser import string_to_bool as convert
    out = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ValueError(f"{where}: expected a single value, got {item!r}.")
        if convert is str and not isinstance(item, bool):
            item = str(item)
        elif convert is not None and isinstance(item, str):
            try:
                item = convert(item)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise ValueError(f"{where}: {item!r} is not a valid value ({e}).") from None
        elif convert in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise ValueError(f"{where}: {item!r} is not a number.")
        elif convert is int and isinstance(item, float):
            raise ValueError(f"{where}: {item!r} is not a whole number.")
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}.")
        out.append(float(item) if convert is float and isinstance(item, int) else item)
    return out if many else out[0]


def read_config_file(path: str | Path, options: dict[str, _Option]) -> dict[str, Any]:
    """Field values from a YAML or JSON file of `option: value` lines (`max_steps` or `max-steps`)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e}).") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"--config {path}: not valid YAML{at} ({getattr(e, 'problem', None) or e}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected `option: value` lines (a mapping), got a {type(data).__name__}.")
    names = {o.action.option_strings[0].lstrip("-").replace("-", "_"): n for n, o in options.items()
             if o.action.option_strings}
    values = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        name = name if name in options else names.get(name, name)
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--config {path}: unknown option {key!r}{hint}; the keys are the long options "
                             "without dashes, e.g. max_steps.")
        values[name] = _coerce(value, options[name].action, f"--config {path}: {key}")
    return values


def config_from_args(args: argparse.Namespace, cls: type, options: dict[str, _Option]):
    """`cls` built from the dataclass defaults, then the --config file, then the command line."""
    values = read_config_file(args.config, options) if getattr(args, "config", None) else {}
    values.update({name: getattr(args, name) for name in options if hasattr(args, name)})
    for option in options.values():
        if option.name in values:
            continue
        if option.required:
            action = option.action
            flag = action.metavar if not action.option_strings else action.option_strings[0]
            raise ValueError(f"{flag} is required (on the command line, or as `{option.name}:` in --config).")
        if option.default is not dataclasses.MISSING:
            values[option.name] = option.default
    return cls(**values)


def add_job(subparsers: argparse._SubParsersAction, name: str, cls: type, job: Callable[[Any], int | None], *,
            overrides: dict[str, dict] | None = None, **parser_kwargs) -> argparse.ArgumentParser:
    """Add subcommand `name`: the fields of `cls` as options, `job(cls(...))` as what it runs."""
    parser_kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = subparsers.add_parser(name, **parser_kwargs)
    options = add_dataclass_arguments(parser, cls, overrides)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="a YAML or JSON file of `option: value` lines (e.g. `max_steps: 200`); options on the "
                        "command line override it")
    def make_config(args: argparse.Namespace):
        return config_from_args(args, cls, options)

    parser.set_defaults(func=lambda args: job(make_config(args)), make_config=make_config)
    return parser


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # parent package missing
        return False


def build_parser() -> argparse.ArgumentParser:
    from hf_attnres.modeling.configuration_attnres import ATTNRES_VERSION

    parser = ArgumentParser(
        prog="hf-attnres",
        description="Attention Residuals (AttnRes, arXiv 2603.15031) for HuggingFace transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-attnres {ATTNRES_VERSION}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if _module_exists(name):
            importlib.import_module(name).register(subparsers)
    return parser


def parse_config(argv: list[str]):
    """The config a command line gives its job, e.g. `parse_config(["train", "m", "--output-dir", "o"])` is the
    `TrainConfig` that `hf-attnres train m --output-dir o` trains with."""
    args = build_parser().parse_args(argv)
    return args.make_config(args)


def describe_os_error(e: OSError) -> str:
    """What went wrong with a file and what to do, in one line."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{' writing' + where if where else ''}: free some space or write to " \
               "another folder (--output-dir)."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where} ({e.strerror}): choose a folder you can write to (--output-dir) or change its " \
               "permissions."
    if e.errno == errno.ENOTDIR:
        return f"cannot create{where}: part of that path is a file, not a folder; choose another --output-dir."
    if e.errno is None or not e.strerror:  # raised by our code or a library with its own message
        return " ".join(str(e).split())
    return f"{e.strerror}:{where}."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed in one line)
        return e.code if isinstance(e.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, PermissionError, a full disk, a Hub error, ...
        print(f"hf-attnres {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:  # user-facing errors carry their own message
        print(f"hf-attnres {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
