"""What a resume may change (dtrain/config/compat.py): keys that leave the math as it was, and nothing else."""

from __future__ import annotations

from dtrain.config import load_config, resume_conflicts, to_dict


def _conflicts(saved: list[str], now: list[str]) -> list[str]:
    return resume_conflicts(to_dict(load_config(None, saved)), to_dict(load_config(None, now)))


def test_where_and_how_a_run_goes_may_change() -> None:
    assert _conflicts(["output_dir=a", "data.num_workers=0", "log.every_steps=10", "dist.timeout_s=60",
                       "checkpoint.keep=2", "train.device=cpu", "data.batch_size=32"],
                      ["output_dir=b", "data.num_workers=4", "log.every_steps=1", "dist.backend=gloo",
                       "checkpoint.keep=5", "train.device=auto", "data.batch_size=16"]) == []


def test_what_changes_the_math_is_named_with_both_values() -> None:
    assert _conflicts(["optim.lr=0.05", "model.hidden=[8]"], ["optim.lr=0.2", "model.hidden=[8]"]) == [
        "optim.lr (0.05 -> 0.2)"]
    # a free section frees its own keys only: data.num_workers is free, data.name is not
    assert _conflicts(["data.name=digits"], ["data.name=synthetic", "data.num_workers=2"]) == [
        "data.name ('digits' -> 'synthetic')"]
    assert _conflicts([], ["train.seed=1", "sched.name=cosine"]) == [
        "sched.name ('constant' -> 'cosine')", "train.seed (0 -> 1)"]


def test_a_saved_config_yaml_s_runtime_section_is_not_config() -> None:
    saved = {**to_dict(load_config()), "runtime": {"world_size": 4, "precision": "fp32"}}
    assert resume_conflicts(saved, to_dict(load_config())) == []
