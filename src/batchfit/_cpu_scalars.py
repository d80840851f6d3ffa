"""Python numbers that CPU ops turn into tensors: bytes no dispatch mode sees as allocations.

``x * 0.5`` reaches the dispatcher as ``aten.mul.Tensor(x, 0.5)``: PyTorch's Python argument
parser has wrapped 0.5 in a 0-dim CPU tensor (``scalar_to_tensor``, torch/csrc/utils/python_arg_parser.cpp;
a double, 8 bytes; an int64, 8; a bool, 1), made outside the dispatcher. A Python dispatch mode
gets the number back, not the tensor; but the CPU allocator holds the tensor for the whole op, and
autograd keeps it for backward when the formula needs it (``MulBackward0`` saves ``other``).
Inside the op, TensorIterator casts a CPU scalar of another dtype than the op's common dtype to
that dtype (``TensorIteratorBase::compute_types``, aten/src/ATen/TensorIterator.cpp: a 0-dim copy,
freed when the op returns). The comparison ops' ``.Scalar`` overloads wrap their scalar the same
way in C++ (``wrapped_scalar_tensor``, aten/src/ATen/native/BinaryOps.cpp).

Measured on this machine with the profiler (torch 2.14.1, CPU): ``x * 0.5`` on float32 allocates
8, 4, the output, frees 4 (the 8 stays with ``MulBackward0``); ``1.0 - x``: 8, 4, output, -4, -8;
``x > 0``: 8, 4, output, -8, -4; on an int64 tensor ``i * 2``: 8, output, -8 (no cast).
On CUDA the scalar stays a kernel argument: none of this is device memory.

>>> import torch
>>> wrapped_numbers(torch.ops.aten.mul.Tensor, (torch.empty(2), 0.5), {})
[(8, torch.float64, 'other')]
"""

from __future__ import annotations

from typing import Any

import torch

_COMPARISONS = frozenset(f"aten.{op}.Scalar" for op in ("eq", "ne", "lt", "le", "gt", "ge"))


def _dtype_of(value: Any) -> torch.dtype | None:
    # scalar_to_tensor's dtypes: bool -> bool, int -> int64, float -> double, complex -> cdouble
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    if isinstance(value, float):
        return torch.float64
    if isinstance(value, complex):
        return torch.complex128
    return None


def wrapped_numbers(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int, torch.dtype, str]]:
    """(bytes, dtype, argument name) of each Python number this op received as a wrapped 0-dim CPU tensor."""
    schema = func._schema
    comparison = str(func) in _COMPARISONS
    found: list[tuple[int, torch.dtype, str]] = []
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        dtype = _dtype_of(value)
        if dtype is None:
            continue
        kind = str(arg.type)
        if kind == "Tensor" or (comparison and kind == "Scalar"):
            found.append((dtype.itemsize, dtype, arg.name))
    return found


# Ops whose backward formula keeps the wrapped ``other`` (tools/autograd/derivatives.yaml:
# mul: `self: mul_tensor_backward(grad, other, ...)`; div: `self: div_tensor_self_backward(grad, other, ...)`),
# needed when ``self`` requires grad.
_SAVES_OTHER = frozenset(f"aten.{op}.Tensor" for op in ("mul", "mul_", "div", "div_"))


def saved_for_backward(func: Any, args: tuple[Any, ...], name: str) -> bool:
    """Whether autograd keeps this wrapped number until the op's backward node runs."""
    return (
        name == "other"
        and str(func) in _SAVES_OTHER
        and torch.is_grad_enabled()
        and isinstance(args[0], torch.Tensor)
        and args[0].requires_grad
    )


def _category(dtype: torch.dtype) -> int:
    return 3 if dtype.is_complex else 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


_DEFAULT = {1: torch.int64, 2: torch.get_default_dtype(), 3: torch.complex64}


def cast_bytes(args: tuple[Any, ...], wrapped: list[tuple[int, torch.dtype, str]]) -> list[int]:
    """The 0-dim copies TensorIterator makes of wrapped scalars whose dtype is not the common dtype.

    The common dtype follows PyTorch's promotion with wrapped numbers (c10/core/ScalarType.h,
    ``at::native::result_type``): a number only raises the category (bool < int < float < complex),
    and then to that category's default dtype; within the tensor's category the tensor's dtype wins.
    """
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        return []
    out = []
    for _, dtype, _ in wrapped:
        scalar_cat, tensor_cat = _category(dtype), _category(first.dtype)
        common = _DEFAULT[scalar_cat] if scalar_cat > tensor_cat else first.dtype
        if dtype != common:
            out.append(common.itemsize)
    return out
