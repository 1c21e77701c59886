"""python -m dtrain.sample: text from a character-level GPT run.

The run is made here: a tiny GPT trained in plain PyTorch (its own loop, not dtrain's) until it has learned a
periodic text by heart, saved as a finished run (config.yaml, model.pt, finished.json) beside a character
vocabulary in nanoGPT's meta.pkl layout. Greedy decoding must then continue the text exactly, past the model's
block_size, which only a correct crop, decode and order of the generated ids can do.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtrain.checkpoint.store import mark_finished
from dtrain.config import ModelConfig, load_config, to_yaml
from dtrain.models.builtin import build_model
from dtrain.sample import main
from helpers import run

TEXT = "the cat sat on the mat.\n"
BLOCK = 8
KWARGS = {"n_layer": 1, "n_head": 2, "n_embd": 32}


def _write_data(folder: Path) -> dict:
    chars = sorted(set(TEXT))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    folder.mkdir(parents=True)
    ids = np.array([meta["stoi"][c] for c in TEXT * 50], dtype=np.uint16)
    (folder / "train.bin").write_bytes(ids.tobytes())
    (folder / "val.bin").write_bytes(ids[:200].tobytes())
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    return meta


def _train_by_hand(vocab: int, ids: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gpt", kwargs=dict(KWARGS)), (BLOCK,), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    starts = range(len(TEXT))  # one window at each offset of the period: the whole text, nothing repeated
    x = torch.stack([ids[s:s + BLOCK] for s in starts])
    y = torch.stack([ids[s + 1:s + 1 + BLOCK] for s in starts])
    for _ in range(150):
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"the tiny GPT did not learn the text (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Ops this small run far faster on one thread than on several contending for a shared CPU (about 100x here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    meta = _write_data(root / "data")
    ids = torch.tensor([meta["stoi"][c] for c in TEXT * 2])
    model = _train_by_hand(meta["vocab_size"], ids)
    run_dir = root / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(None, ["model.name=gpt", f"model.kwargs={KWARGS}".replace("'", ""), "data.name=tokens",
                             f"data.path={root / 'data'}", f"data.block_size={BLOCK}", f"output_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.save(model.state_dict(), run_dir / "model.pt")
    mark_finished(str(run_dir), 150, None)
    return run_dir


def _sample(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_sampling_continues_the_learned_text_past_block_size(char_run: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err = _sample(capsys, str(char_run), "--prompt", "the cat", "--tokens", "40", "--top-k", "1")
    assert code == 0, err
    expected = (TEXT * 3)[:len("the cat") + 40]  # 40 > BLOCK: every character after the 8th came from a crop
    assert out == expected + "\n"


def test_same_seed_same_text_only_vocabulary_characters(char_run: Path, capsys: pytest.CaptureFixture) -> None:
    prompt, n = "mat", 60
    args = [str(char_run), "--prompt", prompt, "--tokens", str(n), "--temperature", "3.0"]
    texts = []
    for seed in ("5", "5", "6"):
        code, out, err = _sample(capsys, *args, "--seed", seed)
        assert code == 0, err
        assert out.endswith("\n")
        texts.append(out[:-1])
    for text in texts:
        assert text.startswith(prompt) and len(text) == len(prompt) + n
        assert set(text) <= set(TEXT)
    assert texts[0] == texts[1]
    # At temperature 3 each draw is spread over several characters: 60 of them agreeing is all but impossible.
    assert texts[0] != texts[2]


def test_top_k_limits_the_characters_drawn(char_run: Path, capsys: pytest.CaptureFixture) -> None:
    # top-k 1 at any temperature is the argmax: the learned text, whatever the seed.
    for seed in ("1", "2"):
        code, out, _ = _sample(capsys, str(char_run), "--prompt", "on", "--tokens", "20", "--temperature", "50",
                               "--top-k", "1", "--seed", seed)
        assert code == 0 and out == (TEXT * 2)[TEXT.index("on"):][:22] + "\n"


def _one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    code, out, err = _sample(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dtrain.sample: error: ")
    return lines[0]


def test_a_prompt_character_outside_the_vocabulary(char_run: Path, capsys: pytest.CaptureFixture) -> None:
    line = _one_line_error(capsys, str(char_run), "--prompt", "the Zoo!", "--tokens", "5")
    assert "--prompt has 2 character(s) not in the vocabulary" in line  # 'o' is in it: "on"
    assert f"{char_run.parent / 'data' / 'meta.pkl'}: '!', 'Z'; allowed: '\\n .acehmnost'" in line


def test_a_missing_vocabulary(char_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _one_line_error(capsys, str(char_run), "--prompt", "the", f"data.path={tmp_path}")
    assert f"no character vocabulary at {tmp_path / 'meta.pkl'}" in line


def test_a_run_that_is_not_a_character_gpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, [f"output_dir={tmp_path}"])))
    line = _one_line_error(capsys, str(tmp_path), "--prompt", "x")
    assert "is not a character-level GPT run (it has model.name=mlp, data.name=digits)" in line


def test_bad_arguments(char_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert "--tokens has value 0; allowed: an integer >= 1" in _one_line_error(
        capsys, str(char_run), "--prompt", "the", "--tokens", "0")
    assert "--temperature has value 0.0" in _one_line_error(
        capsys, str(char_run), "--prompt", "the", "--temperature", "0")


@pytest.mark.multiproc
def test_the_command(char_run: Path, capsys: pytest.CaptureFixture) -> None:
    args = [str(char_run), "--prompt", "sat", "--tokens", "30", "--temperature", "2", "--seed", "9"]
    code, in_process, _ = _sample(capsys, *args)
    assert code == 0
    proc = run([sys.executable, "-m", "dtrain.sample", *args], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == in_process  # the same seed gives the same text in another process
    assert os.path.isfile(char_run / "model.pt")
