"""Typed configs: nested dataclasses filled from YAML plus `key.sub=value` command-line overrides.

Every command's settings are one dataclass tree. Each field carries its help text in
`field(metadata={"help": ...})` (shown by `--help`), and range checks live in the dataclass's
`__post_init__`. Unknown keys and values of the wrong type fail with a `ConfigError` that names
the full key and suggests the closest valid one; YAML is read with the safe loader only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from visual_opsd.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file, then apply `key.sub=value` overrides in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return from_dict(cls, raw)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a plain dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix, str(key), fields))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """A ConfigError naming `key` (with the closest choice as a hint) unless `value` is one of
    `choices`: for names looked up in a registry (tasks), which a Literal type cannot list."""
    allowed = sorted(choices)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}{hint}")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for saving next to checkpoints and reports)."""
    return dataclasses.asdict(config)


def config_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field of `cls`, dotted keys, for `--help` texts."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += config_help(tp, prefix + f.name + ".")
            continue
        sections = _kinds(typing.get_args(tp)) if typing.get_origin(tp) in (Union, types.UnionType) else {}
        if sections:  # a discriminated section: its kinds, then each kind's keys
            rows.append((prefix + f.name + ".kind", repr(f.default), f"one of {sorted(sections)}; "
                         + f.metadata.get("help", "")))
            for kind, member in sections.items():
                rows += [(key, default, f"(kind {kind}) {text}")
                         for key, default, text in config_help(member, prefix + f.name + ".")
                         if key != prefix + f.name + ".kind"]
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


# keys of older configs that now live elsewhere: old key -> (the key that replaced it, what to write instead)
MOVED_KEYS = {
    "hf": ("backend", "backend (with kind: hf; the Hugging Face options are the same keys)"),
    "path": ("paths", "paths (a list: [FILE, ...])"),  # eval's data.path
}


def _unknown_key_message(prefix: str, key: str, fields: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]!s}?" if close else ""
    if key in MOVED_KEYS and MOVED_KEYS[key][0] in fields:
        hint = f"; it is now {prefix}{MOVED_KEYS[key][1]}"
    return f"unknown config key {prefix + key!r}{hint} (valid keys here: {', '.join(sorted(fields))})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type hint `tp`, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = _kinds(args)
        if sections and isinstance(value, dict):
            return from_dict(_pick_kind(sections, value, key), value, key + ".")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; users mean the number
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _kinds(args: tuple) -> dict[str, type]:
    """kind -> dataclass, when `args` (a union's members) are dataclasses told apart by a
    `kind: Literal[...]` field (a discriminated section, e.g. `backend:`); else empty."""
    out: dict[str, type] = {}
    for arg in args:
        if arg is type(None):
            continue
        hint = typing.get_type_hints(arg).get("kind") if dataclasses.is_dataclass(arg) else None
        if hint is None or typing.get_origin(hint) is not Literal:
            return {}
        out.update({kind: arg for kind in typing.get_args(hint)})
    return out


def _pick_kind(sections: dict[str, type], value: dict[str, Any], key: str) -> type:
    """The member of a discriminated section that `value` is: by its `kind`, or, when it has none, the
    only member that has all its keys (so `backend.lora=true` needs no `backend.kind=hf`)."""
    kind = value.get("kind")
    if kind is not None:
        if kind not in sections:
            raise ConfigError(f"{key}.kind: {kind!r} is not one of {sorted(sections)}")
        return sections[kind]
    fits = {c for c in sections.values() if set(value) <= {f.name for f in dataclasses.fields(c)}}
    if len(fits) == 1:
        return fits.pop()
    raise ConfigError(f"{key}: say which kind it is ({key}.kind: one of {sorted(sections)})")
