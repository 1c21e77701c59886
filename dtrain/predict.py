"""`python -m dtrain.predict RUN_DIR OUT_FILE [--checkpoint ...] [--split eval|train] [key=value ...]`.

The model's outputs for every sample of the eval set (or the train set), in dataset order, each sample once,
alone or under any launcher: each rank runs its shard of the set (the run's eval shards: no padding), in eval
mode with the run's precision, and rank 0 gathers them and writes OUT_FILE whole or not at all: `.pt`, a dict
{"outputs": [N, ...], "index": [N]}, or `.npy`, the outputs alone. Half-precision outputs are written as float32.
"""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from dtrain.cli import guarded, run_dir_parser
from dtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

PROG = "dtrain.predict"
SUFFIXES = (".pt", ".npy")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = run_dir_parser(PROG, "Write a dtrain run's model outputs for every sample of a data split.",
                            ("out_file", "where rank 0 writes the outputs: .pt or .npy"))
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="which set (default: eval)")
    args = parser.parse_intermixed_args(argv)
    return guarded(PROG, argv, lambda: predict_run(args.run_dir, args.out_file, args.checkpoint, args.overrides,
                                                   args.split))


def predict_run(run_dir: str, out_file: str, checkpoint: str = "last", overrides: Sequence[str] = (),
                split: str = "eval") -> None:
    if not out_file.endswith(SUFFIXES):
        # The same on every rank, like a config error: rank 0 says it.
        raise ConfigError("OUT_FILE", out_file, " | ".join(SUFFIXES),
                          f"OUT_FILE {out_file!r} must end in {' or '.join(SUFFIXES)}")
    from dtrain.inference import open_run, predict

    with open_run(run_dir, checkpoint, overrides, split) as run:
        got = predict(run)

        def write() -> None:
            assert got is not None  # rank 0 holds the gathered outputs
            outputs, index = got
            _write(out_file, outputs, index)
            print(f"{PROG}: {len(index)} outputs of shape {tuple(outputs.shape[1:])} from the {split} set "
                  f"written to {out_file}; weights {run.weights}", flush=True)

        run.dist.run_on_main(write, share_result=False)


def _write(path: str, outputs: torch.Tensor, index: torch.Tensor) -> None:
    import torch

    from dtrain.inference import write_out

    buf = io.BytesIO()
    if path.endswith(".npy"):
        import numpy

        numpy.save(buf, outputs.numpy())
    else:
        torch.save({"outputs": outputs, "index": index}, buf)
    write_out(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
