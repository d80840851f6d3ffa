"""Explaining a failed forward: the layer, the shape it got, what it expected, and the likely fix.

Shared by the summary and the tracer, so that a wrong input shape reads the same everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ._datasets import DATASETS
from ._errors import BatchfitError, ExitCode
from ._i18n import tr
from ._models import Workload

_torch_logs = {"shown": False}


def show_torch_logs(shown: bool) -> None:
    """``--debug``: let PyTorch's own logs through while batchfit runs a model on fake tensors."""
    _torch_logs["shown"] = shown


@contextlib.contextmanager
def quiet_fake_tensor_logs() -> Iterator[None]:
    """Silence FakeTensorMode's logger while a model runs on fake tensors.

    When a meta kernel rejects a shape, ``FakeTensorMode._dispatch_impl``
    (torch/_subclasses/fake_tensor.py) logs the kernel's whole traceback at ERROR level before
    raising; batchfit reports that failure itself, in one line (:func:`layer_failure`), and the
    exception it raises chains to the original one. With ``--debug`` (:func:`show_torch_logs`)
    nothing is silenced.
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    was = logger.disabled
    logger.disabled = was or not _torch_logs["shown"]
    try:
        yield
    finally:
        logger.disabled = was


# module type -> (module, shape of its first input) -> what it expected, or None when the shape is fine
Expectation = Callable[[Any, tuple[int, ...]], str | None]


def _expect_linear(m: nn.Linear, shape: tuple[int, ...]) -> str | None:
    return None if shape and shape[-1] == m.in_features else tr("expected last dim {n}", n=m.in_features)


def _expect_conv(m: nn.modules.conv._ConvNd, shape: tuple[int, ...]) -> str | None:
    # batchfit always adds the batch dimension, so a short shape is a sample missing a dimension,
    # not an unbatched call
    spatial = len(m.kernel_size)
    if len(shape) != spatial + 2:
        return tr("expected a {rank}-d input {layout}", rank=spatial + 2, layout=_conv_layout(spatial, batch=True))
    return None if shape[1] == m.in_channels else tr("expected {n} input channels (dim 1)", n=m.in_channels)


def _conv_layout(spatial: int, *, batch: bool) -> str:
    dims = ["N", "C"] if batch else ["C"]
    return "(" + ", ".join([*dims, *{1: "L", 2: "HW", 3: "DHW"}[spatial]]) + ")"


def _expect_batchnorm(m: nn.modules.batchnorm._BatchNorm, shape: tuple[int, ...]) -> str | None:
    ok = len(shape) >= 2 and shape[1] == m.num_features
    return None if ok else tr("expected {n} channels at dim 1", n=m.num_features)


def _expect_layernorm(m: nn.LayerNorm, shape: tuple[int, ...]) -> str | None:
    tail = tuple(m.normalized_shape)
    return None if shape[-len(tail) :] == tail else tr("expected trailing dims {tail}", tail=tail)


def _expect_embedding(m: nn.Embedding, shape: tuple[int, ...]) -> str | None:
    return tr("expected integer token ids below {n}", n=m.num_embeddings)


EXPECTATIONS: dict[type[nn.Module], Expectation] = {
    nn.Linear: _expect_linear,
    nn.modules.conv._ConvNd: _expect_conv,
    nn.modules.batchnorm._BatchNorm: _expect_batchnorm,
    nn.LayerNorm: _expect_layernorm,
    nn.Embedding: _expect_embedding,
}


def _expectation(module: nn.Module) -> Expectation | None:
    for cls in type(module).__mro__:
        if cls in EXPECTATIONS:
            return EXPECTATIONS[cls]
    return None


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _input_hint(workload: Workload, module: nn.Module, got: tuple[int, ...]) -> str | None:
    """Guess the input the model wants from the layer that rejected it."""
    sample = workload.inputs[0] if len(workload.inputs) == 1 else None
    if isinstance(module, nn.Linear) and sample is not None and math.prod(got[1:]) == sample.numel:
        # the whole sample reached this layer flattened: the model wants in_features values per sample
        matches = [d for d in DATASETS.values() if math.prod(d.shape) == module.in_features]
        if matches:
            return tr(
                "the model expects `input_size={shape}` / `dataset='{dataset}'`",
                shape=tuple(matches[0].shape),
                dataset=matches[0].name,
            )
        return tr(
            "the model expects {n} values per sample, e.g. `input_size={shape}`",
            n=module.in_features,
            shape=(module.in_features,),
        )
    if isinstance(module, nn.modules.conv._ConvNd) and sample is not None and len(got) != len(module.kernel_size) + 2:
        rank = len(module.kernel_size)
        if len(sample.shape) == rank and sample.shape[0] == module.in_channels:
            proposal = (*sample.shape, sample.shape[-1])  # a spatial size left out
        elif len(sample.shape) == rank:
            proposal = (module.in_channels, *sample.shape)  # the channels left out
        else:
            proposal = (module.in_channels, *(32,) * rank)
        return tr(
            "one sample is {layout} without the batch dimension, e.g. `input_size={example}`",
            layout=_conv_layout(rank, batch=False),
            example=proposal,
        )
    if isinstance(module, nn.modules.conv._ConvNd) and sample is not None and got[1:] == sample.shape:
        names = [d.name for d in DATASETS.values() if d.shape[0] == module.in_channels]
        also = tr(" (or {names})", names=" / ".join(f"`dataset={n!r}`" for n in names)) if names else ""
        return tr(
            "the model expects {n} channels: `input_size={shape}`{also}",
            n=module.in_channels,
            shape=(module.in_channels, *sample.shape[1:]),
            also=also,
        )
    return None


def layer_failure(
    workload: Workload, name: str | None, module: nn.Module | None, got: tuple[int, ...] | None, exc: Exception
) -> BatchfitError:
    """Name the layer whose forward failed, what it got, what it expected, and the likely fix.

    ``name``/``module``: the innermost module running when ``exc`` was raised (None: before any
    module ran); ``got``: the shape of its first tensor input.
    """
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    given = ", ".join(f"`input_size='{s}'`" for s in workload.inputs) or "example inputs"
    if module is None:
        return BatchfitError(
            tr(
                "running {model!r} failed before any layer ran: {error}: {exc}",
                model=workload.name,
                error=type(exc).__name__,
                exc=exc,
            ),
            hint=tr("check the inputs (given: {given}); rerun with --debug for the traceback", given=given),
        )
    where = (
        tr("layer {name} ({type})", name=name, type=type(module).__name__)
        if name
        else tr("the forward of {model} ({type})", model=workload.name, type=type(module).__name__)
    )
    if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)):
        return BatchfitError(
            tr("{where} needs real data to run ({name}: {exc})", where=where, name=type(exc).__name__, exc=exc),
            hint=tr(
                "batchfit runs the forward on fake tensors (no data): data-dependent control flow (.item(), nonzero, boolean masks) is not supported"
            ),
            exit_code=ExitCode.UNSUPPORTED,
        )
    expect = _expectation(module)
    expected = expect(module, got) if expect is not None and got is not None else None
    got_text = tr("input of shape {shape}", shape=fmt_shape(got)) if got is not None else tr("no tensor input")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if expected is not None and got is not None:
        message = tr("{where} {expected}, got {got}", where=where, expected=expected, got=got_text)
    else:
        message = tr("{where} failed on {got}: {error}", where=where, got=got_text, error=first_line)
    hint = (_input_hint(workload, module, got) if got is not None else None) or (
        tr(
            "check `input_size` / `dataset` (given: {given}): one sample's shape without the batch dimension; "
            "rerun with --debug for the traceback",
            given=given,
        )
    )
    return BatchfitError(message, hint=hint)
