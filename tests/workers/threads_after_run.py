"""Run under torchrun: train, drop the result, and report the gloo threads still running.

A finished run must leave no process-group threads behind: a group that outlives
its run keeps gloo's threads going into interpreter shutdown, where the process
can abort after a successful job. Prints one JSON line per rank.
"""

import gc
import json
import os
import sys
from pathlib import Path

from dtrain.config import load_config
from dtrain.run import train


def thread_names() -> list[str]:
    return sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))


def main() -> None:
    cfg = load_config(None, ["data.name=synthetic", "data.train_size=256", "data.eval_size=32",
                             "train.epochs=1", "log.progress=none", f"output_dir={sys.argv[1]}", *sys.argv[2:]])
    result = train(cfg)
    during = thread_names()  # the result still holds the DDP model here
    del result
    gc.collect()
    after = thread_names()
    # One write per line: two ranks share torchrun's stdout, and print() writes the newline separately.
    sys.stdout.write(json.dumps({"rank": int(os.environ["RANK"]), "while_held": during, "after": after}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
