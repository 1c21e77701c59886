"""dtrain's built-in GPT on token data against nanoGPT's five steps written by hand, same model, same batches.

    python benchmarks/gpt.py                # nanoGPT's CPU shakespeare_char size: a few minutes on 2 cores
    python benchmarks/gpt.py --gpu-size     # its GPU size (6 layers, 384 wide, block 256, batch 64), bf16
    python benchmarks/gpt.py --quick        # short windows: seconds, for checking the script

Both run in processes of their own, one after the other, repeat after repeat (interleaved, so a slow
spell of the machine hits both alike), on the same synthetic token file in nanoGPT's layout (train.bin of
uint16 ids, meta.pkl with the vocabulary size) with the same model (dtrain.models.gpt) and optimizer
(AdamW, weight decay on matrices only, warm-up then cosine, clipping at 1.0):

- dtrain: `python -m dtrain data.name=tokens model.name=gpt ...`, as a user runs it; tokens/s from its own
  train records after the first logging window (the warm-up).
- by hand: nanoGPT's loop: a random batch of windows from a fresh np.memmap, forward, cross-entropy of the
  flattened logits, zero_grad, backward, clip, step; the lr set by hand each step.

It prints tokens/s for each (medians of the repeats), the median of the repeats' own ratios dtrain / by hand
(1.00 = as fast), dtrain's MFU where the device's peak is known, and peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VOCAB = 65  # tiny Shakespeare's characters

CPU_SIZE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block": 64, "batch": 12, "precision": "fp32"}
GPU_SIZE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block": 256, "batch": 64, "precision": "bf16"}


def make_tokens(root: Path, tokens: int) -> None:
    g = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    g.integers(0, VOCAB, tokens, dtype=np.uint16).tofile(root / "train.bin")
    g.integers(0, VOCAB, tokens // 10, dtype=np.uint16).tofile(root / "val.bin")
    with open(root / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": VOCAB}, f)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_dtrain(data: Path, size: dict[str, Any], warm: int, timed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        kwargs = "{" + ",".join(f"{k}: {size[k]}" for k in ("n_layer", "n_head", "n_embd")) + ", dropout: 0.0}"
        args = [sys.executable, "-m", "dtrain", "data.name=tokens", f"data.path={data}",
                f"data.block_size={size['block']}", f"data.batch_size={size['batch']}", "model.name=gpt",
                f"model.kwargs={kwargs}", "optim.name=adamw", "optim.lr=1e-3", "optim.betas=[0.9,0.99]",
                "optim.weight_decay=0.1", "optim.no_decay_bias_norm=true", "sched.name=cosine",
                "sched.warmup_steps=100", "sched.min_lr=1e-4", "train.grad_clip=1.0",
                f"train.precision={size['precision']}", f"train.max_steps={warm + timed}",
                f"log.every_steps={warm}", "log.progress=none", "train.save_model=false",
                f"output_dir={out}"]
        res = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"dtrain failed:\n{res.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][1:]  # the first window is the warm-up
    seconds = sum(r["samples"] / r["samples_per_s"] for r in train)
    tokens = sum(r["samples"] for r in train) * size["block"]
    mfu = [r["mfu"] for r in train if r.get("mfu") is not None]
    peak = [r["peak_memory_gb"] for r in train if "peak_memory_gb" in r]
    return {"tokens_per_s": tokens / seconds, **({"mfu": statistics.median(mfu)} if mfu else {}),
            **({"peak_memory_gb": max(peak)} if peak else {})}


def run_hand(data: Path, size: dict[str, Any], warm: int, timed: int) -> dict[str, float]:
    args = [sys.executable, str(Path(__file__).resolve()), "--hand", str(data), json.dumps(size), str(warm),
            str(timed)]
    res = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"the hand-written loop failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def hand(data: Path, size: dict[str, Any], warm: int, timed: int) -> dict[str, float]:
    """nanoGPT's loop, the way its train.py does it, around dtrain's GPT."""
    import torch
    import torch.nn.functional as F

    from dtrain.models.gpt import GPT

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    block, batch = size["block"], size["batch"]
    model = GPT(VOCAB, block, size["n_layer"], size["n_head"], size["n_embd"], dropout=0.0).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=size["precision"] == "bf16")
    steps = warm + timed

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / max(1, steps - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    def get_batch() -> tuple[Any, Any]:
        tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")  # anew each batch, as nanoGPT does
        ix = torch.randint(len(tokens) - block, (batch,))
        x = torch.stack([torch.from_numpy(tokens[i:i + block].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + block].astype(np.int64)) for i in ix.tolist()])
        if cuda:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    start = 0.0
    for it in range(steps):
        if it == warm:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch()
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": timed * batch * block / elapsed}
    if cuda:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hand":
        data, size, warm, timed = Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(hand(data, size, warm, timed)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-size", action="store_true", help="nanoGPT's GPU shakespeare_char size, in bf16")
    parser.add_argument("--quick", action="store_true", help="short windows, one repeat: checks the script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    size = GPU_SIZE if args.gpu_size else CPU_SIZE
    warm, timed = (5, 10) if args.quick else (20, 200)
    repeats = 1 if args.quick else max(3, args.repeats)
    runs: dict[str, list[dict[str, float]]] = {"dtrain": [], "hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens"
        make_tokens(data, 1_000_000)
        for rep in range(repeats):
            runs["dtrain"].append(run_dtrain(data, size, warm, timed))
            runs["hand"].append(run_hand(data, size, warm, timed))
            print(f"repeat {rep + 1}: dtrain {runs['dtrain'][-1]['tokens_per_s']:,.0f} tokens/s, by hand "
                  f"{runs['hand'][-1]['tokens_per_s']:,.0f}", file=sys.stderr, flush=True)
    med = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    ratio = statistics.median(d["tokens_per_s"] / h["tokens_per_s"] for d, h in zip(runs["dtrain"], runs["hand"]))
    print(f"model: {size}, {timed} timed steps after {warm} of warm-up, {repeats} interleaved repeats")
    print(f"dtrain:  {med['dtrain']:12,.0f} tokens/s")
    print(f"by hand: {med['hand']:12,.0f} tokens/s")
    print(f"ratio dtrain / by hand: {ratio:.3f}")
    mfu = [r["mfu"] for r in runs["dtrain"] if "mfu" in r]
    print(f"dtrain MFU: {statistics.median(mfu):.1%}" if mfu else "dtrain MFU: no peak known for this device")
    for name, rs in runs.items():
        peak = [r["peak_memory_gb"] for r in rs if "peak_memory_gb" in r]
        if peak:
            print(f"{name} peak memory: {max(peak):.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runs": runs, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
