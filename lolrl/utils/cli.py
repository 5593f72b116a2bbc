"""Command lines generated from typed dataclasses, with ``transformers.HfArgumentParser``'s conventions.

Each field of a settings dataclass is one flag ``--name``; its help text lives in the field's
metadata and its default is written once, on the field. Metadata keys:

* ``help``: the help text; ``aliases``: the original's short flags (``["-bs"]``);
* ``choices``: allowed values (``Literal[...]`` types give them too);
* ``min`` / ``max``: the allowed range (inclusive), checked after parsing;
* ``ignored``: True for a flag the original accepted but did not read; it parses and ``--help``
  labels it "accepted, ignored (as in the original)";
* ``hidden``: accepted, left out of ``--help``;
* ``const``: the value of the flag given alone (``--resume`` = ``--resume must``);
* ``no_aliases`` / ``no_value``: more spellings of ``--no_<name>``, and its value for a non-boolean
  field (``--no_resume`` = ``--resume never``).

A dataclass with a field ``given_flags`` (``init=False``) gets the names of the fields set on the
command line or in the ``--config`` file.

Booleans parse as ``--flag`` (True), ``--flag True/False/yes/no/1/0`` and, for those on by default,
``--no_flag``; ``X | None``
fields also take ``none``. ``--config FILE.yaml`` reads values from a YAML mapping of field names;
values given on the command line win. Every parse error (unknown flag, wrong type, value out of
range, unknown key in the YAML file, a dataclass's own check) is one line ``error: ...`` naming the
flag and what was expected, with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from lolrl.utils.errors import USER_ERROR_STATUS, UserError

IGNORED = "accepted, ignored (as in the original)"
_NONE = ("none", "null")


def ignored(default: Any, note: str = "", **metadata: Any) -> Any:
    """A field the original parsed but never read: accepted with the original's type and default."""
    return dataclasses.field(default=default, metadata={"ignored": True, "help": note, **metadata})


def setting(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A field with its help text (and aliases, choices, min, max) in the metadata."""
    kwargs = {} if default is dataclasses.MISSING else {"default": default}
    if isinstance(default, (list, dict, set)):
        kwargs = {"default_factory": lambda: type(default)(default)}
    return dataclasses.field(**kwargs, metadata={"help": help, **metadata})


def restated(cls: type, name: str, default: Any, note: str = "", **metadata: Any) -> Any:
    """Field ``name`` of dataclass ``cls`` (its help, choices, aliases) with another default; ``note`` is
    added to its help: a script whose original had another default restates only the default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = {**f.metadata, **metadata}
    if note:
        meta["help"] = f"{meta.get('help', '')}; {note}" if meta.get("help") else note
    return dataclasses.field(default=default, metadata=meta)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: a second dataclass reuses it instead of restating it."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def string_to_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got '{text}'")


def _scalar(kind: type, name: str):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got '{text}'") from None
    convert.__name__ = name
    return convert


def _optional(convert):
    def parse(text: str):
        return None if str(text).lower() in _NONE else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


_CONVERTERS = {int: _scalar(int, "an integer"), float: _scalar(float, "a number"), str: str, bool: string_to_bool}


def _unwrap(tp) -> tuple[Any, bool]:
    """``(X, optional)`` for ``X | None`` / ``Optional[X]``, else ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only X | None unions are supported, got {tp}")
        return args[0], True
    return tp, False


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(USER_ERROR_STATUS, f"error: {message} (see --help)\n")


class DataclassParser:
    """The command line of one or more settings dataclasses (fields must have distinct names)."""

    def __init__(self, *dataclass_types: type, description: str | None = None, prog: str | None = None,
                 ignore: tuple[str, ...] = ()):
        """``ignore``: fields this script accepts but does not read (labelled so in ``--help``)."""
        self.types = dataclass_types
        self.ignore = set(ignore)
        self.parser = OneLineParser(description=description, prog=prog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--config", metavar="FILE.yaml", default=None,
                                 help="read settings from a YAML file of field: value (the command line wins)")
        self.fields: dict[str, dataclasses.Field] = {}
        self.flags: dict[str, str] = {}  # field name -> the flags that set it, for messages
        for cls in dataclass_types:
            hints = typing.get_type_hints(cls)
            group = self.parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0]
                                                   if cls.__doc__ else None)
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                if f.name in self.fields:
                    raise TypeError(f"field '{f.name}' defined twice ({cls.__name__})")
                self.fields[f.name] = f
                self._add(group, f, hints[f.name])

    def _add(self, group, f: dataclasses.Field, tp) -> None:
        meta = dict(f.metadata)
        if f.name in self.ignore:
            meta["ignored"] = True
        aliases = meta.get("aliases", [])
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        base, optional = _unwrap(tp)
        kwargs: dict[str, Any] = {"dest": f.name}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        origin = typing.get_origin(base)
        if origin is Literal:
            meta.setdefault("choices", list(typing.get_args(base)))
            base = type(typing.get_args(base)[0])
        if origin in (list, tuple):
            kwargs["nargs"] = "+"
            base = typing.get_args(base)[0]
        convert = _CONVERTERS.get(base, base)
        if base is bool:
            kwargs.update(nargs="?", const=True)
        elif "const" in meta:
            kwargs.update(nargs="?", const=meta["const"])
        # ``none`` is None for numbers and booleans; text stays text, as HfArgumentParser (e.g. --reward none)
        kwargs["type"] = _optional(convert) if optional and base is not str else convert
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"]) + ([None] if optional and base is not str else [])
        text = meta.get("help", "")
        if meta.get("ignored"):
            text = f"{IGNORED}{': ' + text if text else ''}"
        if "default" in kwargs and not meta.get("ignored"):
            text = f"{text} (default: {kwargs['default']})" if text else f"default: {kwargs['default']}"
        kwargs["help"] = argparse.SUPPRESS if meta.get("hidden") else text
        flags = [f"--{f.name}", *aliases]
        self.flags[f.name] = "/".join(flags)
        group.add_argument(*flags, **kwargs)
        if (base is bool and f.default is True) or "no_value" in meta or "no_aliases" in meta:
            value = meta.get("no_value", False)
            group.add_argument(f"--no_{f.name}", *meta.get("no_aliases", []), dest=f.name, action="store_const",
                               const=value, help=argparse.SUPPRESS if meta.get("hidden") else
                               f"same as --{f.name} {value}")

    # ------------------------------------------------------------------------------------------ parsing
    def _fail(self, message: str):
        self.parser.error(message)

    def _yaml_defaults(self, path: str) -> dict[str, Any]:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            self._fail(f"--config {path}: cannot read it: {str(exc).splitlines()[0]}")
        if not isinstance(values, dict):
            self._fail(f"--config {path}: expected a mapping of field: value")
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            self._fail(f"--config {path}: unknown setting '{unknown[0]}' (not a field of "
                       f"{', '.join(t.__name__ for t in self.types)})")
        for action in self.parser._actions:
            if action.dest in values and action.option_strings[0] == f"--{action.dest}":
                action.required = False
                if isinstance(values[action.dest], str) and action.type is not None:  # e.g. 1e-6, which YAML reads as text
                    try:
                        values[action.dest] = action.type(values[action.dest])
                    except argparse.ArgumentTypeError as exc:
                        self._fail(f"--config {path}: {action.dest}: {exc}")
        return values

    def _check(self, name: str, value: Any) -> None:
        meta = self.fields[name].metadata
        if value is None:
            return
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                      else f">= {lo}" if lo is not None else f"<= {hi}")
            self._fail(f"argument {self.flags[name]}: expected a value {bounds}, got {value}")

    def parse(self, argv: list[str] | None = None) -> tuple:
        """One instance per dataclass type, from ``argv`` (default ``sys.argv[1:]``) and ``--config``."""
        argv = list(sys.argv[1:] if argv is None else argv)
        pre = OneLineParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        defaults = self._yaml_defaults(known.config) if known.config else {}
        self.parser.set_defaults(**defaults)
        try:
            namespace = self.parser.parse_args(argv)
        finally:
            self.parser.set_defaults(**{k: self._field_default(k) for k in defaults})
        for name in self.fields:
            self._check(name, getattr(namespace, name))
        for action in self.parser._actions:  # a --config value skips argparse's own choices check
            value = getattr(namespace, action.dest, None)
            if action.choices is not None and action.dest in defaults and value not in action.choices:
                self._fail(f"argument {self.flags[action.dest]}: invalid choice: {value!r} (choose from "
                           f"{', '.join(map(str, action.choices))})")
        return self.build(vars(namespace), given=self._given(argv) | set(defaults))

    def _given(self, argv: list[str]) -> set[str]:
        """The fields set on the command line: parse again with every default a sentinel."""
        sentinel = object()
        saved = {a.dest: a.default for a in self.parser._actions}
        for action in self.parser._actions:
            action.default = sentinel
        try:
            namespace, _ = self.parser.parse_known_args(argv)
        finally:
            for action in self.parser._actions:
                action.default = saved[action.dest]
        return {n for n in self.fields if getattr(namespace, n, sentinel) is not sentinel}

    def _field_default(self, name: str) -> Any:
        f = self.fields[name]
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return None if f.default is dataclasses.MISSING else f.default

    def build(self, values: dict[str, Any], given: set[str] = frozenset()) -> tuple:
        """The dataclasses from a mapping of field values; their own checks fail as one line."""
        out = []
        for cls in self.types:
            names = [f.name for f in dataclasses.fields(cls) if f.init]
            try:
                config = cls(**{n: values[n] for n in names if n in values})
            except UserError as exc:
                self._fail(str(exc).splitlines()[0])
            if "given_flags" in {f.name for f in dataclasses.fields(cls)}:
                config.given_flags = frozenset(n for n in given if n in names)
            out.append(config)
        return tuple(out)

    def parse_one(self, argv: list[str] | None = None):
        (only,) = self.parse(argv)
        return only

    def format_help(self) -> str:
        return self.parser.format_help()


def to_yaml(*configs: Any, path: str | Path | None = None) -> str:
    """The settings dataclasses as one YAML mapping (what ``--config`` reads) of the values that differ
    from the defaults; written to ``path`` if given."""
    import yaml

    values: dict[str, Any] = {}
    for config in configs:  # the fields that differ from their defaults (required ones always)
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.init and (default is dataclasses.MISSING or value != default):
                values[f.name] = value
    text = yaml.safe_dump(values, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
