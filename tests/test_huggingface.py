"""A Hugging Face causal LM trains through dtrain.train with no wrapper: dict batches as keyword arguments
(data.input_key=*), its output object's logits, loss.name=causal_lm over padded labels.

The model is GPT-2 built from a tiny config (no download). The labels are the targets (data.target_key), so
they are not passed to the model and it computes no loss of its own; dtrain's logged loss must equal the
token mean over each global batch computed here in plain PyTorch (shift by one, -100 ignored), step by step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import dtrain
from helpers import records, rel_diff

transformers = pytest.importorskip("transformers")

V, T, N, SEED, LR = 50, 12, 22, 3, 0.05


class Padded(Dataset):
    """Token sequences of 2 to T ids, padded: input_ids with 0, attention_mask 0, labels with -100."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        ids = torch.randint(1, V, (n, T), generator=g)
        self.mask = (torch.arange(T)[None] < lengths[:, None]).long()
        self.ids = ids * self.mask
        self.labels = torch.where(self.mask.bool(), ids, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=T, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _token_mean(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels.reshape(-1), ignore_index=-100)


@pytest.mark.timeout(120)
def test_a_hugging_face_causal_lm_trains_on_dict_batches_with_the_token_mean(tmp_path: Path) -> None:
    data = Padded(N, 1)
    model = _gpt2()
    reference = copy.deepcopy(model)
    dtrain.train(model=model, train_data=data, eval_data=Padded(9, 2), loss="causal_lm",
                 overrides=["data.input_key=*", "data.target_key=labels", "data.batch_size=4",
                            "train.grad_accum_steps=2", "train.epochs=1", f"train.seed={SEED}", "optim.name=sgd",
                            f"optim.lr={LR}", "optim.momentum=0.0", "log.every_steps=1", "log.progress=none",
                            f"output_dir={tmp_path / 'run'}"])

    # Plain PyTorch: the sampler's permutation, global batches of 8 (8, 8, 6), the token mean of each.
    opt = torch.optim.SGD(reference.parameters(), lr=LR)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED))
    losses, tokens = [], []
    for i in range(0, N, 8):
        batch = {k: torch.stack([data[j][k] for j in order[i:i + 8].tolist()]) for k in data[0]}
        if i == 0:  # the model's own loss agrees with this token mean (it shifts the labels the same way)
            own = reference(**batch).loss
            assert own.item() == pytest.approx(_token_mean(reference, batch).item(), rel=1e-6)
        loss = _token_mean(reference, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens.append(int((batch["labels"][:, 1:] != -100).sum()))

    train = records(tmp_path / "run", "train")
    assert [r["samples"] for r in train] == [8, 8, 6]
    assert [r["tokens"] for r in train] == tokens
    worst = max(rel_diff(r["loss"], ref) for r, ref in zip(train, losses))
    assert len(train) == 3 and worst < 1e-5, (worst, [r["loss"] for r in train], losses)
    print(f"GPT-2 (tiny) through dtrain.train: losses {[round(x, 5) for x in losses]}, "
          f"largest relative difference {worst:.2e}")
