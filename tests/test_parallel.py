"""The strategies (dtrain/parallel/): their arithmetic against torch's own on a plain model, the gradient-sync
toggle, the registry, and the seam's rule that nothing outside dtrain/parallel/ reaches into a wrapper."""

from __future__ import annotations

import ast
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dtrain.config import load_config
from dtrain.parallel import STRATEGIES, Strategy, build_strategy
from dtrain.parallel.ddp import DDPStrategy
from dtrain.parallel.single import Alone
from dtrain.runtime.dist import DistState

PACKAGE = Path(__file__).resolve().parent.parent / "dtrain"


def dist_state(world_size: int, backend: str = "gloo") -> DistState:
    return DistState("test", 0, 0, world_size, backend, torch.device("cpu"))


def frozen_model() -> nn.Module:
    """Two layers, the first's bias frozen: a parameter with no gradient that no norm may count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    return model


def test_one_process_is_not_wrapped_at_all() -> None:
    """Nothing to all-reduce: the model itself, whatever the DDP knobs say, and no sync to skip."""
    strategy = build_strategy(load_config(None, ["dist.grad_compression=bf16"]).dist, dist_state(1))
    assert isinstance(strategy, Alone)
    model = nn.Linear(3, 2)
    assert strategy.wrap(model) is model and strategy.unwrap(model) is model
    x = torch.randn(5, 3)
    for last in (False, True):  # gradients accumulate either way
        with strategy.sync_gradients(model, last):
            model(x).sum().backward()
    torch.testing.assert_close(model.weight.grad, 2 * x.sum(0).expand(2, 3))  # twice d/dW of sum(xW^T + b)
    assert list(strategy.model_state(model)) == ["weight", "bias"]


def test_more_processes_get_the_ddp_strategy_of_their_group() -> None:
    cfg = load_config(None, ["dist.static_graph=true"]).dist
    strategy = build_strategy(cfg, dist_state(4, "nccl"))
    assert isinstance(strategy, DDPStrategy)
    assert (strategy.cfg, strategy.world_size, strategy.backend) == (cfg, 4, "nccl")


def test_every_registered_strategy_is_a_strategy() -> None:
    assert "ddp" in STRATEGIES
    for name, make in STRATEGIES.items():
        assert isinstance(make(load_config(None, []).dist, dist_state(2), "fp32"), Strategy), name


@pytest.mark.parametrize("global_real", [1, 3, 7, 10, 60, 97, 1000])
def test_the_scale_makes_the_reduced_gradient_the_global_mean(global_real: int) -> None:
    """Alone sums one rank's gradient: 1/n. DDP averages W ranks' gradients: W/n, so W x (mean of sums) / n is the
    sum over all ranks / n. With one rank both are the very same float."""
    assert Alone().grad_scale(global_real) == 1 / global_real
    for world in (1, 2, 3, 8):
        ddp = DDPStrategy(load_config(None, []).dist, torch.device("cpu"), world)
        sums = [float(3 * r + 1) for r in range(world)]  # each rank's summed loss (its gradient, by linearity)
        averaged = sum(s * ddp.grad_scale(global_real) for s in sums) / world  # what DDP's all-reduce leaves
        assert averaged == pytest.approx(sum(sums) / global_real)
    assert DDPStrategy(load_config(None, []).dist, torch.device("cpu"), 1).grad_scale(global_real) == \
        Alone().grad_scale(global_real)


def test_clip_is_torchs_clip_over_the_parameters_with_gradients() -> None:
    model, reference = frozen_model(), frozen_model()
    grads = [p.grad.clone() for p in reference.parameters() if p.grad is not None]
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))  # independent arithmetic
    max_norm = norm / 3
    got = Alone().clip_grad_norm(model, max_norm)
    want = nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert float(got) == pytest.approx(norm, rel=1e-6)
    assert torch.equal(got, want)
    coef = max_norm / (norm + 1e-6)
    for p, g, r in zip((p for p in model.parameters() if p.grad is not None), grads,
                       (r for r in reference.parameters() if r.grad is not None)):
        assert torch.equal(p.grad, r.grad)
        torch.testing.assert_close(p.grad, g * coef)
    assert model[0].bias.grad is None


def test_grad_norm_measures_without_clipping() -> None:
    model = frozen_model()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = Alone().grad_norm(model)
    assert float(norm) == pytest.approx(math.sqrt(sum(float(g.double().pow(2).sum()) for g in before)), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip((p for p in model.parameters() if p.grad is not None), before))


def test_model_state_round_trips_through_the_strategy() -> None:
    strategy, source, target = Alone(), frozen_model(), nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    strategy.load_model_state(target, strategy.model_state(source))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


class FakeDDP(nn.Module):
    """Records whether the strategy asked DDP to skip its all-reduce."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.skipped = 0

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.skipped += 1
        yield


def test_ddp_skips_the_all_reduce_on_all_but_the_last_backward() -> None:
    strategy = DDPStrategy(load_config(None, []).dist, torch.device("cpu"), 2)
    inner = nn.Linear(2, 2)
    fake = FakeDDP(inner)
    assert strategy.unwrap(fake) is inner
    for j, last in enumerate([False, False, True]):
        with strategy.sync_gradients(fake, last):
            pass
        assert fake.skipped == min(j + 1, 2)


@contextmanager
def one_process_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("extra,bucket_mib,backend", [
    ([], 25, "gloo"),  # gloo: every bucket 25 MiB, the whole small model in one all-reduce
    (["dist.bucket_cap_mb=0.5"], 0.5, "gloo"),
    ([], None, "nccl"),  # NCCL: DDP's own default, a small first bucket
])
def test_ddp_wrap_hands_the_knobs_to_ddp(extra: list[str], bucket_mib: Optional[float], backend: str) -> None:
    """The bucket rule follows the backend named, not the device. (All knobs on 2 ranks: tests/test_ddp_knobs.py.)"""
    with one_process_group():
        strategy = DDPStrategy(load_config(None, [*extra, "dist.grad_compression=bf16"]).dist, torch.device("cpu"), 1,
                               backend)
        model = nn.Linear(3, 2)
        ddp = strategy.wrap(model)
        assert strategy.unwrap(ddp) is model and ddp.gradient_as_bucket_view
        if bucket_mib is not None:
            assert ddp.bucket_bytes_cap == int(bucket_mib * 2**20)
        assert ddp._get_ddp_logging_data().get("comm_hook") == "bf16_compress_hook"


# --- the seam's rule: only dtrain/parallel/ knows what a wrapper is -------------------------------------------

WRAPPER_NAMES = {"DistributedDataParallel", "no_sync"}
STATE_NAMES = {"state", "loop", "train_state"}
"""What a TrainState is called; its `module` property asks the strategy, so `state.module` is fine."""


def _last_name(node: ast.expr) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def reaches_into_a_wrapper(source: str) -> list[int]:
    """Lines that name DDP or its no_sync, or take `.module` of anything but a TrainState."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if node.attr in WRAPPER_NAMES or (node.attr == "module" and _last_name(node.value) not in STATE_NAMES):
                lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in WRAPPER_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name in WRAPPER_NAMES for a in node.names):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in WRAPPER_NAMES | {"module"}):
            lines.append(node.lineno)
    return sorted(set(lines))


@pytest.mark.parametrize("line", [
    "from torch.nn.parallel import DistributedDataParallel as DDP",
    "model = torch.nn.parallel.DistributedDataParallel(model)",
    "with model.no_sync() if j < last else nullcontext():\n    pass",
    "sd = self.model.module.state_dict()",
    "m = ddp.module",
    "m = getattr(wrapped, 'module', wrapped)",
])
def test_the_scan_sees_a_wrapper_reached_into(line: str) -> None:
    assert reaches_into_a_wrapper(line)


def test_the_scan_lets_a_train_states_module_pass() -> None:
    assert not reaches_into_a_wrapper("m = result.loop.module\nn = state.module\nk = run.loop.module")


def test_nothing_outside_parallel_reaches_into_a_wrapper() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "parallel":
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{n}" for n in reaches_into_a_wrapper(path.read_text())]
    assert not found, f"ask the strategy (dtrain/parallel/) instead: {found}"


def test_every_strategy_the_config_accepts_has_its_implementation() -> None:
    from dtrain.config import choices
    from dtrain.parallel import STRATEGIES

    assert set(choices.STRATEGIES) == set(STRATEGIES)  # none offered without code, none coded but unreachable


def test_an_unknown_strategy_is_refused_with_its_key_and_the_choices() -> None:
    from dtrain.config import load_config
    from dtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'dist\.strategy'.*'fsdp3'.*ddp"):
        load_config(None, ["dist.strategy=fsdp3"])


class _WithAnUnusedHead(nn.Module):
    """`spare` never takes part in the forward, so it never gets a gradient and Adam never gives it state."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def _adam_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("steps_before_save", [0, 2])
def test_a_sharded_checkpoint_resumes_like_the_uninterrupted_run_with_a_parameter_never_given_a_gradient(
        tmp_path: Path, steps_before_save: int) -> None:
    """Through torch.distributed.checkpoint (the path of every fsdp2 checkpoint, whatever strategy loads it), saved
    after 2 Adam steps or before the first: torch's get_state_dict makes up state for every trainable parameter,
    which the strict load would demand of the checkpoint, and which saved before a step would count one step
    too many. Against the same run continued without the save, bitwise."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    batches = [torch.randn(6, 4) for _ in range(5)]
    model = _WithAnUnusedHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _adam_steps(model, optimizer, batches[:steps_before_save])
    dcp.save(Alone().sharded_state(model, optimizer), checkpoint_id=str(tmp_path / "shards"))
    assert len(optimizer.state) == (2 if steps_before_save else 0)  # the save made up nothing in the live run
    _adam_steps(model, optimizer, batches[steps_before_save:])

    torch.manual_seed(1)  # other weights, overwritten by the load
    resumed = _WithAnUnusedHead()
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.1)
    Alone().load_sharded_state(resumed, resumed_optimizer, str(tmp_path / "shards"))
    assert all(p not in resumed_optimizer.state for p in resumed.spare.parameters())
    _adam_steps(resumed, resumed_optimizer, batches[steps_before_save:])
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(want, got), name
    assert resumed_optimizer.state[resumed.used.weight]["step"] == optimizer.state[model.used.weight]["step"] == 5


def test_fsdp2_takes_a_whole_optimizer_state_without_state_for_a_parameter_never_given_a_gradient() -> None:
    """A DDP or one-process checkpoint's optimizer state (keyed by index, no entry for `spare`) loaded into an
    FSDP2-wrapped model (one gloo rank in this process; `spare` its own shard unit) continues as the same run
    left uninterrupted in plain PyTorch, bitwise, and gives `spare` no made-up state."""
    import copy

    from dtrain.parallel.fsdp2 import FSDP2Strategy

    torch.manual_seed(0)
    batches = [torch.randn(6, 4) for _ in range(5)]
    model = _WithAnUnusedHead()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _adam_steps(model, optimizer, batches[:2])
    saved_model, saved_optim = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert len(saved_optim["state"]) == 2
    _adam_steps(model, optimizer, batches[2:])
    with one_process_group():
        strategy = FSDP2Strategy(load_config(None, ["dist.strategy=fsdp2", "dist.shard=[Linear]"]).dist,
                                 torch.device("cpu"), 1)
        torch.manual_seed(1)
        resumed = strategy.wrap(_WithAnUnusedHead())
        resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.1)
        strategy.load_model_state(resumed, saved_model)
        strategy.load_optim_state(resumed, resumed_optimizer, saved_optim)
        assert all(p not in resumed_optimizer.state for p in resumed.spare.parameters())
        _adam_steps(resumed, resumed_optimizer, batches[2:])
        got = strategy.model_state(resumed)
        strategy.close()
    for name, want in model.state_dict().items():
        assert torch.equal(got[name], want), name
