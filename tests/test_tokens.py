"""data.name=tokens: memory-mapped token files read as windows, random or strided, exact across ranks and resumes.

The facts are written here: the token ids a test writes to disk, and the windows they must come back as
(x = ids[o : o+T], y = ids[o+1 : o+T+1]); the runs are compared with independent runs of the same command.
"""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.config import DataConfig
from dtrain.data.char_text import encode_chars, fetch_text, prepare_shakespeare
from dtrain.data.loaders import build_loaders
from dtrain.data.random_windows import RandomWindows, draw_offsets
from dtrain.data.source import SamplerSource
from dtrain.data.tokens import TokenWindows, token_datasets
from dtrain.errors import DTrainError
from dtrain.runtime.dist import DistState
from helpers import WORKERS, dtrain, one_line_error, records, rel_diff, torchrun

T = 8


def _write(folder: Path, train: np.ndarray, val: np.ndarray | None = None, vocab: int | None = None,
           ext: str = ".bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, ids in (("train", train), ("val", val)):
        if ids is not None:
            if ext == ".npy":
                np.save(folder / f"{stem}.npy", ids)
            else:
                (folder / f"{stem}.bin").write_bytes(ids.tobytes())
    if vocab is not None:
        (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab, "stoi": {}, "itos": {}}))
    return folder


def _cfg(folder: Path, **kw: object) -> DataConfig:
    return DataConfig(name="tokens", path=str(folder), block_size=T, **kw)  # type: ignore[arg-type]


def _ids(n: int, vocab: int = 50, seed: int = 0, dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(dtype)


def _dist(rank: int, world: int) -> DistState:
    return DistState(launcher="test", rank=rank, local_rank=rank, world_size=world, backend="gloo",
                     device=torch.device("cpu"))


# ---------------------------------------------------------------- files and windows, in-process


@pytest.mark.parametrize("ext, dtype", [(".bin", np.uint16), (".npy", np.int32)])
def test_windows_are_the_ids_and_the_ids_shifted_by_one(tmp_path: Path, ext: str, dtype: type) -> None:
    ids = _ids(1000, dtype=dtype)
    data = token_datasets(_cfg(_write(tmp_path, ids, ids[:100], ext=ext)))
    train = data.train
    assert isinstance(train, TokenWindows) and len(train) == 999 // T and data.input_shape == (T,)
    assert data.num_classes == int(ids.max()) + 1  # no meta.pkl: the largest id + 1
    x, y = train.get_batch(torch.tensor([0, 5, 123]))
    for row, w in enumerate((0, 5, 123)):
        assert x[row].tolist() == ids[w * T:w * T + T].tolist()
        assert y[row].tolist() == ids[w * T + 1:w * T + T + 1].tolist()
    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
    item = train[5]
    assert torch.equal(item[0], x[1]) and torch.equal(item[1], y[1])  # get_batch = collating the items


def test_uint32_ids_and_the_vocabulary_from_meta(tmp_path: Path) -> None:
    ids = _ids(500, vocab=100_000, dtype=np.uint32)
    data = token_datasets(_cfg(_write(tmp_path, ids, ids, vocab=100_000), token_dtype="uint32"))
    assert data.num_classes == 100_000
    assert data.train[0][0].tolist() == ids[:T].tolist()


def test_a_meta_pkl_is_read_as_plain_data_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("ran",))

    _write(tmp_path, _ids(100))
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 50, "x": Evil()}))
    with pytest.raises(DTrainError, match="reads only dicts, lists, strings and numbers"):
        token_datasets(_cfg(tmp_path))


def test_bad_token_files_are_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(DTrainError, match="no train.bin or train.npy there; data.download=true writes tiny"):
        token_datasets(_cfg(tmp_path / "nothing"))
    short = _write(tmp_path / "short", _ids(T))
    with pytest.raises(DTrainError, match=f"holds {T} tokens, fewer than one window of data.block_size={T}"):
        token_datasets(_cfg(short))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "train.bin").write_bytes(b"\x01" * 101)
    with pytest.raises(DTrainError, match="is 101 bytes, not a whole number of uint16 ids"):
        token_datasets(_cfg(odd))
    beyond = _write(tmp_path / "beyond", np.array([3] * 40 + [70] + [3] * 40, dtype=np.uint16), vocab=65)
    windows = token_datasets(_cfg(beyond)).train
    windows.get_batch(torch.tensor([0, 1, 2, 3]))  # ids below 65
    with pytest.raises(DTrainError, match="holds token id 70, at or beyond the vocabulary of 65"):
        windows.get_batch(torch.tensor([4, 5]))


# ---------------------------------------------------------------- random sampling, in-process


def _random(data: TokenWindows, rank: int, world: int, b: int, k: int) -> RandomWindows:
    return RandomWindows(data, seed=7, rank=rank, world_size=world, batch_size=b, k=k,
                         workers_rng=torch.Generator())


def _global_windows(data: TokenWindows, world: int, b: int, k: int, epoch: int, steps: int) -> list[Counter]:
    """Per step, the multiset of windows (as tuples of ids) that all ranks together train on."""
    per_step: list[Counter] = [Counter() for _ in range(steps)]
    for rank in range(world):
        for window in _random(data, rank, world, b, k).windows(epoch):
            if window.index >= steps:
                break
            assert window.real == [b] * k and window.global_real == world * b * k
            for x, y in window.batches:
                assert x.shape == (b, T) and torch.equal(x[:, 1:], y[:, :-1])
                per_step[window.index].update(tuple(row.tolist()) for row in x)
    return per_step


def test_random_windows_are_the_same_global_batch_at_any_split(tmp_path: Path) -> None:
    ids = np.arange(5000, dtype=np.uint16)  # every window is told apart by its first id
    data = token_datasets(_cfg(_write(tmp_path, ids))).train
    one = _global_windows(data, 1, 12, 1, epoch=0, steps=4)
    for world, b, k in ((2, 6, 1), (3, 2, 2), (4, 3, 1)):
        assert _global_windows(data, world, b, k, epoch=0, steps=4) == one, (world, b, k)
    # Windows start anywhere (not only at multiples of T), and steps and epochs draw anew.
    starts = [w[0] for step in one for w in step]
    assert any(s % T for s in starts) and all(0 <= s <= 5000 - T - 1 for s in starts)
    assert one[0] != one[1] and _global_windows(data, 1, 12, 1, epoch=1, steps=1)[0] != one[0]
    # Ranks draw different windows: rank 0's and rank 1's first micro-batches share none.
    r0, r1 = (next(_random(data, r, 2, 6, 1).windows(0)).batches[0][0] for r in (0, 1))
    assert not {tuple(r.tolist()) for r in r0} & {tuple(r.tolist()) for r in r1}


def test_random_windows_resume_where_the_checkpoint_was(tmp_path: Path) -> None:
    data = token_datasets(_cfg(_write(tmp_path, _ids(3000)))).train
    source = _random(data, 1, 2, 4, 2)
    assert source.steps_per_epoch == -(-len(data) // 16)  # an epoch covers (tokens - 1) // T windows
    full = [w.batches for w in source.windows(3)]
    resumed = _random(data, 1, 2, 4, 2)
    resumed.load_state_dict({"window_in_epoch": 5})
    rest = list(resumed.windows(3))
    assert [w.index for w in rest] == list(range(5, source.steps_per_epoch)) and resumed.position == 0
    for got, want in zip(rest, full[5:]):
        assert all(torch.equal(a, b) for ga, wa in zip(got.batches, want) for a, b in zip(ga, wa))
    # The offsets are a function of (seed, epoch, step) alone: the prefix of a larger draw is the smaller one.
    assert np.array_equal(draw_offsets(7, 3, 5, 16, 100)[:8], draw_offsets(7, 3, 5, 8, 100))


def test_strided_sampling_shards_every_window_once_per_epoch(tmp_path: Path) -> None:
    ids = np.arange(2001, dtype=np.uint16)
    cfg = _cfg(_write(tmp_path, ids, ids[:100]), sampling="strided", batch_size=5)
    data = token_datasets(cfg)
    seen: Counter = Counter()
    for rank in (0, 1):
        loaders = build_loaders(data, cfg, seed=3, dist_state=_dist(rank, 2), grad_accum_steps=1)
        assert isinstance(loaders.train, SamplerSource)  # the usual sampler, on the fast path
        for window in loaders.train.windows(0):
            x = window.batches[0][0]
            seen.update(int(v) for v in x[: window.real[0], 0])
    assert seen == Counter(range(0, 2000, T))  # 250 windows, each once; 2 x 125 per rank, no repeats counted


# ---------------------------------------------------------------- tiny Shakespeare's preparation


def test_a_text_is_encoded_as_characters_in_nanogpt_layout(tmp_path: Path) -> None:
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 7
    folder = tmp_path / "chars"
    calls = []

    def fetch() -> str:
        calls.append(1)
        return text

    prepare_shakespeare(str(folder), fetch)
    prepare_shakespeare(str(folder), fetch)  # a train.bin there: done already, nothing fetched
    assert len(calls) == 1 and sorted(p.name for p in folder.iterdir()) == ["meta.pkl", "train.bin", "val.bin"]
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == len(set(text)) and meta["itos"][0] == "\n" and meta["stoi"]["F"] == 7
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    val = np.fromfile(folder / "val.bin", dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text
    assert token_datasets(DataConfig(name="tokens", path=str(folder), block_size=16)).num_classes == len(set(text))
    assert encode_chars("ab", str(tmp_path / "tiny")) == 2


def test_a_failed_download_is_one_line() -> None:
    with pytest.raises(DTrainError) as caught:
        fetch_text("http://127.0.0.1:9/input.txt", timeout_s=5)  # the discard port: refused at once
    line = str(caught.value)
    assert "\n" not in line and line.startswith("data.download: cannot fetch tiny Shakespeare from http://127.0.0.1")
    assert "set data.path to a folder with its train.bin" in line


# ---------------------------------------------------------------- real runs

LM = ["data.name=tokens", "data.block_size=8", "data.batch_size=4", "train.grad_accum_steps=2", "train.epochs=2",
      "model.name=tests.workers.token_model:build", "loss.name=tests.workers.token_model:next_token_loss",
      "optim.name=adamw", "optim.lr=0.01", "log.every_steps=1", "log.progress=none"]
# 1281 tokens: 160 windows of 8; a step's global batch is 4 x 2 x 2 ranks = 16 windows, so 10 steps an epoch
# for either sampling (strided: 80 windows per rank, 20 batches, 10 windows of 2).


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    ids = _ids(1281, vocab=30, seed=1)
    return _write(folder, ids, _ids(200, vocab=30, seed=2), vocab=30)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt")


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sampling", ["random", "strided"])
def test_kill_9_then_rerun_equals_the_uninterrupted_run(tmp_path: Path, lm_data: Path, sampling: str) -> None:
    """Killed mid-accumulation and half-way through a checkpoint file, then the same command again: the final
    weights equal the uninterrupted run's bit for bit. Random sampling at 2 ranks x 4 also equals 1 rank x 8
    (the same windows in each global batch)."""
    args = [*LM, f"data.path={lm_data}", f"data.sampling={sampling}", "checkpoint.every_steps=3"]
    ref = tmp_path / "uninterrupted"
    dtrain(2, [*args, f"output_dir={ref}"])
    steps = [r["step"] for r in records(ref, "train")]
    assert steps == list(range(1, 21))
    run = tmp_path / "killed"
    rng = random.Random(sampling)
    kills = [f"backward:{rng.randint(2, 6) * 2 + 1}", "save:2"]  # odd: inside an accumulation window
    for spec in [*kills, ""]:
        res = torchrun(2, [str(WORKERS / "killer.py"), *args, f"output_dir={run}"],
                       env={"DTRAIN_TEST_KILL": spec} if spec else {})
        assert (res.returncode != 0) if spec else (res.returncode == 0), (spec, res.stderr)
    want, got = _weights(ref), _weights(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in records(run, "train")] == steps  # each step once
    if sampling != "random":
        return
    one = tmp_path / "one"
    dtrain(0, [*args, "data.batch_size=8", f"output_dir={one}"])
    pairs = list(zip(records(ref), records(one)))
    assert len(pairs) == len(records(ref)) == len(records(one))
    for a, b in pairs:
        assert (a["split"], a["step"], a["samples"]) == (b["split"], b["step"], b["samples"])
        assert rel_diff(a["loss"], b["loss"]) < 1e-5, (a, b)
    for name, w in _weights(one).items():
        torch.testing.assert_close(w, want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.multiproc
def test_ids_beyond_the_vocabulary_stop_set_up_in_one_line(tmp_path: Path) -> None:
    folder = _write(tmp_path / "beyond", np.array([3, 4, 5, 70] * 100, dtype=np.uint16), vocab=65)
    run = tmp_path / "run"
    line = one_line_error([*LM, f"data.path={folder}", f"output_dir={run}"])
    assert line.endswith(f"{folder}/train.bin holds token id 70, at or beyond the vocabulary of 65 its meta.pkl "
                         "gives; fix the ids or meta.pkl's vocab_size")
    assert not run.exists()  # refused before the run wrote anything
