"""The kernels a CUDA GPU would choose, where fake CUDA tensors cannot ask the device.

Two choices depend on the device at run time: the attention backend of
``scaled_dot_product_attention`` (flash, memory-efficient, cuDNN or math; a fake CUDA tensor
gets math, whose saved tensors grow with the sequence length squared) and cuDNN's RNN kernels
(which need the driver even on fake tensors). batchfit makes both choices at the dispatcher:
while a CUDA step is traced, ``aten::scaled_dot_product_attention`` and the RNN ops get a kernel
for the ``AutogradCUDA`` key, ahead of their composite implementation. Every path into them
passes there, whatever called it (``F.scaled_dot_product_attention``,
``nn.MultiheadAttention`` through ``F.multi_head_attention_forward``, a library's attention, a
recomputation inside backward); a ``TorchFunctionMode`` would miss the calls made inside a
function it intercepts, because a mode is off the stack while it handles a call.

The attention rules are PyTorch's (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp,
``can_use_flash_attention`` / ``can_use_mem_efficient_attention``, and sdp_utils_cpp.h) for an
sm80-sm90 card; docs/estimate.md lists them with their sources.

>>> from torch._subclasses.fake_tensor import FakeTensorMode
>>> with FakeTensorMode(), torch.device("cuda"):
...     q = torch.empty(2, 4, 128, 64, dtype=torch.bfloat16)
...     sdp_backend(q, q, q), sdp_backend(q.float(), q.float(), q.float(), is_causal=True)
('flash', 'efficient')
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_RNN_OPS = tuple(f"{op}.{overload}" for op in ("lstm", "gru", "rnn_tanh", "rnn_relu") for overload in ("input", "data"))


def sdp_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> str:
    """The backend ``select_sdp_backend`` picks on an sm80-sm90 GPU: ``flash``, ``efficient`` or ``math``.

    The priority order is flash, then memory-efficient, then math (``priority_order``; cuDNN
    attention comes first only on sm90/sm100 with cuDNN newer than 9.15 in recent releases, and
    saves the same tensors as flash: the output and a float32 log-sum-exp per row).
    """
    dense = query.dim() == key.dim() == value.dim() == 4  # check_tensor_shapes
    if not (dense and query.device.type == "cuda"):
        return "math"
    if (
        torch.backends.cuda.flash_sdp_enabled()
        and attn_mask is None  # check_for_attn_mask
        and _flash_head_dims(query, key, value)
        and (not is_causal or query.shape[-2] == key.shape[-2])  # check_flash_causal_non_square_seqlens
        and query.dtype in (torch.float16, torch.bfloat16)  # check_dtypes_low_precision (sm80+)
        and _heads_ok(query, key, value, enable_gqa)
        and _seq_lens_ok(query, key)
        and _last_dim_stride_1(query, key, value, None, ignore_singleton=True)
    ):
        return "flash"
    if (
        torch.backends.cuda.mem_efficient_sdp_enabled()
        and query.dtype in (torch.float16, torch.float32, torch.bfloat16)
        and _efficient_head_dims(query, key, value)
        and _efficient_offsets_aligned(query, key, value)
        and _seq_lens_ok(query, key)
        and _last_dim_stride_1(query, key, value, attn_mask, ignore_singleton=False)
        and _heads_ok(query, key, value, enable_gqa and _efficient_supports_gqa())
    ):
        return "efficient"
    return "math"


def _flash_head_dims(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    # check_head_dim_size_flash: equal head dims, at most 256 (attention.cpp pads to a multiple of 8)
    d = query.shape[-1]
    return bool(d == key.shape[-1] == value.shape[-1] and d <= 256)


def _gemm_alignment(query: torch.Tensor) -> int:
    # minimum_gemm_alignment on sm80+: tensor cores; max(4, 128 bits / bits per element)
    return max(4, 128 // (8 * query.element_size()))


def _efficient_head_dims(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    # check_head_dim_size_mem_efficient
    align = _gemm_alignment(query)
    dq, dv = query.shape[-1], value.shape[-1]
    return bool(dq == key.shape[-1] and dq % align == 0 and dq > 0 and dv % align == 0 and dv > 0)


def _efficient_offsets_aligned(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    # check_data_ptr_alignment_mem_efficient (sm80+): storage offsets, in elements, aligned to the
    # GEMM alignment (the caching allocator's base pointers are aligned to 512 bytes)
    align = _gemm_alignment(query)
    return all(t.numel() == 0 or t.storage_offset() % align == 0 for t in (query, key, value))


def _heads_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> bool:
    # check_batch_size_and_num_heads_dense (and check_grouped_query_attention with enable_gqa)
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return False
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if enable_gqa:
        return bool(hk == hv and hq % hk == 0)
    return bool(hq == hk == hv)


@functools.cache
def _efficient_supports_gqa() -> bool:
    """Whether this torch's memory-efficient attention takes fewer key/value heads (``enable_gqa``).

    torch 2.11's ``can_use_mem_efficient_attention`` (sdp_utils.cpp) checks
    ``check_batch_size_and_num_heads_dense<false /*supports_grouped_query_attention=*/>``, so GQA
    falls to the math path; pytorch#191085 (torch 2.14 has it) gave the kernel GQA, forward and
    backward. Read from the installed torch: its meta backward (_meta_registrations.py) returns the
    key's gradient with the key's heads only where the kernel supports GQA.
    """
    # asked first inside a trace: the tracer's and the fake mode's hooks must not see these ops
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        q, kv = torch.empty(1, 2, 1, 8, device="meta"), torch.empty(1, 1, 1, 8, device="meta")
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, kv, kv, None, True)
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            out, q, kv, kv, None, out, lse, seed, offset, 0.0, [True, True, True, False]
        )
    return tuple(grads[1].shape) == tuple(kv.shape)


def _seq_lens_ok(query: torch.Tensor, key: torch.Tensor) -> bool:
    # check_nonzero_sequence_lengths_dense
    return bool(query.shape[-2] != 0 and key.shape[-2] != 0)


def _last_dim_stride_1(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, *, ignore_singleton: bool
) -> bool:
    # check_last_dim_stride_equals_1_dense (a GPU also needs the mask's last stride to be 1)
    ok = query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    if ignore_singleton:
        ok = ok or query.shape[-1] == 1
    return ok and (mask is None or mask.stride(-1) == 1)


def _pad_last_dim(t: torch.Tensor, alignment: int) -> torch.Tensor:
    # attention.cpp pad_last_dim / pad_bias: constant padding up to the next multiple
    rest = t.shape[-1] % alignment
    return t if rest == 0 else torch.constant_pad_nd(t, [0, alignment - rest])


def _bool_mask_to_float(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # attention.cpp convert_boolean_attn_mask
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), -math.inf)


def _preprocess_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    # attention.cpp preprocess_mask: the bias seen as 4-d, its last dim padded to 16, or made
    # contiguous when its strides are not multiples of 16
    mask = mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    last = mask.shape[-1]
    if last % 16:
        return _pad_last_dim(mask, 16)[..., :last]
    if any(s % 16 for s in mask.stride()[:3]):
        return mask.contiguous()
    return mask


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """attention.cpp ``scaled_dot_product_attention`` with the backend chosen by :func:`sdp_backend`."""
    backend = sdp_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if backend == "flash":
        head_dim = query.shape[-1]
        scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)  # calculate_scale, unpadded
        q, k, v = (_pad_last_dim(t, 8) for t in (query, key, value))
        out: torch.Tensor = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )[0]
        return out if out.shape[-1] == head_dim else out[..., :head_dim]  # post_process_flash_output
    if backend == "efficient":
        # should_compute_logsumexp: only when a gradient will be needed
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        mask = _bool_mask_to_float(attn_mask, query.dtype)
        if mask is not None:
            mask = _preprocess_mask(mask, query, key)
        return torch.ops.aten._scaled_dot_product_efficient_attention(  # type: ignore[no-any-return]
            query, key, value, mask, needs_grad, dropout_p, is_causal, scale=scale
        )[0]
    return _SDPA.decompose(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)  # type: ignore[no-any-return]


def _native_rnn(op: Any, notes: list[str]) -> Any:
    name = op.name().split("::")[-1].split(".")[0]
    note = f"{name}: simulated with PyTorch's native CUDA RNN instead of cuDNN (cuDNN needs a real GPU)"

    def kernel(*args: Any, **kwargs: Any) -> Any:
        # cuDNN's RNN kernels need the driver even on fake tensors: PyTorch's own CUDA RNN (fused
        # cells, one per time step) runs instead; its saved tensors differ from cuDNN's reserve space
        if note not in notes:
            notes.append(note)
        with torch.backends.cudnn.flags(enabled=False):
            return op.decompose(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_kernel_choices(notes: list[str]) -> Iterator[None]:
    """Make the device-dependent kernel choices for fake CUDA tensors while the block runs."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("scaled_dot_product_attention", _sdpa, "AutogradCUDA")
        for name in _RNN_OPS:
            packet, overload = name.split(".")
            lib.impl(name, _native_rnn(getattr(getattr(torch.ops.aten, packet), overload), notes), "AutogradCUDA")
        yield
    finally:
        lib._destroy()
