"""What `python -m dtrain --help` teaches after the options: the config's sections, the presets, the other
commands and where each key is documented. No torch: --help answers at once."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import typing

from dtrain.config import presets, schema

WIDTH = 100

COMMANDS = {
    "python -m dtrain.lr_find [--config ...] [key=value ...]": "the learning-rate range test",
    "python -m dtrain.eval RUN_DIR [--checkpoint ...]": "evaluate a run's weights",
    "python -m dtrain.predict RUN_DIR OUT_FILE": "the model's outputs for every sample",
    "python -m dtrain.plot RUN_DIR": "training curves into RUN_DIR/curves.png",
    "python -m dtrain.sample RUN_DIR --prompt TEXT --tokens N": "text from a character-level GPT run",
}


def _section_class(tp: typing.Any) -> typing.Optional[type]:
    """The dataclass a top-level field holds, or (callbacks) holds a list of."""
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _summary(cls: type) -> str:
    # Each section's class docstring says what it holds (the reference page shows the same words); a class
    # without one has dataclass's generated signature there instead, which teaches nothing.
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def sections() -> tuple[list[tuple[str, str]], list[str]]:
    """(section, its one line) for each config section, in the schema's order; the top-level keys."""
    hints = typing.get_type_hints(schema.Config)
    found, top = [], []
    for f in dataclasses.fields(schema.Config):
        cls = _section_class(hints[f.name])
        if cls is None:
            top.append(f.name)
        else:
            found.append((f.name, _summary(cls)))
    return found, top


def epilog() -> str:
    found, top = sections()
    width = max(len(name) for name, _ in found) + 2
    lines = ["config sections (section.key=value on the command line, or in a YAML file):"]
    for name, text in found:
        lines += textwrap.wrap(text, WIDTH, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))
        if not text:
            lines.append(f"  {name}")
    lines += [f"  top-level keys: {', '.join(top)}", ""]
    names = ", ".join(presets.names()) or "none installed"
    lines += ["presets (--config NAME; written in the repository's configs/, a path to a YAML file works too):",
              *textwrap.wrap(names, WIDTH, initial_indent="  ", subsequent_indent="  "), ""]
    lines += ["other commands (each takes --help):"]
    lines += [f"  {cmd}\n      {text}" for cmd, text in COMMANDS.items()]
    lines += ["", "every key with its type, default and meaning: docs/reference/config.md in the repository;",
              "the values a run would use: python -m dtrain --show-config [--config ...] [key=value ...]"]
    return "\n".join(lines)
