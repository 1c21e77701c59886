"""YAML for config files: plain values only, duplicate keys refused, lines kept for messages.

PyYAML's SafeLoader alone would take the last of two equal keys, read `1e-3` as a string
and `010` as 8, and build dates and sets. This loader reads only what a config holds
(mappings, lists, strings, integers, finite or not floats, booleans, null), refuses any
other tag without running anything, and remembers the line of every mapping key. `dump`
writes with the same rules, so what it writes reads back as the same values.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

MERGE_TAG = "tag:yaml.org,2002:merge"
NULL_WORDS = ("~", "null", "Null", "NULL")


class YamlProblem(Exception):
    """Text that is not a YAML document of plain values; `line` is 1-based when known."""

    def __init__(self, problem: str, line: Optional[int] = None) -> None:
        self.problem, self.line = problem, line
        super().__init__(problem if line is None else f"line {line}: {problem}")


class Located(dict):
    """A mapping read from YAML, with the line each key was written on."""

    lines: dict[Any, int]

    def __init__(self) -> None:
        super().__init__()
        self.lines = {}


def _resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    # YAML 1.2's core schema, the one users expect: true/false only, decimal integers,
    # floats with or without a dot (1e-3), .inf/.nan. Keyed by first character as PyYAML wants.
    table: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}
    rules = [
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^[-+]?[0-9][0-9_]*$", "-+0123456789"),
        ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
                                    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
        ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        (MERGE_TAG, r"^<<$", "<"),
    ]
    for tag, pattern, first in rules:
        for ch in first:
            table.setdefault(ch, []).append((tag, re.compile(pattern)))
    return table


def _int(loader: "_Loader", node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return int(text, 10)
    except ValueError:
        raise ConstructorError(None, None, f"{text!r} is not a decimal integer", node.start_mark) from None


def _float(loader: "_Loader", node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).replace("_", "").lower()
    special = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
    try:
        return float(special.get(text, text))
    except ValueError:
        raise ConstructorError(None, None, f"{text!r} is not a number", node.start_mark) from None


def _map(loader: "_Loader", node: yaml.MappingNode) -> Any:
    data = Located()
    yield data
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:
            continue  # `<<: *base` keys may be overridden below them; that is their purpose
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:
            raise ConstructorError(None, None, f"a key that is not a plain value ({key!r})",
                                   key_node.start_mark) from None
        if first is not None:
            # PyYAML would silently keep the last one; two values for one key is a mistake.
            raise ConstructorError(None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
        seen[key] = line
    data.update(loader.construct_mapping(node, deep=True))
    for key_node, _ in node.value:  # flattened by now: merged keys first, own keys last (they win)
        data.lines[loader.construct_object(key_node, deep=True)] = key_node.start_mark.line + 1


def _unknown_tag(loader: "_Loader", node: yaml.Node) -> Any:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    raise ConstructorError(None, None, f"the tag {tag!r} is not read (only plain values: mappings, "
                           "lists, strings, numbers, true/false, null)", node.start_mark)


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _resolvers()
    yaml_constructors = {
        "tag:yaml.org,2002:null": SafeConstructor.construct_yaml_null,
        "tag:yaml.org,2002:bool": SafeConstructor.construct_yaml_bool,
        "tag:yaml.org,2002:int": _int,
        "tag:yaml.org,2002:float": _float,
        "tag:yaml.org,2002:str": SafeConstructor.construct_yaml_str,
        "tag:yaml.org,2002:seq": SafeConstructor.construct_yaml_seq,
        "tag:yaml.org,2002:map": _map,
        None: _unknown_tag,
    }


def _both_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    table = {ch: list(rules) for ch, rules in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    for ch, rules in _resolvers().items():
        table.setdefault(ch, []).extend(rules)
    return table


class _Dumper(yaml.SafeDumper):
    # A string that this loader, or a YAML 1.1 reader (yaml.safe_load: `yes`, `010`), would read
    # as something else is quoted: what is dumped reads back the same everywhere.
    yaml_implicit_resolvers = _both_resolvers()


def parse(text: str) -> Any:
    """One YAML document of plain values (None when empty); YamlProblem otherwise."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader constructs plain values only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if exc.context and exc.problem:
            problem = f"{' '.join(exc.context.split())}: {problem}"
        raise YamlProblem(problem, mark.line + 1 if mark is not None else None) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlProblem(f"a character YAML does not allow (0x{char:02x})", line) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(" ".join(str(exc).split())) from None
    except RecursionError:
        raise YamlProblem("nested too deeply") from None


def read(path: str) -> Any:
    """The file's document; OSError when it cannot be read, YamlProblem when it is not plain YAML text."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise YamlProblem(f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line) from None
    return parse(text)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
