"""Under torchrun: dtrain.train(model=a module with tied weights, dist.strategy=fsdp2) from a script, then the
returned model used after the process group is gone. Rank r writes <out>/released_<r>.pt: its parameters, its
class name, whether any parameter is still a DTensor, whether the tie held, and its outputs on fixed inputs."""

from __future__ import annotations

import sys

import torch
from torch import nn

import dtrain


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's head and token embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def main(out: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (64, 5))
    data = torch.utils.data.TensorDataset(ids, ids.roll(1, dims=1))
    result = dtrain.train(model=Tied(), train_data=data, eval_data=data, loss="cross_entropy",
                          overrides=["dist.strategy=fsdp2", "train.epochs=2", "data.batch_size=8",
                                     "optim.name=adam", "optim.lr=0.01", "log.progress=none", f"output_dir={out}"])
    import torch.distributed as dist

    model = result.model
    assert not dist.is_initialized()  # the group is gone: the model must work on its own
    with torch.no_grad():
        outputs = model(ids[:4])
    rank = int(__import__("os").environ["RANK"])
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "class": type(model).__name__, "block_class": type(model.blocks[0]).__name__,
                "dtensors": sum(type(p).__name__ == "DTensor" for p in model.parameters()),
                "tied": model.head.weight is model.embed.weight, "outputs": outputs, "inputs": ids[:4]},
               f"{out}/released_{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
