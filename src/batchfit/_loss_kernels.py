"""Losses whose reduced result keeps the unreduced loss's storage, and what they hold inside.

A fake (meta) kernel gives ``F.mse_loss(x, y)`` a 0-dim result of one element. The real kernels
give it a storage of the *unreduced* size, alive as long as the loss tensor is (through backward,
and in the loop users write until the name is rebound), and hold a second unreduced tensor while
they reduce:

* ``mse_loss`` and ``smooth_l1_loss`` are structured kernels whose meta function
  (aten/src/ATen/native/Loss.cpp, ``TORCH_META_FUNC(mse_loss)`` / ``TORCH_META_FUNC(smooth_l1_loss)``)
  builds a TensorIterator over the output, which allocates it at the broadcast shape of input and
  target, and then calls ``maybe_get_output().resize_({})``: shrinking never frees a storage
  (``resize_impl_cpu_`` / ``resize_impl_cuda_`` only grow one). The implementation
  (``TORCH_IMPL_FUNC(mse_loss_out)``) then makes ``Tensor loss`` with another
  ``TensorIterator::borrowing_binary_op`` (unreduced, alive until it returns) and reduces it
  into the result with ``at::mean_out`` or ``at::sum_out``.
* ``binary_cross_entropy`` (Loss.cpp ``binary_cross_entropy_cpu`` / ``binary_cross_entropy_out_cpu``;
  Loss.cu ``binary_cross_entropy_out_cuda``) computes the unreduced loss into
  ``at::empty_like(input)``, reduces it with ``apply_loss_reduction`` (a new 0-dim tensor) and
  copies that back with ``loss.resize_as_(loss_reduced).copy_(loss_reduced)``: again the
  unreduced storage under a 0-dim result.

On the CPU ``at::mean_out`` is ``at::sum_out(result, ...).div_(dim_prod)`` (aten/src/ATen/native/
ReduceOps.cpp, ``TORCH_IMPL_FUNC(mean_out)``, the ``is_cpu()`` branch): ``dim_prod`` is an
``int64_t`` that ``div_`` wraps in an 8-byte 0-dim tensor, which TensorIterator casts to the
result's dtype (:mod:`batchfit._cpu_scalars`); half types first take an fp32 copy of the result.
Measured with the profiler on torch 2.14.1 (``F.mse_loss`` on an (8, 3) float32 pair): 96 (the
result), 96 (``loss``), 8, 4, then -4, -8, -96; the result keeps its 96 bytes.

>>> import torch
>>> x = torch.empty(8, 3)
>>> unreduced_loss(torch.ops.aten.mse_loss.default, (x, x, 1), {}, "cpu")
(96, [('alloc', 'loss', 96), ('alloc', 'divisor', 8), ('alloc', 'divisor_cast', 4)])
"""

from __future__ import annotations

from typing import Any

import torch

Step = tuple[Any, ...]  # ("alloc", name, nbytes) or ("free", name), as in _cuda_scratch

_MEAN, _NONE = 1, 0
_HALF = (torch.float16, torch.bfloat16)


def _reduction(args: tuple[Any, ...], kwargs: dict[str, Any], position: int) -> int:
    value = args[position] if len(args) > position else kwargs.get("reduction", _MEAN)
    return int(value)


def cpu_mean_program(dtype: torch.dtype, numel: int) -> list[Step]:
    """What ``at::mean_out`` holds inside itself on the CPU for a 0-dim result of ``dtype``, reducing
    ``numel`` elements (ReduceOps.cpp ``TORCH_IMPL_FUNC(mean_out)``): a half result is summed into
    an fp32 copy, from an fp32 copy of the input (``sum_out`` with ``sum_out_dtype``, freed when it
    returns); then ``div_(dim_prod)`` wraps the ``int64_t`` divisor (8 bytes) and casts it to the
    dtype it divides."""
    if dtype in _HALF:
        return [
            ("alloc", "result_fp32", 4),
            ("alloc", "input_fp32", numel * 4),
            ("free", "input_fp32"),
            ("alloc", "divisor", 8),
            ("alloc", "divisor_cast", 4),
        ]
    prog: list[Step] = [("alloc", "divisor", 8)]
    if dtype != torch.int64:
        prog.append(("alloc", "divisor_cast", dtype.itemsize))
    return prog


def unreduced_loss(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> tuple[int, list[Step]] | None:
    """(bytes the result's storage really has, the buffers the op holds inside itself as a program
    of ``("alloc", name, nbytes)`` / ``("free", name)`` steps; what is left is freed at the end,
    newest first) for a loss that reduces into the unreduced storage; None for any other op or
    ``reduction='none'``."""
    rule = _RULES.get(func)
    if rule is None:
        return None
    position, structured = rule
    reduction = _reduction(args, kwargs, position)
    if reduction == _NONE:
        return None
    x, y = args[0], args[1]
    dtype = torch.result_type(x, y) if structured else x.dtype
    numel = int(torch.Size(torch.broadcast_shapes(x.shape, y.shape) if structured else x.shape).numel())
    nbytes = numel * dtype.itemsize
    mean = cpu_mean_program(dtype, numel) if device == "cpu" and reduction == _MEAN else []
    if structured:  # the implementation's own unreduced `loss`, then the reduction into the result
        return nbytes, [("alloc", "loss", nbytes), *mean]
    # apply_loss_reduction's 0-dim result (with mean's buffers on the CPU), copied back, then freed
    return nbytes, [("alloc", "reduced", dtype.itemsize), *mean]


# op -> (position of `reduction` in its schema, whether it is the structured mse/smooth_l1 kind)
_RULES: dict[Any, tuple[int, bool]] = {
    torch.ops.aten.mse_loss.default: (2, True),
    torch.ops.aten.smooth_l1_loss.default: (2, True),
    torch.ops.aten.binary_cross_entropy.default: (3, False),
}
