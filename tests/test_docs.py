"""The docs site's generated pages: the config reference covers every key and is current, every field says
what it does, and the commands page still shows what --help prints."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import pytest

from dtrain.config import choices, reference, schema, to_dict
from dtrain.config.typed import _hints

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PAGE = ROOT / "docs" / "reference" / "config.md"
COMMANDS_PAGE = ROOT / "docs" / "reference" / "commands.md"


def with_list_items(obj: Any) -> Any:
    """`obj` with one default item in every list of mappings (optim.param_groups, callbacks), so that
    to_dict shows the items' keys too."""
    for name, tp in _hints(type(obj)).items():
        if dataclasses.is_dataclass(tp):
            with_list_items(getattr(obj, name))
        elif reference._item(tp) is not None:
            setattr(obj, name, [with_list_items(reference._item(tp)())])
    return obj


def flat_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    for name, value in tree.items():
        key = prefix + name
        if isinstance(value, dict) and value:
            yield from flat_keys(value, key + ".")
            continue
        yield key
        if isinstance(value, list) and value and isinstance(value[0], dict):
            yield from flat_keys(value[0], key + "[*].")


def test_every_config_key_is_in_the_reference() -> None:
    page = reference.render()
    found = list(flat_keys(to_dict(with_list_items(schema.Config()))))
    assert "optim.param_groups[*].params" in found and "callbacks[*].name" in found
    missing = [k for k in found if f"| `{k}` |" not in page]
    assert not missing, f"config keys missing from the generated reference: {', '.join(missing)}"


def test_the_committed_config_reference_is_current() -> None:
    if CONFIG_PAGE.read_text(encoding="utf-8") != reference.render():
        pytest.fail(f"{CONFIG_PAGE.relative_to(ROOT)} differs from what the schema generates; regenerate it: "
                    f"{reference.REGENERATE}", pytrace=False)


def test_every_config_field_and_section_has_a_docstring() -> None:
    missing = reference.undocumented()
    assert not missing, ("config keys without a docstring in dtrain/config/schema.py (the string right after "
                         f"the field is its reference entry): {', '.join(missing)}")


def test_the_choices_table_names_what_validate_checks() -> None:
    """reference.CHOICES maps keys to choice tuples by hand: it must agree with validate.py's _choice calls."""
    tree = ast.parse((ROOT / "dtrain" / "config" / "validate.py").read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "_choice"]
    assert len(calls) >= 10
    for call in calls:
        key, names = call.args[0].value, call.args[2].id
        assert key in reference.CHOICES, f"{key} takes choices.{names} but is not in reference.CHOICES"
        assert reference.CHOICES[key][0] is getattr(choices, names), f"{key}: reference.CHOICES != choices.{names}"
    known = {k.key for k in reference.keys()}
    assert set(reference.CHOICES) <= known, set(reference.CHOICES) - known


def test_field_docstrings_are_read_from_the_source(tmp_path: Path) -> None:
    source = tmp_path / "schema.py"
    source.write_text('class A:\n    """Section."""\n\n    x: int = 1\n    """Doc of x."""\n    y: int = 2\n'
                      '    z: str = "a"\n    """Doc of z."""\n')
    assert reference._documented(source) == {"A": ("Section.", {"x": "Doc of x.", "z": "Doc of z."})}


def test_cells_escape_markdown_but_keep_code() -> None:
    assert reference._escape("a | b, '*.bias', <output_dir>,\n  `x | y`, __init__ and fast_path") == (
        "a \\| b, '\\*.bias', &lt;output_dir&gt;, `x \\| y`, \\_\\_init\\_\\_ and fast_path")


def test_the_reference_command_writes_the_page(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    assert reference.main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference.render()
    assert reference.main(["--help"]) == 2


@pytest.mark.multiproc
def test_the_committed_commands_page_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_commands", ROOT / "docs" / "gen_commands.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    if COMMANDS_PAGE.read_text(encoding="utf-8") != gen.render():
        pytest.fail(f"{COMMANDS_PAGE.relative_to(ROOT)} differs from the commands' --help; regenerate it: "
                    "python docs/gen_commands.py", pytrace=False)
