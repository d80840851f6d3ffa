"""Shape-only stand-ins for ops whose fake implementation is a slow Python decomposition.

Under ``FakeTensorMode`` an op without a meta kernel runs its decomposition op by op; for
``cudnn_batch_norm`` and its backward that is ~30 small ops per call, and every new batch size
misses the fake mode's cache. The tracer only needs the outputs' metadata (shape, strides, dtype,
device), so each stand-in here makes exactly the outputs the decomposition would make, with one
``empty`` each. A stand-in returns None where its shortcut is not known to agree (unusual
layouts, missing tensors): the op then runs as usual. ``tests/test_fast_kernels.py`` checks each
stand-in output by output: against the decomposition on CUDA, against the real kernel on CPU.
Where the two differ (CPU batch norm with bf16/fp16 input and float32 parameters), the stand-in
follows the real kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_COMPUTATION_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.complex32: torch.complex64}


def _dense(t: torch.Tensor) -> bool:
    """Whether the elements fill the storage span exactly once (some dimension order is contiguous)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor with ``t``'s shape and strides (``t`` is dense)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)


def _cudnn_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    exponential_average_factor: float,
    epsilon: float,
) -> tuple[torch.Tensor, ...] | None:
    # decomposition: native_batch_norm's elementwise output follows a dense input's layout; the
    # saved mean and inverse std are (C,) in the computation dtype (training), or empty in the
    # weight's dtype (eval); the reserve space is empty. Running statistics change in place.
    if input.dim() < 2 or not _dense(input) or weight is None:
        return None
    if not training and (running_mean is None or running_var is None):
        return None
    out = _like(input)
    if training:
        acc = _COMPUTATION_DTYPE.get(input.dtype, input.dtype)
        channels = input.shape[1]
        save_mean = torch.empty((channels,), dtype=acc, device=input.device)
        save_invstd = torch.empty((channels,), dtype=acc, device=input.device)
    else:
        save_mean = weight.new_empty((0,))
        save_invstd = weight.new_empty((0,))
    reserve = input.new_empty((0,), dtype=torch.uint8)
    return out, save_mean, save_invstd, reserve


def _cudnn_batch_norm_backward(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_var: torch.Tensor | None,
    epsilon: float,
    reserveSpace: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    # decomposition: native_batch_norm_backward in training mode; grad_input is elementwise over
    # grad_output and input (same layout assumed here), the weight and bias gradients are (C,)
    # in the weight's dtype
    if (
        input.dim() < 2
        or weight is None
        or save_mean is None
        or save_var is None
        or grad_output.shape != input.shape
        or grad_output.stride() != input.stride()
        or not _dense(input)
    ):
        return None
    grad_input = _like(input)
    channels = input.shape[1]
    grad_weight = torch.empty((channels,), dtype=weight.dtype, device=input.device)
    grad_bias = torch.empty((channels,), dtype=weight.dtype, device=input.device)
    return grad_input, grad_weight, grad_bias


def _native_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...] | None:
    # the CPU kernel (cuda runs cudnn_batch_norm): output laid out as the input; saved mean and
    # inverse std (C,) when training, empty otherwise, in float32 when the input is bf16/fp16 and
    # the parameters float32 ("mixed type", e.g. under CPU autocast; the fake mode's decomposition
    # makes them in the input's dtype there, which the real backward kernel then rejects)
    if input.device.type != "cpu" or input.dim() < 2 or not _standard_layout(input):
        return None
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if all(t.dtype == input.dtype for t in params):
        stat_dtype = input.dtype
    elif input.dtype in (torch.bfloat16, torch.float16) and all(t.dtype == torch.float32 for t in params):
        stat_dtype = torch.float32
    else:
        return None  # the kernel raises its own error
    if not training and (running_mean is None or running_var is None):
        return None
    size = input.shape[1] if training else 0
    save_mean = torch.empty((size,), dtype=stat_dtype, device=input.device)
    save_invstd = torch.empty((size,), dtype=stat_dtype, device=input.device)
    return _like(input), save_mean, save_invstd


def _standard_layout(t: torch.Tensor) -> bool:
    """Contiguous or channels-last: where laying out like ``t`` is what ``suggest_memory_format`` gives."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _foreach_sqrt(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    # Adam's denominator: one new tensor per input, laid out as the input (the fake mode runs the
    # op tensor by tensor, ~0.3 ms each)
    if not all(isinstance(t, torch.Tensor) and _dense(t) for t in tensors):
        return None
    return [_like(t) for t in tensors]


FAST_KERNELS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.cudnn_batch_norm.default: _cudnn_batch_norm,
    torch.ops.aten.cudnn_batch_norm_backward.default: _cudnn_batch_norm_backward,
    torch.ops.aten.native_batch_norm.default: _native_batch_norm,
    torch.ops.aten._foreach_sqrt.default: _foreach_sqrt,
}


def run_fast(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The op's outputs made directly, or None when it has no stand-in or the shortcut does not apply."""
    kernel = FAST_KERNELS.get(func)
    if kernel is None:
        return None
    return kernel(*args, **kwargs)
