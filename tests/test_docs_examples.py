"""The examples and command lines in README.md and docs/ cannot rot unnoticed.

* A ```python block right after `<!-- tested: tests/test_docs_examples.py -->` is run here, in a temporary
  working directory (a run writes its runs/ there). A marker naming another test file is that file's to run,
  and it must name the page. Every other python block must at least compile, and every yaml block that is a
  config is loaded as one.
* Every dtrain command line (`python -m dtrain...`, `torchrun ... -m dtrain...`, `accelerate launch ... -m
  dtrain`, the console scripts, the sbatch and launch/ scripts, which pass their arguments to dtrain) in a
  shell block, a `$ ` line of a transcript, or an inline code span is parsed like a shell would (shlex, with
  backslash continuations joined), and its config part (`--config` files and `key=value` overrides) is
  validated with `dtrain.config.load_config`: torch-free and in-process, so a renamed key or a bad value in
  the docs fails here in milliseconds. A transcript line followed by `dtrain: error: ...` must fail with
  exactly that message.

Placeholders are skipped, not guessed: `<...>`, the literal `key=value`, a synopsis in `[...]`, and config
files that are the reader's own (my.yaml, a run's config.yaml). A bare preset name (`--config mnist_mlp`)
is looked up as configs/<name>.yaml.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import yaml

from dtrain.config import Config, load_config
from dtrain.errors import DTrainError
from helpers import REPO

HERE = "tests/test_docs_examples.py"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*tested:\s*(\S+?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL = ("bash", "sh", "shell", "console", "text", "")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
SECTIONS = {f.name for f in Config.__dataclass_fields__.values()}  # top-level keys, sections included


@dataclass
class Block:
    page: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    lines: list[str]
    marker: Optional[str] = None
    """What the `<!-- tested: ... -->` right before the block names, if any."""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


@dataclass
class Command:
    where: str
    text: str
    expect_error: Optional[str] = None
    """A transcript's `dtrain...: error: ...` line right after the command: what it must fail with."""
    inline: bool = False
    """From a code span in the prose, where a bare `python -m dtrain.eval` names the command, not a run of it."""


def _blocks_and_prose(page: Path) -> tuple[list[Block], list[tuple[int, str]], list[tuple[int, str]]]:
    """The fenced blocks, the prose lines (numbered) and every marker with its line."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    markers: list[tuple[int, str]] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i, last_text = 0, ""
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            found = MARKER.search(lines[i])
            if found:
                markers.append((i + 1, found.group(1)))
            prose.append((i + 1, lines[i]))
            if lines[i].strip():
                last_text = lines[i]
            i += 1
            continue
        indent, fence, lang = opened.groups()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marked = MARKER.search(last_text)
        blocks.append(Block(page, i + 1, lang.lower(), body, marked.group(1) if marked else None))
        last_text = lines[i]
        i = j + 1
    return blocks, prose, markers


SCANNED = {page: _blocks_and_prose(page) for page in PAGES}
BLOCKS = [b for blocks, _, _ in SCANNED.values() for b in blocks]
MARKED = [b for b in BLOCKS if b.marker]


def _joined(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines with backslash continuations joined, each with the line number it starts on."""
    out: list[tuple[int, str]] = []
    pending, start = "", first
    for n, line in enumerate(lines, first):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _commands() -> list[Command]:
    found: list[Command] = []
    for page, (blocks, prose, _) in SCANNED.items():
        rel = page.relative_to(REPO)
        for b in blocks:
            if b.lang not in SHELL:
                continue
            transcript = any(line.startswith("$ ") for line in b.lines)
            if not transcript and b.lang not in ("bash", "sh", "shell"):
                continue  # program output, a layout, a message: nothing to run
            if transcript:
                for k, line in enumerate(b.lines):
                    if line.startswith("$ "):
                        after = b.lines[k + 1] if k + 1 < len(b.lines) else ""
                        error = re.match(r"dtrain[\w.-]*: error: (.*)$", after)
                        found.append(Command(f"{rel}:{b.line + 1 + k}", line[2:],
                                             error.group(1) if error else None))
            else:
                found += [Command(f"{rel}:{n}", text) for n, text in _joined(b.lines, b.line + 1)]
        for n, line in prose:
            for span in re.findall(r"`([^`]+)`", line):
                found.append(Command(f"{rel}:{n}", span, inline=True))
    return [c for c in found if _invocation(c.text) is not None]


@dataclass
class Invocation:
    """One dtrain command: the module it runs and its arguments, placeholders already marked."""

    module: str
    args: list[str] = field(default_factory=list)


def _tokens(text: str) -> Optional[list[list[str]]]:
    """The simple commands of a shell line (split at ; && || | &), or None for a synopsis or unparsable text."""
    text = PLACEHOLDER.sub("__PLACEHOLDER__", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return None  # an unbalanced quote: prose in backticks, not a command
    if any(t.startswith("[") or t == "..." for t in tokens):
        return None  # a synopsis, `python -m dtrain [--config FILE.yaml ...] [key=value ...]`
    commands: list[list[str]] = [[]]
    skip_next = False
    for t in tokens:
        if skip_next:
            skip_next = False
        elif t in (";", "&&", "||", "|", "&"):
            commands.append([])
        elif t in (">", ">>", "<"):
            skip_next = True  # a redirection and its file
        else:
            commands[-1].append(t)
    return [c for c in commands if c]


def _invocation(text: str) -> Optional[Invocation]:
    for words in _tokens(text) or []:
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]  # WANDB_MODE=offline ...: the environment, not the command
        if not words:
            continue
        if "-m" in words[:-1]:
            i = words.index("-m")
            module = words[i + 1]
            if module == "dtrain" or module.startswith("dtrain."):
                return Invocation(module, words[i + 2:])
            continue
        scripts = {"dtrain": "dtrain", "dtrain-lr-find": "dtrain.lr_find", "dtrain-plot": "dtrain.plot"}
        if words[0] in scripts:
            return Invocation(scripts[words[0]], words[1:])
        for i, w in enumerate(words):
            if w.endswith(".sbatch") and "/" in w:  # a bare `train.sbatch` in prose is its name
                return Invocation("dtrain", words[i + 1:]) if _script(w) else Invocation(f"missing:{w}")
            if re.match(r"^(\./)?launch/.*\.sh$", w):
                # launch/X.sh NPROC [dtrain arguments...]
                return Invocation("dtrain", words[i + 2:]) if _script(w) else Invocation(f"missing:{w}")
            if re.match(r"^(\./)?(examples|benchmarks)/.*\.py$", w):
                return Invocation("script") if _script(w) else Invocation(f"missing:{w}")
    return None


def _script(path: str) -> bool:
    return (REPO / path).is_file()


def _placeholder(arg: str) -> bool:
    return "__PLACEHOLDER__" in arg or arg.lower() == "key=value"


def _config_file(arg: str) -> Optional[str]:
    """The file to load for `--config arg`, or None for the reader's own file (nothing here to check)."""
    if _placeholder(arg):
        return None
    if (REPO / arg).is_file():
        return str(REPO / arg)
    if "/" not in arg and not arg.endswith((".yaml", ".yml")):
        return str(REPO / "configs" / f"{arg}.yaml")  # a preset by name; missing: load_config says so
    if arg.startswith("configs/"):
        return str(REPO / arg)  # a preset that is not there: load_config says so
    return None


RUN_DIR_COMMANDS = {
    # module: (positionals, options taking a value)
    "dtrain.eval": (1, {"--checkpoint", "--out"}),
    "dtrain.predict": (2, {"--checkpoint", "--split"}),
    "dtrain.plot": (1, set()),
}
CONFIG_COMMANDS = {"dtrain", "dtrain.lr_find"}
FLAGS = {"-h", "--help", "--show-config"}


def check(inv: Invocation, expect_error: Optional[str] = None, inline: bool = False) -> None:
    """Fail (AssertionError, or the DTrainError load_config raises) unless the command is valid as written."""
    assert not inv.module.startswith("missing:"), f"no such script: {inv.module[8:]}"
    if inv.module == "script" or (inline and not inv.args):
        return
    if inv.module not in CONFIG_COMMANDS and inv.module not in RUN_DIR_COMMANDS:
        assert importlib.util.find_spec(inv.module) is not None, f"no module {inv.module}"
        return
    positionals, valued = RUN_DIR_COMMANDS.get(inv.module, (0, {"--config"}))
    files: list[str] = []
    overrides: list[str] = []
    unchecked = False
    given: list[str] = []
    args = list(inv.args)
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if arg in FLAGS and inv.module in CONFIG_COMMANDS:
            continue
        if arg.startswith("-"):
            assert name in valued, f"python -m {inv.module} has no option {name}"
            assert eq or args, f"{name} needs a value"
            value = inline if eq else args.pop(0)
            if name == "--config":
                path = _config_file(value)
                unchecked |= path is None
                files += [path] if path else []
            elif name == "--checkpoint" and not _placeholder(value):
                assert value in ("last", "best", "ema") or "/" in value or value.endswith(".pt"), \
                    f"--checkpoint {value}: allowed last | best | ema | a checkpoint directory | a .pt file"
            elif name == "--split":
                assert value in ("eval", "train"), f"--split {value}: allowed eval | train"
            continue
        if len(given) < positionals:
            given.append(arg)
            continue
        assert eq or _placeholder(arg), f"{arg!r}: expected key=value (python -m {inv.module} takes no more " \
                                        f"than {positionals} positional arguments)"
        if _placeholder(arg):
            unchecked = True
        else:
            overrides.append(arg)
    assert len(given) == positionals, f"python -m {inv.module} needs {positionals} positional arguments"
    if inv.module == "dtrain.predict" and not _placeholder(given[1]):
        assert given[1].endswith((".pt", ".npy")), f"OUT_FILE {given[1]} must end in .pt or .npy"
    if inv.module == "dtrain.plot":
        return
    if expect_error is not None and not unchecked:
        with pytest.raises(DTrainError) as failed:
            load_config(files, overrides)
        assert str(failed.value) == expect_error
        return
    if expect_error is None:
        load_config(files, overrides)


COMMANDS = _commands()


def test_the_pages_hold_what_these_tests_look_for() -> None:
    # A parser that silently finds nothing would pass everything.
    assert len(MARKED) >= 4, [b.where for b in MARKED]
    assert len(COMMANDS) >= 40
    assert any(c.expect_error for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_every_command_line_is_valid_as_written(command: Command) -> None:
    inv = _invocation(command.text)
    assert inv is not None
    try:
        check(inv, command.expect_error, command.inline)
    except (AssertionError, DTrainError) as exc:
        pytest.fail(f"{command.where}: `{command.text.strip()}`: {exc}")


@pytest.mark.parametrize("text", [
    "python -m dtrain train.epocs=3",
    "torchrun --nproc_per_node=2 -m dtrain --config configs/no_such_preset.yaml",
    "python -m dtrain --config no_such_preset",
    "sbatch slurm/train.sbatch optim.name=adam optim.momentum=0.5",
    "python -m dtrain.eval runs/x --checkpoint newest",
    "python -m dtrain.predict runs/x preds.csv",
    "python -m dtrain --conifg configs/mnist_mlp.yaml",
    "bash launch/no_such_launcher.sh 4",
])
def test_a_broken_command_fails_the_check(text: str) -> None:
    inv = _invocation(text)
    assert inv is not None
    with pytest.raises((AssertionError, DTrainError)):
        check(inv)


def test_placeholders_and_synopses_are_skipped_not_guessed() -> None:
    assert _invocation("python -m dtrain [--config FILE.yaml ...] [key=value ...]") is None
    check(_invocation("python -m dtrain --config <run>/config.yaml key=value"))  # type: ignore[arg-type]
    check(_invocation("python -m dtrain.plot runs/<date>-<time>"))  # type: ignore[arg-type]
    check(_invocation("WANDB_MODE=offline python -m dtrain log.wandb=true  # a comment; `x`"))  # type: ignore


def test_every_marker_stands_right_before_a_python_block() -> None:
    for page, (blocks, _, markers) in SCANNED.items():
        before_python = {b.line for b in blocks if b.marker and b.lang == "python"}
        for line, named in markers:
            assert any(0 < start - line <= 2 for start in before_python), \
                f"{page.relative_to(REPO)}:{line}: the marker for {named} is not right before a ```python block"


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_every_marked_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.marker != HERE:
        named = REPO / block.marker  # type: ignore[operator]
        assert named.is_file(), f"{block.where}: the marker names {block.marker}, which does not exist"
        assert str(block.page.relative_to(REPO)) in named.read_text(), \
            f"{block.where}: {block.marker} does not read {block.page.relative_to(REPO)}"
        return
    text = "\n".join(block.lines) + "\n"
    same = tuple(line for line in block.lines if line.strip())
    if same in _RAN:
        return  # the same example on another page: it ran once already, and CI time is short
    monkeypatch.chdir(tmp_path)  # the runs/ an example makes go here
    exec(compile(text, block.where, "exec"), {"__name__": "__docs_example__"})  # noqa: S102 - our own docs
    _RAN.add(same)


_RAN: set[tuple[str, ...]] = set()


def test_the_readme_example_is_examples_regression_py() -> None:
    # The README says so, and examples/regression.py is what the guides tell people to launch.
    readme = next(b for b in MARKED if b.page.name == "README.md")
    script = (REPO / "examples" / "regression.py").read_text().split('"""', 2)[2]
    assert [line for line in readme.lines if line.strip()] == [line for line in script.splitlines() if line.strip()]


PYTHON = [b for b in BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_every_python_block_compiles(block: Block) -> None:
    compile("\n".join(block.lines) + "\n", block.where, "exec")


CONFIGS = [b for b in BLOCKS if b.lang in ("yaml", "yml")]


@pytest.mark.parametrize("block", CONFIGS, ids=[b.where for b in CONFIGS])
def test_every_yaml_config_block_loads(block: Block, tmp_path: Path) -> None:
    tree = yaml.safe_load("\n".join(block.lines))
    if not isinstance(tree, dict) or not set(tree) <= SECTIONS | {"runtime"}:
        pytest.skip("not a dtrain config")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(block.lines) + "\n")
    load_config(str(path))


def test_the_readme_links_lead_somewhere() -> None:
    # mkdocs checks the links between pages under docs/; the README is outside the site, so its links are
    # checked here.
    text = (REPO / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]
    assert targets
    for target in targets:
        assert (REPO / target.split("#")[0]).exists(), f"README.md links to {target}, which is not there"
