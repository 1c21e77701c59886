"""model.name=gpt (dtrain/models/gpt.py) and the train records' tokens_per_s and mfu (dtrain/loop/throughput.py)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import dtrain
from dtrain.config import ModelConfig
from dtrain.errors import ConfigError, DTrainError
from dtrain.loop.throughput import (Throughput, device_peak_tflops, first_input, model_flops_per_token,
                                    tokens_per_sample)
from dtrain.models.builtin import build_model
from dtrain.__main__ import main as dtrain_main
from dtrain.data.char_text import encode_chars
from dtrain.models.gpt import GPT, Block
from helpers import records


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread is much faster than several contending for a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt(vocab: int = 65, block: int = 64, **kwargs) -> GPT:
    model = build_model(ModelConfig(name="gpt", kwargs=kwargs), (block,), vocab)
    assert isinstance(model, GPT)
    return model


# ---------------------------------------------------------------- the model

def test_logits_at_a_position_ignore_every_later_token() -> None:
    torch.manual_seed(0)
    model = gpt(20, 16, n_layer=2, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 20, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 20)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 20, (3, 15 - t))
        assert not torch.equal(changed, idx)
        again = model(changed)
        torch.testing.assert_close(again[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-6)
        # And the later ones do see them: the check above is not passing on a model that ignores its input.
        assert (again[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-3


def test_a_shorter_sequence_gives_the_same_logits_as_its_prefix() -> None:
    torch.manual_seed(0)
    model = gpt(20, 16, n_layer=1, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 20, (2, 16))
    torch.testing.assert_close(model(idx[:, :7]), model(idx)[:, :7], rtol=1e-5, atol=1e-6)
    with pytest.raises(DTrainError, match="given 17 tokens per sequence; its block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_the_lm_head_is_the_token_embedding() -> None:
    model = gpt(50, 8, n_layer=1, n_head=2, n_embd=16, bias=False)
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names  # one tensor, trained once
    # One matrix, counted once: 50*16 (tied) + 8*16 (positions) + one block + the final norm's weight.
    block = 16 + 16 * 48 + 16 * 16 + 16 + 16 * 64 + 64 * 16
    assert sum(p.numel() for p in model.parameters()) == 50 * 16 + 8 * 16 + block + 16
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randint(0, 50, (2, 8))).reshape(-1, 50), torch.randint(0, 50, (16,))).backward()
    opt.step()
    assert model.lm_head.weight is model.wte.weight
    fresh = gpt(50, 8, n_layer=1, n_head=2, n_embd=16, bias=False)
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.wte.weight
    torch.testing.assert_close(fresh.wte.weight, model.wte.weight, rtol=0, atol=0)


def test_gpt2_initialisation() -> None:
    torch.manual_seed(0)
    n_layer = 6
    model = gpt(1000, 64, n_layer=n_layer, n_head=4, n_embd=256)
    residual_std = 0.02 / math.sqrt(2 * n_layer)  # GPT-2: the projections into the residual stream, scaled

    def std_ok(t: torch.Tensor, std: float) -> None:
        # 65k+ draws: the sample std is within ~0.3% of the true one; 3% would take a wrong init to pass.
        assert abs(t.std().item() / std - 1) < 0.03, (t.std().item(), std)
        assert abs(t.mean().item()) < 3 * std / math.sqrt(t.numel()) * 3

    std_ok(model.wte.weight, 0.02)
    std_ok(model.wpe.weight, 0.02)
    for block in model.blocks:
        assert isinstance(block, Block)
        std_ok(block.attn.qkv.weight, 0.02)
        std_ok(block.mlp.fc.weight, 0.02)
        std_ok(block.attn.proj.weight, residual_std)
        std_ok(block.mlp.proj.weight, residual_std)
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert linear.bias is not None and not linear.bias.any()
        for norm in (block.ln_1, block.ln_2):
            assert torch.equal(norm.weight, torch.ones(256)) and not norm.bias.any()
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == n_layer


def test_flops_per_token_is_nanogpts_estimate() -> None:
    # nanoGPT's CPU shakespeare_char model: 4 layers, 4 heads, 128 wide, block 64, 65 characters, no biases.
    model = gpt(65, 64, n_layer=4, n_head=4, n_embd=128, bias=False)
    per_block = 128 + 128 * 384 + 128 * 128 + 128 + 128 * 512 + 512 * 128  # ln_1, qkv, proj, ln_2, fc, proj
    n = 65 * 128 + 4 * per_block + 128  # tied embedding, blocks, ln_f; not the position table
    assert n == 795_904 and model.num_params() == n  # nanoGPT prints "number of parameters: 0.80M" for it
    assert model.flops_per_token == 6 * n + 12 * 4 * 4 * (128 // 4) * 64 == 5_168_640
    assert model_flops_per_token(model) == 5_168_640


def test_model_kwargs_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'model.kwargs.block_size' has value 32; allowed: at least the data's "
                                          r"block size \(data.block_size=64\)"):
        gpt(65, 64, block_size=32)
    assert gpt(65, 64, n_layer=1, n_head=1, n_embd=8, block_size=128).wpe.num_embeddings == 128
    with pytest.raises(ConfigError, match="'model.kwargs.n_embd' has value 30; allowed: a multiple of "
                                          r"model.kwargs.n_head \(4\)"):
        gpt(n_embd=30)
    with pytest.raises(ConfigError, match=r"with model.name=gpt \(not hidden\)"):
        gpt(hidden=[3])
    with pytest.raises(ConfigError, match="'model.kwargs.dropout' has value 1.0"):
        gpt(dropout=1.0)
    with pytest.raises(DTrainError, match=r"allowed: token data .* got inputs of shape \(1, 28, 28\)"):
        build_model(ModelConfig(name="gpt"), (1, 28, 28), 10)


def test_the_command_line_refuses_a_block_size_beyond_the_models(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    encode_chars("to be or not to be, that is the question\n" * 20, str(tmp_path / "chars"))
    common = ["data.name=tokens", f"data.path={tmp_path / 'chars'}", "data.block_size=32", "model.name=gpt",
              "loss.name=causal_lm"]
    out = tmp_path / "run"
    assert dtrain_main([*common, "model.kwargs={block_size: 16}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == ("dtrain: error: config key 'model.kwargs.block_size' has value 16; allowed: at least the data's "
                   "block size (data.block_size=32): the model's position table must cover every position of a "
                   "window; unset, it is the data's\n")
    assert not out.exists()  # refused before anything was written
    # Not token data: one line too, not an embedding's index error.
    assert dtrain_main(["model.name=gpt", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err == ("dtrain: error: model.name=gpt takes token ids, integers [batch, T]; it was "
                                       "given torch.float32 inputs (32, 64) (token data: data.name=tokens)\n")
    assert not out.exists()


# ---------------------------------------------------------------- tokens_per_s and mfu

def test_throughput_arithmetic() -> None:
    t = Throughput(tokens_per_sample=64, flops_per_token=5_168_640.0, peak_flops=2 * 989e12)
    got = t.values(123.25)
    assert got["tokens_per_s"] == 123.25 * 64 == 7888.0
    assert got["mfu"] == 7888.0 * 5_168_640.0 / (2 * 989e12)
    assert Throughput(64, 5.0).values(2.0) == {"tokens_per_s": 128.0}  # no peak: no mfu
    assert Throughput().values(2.0) == {}


def test_tokens_per_sample_from_the_input_alone() -> None:
    assert tokens_per_sample(torch.zeros(64, dtype=torch.long)) == 64
    assert tokens_per_sample(torch.zeros(64, dtype=torch.int32)) == 64
    assert tokens_per_sample({"input_ids": torch.zeros(10, dtype=torch.long),
                              "attention_mask": torch.ones(10, dtype=torch.long)}) == 10
    assert tokens_per_sample(torch.zeros(64)) is None  # features, not tokens
    assert tokens_per_sample(torch.zeros(3, 8, 8, dtype=torch.uint8)) == 192  # an integer input is counted
    assert tokens_per_sample(torch.zeros(4, dtype=torch.bool)) is None
    assert tokens_per_sample({"pixels": torch.zeros(4)}) is None


def test_the_peak_comes_from_the_config_a_known_gpu_or_nowhere() -> None:
    assert device_peak_tflops(torch.device("cpu"), 12.5) == (12.5, "")
    peak, why = device_peak_tflops(torch.device("cpu"), None)
    assert peak is None and why.startswith("no mfu on CPU") and "log.peak_tflops" in why


def test_reading_the_first_sample_leaves_the_random_streams_alone() -> None:
    class Drawing(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.randint(0, 9, (8,)) + random.randint(0, 0), torch.rand(())

    torch.manual_seed(3)
    random.seed(3)
    before = torch.rand(3), random.random()
    torch.manual_seed(3)
    random.seed(3)
    x = first_input(Drawing(), lambda s: s)
    assert x.shape == (8,)
    assert torch.equal(torch.rand(3), before[0]) and random.random() == before[1]


def _windows(n: int, block: int, vocab: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n * block + 1,), generator=g)
    return TensorDataset(ids[:-1].view(n, block), ids[1:].view(n, block))


def _window_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def test_train_records_carry_tokens_per_s_and_mfu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    block, vocab = 16, 20
    data = dtrain.Datasets(_windows(96, block, vocab), None, input_shape=(block,), num_classes=vocab)
    common = ["model.name=gpt", "model.kwargs={n_layer: 1, n_head: 2, n_embd: 16}", "train.max_steps=4",
              "log.every_steps=2", "data.batch_size=8", "log.progress=lines"]
    dtrain.train(train_data=data.train, loss=_window_loss,
                 overrides=[*common, "log.peak_tflops=0.002", f"output_dir={tmp_path / 'a'}"])
    fpt = gpt(vocab, block, n_layer=1, n_head=2, n_embd=16).flops_per_token
    train = records(tmp_path / "a", "train")
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["tokens_per_s"] == r["samples_per_s"] * block
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 0.002e12, rel=1e-12)
    assert "no mfu" not in capsys.readouterr().out

    dtrain.train(train_data=data.train, loss=_window_loss, overrides=[*common, f"output_dir={tmp_path / 'b'}"])
    out = capsys.readouterr().out
    train = records(tmp_path / "b", "train")
    assert all("tokens_per_s" in r and "mfu" not in r for r in train)
    notes = [line for line in out.splitlines() if "no mfu" in line]
    assert notes == ["dtrain: no mfu on CPU: dtrain knows no peak FLOP/s for it; log.peak_tflops=<TFLOP/s of one "
                     "device> sets one"]


# ---------------------------------------------------------------- the presets: nanoGPT's recipes

@pytest.mark.parametrize("name, layers, width, block, batch, dropout, steps, device, precision", [
    ("shakespeare_char", 6, 384, 256, 64, 0.2, 5000, "auto", "bf16"),  # config/train_shakespeare_char.py
    ("shakespeare_char_cpu", 4, 128, 64, 12, 0.0, 2000, "cpu", "fp32"),  # its README's CPU command
])
def test_the_shakespeare_presets_are_nanogpts_recipes(name: str, layers: int, width: int, block: int, batch: int,
                                                      dropout: float, steps: int, device: str,
                                                      precision: str) -> None:
    from dtrain.config import load_config

    cfg = load_config(name)
    assert (cfg.data.name, cfg.data.path, cfg.data.download) == ("tokens", "data/shakespeare_char", True)
    assert (cfg.data.block_size, cfg.data.batch_size, cfg.data.sampling) == (block, batch, "random")
    assert cfg.model.name == "gpt"
    assert cfg.model.kwargs == {"n_layer": layers, "n_head": layers, "n_embd": width, "dropout": dropout,
                                "bias": False}
    assert cfg.loss.name == "cross_entropy"
    o, s, t = cfg.optim, cfg.sched, cfg.train
    assert (o.name, o.lr, o.betas, o.weight_decay, o.no_decay_bias_norm) == ("adamw", 1e-3, [0.9, 0.99], 0.1, True)
    assert (s.name, s.warmup_steps, s.min_lr) == ("cosine", 100, 1e-4)
    assert (t.max_steps, t.grad_clip, t.grad_accum_steps, t.device, t.precision) == (steps, 1.0, 1, device,
                                                                                      precision)
    # train.max_steps is the length, not the epochs: nanoGPT's prepare.py writes 1,003,854 train tokens.
    assert t.epochs * ((1_003_854 - 1) // block // batch) >= steps
    assert cfg.eval.every_steps == 250
    # Weight decay on matrices only, as nanoGPT's configure_optimizers: every 2-D parameter, nothing else.
    from dtrain.loop.optim import param_groups

    groups, _ = param_groups(cfg.optim, build_model(cfg.model, (block,), 65))
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert all(p.dim() >= 2 for p in by_decay[0.1]) and all(p.dim() < 2 for p in by_decay[0.0])
