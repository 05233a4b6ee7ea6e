"""Typed configuration: frozen dataclasses built from YAML, `--set a.b=value` overrides or Python, checked alike.

Knows nothing of mapray. A config class derives from `Checked`: whether it is built from a YAML mapping
(`from_dict`, `load`) or called in Python, every field is checked against its declared type (`Literal`, unions,
lists, nested sections, `dict[str, str]`) and then the class's own `check`, and a problem is a `ConfigError`
whose one line names the key. A section built inside another names its keys with the section's path
("policy.max_length"); built alone in Python it names them bare ("max_length").
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import math
import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import yaml

from mapray.errors import ConfigError, first_line

MAX_CONFIG_BYTES = 16 << 20  # a config is a few KiB; anything this large is the wrong file
_REPR = reprlib.Repr()  # values quoted in messages: bounded depth, length and items
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
Key = Callable[[str], str]  # a field's name -> its key as messages name it
_KEY: contextvars.ContextVar[Key] = contextvars.ContextVar("mapray_config_key", default=lambda name: name)


class Checked:
    """Base of the config dataclasses: fields checked against their types on construction, then `check`."""

    def __post_init__(self) -> None:
        key = _KEY.get()
        for name, tp in _hints(type(self)).items():
            value = getattr(self, name)
            coerced = coerce(tp, value, key(name), scalars=False)
            if coerced is not value:
                object.__setattr__(self, name, coerced)  # frozen: 2 -> 2.0 for a float, a dict -> its section
        # the section's own rules name a value that breaks them ("--ratio: must be in [0, 1], got nan") before
        # the generic checks of values no run can use; YAML values had those checks as they were parsed
        self.check(key)
        for name in _hints(type(self)):
            _check_scalars(getattr(self, name), key(name))

    def check(self, key: Key) -> None:
        """The relations between fields that types alone cannot express; `key(name)` names a field."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load(cls: type, path: str | None, overrides: typing.Sequence[str] = (), base: dict | None = None) -> Any:
    """Reads a YAML file (or starts from `base`), applies `key.sub=value` overrides, builds `cls`. Every problem
    with the file or an override is a `ConfigError` naming the key, never another exception."""
    data: dict = copy.deepcopy(base) if base else {}  # an override must not write into the caller's dict
    if path is not None:
        loaded = _parse_yaml(_read_config(path), f"config {show(path)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {show(path)} must be a mapping of sections, got {type(loaded).__name__}")
        data.update(loaded)
    for item in overrides:
        _apply_override(data, item)
    return from_dict(cls, data, "")


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass `cls` from plain data, checking keys and types; `where` names the section in errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in known), key=str)  # YAML keys may be ints, None, ...
    if unknown:
        raise ConfigError(f"unknown config key {join(where, unknown[0])} (known: {', '.join(sorted(known))})")
    hints = _hints(cls)
    fields = {name: coerce(hints[name], value, join(where, name)) for name, value in data.items()}
    return build(cls, lambda name: join(where, name), **fields)


def build(cls: type, key: Key, **fields: Any) -> Any:
    """`cls(**fields)` with its keys named by `key` in messages (a command line names them as its flags)."""
    token = _KEY.set(key)
    try:
        return cls(**fields)
    finally:
        _KEY.reset(token)


def _read_config(path: str) -> bytes:
    try:
        with open(path, "rb") as f:  # bytes: the YAML reader decodes them and reports bad UTF-8 as YAML errors
            text = f.read(MAX_CONFIG_BYTES + 1)  # bounded: `--config /dev/zero` must not read forever
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config {show(path)}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {show(path)} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a run config")
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no `!!python/...` tag is ever constructed, let alone run) that also refuses a key
    given twice in one mapping: plain YAML keeps the last silently, so a second `policy:` section would replace
    the first without a word. A merge (`<<: *base`) may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: the base class reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {short(key)}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str | bytes, what: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: safe_load plus the duplicate check
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{what} is not valid YAML: {first_line(e.problem or e.context or e)}{at}") from None
    # ValueError: a timestamp such as 2020-13-45, an int beyond Python's digit limit; RecursionError: deep nesting
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"{what} is not valid YAML: {first_line(e)}") from None


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {short(item)}: expected key.sub=value")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {show(key)}: empty key segment, expected key.sub=value")
    node = data
    *parents, leaf = parts
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {show(key)}: {show(part)} is not a section")
        node = child
    node[leaf] = _parse_yaml(raw, f"--set {show(key)}: the value") if raw else ""


def coerce(tp: Any, value: Any, where: str, scalars: bool = True) -> Any:
    """`value` as a field declared `tp` holds it (an int for a float becomes that float, a mapping for a
    section becomes the section), or a `ConfigError` naming `where`; `scalars`: also refuse the values of the
    right type that no run can use (`_check_scalar`)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, value, where, scalars)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(type(value) is type(a) and value == a for a in allowed):  # True is not 1, 1.0 is not "1"
            raise ConfigError(f"{where}: {short(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        items = [coerce(item_tp, v, f"{where}[{i}]", scalars) for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value)) else items
    if origin is dict:
        value_tp = typing.get_args(tp)[1]
        if value_tp is str:
            return _text_mapping(value, where)
        return _typed_mapping(value_tp, value, where, scalars)
    if tp is float and type(value) is int:
        _check_scalar(value, where)  # an int too large for a float
        value = float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {short(value)}")
    if scalars:
        _check_scalar(value, where)
    return value


def _coerce_union(tp: Any, value: Any, where: str, scalars: bool) -> Any:
    options = [o for o in typing.get_args(tp) if o is not type(None)]
    if value is None and len(options) < len(typing.get_args(tp)):
        return None
    errors = {}
    for option in options:
        try:
            return coerce(option, value, where, scalars)
        except ConfigError as e:
            errors[option] = str(e)
    # the option of the value's own shape tells what is wrong inside it: "input.uri[1]: expected str, got int 2"
    shaped = [msg for option, msg in errors.items() if isinstance(value, typing.get_origin(option) or option)]
    if len(errors) == 1 or len(shaped) == 1:
        raise ConfigError(shaped[0] if shaped else next(iter(errors.values())))
    names = " or ".join(str(o) if typing.get_origin(o) else o.__name__ for o in options)
    raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {short(value)}")


def _text_mapping(value: Any, where: str) -> dict[str, str]:
    """A `dict[str, str]` field (environment variables): text keys, scalar values kept as their text."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if type(k) is not str:
            raise ConfigError(f"{where}: keys must be text, got {type(k).__name__} {short(k)}")
        if type(v) not in (str, int, float):  # not bool: `true` would arrive as the text "True"
            raise ConfigError(f"{join(where, k)}: expected text or a number, got {type(v).__name__} {short(v)}")
        _check_scalar(k, where)
        _check_scalar(v, join(where, k))
    if all(type(v) is str for v in value.values()):
        return value
    return {k: str(v) for k, v in value.items()}


def _typed_mapping(value_tp: Any, value: Any, where: str, scalars: bool) -> dict:
    """A `dict[str, T]` field (a group's quota): text keys, each value coerced to T."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    for k in value:
        if type(k) is not str:
            raise ConfigError(f"{where}: keys must be text (quote them), got {type(k).__name__} {short(k)}")
        _check_scalar(k, where)
    return {k: coerce(value_tp, v, join(where, k), scalars) for k, v in value.items()}


def _check_scalars(value: Any, where: str) -> None:
    """`_check_scalar` on a field's value, or on each item of a list of them."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_scalars(item, f"{where}[{i}]")
    else:
        _check_scalar(value, where)


def _check_scalar(value: Any, where: str) -> None:
    """Values of a field's type that no run can use: NaN or infinite floats, ints beyond 64 bits, and text that
    is not valid Unicode (a YAML "\\ud800" escape gives a lone surrogate, which no path or log can hold)."""
    if type(value) is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if type(value) is int and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{where}: {short(value)} is out of range")
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: not valid Unicode text: {short(value)}") from None


def join(where: str, name: Any) -> str:
    return f"{where}.{show(name)}" if where else show(name)


def show(name: Any) -> str:
    """A key or path for a one-line message: as written when it is short printable text, else a short repr."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 200 else short(name)


def short(value: Any) -> str:
    """A bounded, one-line repr: a YAML alias can make a value exponentially large when written out in full."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int too long for Python to write out
        return f"<{type(value).__name__}>"


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
