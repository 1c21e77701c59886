"""Under torchrun: `python -m dtrain ARGS` with model.name=mlp, where each rank's built-in MLP comes out with its
own weights (as after an init that is not deterministic across ranks): the real build, then noise drawn from a
generator seeded by RANK. The hash of what each rank built goes to $DTRAIN_TEST_HASH_DIR/built_<rank>.txt, so a
test can show that the ranks start from rank 0's weights all the same. Without the noise the ranks would build
alike from train.seed, and a check of the start could not fail."""

from __future__ import annotations

import os
import sys

import torch

from dtrain.__main__ import main
from dtrain.models import builtin
from tests.workers.fsdp2_models import note_built

_real = builtin.prepare_model


def _per_rank(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
    model = _real(model, *args, **kwargs)  # type: ignore[arg-type]
    noise = torch.Generator().manual_seed(500 + int(os.environ["RANK"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise), alpha=0.01)
    return note_built(model)


if __name__ == "__main__":
    builtin.prepare_model = _per_rank  # build_model looks it up here when it finishes the MLP
    sys.exit(main(sys.argv[1:]))
