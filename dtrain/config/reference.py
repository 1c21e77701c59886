"""The config reference page (docs/reference/config.md), generated from the schema so that each key is written
down once: its meaning is the field's docstring in schema.py, its type and default the dataclass's own, its
allowed values the tuples in choices.py.

    python -m dtrain.config.reference docs/reference/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from dtrain.config import choices, schema
from dtrain.config.typed import MISSING, _hints, _optional

REGENERATE = "python -m dtrain.config.reference docs/reference/config.md"

FACTORY = "a factory 'package.module:function'"
# Which choice tuple each key takes (validate.py checks the same; tests/test_docs.py keeps the two in step).
# The text after the tuple is what the key accepts besides its names.
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "data.name": (choices.DATASETS, FACTORY),
    "data.sampling": (choices.SAMPLINGS, ""),
    "data.token_dtype": (choices.TOKEN_DTYPES, ""),
    "model.name": (choices.MODELS, FACTORY),
    "model.init": (choices.MODEL_INITS, ""),
    "loss.name": (choices.LOSSES, "a function 'package.module:function'"),
    "loss.metrics": (choices.METRICS, "a function 'package.module:function'"),
    "optim.name": (choices.OPTIMIZERS, ""),
    "sched.name": (choices.SCHEDULES, ""),
    "train.precision": (choices.PRECISIONS, ""),
    "train.device": (choices.DEVICES, ""),
    "train.on_nonfinite": (choices.ON_NONFINITE, ""),
    "dist.backend": (choices.BACKENDS, ""),
    "dist.strategy": (choices.STRATEGIES, ""),
    "dist.grad_compression": (choices.GRAD_COMPRESSIONS, ""),
    "log.progress": (choices.PROGRESS, ""),
    "checkpoint.signals": (choices.CATCHABLE_SIGNALS, ""),
    "checkpoint.mode": (choices.MONITOR_MODES, ""),
    "early_stop.mode": (choices.MONITOR_MODES, ""),
    "resume": (("auto", "never"), "the path of a checkpoint directory"),
}

INTRO = """\
# Config reference

<!-- Generated from dtrain/config/schema.py: do not edit. Regenerate with
     {command} -->

Every key of the run's configuration, as `python -m dtrain` and `dtrain.train(overrides=...)` take it:
defaults, then the YAML files given with `--config`, then the `key=value` overrides, in order. Values are
YAML; `null` (or an empty value, `key=`) means unset, which only the keys whose type says "or null" accept.
A list item's keys are written `key[*].name` here and given as a whole list, e.g.
`'callbacks=[{{name: mypkg.callbacks:Mine}}]'`.
"""


def _documented(path: Path) -> dict[str, tuple[Optional[str], dict[str, str]]]:
    """class name -> (its docstring, {field: the string literal right after it})."""
    out: dict[str, tuple[Optional[str], dict[str, str]]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for here, after in zip(node.body, node.body[1:] + [None]):
            if isinstance(here, ast.AnnAssign) and isinstance(here.target, ast.Name):
                if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    fields[here.target.id] = after.value.value
        out[node.name] = (ast.get_docstring(node), fields)
    return out


DOCS = _documented(Path(schema.__file__))


@dataclasses.dataclass(frozen=True)
class Key:
    key: str
    """Dotted, with [*] for the items of a list of mappings."""
    type: Any
    default: Any
    doc: Optional[str]


def _item(tp: Any) -> Optional[type]:
    """The dataclass a list field holds, if it holds one."""
    inner, _ = _optional(tp)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def keys(cls: type = schema.Config, prefix: str = "") -> Iterator[Key]:
    """Every key below `cls` in declaration order, a list of mappings followed by its items' keys."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from keys(tp, key + ".")
            continue
        yield Key(key, tp, _default(f), DOCS[cls.__name__][1].get(f.name))
        item = _item(tp)
        if item is not None:
            yield from keys(item, key + "[*].")


def sections() -> list[tuple[str, Optional[str], list[Key]]]:
    """(title, intro, keys): one per section of Config, then the callbacks, then the top-level keys."""
    hints = _hints(schema.Config)
    out, top = [], []
    for f in dataclasses.fields(schema.Config):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append((f.name, DOCS[tp.__name__][0], list(keys(tp, f.name + "."))))
        elif _item(tp) is not None:
            out.append((f.name, DOCS[_item(tp).__name__][0], [k for k in keys() if k.key.split("[")[0] == f.name]))
        else:
            top.extend(k for k in keys() if k.key == f.name)
    out.append(("Top-level keys", None, top))
    return out


def undocumented() -> list[str]:
    """The keys without a docstring, and the sections (dataclasses) without one."""
    missing = [k.key for k in keys() if not k.doc]
    missing += [f"{title} (section)" for title, intro, _ in sections()[:-1] if not intro]
    return missing


def type_text(tp: Any) -> str:
    inner, optional = _optional(tp)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner)
        words = "list of mappings" if dataclasses.is_dataclass(item) else f"list of {item.__name__}"
    elif typing.get_origin(inner) is dict:
        words = "mapping"
    else:
        words = inner.__name__
    return f"{words} or null" if optional else words


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def default_text(value: Any) -> str:
    return "required" if value == MISSING else f"`{_yaml(value)}`"


def allowed_text(k: Key) -> str:
    names, more = CHOICES.get(k.key, ((), ""))
    words = ", ".join(f"`{n}`" for n in names)
    more = _escape(more)
    text = f"{words}, or {more}" if words and more else words or more
    return f"each item: {text}" if text and typing.get_origin(_optional(k.type)[0]) is list else text


_SPECIAL = str.maketrans({c: "\\" + c for c in "\\*[]|"} | {"<": "&lt;", ">": "&gt;"})
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # inside a word, _ is no emphasis


def _escape(text: str) -> str:
    """Plain text for a Markdown table cell: code spans kept, everything else literal."""
    parts = " ".join(text.split()).split("`")
    # Even parts are prose; odd ones were inside backticks (a pipe must still not end the cell there).
    return "`".join(_EDGE_UNDERSCORE.sub(r"\\_", p.translate(_SPECIAL)) if i % 2 == 0 else p.replace("|", "\\|")
                    for i, p in enumerate(parts))


def render() -> str:
    lines = [INTRO.format(command=REGENERATE)]
    for title, intro, rows in sections():
        lines += [f"## {title}", ""]
        if intro:
            lines += [_escape(intro), ""]
        lines += ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for k in rows:
            lines.append(f"| `{k.key}` | {type_text(k.type)} | {default_text(k.default)} | {allowed_text(k)} "
                         f"| {_escape(k.doc or '')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"usage: python -m dtrain.config.reference [OUT]  (e.g. {REGENERATE})", file=sys.stderr)
        return 2
    text = render()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
