"""Scratch memory that CPU kernels allocate inside themselves, measured once and remembered.

No dispatch mode sees the buffers a kernel allocates and frees before it returns: oneDNN
convolutions reorder their inputs and weights, batch-norm backward and the oneDNN LSTM keep
workspaces. For ``--device cpu`` the tracer asks this module, for each such op, how far memory
rises inside the op beyond what it returns, by running that one op for real at the same shapes
under the profiler (a few milliseconds), cached by op and shapes. When the real op would be too
large to run here, it is measured at batch sizes 1 and 2 and extrapolated linearly in the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_map

# op -> positions of the arguments whose dim 0 is the batch (used only to shrink huge calls)
SCRATCH_OPS: dict[str, tuple[int, ...]] = {
    "aten.convolution.default": (0,),
    "aten.convolution_backward.default": (0, 1),
    "aten.native_batch_norm_backward.default": (0, 1),
    "aten.mkldnn_rnn_layer.default": (),
    "aten.mkldnn_rnn_layer_backward.default": (),
}
_MAX_REAL_BYTES = 256 * 1024**2  # larger calls are measured at batch 1 and 2 and extrapolated


def is_scratch_op(func: Any) -> bool:
    return str(func) in SCRATCH_OPS


def scratch_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bool]:
    """Peak rise inside ``func`` beyond its outputs, in bytes, and whether it was extrapolated."""
    key = _key(func, args, kwargs)
    return _measure_cached(key, func, args, kwargs)


def _key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    def one(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), tuple(a.stride()), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(one(x) for x in a)
        return a

    return (str(func), one(args), tuple(sorted((k, one(v)) for k, v in kwargs.items())))


_CACHE: dict[tuple[Any, ...], tuple[int, bool]] = {}


def _measure_cached(key: tuple[Any, ...], func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bool]:
    if key not in _CACHE:
        _CACHE[key] = _measure(func, args, kwargs)
    return _CACHE[key]


def _bytes(args: Any) -> int:
    total = 0

    def add(a: Any) -> Any:
        nonlocal total
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        return a

    tree_map(add, args)
    return total


def _measure(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bool]:
    batched = SCRATCH_OPS[str(func)]
    first = args[batched[0]] if batched else None
    batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    if _bytes(args) <= _MAX_REAL_BYTES or not batched or batch <= 2:
        return _run(func, args, kwargs, None), False
    s1 = _run(func, args, kwargs, (batched, 1))
    s2 = _run(func, args, kwargs, (batched, 2))
    return max(0, s1 + (s2 - s1) * (batch - 1)), True


def _run(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], shrink: tuple[tuple[int, ...], int] | None) -> int:
    def real(a: Any, batch: int | None = None) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        shape = list(a.shape)
        stride = list(a.stride())
        if batch is not None and shape:
            shape[0] = batch
        out = torch.empty_strided(shape, _strides_for(shape, stride), dtype=a.dtype, device="cpu")
        if out.is_floating_point():
            out.normal_()
        else:
            out.zero_()
        return out

    with unset_fake_temporarily():
        real_args = []
        for i, a in enumerate(args):
            batch = shrink[1] if shrink is not None and i in shrink[0] else None
            real_args.append(tree_map(functools.partial(real, batch=batch), a))
        real_kwargs = tree_map(real, kwargs)
        return _profile_rise(lambda: func(*real_args, **real_kwargs))


def _strides_for(shape: list[int], stride: list[int]) -> list[int]:
    """Strides with the same dimension order as ``stride`` (channels-last stays channels-last)."""
    order = sorted(range(len(shape)), key=lambda d: (stride[d], -d))
    out = [0] * len(shape)
    step = 1
    for d in order:
        out[d] = step
        step *= max(shape[d], 1)
    return out


def _profile_rise(call: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    del out
    # `running` ends at what the op returned (still alive here): the rest was scratch
    return max(0, peak - running)
