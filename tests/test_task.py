"""The loss/metric contract (dtrain/loop/task.py) against torch's own losses, and its one-line refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.errors import DTrainError
from dtrain.loop.task import BUILTIN, build_task

B = 6


def _sum_over_batch(name: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """The loss summed over the batch, per sample: a weighted loss's sum scaled to its weight per sample."""
    total, weight = build_task(name, [], "input", "target").loss_terms(out, y)
    return total.item() if weight is None else total.item() / weight.item() * y.shape[0]


@pytest.mark.parametrize("name, out, y, reference", [
    ("cross_entropy", torch.randn(B, 5), torch.randint(0, 5, (B,)), F.cross_entropy),
    ("cross_entropy", torch.randn(B, 5, 3), torch.randint(0, 5, (B, 3)), F.cross_entropy),  # per position
    ("cross_entropy", torch.randn(B, 5), torch.softmax(torch.randn(B, 5), 1), F.cross_entropy),  # soft labels
    ("mse", torch.randn(B, 3), torch.randn(B, 3), F.mse_loss),
    ("mse", torch.randn(B), torch.randn(B), F.mse_loss),
    ("l1", torch.randn(B, 2), torch.randn(B, 2), F.l1_loss),
    ("smooth_l1", torch.randn(B, 2) * 3, torch.randn(B, 2), F.smooth_l1_loss),
    ("bce_with_logits", torch.randn(B, 4), torch.randint(0, 2, (B, 4)).float(), F.binary_cross_entropy_with_logits),
])
def test_builtin_loss_summed_over_the_batch_is_torch_mean_times_batch(name, out, y, reference) -> None:  # type: ignore[no-untyped-def]
    """Per-sample mean over the other dims, summed over samples: torch's mean loss x batch size."""
    assert _sum_over_batch(name, out, y) == pytest.approx(reference(out, y).item() * B, rel=1e-6)


def test_metrics_against_hand_arithmetic() -> None:
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    values, weights = BUILTIN["accuracy"](out, torch.tensor([0, 0, 0]))
    assert values.tolist() == [1.0, 0.0, 1.0] and weights.tolist() == [1.0, 1.0, 1.0]
    values, weights = BUILTIN["accuracy"](out, torch.tensor([0, -100, 0]))  # an ignored label counts nowhere
    assert values.tolist() == [1.0, 0.0, 1.0] and weights.tolist() == [1.0, 0.0, 1.0]
    assert BUILTIN["mae"](out, torch.zeros(3, 2))[0].tolist() == [1.5, 1.5, 0.75]
    task = build_task("mse", [], "input", "target")
    assert task.eval_names == ["loss", "mae"]
    sums, weighted = task.eval_sums(out, torch.zeros(3, 2))
    assert sums.reshape(-1).tolist() == pytest.approx([2.5 + 4.5 + 0.625, 3.75, 3, 3]) and weighted == [False, False]


def test_default_metrics_follow_the_loss() -> None:
    assert build_task("cross_entropy", [], "i", "t").eval_names == ["loss", "accuracy"]
    assert build_task("l1", [], "i", "t").eval_names == ["loss"]
    assert build_task("bce_with_logits", [], "i", "t").eval_names == ["loss", "accuracy"]
    assert build_task("l1", [(None, "mae"), ("worst", lambda o, y: (o - y).abs().amax(1))], "i", "t").eval_names \
        == ["loss", "mae", "worst"]


def test_a_torch_loss_module_is_used_per_sample() -> None:
    out, y = torch.randn(B, 3), torch.randn(B, 3)
    task = build_task(nn.MSELoss(), [], "i", "t")
    assert task.loss_sum(out, y).item() == pytest.approx(F.mse_loss(out, y).item() * B, rel=1e-6)
    module = nn.CrossEntropyLoss(label_smoothing=0.1)
    task = build_task(module, [], "i", "t")
    labels = torch.randint(0, 3, (B,))
    assert task.loss_sum(out, labels).item() == pytest.approx(module(out, labels).item() * B, rel=1e-6)
    assert module.reduction == "mean"  # the user's own object is left as it was


@pytest.mark.parametrize("loss, out, y, needle", [
    ("cross_entropy", torch.randn(B, 10), torch.randn(B, 1),
     "loss.name=cross_entropy needs integer class labels as targets, got (6, 1) float32"),
    ("cross_entropy", torch.randn(B), torch.randint(0, 2, (B,)), "do not fit class-label targets"),
    ("mse", torch.randn(B, 1), torch.randn(B), "outputs (6, 1) float32 and the targets (6,) float32 must have"),
    ("mse", torch.randn(B, 10), torch.randint(0, 10, (B,)), "must have the same shape"),
    ("mse", torch.randn(B, 1), torch.randint(0, 10, (B, 1)), "targets must be floating point"),
])
def test_mismatched_targets_are_one_line(loss: str, out: torch.Tensor, y: torch.Tensor, needle: str) -> None:
    with pytest.raises(DTrainError) as err:
        build_task(loss, [], "i", "t").loss_sum(out, y)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_loss_that_averages_the_batch_itself_is_refused() -> None:
    def batch_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    with pytest.raises(DTrainError) as err:
        build_task(batch_mean, [], "i", "t").loss_sum(torch.randn(B, 1), torch.randn(B, 1))
    msg = str(err.value)
    assert "loss.name batch_mean returned shape () for a batch of 6" in msg and "reduction='none'" in msg


def test_batches_are_pairs_or_dicts_with_the_configured_keys() -> None:
    task = build_task("mse", [], "features", "label")
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert task.split((x, y))[1] is y and task.split([x, y])[0] is x
    assert task.split({"features": x, "label": y, "id": 3})[1] is y
    with pytest.raises(DTrainError, match=r"a batch is a dict with keys \['input', 'target'\]; expected the keys "
                                          r"data.input_key='features'"):
        task.split({"input": x, "target": y})
    with pytest.raises(DTrainError, match="a batch is a tuple of 3; expected"):
        task.split((x, y, y))
    with pytest.raises(DTrainError, match="a batch is Tensor; expected"):
        task.split(x)


def _token_mean(task_loss: str, out: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> float:
    total, weight = build_task(task_loss, [], "i", "t", ignore_index).loss_terms(out, y)
    return total.item() / weight.item()


def test_cross_entropy_is_the_mean_over_real_tokens_in_either_layout() -> None:
    logits, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))  # [batch, time, vocab]
    y[0, 2:] = -100
    y[2, 1:] = 3  # ignore_index=3 below
    expected = F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1), ignore_index=-100).item()
    assert _token_mean("cross_entropy", logits, y) == pytest.approx(expected, rel=1e-6)
    assert _token_mean("cross_entropy", logits.transpose(1, 2), y) == pytest.approx(expected, rel=1e-6)  # torch's
    expected3 = F.cross_entropy(logits.reshape(-1, 7), y.clamp_min(0).reshape(-1), ignore_index=3).item()
    assert _token_mean("cross_entropy", logits, y.clamp_min(0), 3) == pytest.approx(expected3, rel=1e-6)


def test_causal_lm_shifts_the_labels_by_one() -> None:
    logits, labels = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    labels[1, 4:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert _token_mean("causal_lm", logits, labels) == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(DTrainError, match=r"causal_lm needs logits \[batch, time, vocab\]"):
        build_task("causal_lm", [], "i", "t").loss_terms(torch.randn(2, 9), labels)


def test_a_user_loss_may_return_values_and_weights() -> None:
    task = build_task(lambda o, y: ((o - y).pow(2).sum(1), torch.full((o.shape[0],), 2.0)), [], "i", "t")
    total, weight = task.loss_terms(torch.ones(3, 2), torch.zeros(3, 2), first=2)
    assert (total.item(), weight.item()) == (4.0, 4.0)


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@pytest.mark.parametrize("returned", [lambda t: t, lambda t: {"logits": t, "loss": None}, _Out,
                                      lambda t: (t, torch.tensor(1.0)), lambda t: [t]])
def test_a_model_may_return_its_logits_in_several_ways(returned) -> None:  # type: ignore[no-untyped-def]
    logits = torch.randn(2, 3)
    task = build_task("cross_entropy", [], "*", "labels")
    x, y = task.split({"input_ids": torch.zeros(2), "mask": torch.ones(2), "labels": torch.zeros(2)})
    assert sorted(x) == ["input_ids", "mask"] and y.tolist() == [0, 0]  # the targets are not passed

    def model(input_ids: torch.Tensor, mask: torch.Tensor) -> object:
        return returned(logits)

    assert task.forward(model, x) is logits


@pytest.mark.parametrize("returned, needle", [
    ("text", "the model returned str;"),
    (None, "the model returned NoneType;"),
    ({"loss": torch.tensor(1.0)}, "the model returned a dict with keys ['loss'];"),
    (("a", torch.zeros(2)), "the model returned a tuple whose first element is str;"),
    ((), "the model returned an empty tuple;"),
])
def test_a_model_returning_no_logits_is_one_line(returned: object, needle: str) -> None:
    task = build_task("cross_entropy", [], "input", "target")
    with pytest.raises(DTrainError) as err:
        task.forward(lambda x: returned, torch.zeros(2))
    msg = str(err.value)
    assert needle in msg and "a tuple whose first element is the outputs" in msg and "\n" not in msg
