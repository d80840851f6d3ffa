"""The reference step, written once: traced on fake tensors, measured for real, probed on a GPU.

Before the window: model (train mode), optimizer (no state), one batch of inputs and labels.
Then, ``iterations`` times::

    loss = loss_fn(model(*args, **kwargs), labels)   # the output is not kept once the loss exists
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

What differs between a trace and a real run is passed in: how backward runs (a replay of the
engine on fake tensors, or ``loss.backward()``), the grad scaler, and a callback per phase.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .models import ModelInputs
from .training import (
    AUTO_LOSS,
    LOSSES,
    LossChoice,
    LossSpec,
    OptimizerSpec,
    Precision,
    StepFn,
    choose_loss,
    first_tensor,
    output_is_loss,
)


@dataclass
class StepSpec:
    """Everything the reference step needs besides the model and its inputs."""

    device: str
    optimizer: OptimizerSpec
    precision: Precision
    loss: LossSpec
    mode: str = "train"  # or "inference"
    step: StepFn | None = None
    iterations: int = 2
    threads: int | None = None  # CPU: torch's intra-op threads for the step (kernel scratch depends on it)


class Scaler(Protocol):
    def scale(self, loss: torch.Tensor) -> torch.Tensor: ...
    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...
    def update(self) -> None: ...


@contextlib.contextmanager
def autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` that also works for fake CUDA tensors on a machine without a GPU.

    ``torch.autocast("cuda")`` disables itself when CUDA is unavailable (a Python-side check);
    setting the autocast state directly applies CUDA's autocast op lists to fake CUDA tensors,
    and on a real GPU does what ``torch.autocast`` does.
    """
    if dtype is None:
        yield
        return
    prev_enabled = torch.is_autocast_enabled(device_type)
    prev_dtype = torch.get_autocast_dtype(device_type)
    prev_cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.set_autocast_cache_enabled(True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev_enabled)
        torch.set_autocast_dtype(device_type, prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` and give the previous count back (None: as it is).

    CPU kernels size their scratch by the thread count (oneDNN's convolutions keep a buffer per
    thread), so a CPU step is simulated and measured at the count the user's run will have.
    """
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def train_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Set train/eval for the step and give every submodule its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def unique_trainable(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def label_choice(model: nn.Module, inputs: ModelInputs, spec: StepSpec) -> LossChoice:
    """The loss the step will use, from a no-grad forward (labels are made from it before the window).

    A user's ``--step`` computes its own loss: its labels follow the output's first tensor.
    """
    with torch.no_grad(), autocast(spec.device, spec.precision.autocast_dtype):
        out = inputs.call(model)
    if spec.step is None:
        return choose_loss(out, spec.loss)
    if output_is_loss(out) is not None:
        return LossChoice("computed by your --step")
    target, _ = first_tensor(out)
    labels_like = LOSSES["token-cross-entropy"] if spec.loss is AUTO_LOSS else spec.loss
    return LossChoice("computed by your --step", labels_like, target)


def run_step(
    model: nn.Module,
    inputs: ModelInputs,
    spec: StepSpec,
    optimizer: torch.optim.Optimizer | None,
    *,
    backward: Callable[[torch.Tensor], None],
    labels: Any = None,
    make_labels: Callable[[LossChoice], Any] | None = None,
    scaler: Scaler | None = None,
    on_phase: Callable[[str, int], None] = lambda phase, iteration: None,
    after_step: Callable[[torch.optim.Optimizer], None] = lambda optimizer: None,
    window_only: bool = False,
) -> str | None:
    """Run the reference step's window; returns which loss ran, in words (None in inference).

    ``labels`` may be given, or made on first use by ``make_labels(choice)`` (which must file them
    as existing before the window). ``window_only``: stop after the first iteration's backward.
    ``on_phase(phase, iteration)`` is called as each phase begins, and with ``"end"`` as the step ends.
    """
    if spec.mode == "inference":
        on_phase("forward", 1)
        with torch.no_grad(), autocast(spec.device, spec.precision.autocast_dtype):
            out = inputs.call(model)
        del out
        on_phase("end", 1)
        return None
    assert optimizer is not None
    it = 0
    described = "computed by your --step" if spec.step is not None else None
    for it in range(1, spec.iterations + 1):
        on_phase("forward", it)
        if spec.step is not None:
            spec.step(model, inputs.as_given(), labels, optimizer)
            continue
        with autocast(spec.device, spec.precision.autocast_dtype):
            out = inputs.call(model)
            choice = choose_loss(out, spec.loss)
            if labels is None and make_labels is not None and choice.target is not None:
                labels = make_labels(choice)
            loss = choice.loss(out, labels)
            described = choice.description
            del out, choice  # the choice holds the logits: they go when the output goes
        if scaler is not None:
            loss = scaler.scale(loss)
        on_phase("backward", it)
        backward(loss)
        del loss
        if window_only:
            break
        on_phase("optimizer", it)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        after_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    on_phase("end", it)  # while this frame's locals (the labels it made) are still alive
    return described
