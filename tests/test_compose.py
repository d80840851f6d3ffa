"""A trace composed from the whole step at one size and the forward/backward at another is
exactly the whole step traced at that other size."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from batchfit._compose import compose
from batchfit._estimate import Estimator
from batchfit._fit import fit
from batchfit._models import InputSpec, Workload, load_workload
from batchfit._step import make_spec
from zoo import ZOO, zoo_workload

CASES = [
    ("cnn", "adam", "fp32"),
    ("cnn", "sgd", "amp-fp16"),  # the loss scaler's state is made once, in iteration 1's window
    ("resnet18", "adamw", "amp-bf16"),
    ("mlp", "sgd", "bf16"),
    ("tied_lm", "adamw", "fp32"),
    ("frozen", "adam", "fp32"),
    ("lstm", "adam", "fp32"),
    ("dict_input", "sgd", "fp32"),
    ("llama_tiny", "adamw", "amp-bf16"),
]


@pytest.mark.parametrize(("name", "optimizer", "precision"), CASES)
def test_composed_trace_equals_the_full_trace(name: str, optimizer: str, precision: str) -> None:
    if name in ZOO:
        workload = zoo_workload(name)
    else:
        workload = load_workload(
            name, (3, 32, 32) if name == "resnet18" else None, dataset="mnist" if name != "resnet18" else None
        )
    est = Estimator(workload, make_spec("cuda", optimizer, precision, None, None, "train"), gpu="a100-80gb")
    template = est.trace(2)
    for batch_size in (3, 7):
        short = est.trace(batch_size, window_only=True)
        assert short.window_only and len(short.events) < len(template.events)
        composed = compose(template, short)
        assert composed is not None
        full = est.trace(batch_size)
        assert composed.events == full.events
        assert composed.numels == full.numels
        assert composed.activation_bytes_by_module == full.activation_bytes_by_module
        assert composed.batch_size == batch_size and not composed.window_only


@pytest.mark.parametrize("loop", ["hf-trainer", "lightning"])
@pytest.mark.parametrize(("name", "precision"), [("cnn", "fp32"), ("tied_lm", "amp-fp16")])
def test_each_loop_composes(loop: str, name: str, precision: str) -> None:
    """Lightning frees the last step's gradients inside the window (zero_grad before backward);
    the Trainer keeps its detached loss and the gradient norm across steps."""
    workload = zoo_workload(name) if name in ZOO else load_workload(name, dataset="mnist")
    spec = make_spec("cuda", "adam", precision, loop=loop)
    est = Estimator(workload, spec, gpu="a100-80gb")
    composed = compose(est.trace(2), est.trace(5, window_only=True))
    assert composed is not None and composed.events == est.trace(5).events


class _OddAtOne(nn.Module):
    """Takes another path for a single sample: the two traces do not line up."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            x = x * 2.0  # one more temporary at batch size 1
        return self.fc(x)


def test_traces_that_do_not_line_up_are_not_composed() -> None:
    with torch.device("meta"):
        model = _OddAtOne()
    est = Estimator(Workload("odd", model, (InputSpec((8,)),)), make_spec("cuda", "adam"), gpu="a100-80gb")
    assert compose(est.trace(1), est.trace(2, window_only=True)) is None
    assert compose(est.trace(2), est.trace(3, window_only=True)) is not None
    with pytest.raises(ValueError, match="full trace"):
        compose(est.trace(2, window_only=True), est.trace(3, window_only=True))


class _KeepsLast(nn.Module):
    """Keeps its last activation across steps: iteration 2 frees what iteration 1 kept, as the
    loop's own ``outputs`` and ``loss`` are (carried over, dead once rebound)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.last = y.detach() * 1.0
        return y


def test_what_iteration_1_carries_into_iteration_2_is_composed() -> None:
    with torch.device("meta"):
        model = _KeepsLast()
    est = Estimator(Workload("keeps", model, (InputSpec((8,)),)), make_spec("cuda", "adam"), gpu="a100-80gb")
    template = est.trace(2)
    # the loop's outputs and the model's kept tensor are born in window 1 and die in window 2
    f2 = template.mark_index("forward", 2)
    born_1 = {e.storage for e in template.events[: template.mark_index("optimizer", 1)] if e.is_alloc}
    assert sum(1 for e in template.events[f2:] if not e.is_alloc and e.storage in born_1) >= 2
    composed = compose(template, est.trace(3, window_only=True))
    assert composed is not None and composed.events == est.trace(3).events


class _SecondCallDiffers(nn.Module):
    """Makes one more temporary on every second call: the second window is not the first repeated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        return y * 1.0 if self.calls % 2 == 0 else y


def test_a_window_that_does_not_repeat_is_not_composed() -> None:
    with torch.device("meta"):
        model = _SecondCallDiffers()
    est = Estimator(Workload("differs", model, (InputSpec((8,)),)), make_spec("cuda", "adam"), gpu="a100-80gb")
    assert compose(est.trace(2), est.trace(3, window_only=True)) is None


def test_fit_answers_the_same_with_and_without_composition(monkeypatch: pytest.MonkeyPatch) -> None:
    args = {"gpu": "rtx4090", "optimizer": "adam"}
    fit_module = importlib.import_module("batchfit._fit")  # (the package's `fit` is the function)
    made: list[bool] = []

    def spy(template, short):
        out = compose(template, short)
        made.append(out is not None)
        return out

    monkeypatch.setattr(fit_module, "compose", spy)
    composed = fit("resnet18", (3, 64, 64), **args)
    assert made and all(made)  # batch 2 and the checking size were composed onto batch 1
    monkeypatch.setattr(fit_module, "compose", lambda template, short: None)  # every trace in full
    full = fit("resnet18", (3, 64, 64), **args)
    assert composed.max_batch_size == full.max_batch_size
    assert composed.recommended_batch_size == full.recommended_batch_size
    assert composed.estimate_at_max == full.estimate_at_max
    assert composed.method == full.method == "affine"


def test_fit_without_fork_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """BATCHFIT_NO_FORK=1 (or no fork on the platform): every trace in this process, same answer."""
    args = {"memory": "3GiB", "optimizer": "adamw"}
    side_by_side = fit("cnn", dataset="cifar10", **args)
    monkeypatch.setenv("BATCHFIT_NO_FORK", "1")
    alone = fit("cnn", dataset="cifar10", **args)
    assert alone.max_batch_size == side_by_side.max_batch_size
    assert alone.recommended_batch_size == side_by_side.recommended_batch_size
    assert alone.estimate_at_max == side_by_side.estimate_at_max
