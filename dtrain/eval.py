"""`python -m dtrain.eval RUN_DIR [--checkpoint last|best|ema|PATH] [--out FILE.json] [key=value ...]`.

Evaluates a run's weights on the eval set of its config.yaml (after the overrides: another data.name or
data.kwargs scores another set) exactly as the run's own eval does: the same loader, shards, precision and
`dtrain.loop.evaluate`. Alone or under any launcher (`torchrun --nproc_per_node=N -m dtrain.eval ...`); the
last eval record of the run comes back bit for bit at the run's world size. Rank 0 prints one line and, with
--out, writes the result as JSON; nothing is written into RUN_DIR.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

from dtrain.cli import guarded, run_dir_parser

PROG = "dtrain.eval"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = run_dir_parser(PROG, "Evaluate a dtrain run's weights on the eval set of its config.")
    parser.add_argument("--out", metavar="FILE.json", help="also write the result here as JSON (rank 0)")
    args = parser.parse_intermixed_args(argv)
    return guarded(PROG, argv, lambda: evaluate_run(args.run_dir, args.checkpoint, args.overrides, args.out))


def evaluate_run(run_dir: str, checkpoint: str = "last", overrides: Sequence[str] = (),
                 out: Optional[str] = None) -> dict[str, Any]:
    """Evaluate on every rank; the result (loss, each metric, samples) on every rank."""
    from dtrain.inference import open_run, write_out
    from dtrain.loop.evaluate import evaluate

    with open_run(run_dir, checkpoint, overrides, scoring=True) as run:
        result = evaluate(run.state, run.task, run.loader)

        def report() -> None:
            values = " ".join(f"{k} {v:.6g}" for k, v in result.items() if k != "samples")
            print(f"{PROG}: {values} on {result['samples']} samples; weights {run.weights}", flush=True)
            if out:
                body = {"eval": result, "run_dir": run_dir, "weights": run.weights, "overrides": list(overrides),
                        "world_size": run.dist.world_size}
                write_out(out, (json.dumps(body, allow_nan=True, indent=1) + "\n").encode())

        run.dist.run_on_main(report, share_result=False)
    return result


if __name__ == "__main__":
    sys.exit(main())
