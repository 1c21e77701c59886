"""Plain YAML values into the config dataclasses, each checked against its field's type.

A mapping from a file merges into the sections key by key; a `key=value` override sets
one dotted key; a list is always replaced whole. Every refusal is a one-line ConfigError,
`config key 'K' has value V; allowed: ...`, naming the dotted key and, for a file, where
it was written. Works on any dataclass tree, so new fields need nothing here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from typing import Any, Union

from dtrain.config import yamlfile
from dtrain.errors import ConfigError

INT64 = (-(2**63), 2**63 - 1)
MISSING = "???"  # a field with no default that the user must set (the value OmegaConf used for it)


def show(value: Any) -> str:
    """repr, short enough for one line (a huge list or integer is cut)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "<an integer too long to print>"
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(key: str, value: Any, allowed: str, where: str = "") -> ConfigError:
    suffix = f" ({where})" if where else ""
    return ConfigError(key, value, allowed, f"config key '{key}' has value {show(value)}; allowed: {allowed}{suffix}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is Union and type(None) in typing.get_args(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner, True
    return tp, False


def allowed_text(tp: Any) -> str:
    """What a field of type `tp` accepts, in words."""
    inner, optional = _optional(tp)
    words = _allowed_plain(inner)
    return f"{words}, or null (unset)" if optional else words


_PLURAL = {bool: "true | false values", int: "integers", float: "finite numbers", str: "strings"}


def _allowed_plain(tp: Any) -> str:
    if tp is bool:
        return "true | false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return f"a list of mappings with keys {', '.join(f.name for f in dataclasses.fields(item))}"
        return f"a list of {_PLURAL.get(item, 'values')}"
    if origin is dict:
        return "a mapping of names to values, e.g. {num_classes: 10}"
    if tp is Any:
        return "any value"
    raise TypeError(f"config fields of type {tp!r} are not supported")


def _plain(value: Any) -> Any:
    """Nested plain dicts and lists (a file's mappings carry their lines)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def convert(key: str, value: Any, tp: Any, where: str = "", path: str = "") -> Any:
    """`value` as the field type `tp` wants it, or ConfigError. Accepts what it returns (idempotent).
    `where` says where the value was written; `path` is its file, for mappings inside lists."""
    inner, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise refuse(key, value, allowed_text(tp) + " (null and an empty value mean unset, which this key "
                     "does not allow)", where)
    ok, result = _convert(key, value, inner, where, path)
    if not ok:
        raise refuse(key, value, allowed_text(tp), where)
    return result


def _convert(key: str, value: Any, tp: Any, where: str, path: str) -> tuple[bool, Any]:
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise refuse(key, value, "an integer that fits in 64 bits", where)
            return True, value
        return False, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise refuse(key, value, "a finite number", where)
            return True, number
        return False, None
    if tp is str:
        return isinstance(value, str), value
    if tp is Any:
        return True, _plain(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            check(value, key)
            return True, value
        if not isinstance(value, dict):
            return False, None
        obj = tp()
        merge(obj, value, f"{key}.", {}, path)
        for f in dataclasses.fields(tp):
            if getattr(obj, f.name) == MISSING:
                raise refuse(f"{key}.{f.name}", None, f"{allowed_text(_hints(tp)[f.name])} (required)", where)
        return True, obj
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, None
        if dataclasses.is_dataclass(item):
            return True, [convert(f"{key}[{i}]", v, item, where, path) for i, v in enumerate(value)]
        items = []
        for i, v in enumerate(value):
            # A wrong item is reported with the whole list and what the list takes.
            try:
                items.append(convert(key, v, item))
            except ConfigError as exc:
                raise refuse(key, value, f"{allowed_text(tp)} (item {i}: {exc.allowed.split(' (')[0]})",
                             where) from None
        return True, items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return False, None
        return True, _plain(value)
    raise TypeError(f"config fields of type {tp!r} are not supported")


def _unknown(key: str, name: str, value: Any, cls: type, where: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean '{key[: len(key) - len(str(name))]}{close[0]}'? " if close and key.endswith(str(name)) else ""
    return refuse(key, value, f"a known key; {hint}the keys there are {', '.join(known)}", where)


def _where(path: str, lines: dict[Any, int], name: Any) -> str:
    if not path:
        return ""
    line = lines.get(name)
    return f"in {path} line {line}" if line else f"in {path}"


def merge(obj: Any, mapping: dict, prefix: str, origins: dict[str, str], path: str = "") -> None:
    """Merge a file's mapping into the dataclass `obj`, key by key; `path` names the file for messages."""
    lines = getattr(mapping, "lines", {})
    hints = _hints(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        where = _where(path, lines, name)
        if name not in hints:
            raise _unknown(key, name, value, type(obj), where)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # `train:` with every key below it commented out: no values
            if not isinstance(value, dict):
                raise refuse(key, value, allowed_text(tp), where)
            merge(getattr(obj, name), value, f"{key}.", origins, path)
            continue
        inner, _ = _optional(tp)
        if typing.get_origin(inner) is dict and isinstance(value, dict) and isinstance(getattr(obj, name), dict):
            value = _merged(getattr(obj, name), convert(key, value, tp, where))
        setattr(obj, name, convert(key, value, tp, where, path))
        origins[key] = where


def _merged(old: dict, new: dict) -> dict:
    """Free-form mappings (model.kwargs) merge like the sections do; anything else in them is replaced."""
    out = copy.deepcopy(old)
    for k, v in new.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_override(obj: Any, key: str, text: str, origins: dict[str, str]) -> None:
    """Apply one `key=value` from the command line to the dataclass tree `obj`."""
    names = key.split(".")
    node: Any = obj
    for depth, name in enumerate(names):
        hints = _hints(type(node))
        if name not in hints:
            raise _unknown(".".join(names[: depth + 1]), name, text, type(node), "")
        tp = hints[name]
        here = ".".join(names[: depth + 1])
        last = depth == len(names) - 1
        if last:
            value = _value(here, text, tp)
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                merge(getattr(node, name), value, f"{here}.", origins)
                return
            setattr(node, name, convert(here, value, tp))
            origins[here] = ""
            return
        if dataclasses.is_dataclass(tp):
            node = getattr(node, name)
            continue
        inner, _ = _optional(tp)
        if typing.get_origin(inner) is dict:
            # A key inside a free-form mapping: model.kwargs.depth=3.
            mapping = copy.deepcopy(getattr(node, name)) or {}
            inner_node = mapping
            for part in names[depth + 1: -1]:
                if not isinstance(inner_node.get(part), dict):
                    inner_node[part] = {}
                inner_node = inner_node[part]
            inner_node[names[-1]] = _plain(_value(key, text, Any))
            setattr(node, name, mapping)
            origins[here] = ""
            return
        raise refuse(key, text, f"no key below '{here}', which is {allowed_text(tp)}; give it whole, e.g. "
                     f"{here}=[...]" if typing.get_origin(inner) is list else
                     f"no key below '{here}', which is {allowed_text(tp)}")


def _value(key: str, text: str, tp: Any) -> Any:
    """The override's text as YAML, except that a string field takes plain text as it is
    (`log.run_name=007` stays '007', `#3` is not a comment)."""
    inner, optional = _optional(tp)
    stripped = text.strip()
    if inner is str:
        if stripped == "":
            return None if optional else ""
        # A lone '*' (data.input_key=*) is no YAML alias: it can only mean itself.
        if stripped == "*" or stripped not in yamlfile.NULL_WORDS and stripped[0] not in "[{'\"!&*|>%@`":
            return stripped
    try:
        return yamlfile.parse(text)
    except yamlfile.YamlProblem as exc:
        raise refuse(key, text, f"{allowed_text(tp)} (the value is not valid YAML: {exc.problem})") from None


def check(obj: Any, prefix: str = "") -> None:
    """Type-check every field of a dataclass tree built in Python (dtrain.train(config=Config(...)))."""
    for name, tp in _hints(type(obj)).items():
        key = f"{prefix}{name}"
        value = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, tp):
            check(value, f"{key}.")
        else:
            setattr(obj, name, convert(key, value, tp))
