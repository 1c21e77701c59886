"""The documented callback runs: it is taken from docs/guides/callbacks.md itself (where the README points) and
trains a run with it. The other marked examples are run by tests/test_docs_examples.py."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dtrain
from helpers import REPO, records


PAGE = "docs/guides/callbacks.md"


def _block_after(marker: str) -> str:
    text = (REPO / PAGE).read_text()
    found = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, f"no python block after {marker!r} in {PAGE}"
    return found.group(1)


def test_the_documented_callback_finishes_the_run_where_its_rule_says(tmp_path: Path) -> None:
    scope: dict = {}
    exec(_block_after("<!-- tested: tests/test_readme_examples.py -->"), scope)  # noqa: S102 - our own docs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    cb = scope["StopBelow"](0.3)
    dtrain.train(model=lambda: nn.Linear(2, 2), train_data=TensorDataset(x, y), loss="cross_entropy", callbacks=[cb],
                 overrides=[f"output_dir={tmp_path}", "data.batch_size=8", "train.epochs=20", "optim.lr=0.5",
                            "log.every_steps=2", "log.progress=none"])
    logged = [r for r in records(tmp_path, "train")]
    first_below = next(r["step"] for r in logged if r["loss"] < 0.3)
    assert logged[-1]["step"] == first_below < 20 * 8  # stopped at the first log below the target
    assert cb.state_dict() == {"logs_seen": len(logged)}
    assert (tmp_path / "model.pt").exists()  # a callback's stop finishes the run
