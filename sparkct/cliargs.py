"""The pieces every ``sparkct`` sub-command's parser is built from: the parser class and its help
formatter, a config dataclass's fields as ``--flags`` (and back), the argument types, and the one-line
report of a user's mistake.

A leaf: it imports nothing from sparkct but :mod:`sparkct.errors`, and no torch or numpy, so any layer's
command module may use it and ``sparkct -h`` stays instant.

A field becomes a flag through its metadata, written with :func:`option`::

    @dataclass
    class Settings:
        size: int | None = option("output rows = cols", default=None)
        workers: int = option("worker processes", default=1, flags=("-j", "--jobs"), metavar="JOBS")
        antialias: bool = option("no low-pass before shrinking", default=True, negate=True)  # --no-antialias
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

from sparkct.errors import TrainingDiverged, TrainingInterrupted, UserError

__all__ = [
    "HelpFormatter",
    "Parser",
    "add_dataclass_args",
    "arg_type",
    "base_type",
    "dataclass_from_args",
    "flag",
    "option",
    "output_file",
    "parse_bool",
    "parse_field",
    "run_command",
    "tuple_of",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, defaults shown."""


class Parser(argparse.ArgumentParser):
    """Every sparkct (sub)parser: defaults in the help. Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # A user's mistake is one line with status 2, as run_command reports the others (`sparkct -h` promises
        # it); argparse's default prints the whole usage block first. -h still prints the usage.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def option(
    help: str = "",
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    flags: tuple[str, ...] = (),
    negate: bool = False,
    **argparse_kwargs,
) -> Any:
    """A dataclass field with its command-line form: `help`; its `default` (or `default_factory`);
    `flags` (default: ``--field-name``); `negate` (a bool field that is on by default, given as
    ``--no-field-name``); any other keyword (``choices``, ``metavar``, ``action="store_true"``) goes to
    ``add_argument`` as it is."""
    meta: dict[str, Any] = {"help": help}
    if flags:
        meta["flags"] = tuple(flags)
    if negate:
        meta["negate"] = True
    if argparse_kwargs:
        meta["argparse"] = argparse_kwargs
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The flag of a field: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def parse_bool(s: str) -> bool:
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def tuple_of(tp) -> Callable[[str], tuple]:
    """The parser of a ``tuple[X, ...]`` annotation: comma-separated values."""
    inner = typing.get_args(tp)[0]

    def parse(s: str):
        try:
            return tuple(inner(x) for x in s.replace(" ", "").split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {inner.__name__}s, got {s!r}") from None

    return parse


def base_type(tp) -> tuple[Any, bool]:
    """(scalar type, optional) of an annotation like ``int | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing})  # annotations are strings under `from __future__ import annotations`
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        if typing.get_origin(tp) in (tuple,):
            return tp, False
        return (non_none[0] if len(non_none) == 1 else str), len(non_none) < len(args)
    return tp, False


def arg_type(tp) -> Callable[[str], Any]:
    """The string -> value parser of a scalar type from :func:`base_type`."""
    if tp is bool:
        return parse_bool
    if typing.get_origin(tp) is tuple:
        return tuple_of(tp)
    return tp


def parse_field(cls, name: str, value: str) -> Any:
    """`value` (a string) converted by the type of dataclass `cls`'s field `name` (e.g. ``--set k=v``)."""
    tp, _ = base_type(typing.get_type_hints(cls)[name])
    return arg_type(tp)(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _negated_dest(name: str) -> str:
    return "no_" + name


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls,
    defaults: dict | None = None,
    *,
    title: str | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One --flag per field of dataclass `cls` (underscores -> dashes), typed from the annotation, with the
    field's help (and the rest of its :func:`option` metadata); `defaults` override the dataclass defaults
    (e.g. a method's preferred optimizer)."""
    group = parser.add_argument_group(title) if title else parser
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = defaults.get(f.name, _default(f))
        help = f.metadata.get("help", "")
        if f.metadata.get("negate"):
            group.add_argument(
                flag(_negated_dest(f.name)),
                dest=_negated_dest(f.name),
                action="store_true",
                default=not default,
                help=help,
            )
            continue
        tp, _ = base_type(hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help}
        extra = f.metadata.get("argparse", {})
        if "action" not in extra:
            kw["type"] = arg_type(tp)
            if tp is bool:
                kw.update(metavar="{true,false}", nargs="?", const=True)  # a bare --flag means true
            elif typing.get_origin(tp) is tuple:
                kw["metavar"] = "A,B"
        kw.update(extra)
        group.add_argument(*f.metadata.get("flags", (flag(f.name),)), **kw)


def dataclass_from_args(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    """`cls` from the parsed flags; fields in `skip` keep their defaults (flags of the same name that
    belong to something else, e.g. a fine-tuning task's --labels)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        if f.metadata.get("negate"):
            if hasattr(args, _negated_dest(f.name)):
                kw[f.name] = not getattr(args, _negated_dest(f.name))
        elif hasattr(args, f.name):
            kw[f.name] = getattr(args, f.name)
    return cls(**kw)


def output_file(path: str, what: str) -> str:
    """Check that `path` can be written as a new file: its folder exists and it is not a folder. `what`
    names it in the error (its flag)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"{what} {path!r}: folder {d!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder")
    return path


def run_command(
    func: Callable[[argparse.Namespace], int], args: argparse.Namespace, name: str, *, verbose: bool = False
) -> int:
    """``func(args)``'s exit status, with a user's mistake (:class:`~sparkct.errors.UserError`, a missing
    or unwritable path) printed as one line ``NAME: error: ...`` and status 2 (the traceback only with
    `verbose`), a diverged run as one line and status 1, a run stopped by a signal as its line (checkpoint,
    resume command) and 128 + the signal's number, and any other interrupt as status 130."""
    try:
        return func(args)
    except TrainingDiverged as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError) as e:
        if verbose:
            raise
        msg = (
            str(e)
            if isinstance(e, UserError) or not getattr(e, "filename", None)
            else f"{e.strerror or e}: {e.filename}"
        )
        print(f"{name}: error: {msg}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # a run that stopped cleanly: where it is and how to go on
        print(f"{name}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`sparkct pretrain --list | head`): stop quietly, as a shell tool would;
        # stdout goes to devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
