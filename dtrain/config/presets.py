"""Presets by name: `--config mnist_mlp` reads the package's copy of configs/mnist_mlp.yaml.

They are written once, in the repository's configs/; dtrain/presets links there, so a clone and an
editable install read them in place and a wheel carries copies (pyproject.toml's package-data).
"""

from __future__ import annotations

import os
from importlib import resources

from dtrain.errors import ConfigError

SUFFIX = ".yaml"


def names() -> list[str]:
    """The presets this installation carries, sorted."""
    folder = resources.files("dtrain") / "presets"
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(SUFFIX)] for f in folder.iterdir() if f.name.endswith(SUFFIX))


def looks_like_name(text: str) -> bool:
    """A bare word: no directory and no extension, so it cannot be meant as a YAML file's path."""
    seps = {os.sep, os.altsep or os.sep, "/"}
    return bool(text) and not any(s in text for s in seps) and not text.endswith((".yaml", ".yml"))


def resolve(text: str) -> str:
    """The file to read for `--config TEXT`: a preset's for a bare name, else TEXT itself (a path, as always).

    A file of that name in the working directory still wins, so a path that worked before still does."""
    if not looks_like_name(text) or os.path.isfile(text):
        return text
    if text in names():
        # Messages then name the file a user can open: configs/... in a clone, site-packages in a wheel.
        return os.path.realpath(os.fspath(resources.files("dtrain") / "presets" / f"{text}{SUFFIX}"))
    available = ", ".join(names()) or "none installed"
    raise ConfigError("", text, available, f"config '{text}' is neither a preset nor a file; presets: {available} "
                      "(or a path to a YAML file)")


def hint(path: str) -> str:
    """For a missing file named like a preset (configs/mnist_mlp.yaml outside a clone): the preset's name."""
    stem, ext = os.path.splitext(os.path.basename(path))
    return f" (the preset by name: {stem})" if ext == SUFFIX and stem in names() else ""
