"""dtrain.train under dist.strategy=fsdp2 returns a plain module: FSDP2 taken off, the full trained weights as
ordinary parameters (ties kept), usable after the process group is destroyed, the same on every rank and equal to
the model.pt the run wrote (the independent record of the trained weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import WORKERS, torchrun


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_the_api_returns_the_whole_trained_model_usable_without_the_process_group(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = torchrun(2, [str(WORKERS / "fsdp2_api.py"), str(out)])
    assert res.returncode == 0, res.stderr
    saved = torch.load(out / "model.pt")
    got = [torch.load(out / f"released_{r}.pt") for r in (0, 1)]
    for g in got:
        assert g["class"] == "Tied" and g["block_class"] == "Sequential"  # no FSDP class left
        assert g["dtensors"] == 0 and g["tied"]
        assert g["params"].keys() == saved.keys()
        for k in saved:
            assert torch.equal(g["params"][k], saved[k]), k
    # Its outputs are those of a fresh plain module loaded from model.pt.
    from tests.workers.fsdp2_api import Tied

    plain = Tied()
    plain.load_state_dict(saved)
    with torch.no_grad():
        want = plain(got[0]["inputs"])
    for g in got:
        assert torch.equal(g["outputs"], want)
    # The trained weights changed from the start and are not a shard: the embedding holds all 11 rows.
    assert saved["embed.weight"].shape == (11, 6)
