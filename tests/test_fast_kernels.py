"""The tracer's shape-only stand-ins make exactly the outputs the fake mode's own decomposition makes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from batchfit._estimate import Estimator
from batchfit._fast_kernels import FAST_KERNELS, run_fast
from batchfit._models import load_workload
from batchfit._step import make_spec

aten = torch.ops.aten


def _meta(t: torch.Tensor) -> tuple[object, ...]:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.storage_offset(), t.untyped_storage().nbytes())


def _bn_args(
    shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype, channels_last: bool, training: bool
):
    x = torch.empty(shape, dtype=dtype, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    w, b, rm, rv = (torch.empty(c, dtype=weight_dtype, device="cuda") for _ in range(4))
    return x, w, b, rm, rv, training


CASES = [
    (shape, dtype, wdtype, cl, training)
    for shape, cl in (
        ((2, 8, 5, 7), False),
        ((2, 8, 5, 7), True),
        ((3, 4, 2, 3, 5), True),
        ((4, 6), False),
        ((1, 3, 9), False),
    )
    for dtype, wdtype in (
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    )
    for training in (True, False)
]


@pytest.mark.parametrize(("shape", "dtype", "wdtype", "channels_last", "training"), CASES)
def test_cudnn_batch_norm_matches_the_decomposition(shape, dtype, wdtype, channels_last, training):
    with FakeTensorMode():
        x, w, b, rm, rv, train = _bn_args(shape, dtype, wdtype, channels_last, training)
        args = (x, w, b, rm, rv, train, 0.1, 1e-5)
        expected = aten.cudnn_batch_norm.default(*args)
        fast = run_fast(aten.cudnn_batch_norm.default, args, {})
        assert fast is not None
        assert [_meta(t) for t in fast] == [_meta(t) for t in expected]
        if not training:
            return
        grad = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="cuda")
        bargs = (x, grad, w, rm, rv, expected[1], expected[2], 1e-5, expected[3])
        expected_b = aten.cudnn_batch_norm_backward.default(*bargs)
        fast_b = run_fast(aten.cudnn_batch_norm_backward.default, bargs, {})
        assert fast_b is not None
        assert [_meta(t) for t in fast_b] == [_meta(t) for t in expected_b]


def test_unusual_layouts_run_the_op_itself():
    with FakeTensorMode():
        x = torch.empty(4, 8, 6, 6, device="cuda")[:, :, ::2]  # not dense
        w = torch.empty(8, device="cuda")
        assert run_fast(aten.cudnn_batch_norm.default, (x, w, w, w, w, True, 0.1, 1e-5), {}) is None
        y = torch.empty(4, 8, 6, 6, device="cuda")
        g = y.contiguous(memory_format=torch.channels_last)  # gradient laid out unlike the input
        assert run_fast(aten.cudnn_batch_norm_backward.default, (y, g, w, w, w, w, w, 1e-5, y), {}) is None
    assert run_fast(aten.add.Tensor, (), {}) is None  # no stand-in: the op runs as usual


@pytest.mark.parametrize(
    ("precision", "memory_format"), list(itertools.product(("fp32", "amp-fp16"), ("contiguous", "channels_last")))
)
def test_traces_are_the_same_with_and_without_stand_ins(monkeypatch, precision, memory_format):
    """A whole step (BatchNorm forward and backward, AMP casts) traces to the same timeline."""
    workload = load_workload("resnet18", (3, 32, 32))
    if memory_format == "channels_last":
        workload.model.to(memory_format=torch.channels_last)
    est = Estimator(workload, make_spec("cuda", "adam", precision, None, None, "train"), gpu="a100-80gb")
    used: list[str] = []

    def counting(func, args, kwargs):
        out = run_fast(func, args, kwargs)
        if out is not None:
            used.append(str(func))
        return out

    monkeypatch.setattr("batchfit._trace.run_fast", counting)
    fast = est.trace(3)
    assert used.count("aten.cudnn_batch_norm.default") == 2 * 20  # resnet18: 20 BatchNorms, two iterations
    assert used.count("aten.cudnn_batch_norm_backward.default") == 2 * 20
    monkeypatch.setattr("batchfit._trace.run_fast", lambda func, args, kwargs: None)
    slow = est.trace(3)
    assert fast.events == slow.events
    assert fast.activation_bytes_by_module == slow.activation_bytes_by_module
    assert set(FAST_KERNELS) == {
        aten.cudnn_batch_norm.default,
        aten.cudnn_batch_norm_backward.default,
        aten.native_batch_norm.default,
        aten._foreach_sqrt.default,
    }


CPU_CASES = [
    (shape, dtype, wdtype, cl, training)
    for shape, cl in (((4, 8, 5, 5), False), ((4, 8, 5, 5), True), ((2, 6, 7), False))
    for dtype, wdtype in (
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    )
    for training in (True, False)
]


@pytest.mark.parametrize(("shape", "dtype", "wdtype", "channels_last", "training"), CPU_CASES)
def test_cpu_batch_norm_matches_the_real_kernel(shape, dtype, wdtype, channels_last, training):
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b, rm, rv = (
        torch.ones(c, dtype=wdtype),
        torch.zeros(c, dtype=wdtype),
        torch.zeros(c, dtype=wdtype),
        torch.ones(c, dtype=wdtype),
    )
    real = aten.native_batch_norm.default(x, w, b, rm, rv, training, 0.1, 1e-5)
    with FakeTensorMode() as mode:
        args = (*(mode.from_tensor(t) for t in (x, w, b, rm, rv)), training, 0.1, 1e-5)
        fast = run_fast(aten.native_batch_norm.default, args, {})
        assert fast is not None
        assert [_meta(t) for t in fast] == [_meta(t) for t in real]


def test_cpu_autocast_bf16_with_batch_norm_traces():
    """Under CPU autocast, BatchNorm sees bf16 input and float32 parameters: the trace's saved
    statistics are float32 as in the real kernel, and the backward (which checks) runs."""
    workload = load_workload("cnn", (1, 28, 28))
    est = Estimator(workload, make_spec("cpu", "sgd", "amp-bf16", None, None, "train"))
    trace = est.trace(2)
    assert any(e.phase == "backward" for e in trace.events)


def test_foreach_sqrt_matches_the_decomposition():
    with FakeTensorMode():
        tensors = [
            torch.empty(64, 3, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last),
            torch.empty(10, device="cuda", dtype=torch.bfloat16),
            torch.empty(5, 4, device="cuda").t(),  # transposed: still dense
            torch.empty((), device="cuda"),
        ]
        expected = aten._foreach_sqrt.default(tensors)
        fast = run_fast(aten._foreach_sqrt.default, (tensors,), {})
        assert fast is not None
        assert [_meta(t) for t in fast] == [_meta(t) for t in expected]
        strided = [torch.empty(8, 8, device="cuda")[:, ::2]]
        assert run_fast(aten._foreach_sqrt.default, (strided,), {}) is None
