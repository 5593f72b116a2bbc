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
  field (``--no_resume`` = ``--resume never``);
* ``const_aliases``: flags that set the field to a value (``{"-ts": "good_priority"}``);
* ``converted_aliases``: flags whose value goes through a function into the field
  (``{"--warmup_ratio": warmup_ratio}``);
* ``setting_aliases``: one flag whose choice sets several fields (``--dtype bf16``: ``bf16`` True, ``fp16`` False);
* ``required``: the flag must be given (on the command line or in ``--config``);
* ``given_sets``: the name of a boolean field set True when this one is given (``ppo_clip_given``);
* ``hidden_field``: not a flag at all (bookkeeping of the Python API);
* ``flatten`` (a prefix): a nested settings dataclass whose fields are flags ``--<prefix><field>``.

Fields of ``transformers.TrainingArguments`` parse as ``HfArgumentParser`` parses them (a union with
``str`` as text, checked by the dataclass; ``str | list[str]`` as one or more values); a field no command
line can give (a config object) is left to the Python API. An ignored field's value is parsed and
dropped: the dataclass keeps its default. YAML keys are field names or long aliases.

Booleans parse as ``--flag`` (True), ``--flag True/False/yes/no/1/0`` and, for those on by default,
``--no_flag``; ``X | None``
fields also take ``none``. ``--config FILE.yaml`` reads values from a YAML mapping of field names;
values given on the command line win. Every parse error (unknown flag, wrong type, value out of
range, unknown key in the YAML file, a dataclass's own check) is one line ``error: ...`` naming the
flag and what was expected, with exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
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
    elif dataclasses.is_dataclass(default) and not isinstance(default, type):  # nested settings: a fresh copy each
        kwargs = {"default_factory": lambda: copy.deepcopy(default)}
    return dataclasses.field(**kwargs, metadata={"help": help, **metadata})


def restated(cls: type, name: str, default: Any, note: str = "", **metadata: Any) -> Any:
    """Field ``name`` of dataclass ``cls`` (its help, choices, aliases) with another default; ``note`` is
    added to its help: a script whose original had another default restates only the default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = {**f.metadata, **metadata}
    if note:
        meta["help"] = f"{meta.get('help', '')}; {note}" if meta.get("help") else note
    return setting(default, **meta)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: a second dataclass reuses it instead of restating it."""
    return _default({f.name: f for f in dataclasses.fields(cls)}[name])


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


def _field_type(tp) -> tuple[Any, bool, bool] | None:
    """``(type of one value, optional, many)`` of a field's type, or None when no command line can give it
    (e.g. a config object). ``X | None`` is optional; a union with ``str`` (``IntervalStrategy | str``,
    ``dict | str``, TrainingArguments' spellings) parses as text, the dataclass's own checks decide;
    ``str | list[str]`` and ``list[X]`` take one or more values."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            tp, origin = args[0], typing.get_origin(args[0])
        elif str in args:
            many = any(typing.get_origin(a) in (list, tuple) and typing.get_args(a)[:1] == (str,) for a in args)
            return str, optional, many
        else:
            return None
    if origin is Literal:
        return tp, optional, False
    if origin in (list, tuple):
        element = (typing.get_args(tp) or (str,))[0]
        return (element, optional, True) if element in _CONVERTERS else None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return str, optional, False
    return (tp, optional, False) if tp in _CONVERTERS else None


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(USER_ERROR_STATUS, f"error: {message} (see --help)\n")


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One command-line setting: field ``name`` of ``owner``, or field ``sub`` of its nested settings ``name``."""

    field: dataclasses.Field
    owner: type
    default: Any
    parent: str | None = None  # the nested field it lives in (flattened), e.g. "lora"
    sub: str | None = None  # its name inside the nested dataclass, e.g. "r"


class DataclassParser:
    """The command line of one or more settings dataclasses (fields must have distinct names).

    A field whose metadata has ``flatten`` (a prefix, e.g. ``"lora_"``) and whose type is a dataclass
    gives one flag per field of that dataclass (``--lora_r``), built back into it; fields of types no
    command line can give (config objects) are left to the Python API."""

    def __init__(self, *dataclass_types: type, description: str | None = None, prog: str | None = None,
                 ignore: tuple[str, ...] = ()):
        """``ignore``: fields this script accepts but does not read (labelled so in ``--help``)."""
        self.types = dataclass_types
        self.ignore = set(ignore)
        self.parser = OneLineParser(description=description, prog=prog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--config", metavar="FILE.yaml", default=None,
                                 help="read settings from a YAML file of field: value (the command line wins)")
        self.fields: dict[str, _Flag] = {}
        self.flags: dict[str, str] = {}  # field name -> the flags that set it, for messages
        self.keys: dict[str, str] = {}  # a YAML key (field name or long alias) -> field name
        self.alias_settings: dict[str, dict[str, dict[str, Any]]] = {}  # --dtype -> {bf16: {bf16: True, ...}}
        for cls in dataclass_types:
            hints = typing.get_type_hints(cls)
            group = self.parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0]
                                                   if cls.__doc__ else None)
            for f in dataclasses.fields(cls):
                if not f.init or f.metadata.get("hidden_field"):
                    continue
                prefix = f.metadata.get("flatten")
                if prefix is not None and dataclasses.is_dataclass(hints[f.name]):
                    nested, sub_hints = _default(f), typing.get_type_hints(hints[f.name])
                    for sub in dataclasses.fields(nested):
                        if sub.init:
                            self._register(group, _Flag(sub, cls, getattr(nested, sub.name), f.name, sub.name),
                                           prefix + sub.name, sub_hints[sub.name])
                else:
                    self._register(group, _Flag(f, cls, _default(f)), f.name, hints[f.name])

    def _register(self, group, flag: _Flag, name: str, tp) -> None:
        kind = _field_type(tp)
        if kind is None:
            return  # e.g. a ParallelismConfig: the Python API's
        if name in self.fields:
            raise TypeError(f"field '{name}' defined twice ({flag.owner.__name__})")
        self.fields[name] = flag
        self._add(group, name, flag, *kind)

    def _add(self, group, name: str, flag: _Flag, base, optional: bool, many: bool) -> None:
        meta = dict(flag.field.metadata)
        if name in self.ignore:
            meta["ignored"] = True
        aliases = meta.get("aliases", [])
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        kwargs: dict[str, Any] = {"dest": name}
        if flag.default is not dataclasses.MISSING:
            kwargs["default"] = flag.default
        else:
            kwargs["required"] = True
        if meta.get("required"):
            kwargs["required"] = True
        if typing.get_origin(base) is Literal:
            meta.setdefault("choices", list(typing.get_args(base)))
            base = type(typing.get_args(base)[0])
        if many:
            kwargs["nargs"] = "+"
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
            shown = kwargs["default"].value if isinstance(kwargs["default"], enum.Enum) else kwargs["default"]
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        hidden = meta.get("hidden")
        kwargs["help"] = argparse.SUPPRESS if hidden else text.replace("%", "%%")
        flags = [f"--{name}", *aliases]
        self.flags[name] = "/".join(flags)
        self.keys.update({name: name, **{a[2:]: name for a in aliases if a.startswith("--")}})
        group.add_argument(*flags, **kwargs)
        on_somewhere = flag.default is True or flag.field.default is True  # here, or in the dataclass itself
        if (base is bool and on_somewhere) or "no_value" in meta or "no_aliases" in meta:
            value = meta.get("no_value", False)
            no_flags = dict.fromkeys([f"--no_{name}", *meta.get("no_aliases", [])])
            group.add_argument(*no_flags, dest=name, action="store_const",
                               const=value, help=argparse.SUPPRESS if hidden else f"same as --{name} {value}")
        for alias, convert_alias in meta.get("converted_aliases", {}).items():  # --warmup_ratio R: warmup_steps
            self.keys.setdefault(alias.lstrip("-"), name)
            group.add_argument(alias, dest=name, type=convert_alias, help=argparse.SUPPRESS if hidden else
                               f"sets --{name}: {getattr(convert_alias, '__doc__', '') or ''}".strip())
        for alias, table in meta.get("setting_aliases", {}).items():  # --dtype bf16: bf16=True, fp16=False
            self.keys.setdefault(alias.lstrip("-"), alias.lstrip("-"))
            self.alias_settings[alias.lstrip("-")] = table
            group.add_argument(alias, dest=f"_alias_{alias.lstrip('-')}", choices=list(table), default=None,
                               help=argparse.SUPPRESS if hidden else
                               "; ".join(f"{k}: {', '.join(f'--{f} {v}' for f, v in s.items())}"
                                         for k, s in table.items()))
        for alias, value in meta.get("const_aliases", {}).items():
            if alias.startswith("--"):
                self.keys.setdefault(alias.lstrip("-"), name)
            group.add_argument(alias, dest=name, action="store_const", const=value,
                               help=argparse.SUPPRESS if hidden else f"same as --{name} {value}")

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
        unknown = sorted(set(values) - set(self.keys))
        if unknown:
            self._fail(f"--config {path}: unknown setting '{unknown[0]}' (not a field of "
                       f"{', '.join(t.__name__ for t in self.types)})")
        values = {self.keys[k]: v for k, v in values.items()}
        for action in self.parser._actions:
            if action.dest in values and action.option_strings[0] == f"--{action.dest}":
                action.required = False
                value = values[action.dest]
                if isinstance(value, str) and action.nargs == "+":
                    value = values[action.dest] = [value]
                texts = value if isinstance(value, list) else [value]
                if action.type is not None and all(isinstance(t, str) for t in texts):  # e.g. 1e-6: text to YAML
                    try:
                        converted = [action.type(t) for t in texts]
                    except argparse.ArgumentTypeError as exc:
                        self._fail(f"--config {path}: {action.dest}: {exc}")
                    values[action.dest] = converted if isinstance(value, list) else converted[0]
        return values

    def _check(self, name: str, value: Any) -> None:
        meta = self.fields[name].field.metadata
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
            self.parser.set_defaults(**{k: self.fields[k].default if k in self.fields else None for k in defaults})
        for alias, table in self.alias_settings.items():  # an alias that sets several fields, e.g. --dtype
            choice = getattr(namespace, f"_alias_{alias}", None) or defaults.get(alias)
            if choice is not None:
                if choice not in table:
                    self._fail(f"argument --{alias}: invalid choice: {choice!r} (choose from {', '.join(table)})")
                for field_name, value in table[choice].items():
                    setattr(namespace, field_name, value)
        for name in self.fields:
            self._check(name, getattr(namespace, name))
        for action in self.parser._actions:  # a --config value skips argparse's own choices check
            value = getattr(namespace, action.dest, None)
            if action.choices is not None and action.dest in defaults and value not in action.choices:
                self._fail(f"argument {self.flags[action.dest]}: invalid choice: {value!r} (choose from "
                           f"{', '.join(map(str, action.choices))})")
        return self.build(vars(namespace), given=(self._given(argv) | set(defaults)) & set(self.fields))

    def _given(self, argv: list[str]) -> set[str]:
        """The fields set on the command line: parse again with every default a sentinel."""
        sentinel = object()
        saved = [(a, a.default, a.required) for a in self.parser._actions]  # several actions may share a dest
        for action in self.parser._actions:
            action.default, action.required = sentinel, False
        try:
            namespace, _ = self.parser.parse_known_args(argv)
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required
        return {n for n in self.fields if getattr(namespace, n, sentinel) is not sentinel}

    def field_of(self, flag: str) -> str:
        """The field a flag sets (``-bs`` -> ``per_device_train_batch_size``)."""
        for action in self.parser._actions:
            if flag in action.option_strings:
                return action.dest
        raise KeyError(flag)

    def value(self, parsed: tuple, name: str) -> Any:
        """Setting ``name`` (a flag's field, nested ones too: ``lora_r``) of the dataclasses ``parse`` returned."""
        flag = self.fields[name]
        (owner,) = [p for p in parsed if isinstance(p, flag.owner)]
        return getattr(owner, name) if flag.parent is None else getattr(getattr(owner, flag.parent), flag.sub)

    def build(self, values: dict[str, Any], given: set[str] = frozenset()) -> tuple:
        """The dataclasses from a mapping of field values (an ignored field keeps its default); their own
        checks fail as one line."""
        out = []
        for cls in self.types:
            kwargs: dict[str, Any] = {}
            nested: dict[str, dict[str, Any]] = {}
            for name, flag in self.fields.items():
                if flag.owner is not cls or name not in values:
                    continue
                meta = flag.field.metadata
                if meta.get("ignored") or name in self.ignore:
                    continue
                if flag.parent is None:
                    kwargs[name] = values[name]
                else:
                    nested.setdefault(flag.parent, {})[flag.sub] = values[name]
                if name in given and meta.get("given_sets"):
                    kwargs[meta["given_sets"]] = True
            owned = {f.name: f for f in dataclasses.fields(cls)}
            for parent, sub_values in nested.items():
                kwargs[parent] = dataclasses.replace(_default(owned[parent]), **sub_values)
            try:
                config = cls(**kwargs)
            except UserError as exc:
                self._fail(str(exc).splitlines()[0])
            out.append(config)
        return tuple(out)

    def parse_one(self, argv: list[str] | None = None):
        (only,) = self.parse(argv)
        return only

    def format_help(self) -> str:
        return self.parser.format_help()


def _yaml_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    return value


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, list) and all(_plain(v) for v in value))


def to_yaml(*configs: Any, path: str | Path | None = None) -> str:
    """The settings dataclasses as one YAML mapping (what ``--config`` reads) of the values that differ
    from the defaults, nested settings (``flatten``) by their flags' names; written to ``path`` if given."""
    import yaml

    values: dict[str, Any] = {}

    def add(name: str, value: Any, default: Any) -> None:
        value, default = _yaml_value(value), _yaml_value(default)
        if _plain(value) and (default is dataclasses.MISSING or value != default):
            values[name] = value

    for config in configs:  # the fields that differ from their defaults (required ones always)
        for f in dataclasses.fields(config):
            if not f.init or f.metadata.get("ignored") or f.metadata.get("hidden_field"):
                continue
            value = getattr(config, f.name)
            if f.metadata.get("flatten") is not None and dataclasses.is_dataclass(value):
                default = _default(f)
                for sub in dataclasses.fields(value):
                    add(f.metadata["flatten"] + sub.name, getattr(value, sub.name), getattr(default, sub.name))
            else:
                add(f.name, value, _default(f))
    text = yaml.safe_dump(values, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
