"""What a resumed run may change: a checkpoint continues only under a config with the same math."""

from __future__ import annotations

from typing import Any

# Keys a resumed run may change: they leave its math as it was. Every other key must equal the
# checkpoint's; the per-process batch and accumulation may change only with the same global batch.
RESUME_FREE = ("data.root", "data.download", "data.num_workers", "data.eval_batch_size", "data.batch_size",
               "data.fast_path", "data.device_resident",
               "train.grad_accum_steps", "train.device", "train.save_model", "train.on_nonfinite",
               "train.max_skipped_steps", "dist.", "log.", "lr_find.",
               "checkpoint.", "eval.", "callbacks", "output_dir", "overwrite", "resume")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE)


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (checkpoint value -> this value)' for every key that changes the math of a resumed run."""
    a, b = _flatten({k: v for k, v in saved.items() if k != "runtime"}), _flatten(current)
    changed = [k for k in sorted(set(a) | set(b)) if not _free(k) and a.get(k) != b.get(k)]
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed]
