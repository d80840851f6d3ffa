"""Memory that CUDA kernels allocate through the caching allocator inside one op.

A fake kernel makes an op's outputs and nothing else; the real CUDA kernel may also take buffers
from the caching allocator (``at::empty`` inside the kernel) and give them back before it returns.
They count in ``torch.cuda.max_memory_allocated()`` and can set the step's peak, so each one that
matters at training scale is modelled here from PyTorch's source, keyed by the aten op the tracer
sees, as a function of the op's shapes and dtypes. Each rule names the file and function it
follows; ``docs/allocator.md`` lists them in a table, and ``bench/gpu_validate.py`` measures each
on a real GPU (the figures are *modelled, not yet measured* until such a run is committed).

A rule returns a small program of ``("alloc", name, nbytes)`` / ``("free", name)`` steps in the
kernel's order; whatever is still held when the program ends is freed then, newest first.

>>> q = torch.empty(2, 8, 1000, 64, dtype=torch.bfloat16, device="meta")
>>> prog = flash_backward_program(q, q, q, q, (8, 0))
>>> [(step[1], step[2]) for step in prog]
[('softmax_d', 65536), ('dq_accum', 4194304)]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Step = tuple[Any, ...]  # ("alloc", name, nbytes) or ("free", name)
Rule = Callable[[tuple[Any, ...], dict[str, Any], tuple[int, int]], list[Step]]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


_HALF = (torch.float16, torch.bfloat16)
_INT64_BYTES = 8


# -- flash attention backward -------------------------------------------------------------------


def flash_backward_program(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    compute_capability: tuple[int, int],
    *,
    deterministic: bool = False,
    sm_count: int | None = None,
) -> list[Step]:
    """FlashAttention-2 backward's own buffers; tensors in SDPA's layout ``[B, H, S, D]``.

    aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp, ``mha_bwd``:
    ``softmax_d = empty({b, h, round_multiple(seqlen_q, 128)}, float)``;
    ``dq_accum = empty({b, round_multiple(seqlen_q, 128), h, head_size_rounded}, float)`` where
    ``head_size_rounded = round_multiple(d, d <= 128 ? 32 : 64)`` (``loop`` is always true); with
    deterministic algorithms ``dq_accum`` gains a leading ``nsplits = ceil(SMs / (b*h))``;
    MQA/GQA (fewer key heads) adds ``dk_expanded``/``dv_expanded`` = ``{b, seqlen_k, h, d}`` in the
    input dtype. ``softmax_d`` is returned to ``_flash_attention_backward``, which drops it: all
    die when the op returns.
    """
    del compute_capability  # one kernel family on sm80+
    b, h, sq, d = (int(s) for s in query.shape)
    sk, hk = int(key.shape[2]), int(key.shape[1])
    sq_r = _round_up(sq, 128)
    d_r = _round_up(d, 32 if d <= 128 else 64)
    splits = 1
    if deterministic:
        splits = _ceil_div(sm_count or 1, b * h)
    prog: list[Step] = [
        ("alloc", "softmax_d", b * h * sq_r * 4),
        ("alloc", "dq_accum", splits * b * sq_r * h * d_r * 4),
    ]
    if hk != h:
        itemsize = query.element_size()
        prog += [
            ("alloc", "dk_expanded", b * sk * h * d * itemsize),
            ("alloc", "dv_expanded", b * sk * h * d * itemsize),
        ]
    return prog


# -- memory-efficient attention backward (xformers' CUTLASS kernels) ---------------------------

# aten/src/ATen/native/transformers/cuda/mem_eff_attention/kernels/cutlassB.h, dispatch_cutlassB_
# {f16,bf16}_sm80: the kernels in the order tried, as (block I, block J, max K, sequences aligned
# to the block, preload); `_efficient_attention_backward` launches the first one that fits.
# Without dropout:
_CUTLASS_B_HALF_SM80 = (
    (64, 64, 32, True),
    (64, 64, 32, False),
    (64, 64, 64, True),
    (64, 64, 64, False),
    (128, 64, 96, False),  # only when the compute capability is 8.6 or 8.9
    (128, 128, 128, True),
    (128, 128, 128, False),
    (64, 64, 128, True),
    (64, 64, 128, False),
    (128, 64, 65536, False),
    (64, 64, 65536, False),
)
# With dropout (the `_dropout_` kernels; none is sequence-aligned):
_CUTLASS_B_HALF_SM80_DROPOUT = (
    (64, 64, 32, False),
    (64, 64, 64, False),
    (128, 128, 128, False),
    (64, 64, 128, False),
    (128, 64, 65536, False),
    (64, 64, 65536, False),
)
# dispatch_cutlassB_f32_sm80 (fp32 kernels: no preload, none sequence-aligned; dropout variants
# have the same blocks):
_CUTLASS_B_F32_SM80 = (
    (64, 64, 32, False),
    (64, 64, 64, False),
    (128, 64, 128, False),
    (64, 64, 128, False),
    (128, 64, 65536, False),
    (64, 64, 65536, False),
)
# Shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): the 128x128 and 128x64 kernels
# need more than the 99 KiB of the 8.6/8.9 cards (their `sizeof(SharedStorage)` check skips them).
_SMALL_SMEM_CCS = ((8, 6), (8, 9), (12, 0))


def _cutlass_b_kernel(
    k: int, m: int, n: int, dropout: bool, cc: tuple[int, int], half: bool = True
) -> tuple[int, int, int]:
    """(block I, block J, max K) of the backward kernel PyTorch launches: the sm80 tables, which
    ``dispatch_cutlassB`` uses for ``80 <= cc < 100`` in the releases read (used here for newer
    cards too, unverified)."""
    table = _CUTLASS_B_F32_SM80 if not half else _CUTLASS_B_HALF_SM80_DROPOUT if dropout else _CUTLASS_B_HALF_SM80
    small_smem = cc in _SMALL_SMEM_CCS
    for bi, bj, max_k, aligned in table:
        if max_k == 96 and cc not in ((8, 6), (8, 9)):
            continue
        if max_k < k or (aligned and (m % bi or n % bj)):
            continue
        if small_smem and bi == 128 and max_k != 96:
            continue
        return bi, bj, max_k
    return 64, 64, 65536


def efficient_backward_program(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    compute_capability: tuple[int, int],
    *,
    dropout: bool = False,
) -> list[Step]:
    """Memory-efficient attention backward's own buffers; tensors in SDPA's layout ``[B, H, S, D]``.

    aten/src/ATen/native/transformers/cuda/attention_backward.cu, ``_efficient_attention_backward``:
    ``grad_out.contiguous()`` (a copy when the incoming gradient is not contiguous in the kernel's
    ``[B, M, H, Kv]`` layout); ``delta = empty({B, nH, M}, float)`` for the half-precision kernels
    (``kKernelComputesDelta``), else ``(grad_out.float() * out.float()).sum(-1).transpose(-2,
    -1).contiguous()`` (a ``[B, M, H, Kv]`` fp32 product, its ``[B, M, H]`` sum and the
    ``[B, H, M]`` copy); then ``workspace = empty({p.workspace_size()}, uint8)`` with
    mem_eff_attention/kernel_backward.h ``Params::workspace_size``: per batch and head
    ``align_up(gk + gv + gq, 4)`` floats, ``gq = ceil(M/I) * ceil(K/J) * (4 + I*J)`` (the
    ``GradQTempStorage`` of lock, counter, pad and an ``I x J`` fp32 tile; ``kNeedsAccumGradQ``
    since ``kEnableSplitKeys``), and ``gk = gv = splits * align_up(N, J) * align_up(K, I)`` when the
    fp32 accumulators of dK/dV cannot stay in registers (half kernels with ``kMaxK > I``).
    Which kernels a card's shared memory excludes is modelled coarsely: on the 99 KiB cards
    (8.6, 8.9, 12.0) the kernels with 128-row blocks are skipped, except the 8.6/8.9 k96 one.
    """
    b, h, m, k = (int(s) for s in query.shape)
    n, kv = int(key.shape[2]), int(value.shape[3])
    half = query.dtype in _HALF
    prog: list[Step] = []
    # the kernel reads grad_out as [B, M, H, Kv]: contiguous there means stride order 0, 2, 1, 3
    g_t = grad_out.transpose(1, 2)
    copy = 0 if g_t.is_contiguous() else g_t.numel() * g_t.element_size()
    prog.append(("alloc", "grad_out_contiguous", copy))  # 0 bytes when no copy: one structure
    bi, bj, max_k = _cutlass_b_kernel(max(k, kv), m, n, dropout, compute_capability, half)
    if half:
        prog.append(("alloc", "delta", b * h * m * 4))
    else:
        prog += [
            ("alloc", "delta_product", b * m * h * kv * 4),
            ("alloc", "delta_sum", b * m * h * 4),
            ("free", "delta_product"),
            ("alloc", "delta", b * h * m * 4),
            ("free", "delta_sum"),
        ]
    output_in_rf = half and max_k <= bi
    needs_accum_kv = not output_in_rf and half  # output_accum_t (float) differs from output_t
    splits = 1
    if needs_accum_kv:
        splits = _ceil_div(n, bj)
        if b * h >= 256 and n <= 2 * bj:
            splits = 1
        splits = min(splits, 200 // (b * h))
        splits = max(splits, 1)
    gk = splits * _round_up(n, bj) * _round_up(k, bi) if needs_accum_kv else 0
    gv = splits * _round_up(n, bj) * _round_up(kv, bi) if needs_accum_kv else 0
    gq = _ceil_div(m, bi) * _ceil_div(k, bj) * (4 + bi * bj)
    prog.append(("alloc", "workspace", b * h * _round_up(gk + gv + gq, 4) * 4))
    return prog


def efficient_forward_program(query: torch.Tensor, value: torch.Tensor) -> list[Step]:
    """Memory-efficient attention forward's fp32 output accumulator; SDPA's layout ``[B, H, M, K]``.

    aten/src/ATen/native/transformers/cuda/attention.cu, ``_efficient_attention_forward``:
    ``output_accum = empty(output.sizes(), float)`` when ``Kernel::kNeedsOutputAccumulatorBuffer``
    (mem_eff_attention/kernel_forward.h: the output cannot stay in registers, ``kMaxK >
    kKeysPerBlock``, and is not fp32). kernels/cutlassF.h ``dispatch_cutlassF_{f16,bf16}_sm80``:
    64x64 up to K 64, 64x128 up to 128 (both in registers), then 32x128 with ``kMaxK`` 65536 (in
    global memory): half-precision heads wider than 128 need it. fp32 kernels never do.
    """
    b, h, m, k = (int(x) for x in query.shape)
    kv = int(value.shape[3])
    needed = query.dtype in _HALF and max(k, kv) > 128
    return [("alloc", "output_accum", 4 * b * m * h * kv if needed else 0)]


def _sdpa_efficient_forward(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    return efficient_forward_program(args[0], args[2])


def _sdpa_flash_backward(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    grad_out, query, key, value = args[:4]
    return flash_backward_program(grad_out, query, key, value, cc)


def _sdpa_efficient_backward(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    grad_out, query, key, value = args[:4]
    dropout_p = float(args[9]) if len(args) > 9 else float(kwargs.get("dropout_p", 0.0))
    return efficient_backward_program(grad_out, query, key, value, cc, dropout=dropout_p > 0)


# -- embedding backward ---------------------------------------------------------------------------

NROWS_PER_THREAD = 10  # aten/src/ATen/native/cuda/EmbeddingBackwardKernel.cu


def embedding_backward_program(
    grad_output: torch.Tensor, indices: torch.Tensor, num_weights: int, scale_grad_by_freq: bool
) -> list[Step]:
    """``embedding_dense_backward`` on CUDA, the sort path (more than 3,072 indices, or
    ``scale_grad_by_freq``); the direct path allocates only its output (every buffer 0 bytes).

    aten/src/ATen/native/cuda/Embedding.cu, ``embedding_dense_backward_cuda``: ``sorted_indices``,
    ``orig_indices`` (``empty_like(indices)``) and ``range = arange(num_indices)`` for
    ``radix_sort_pairs`` (``range`` dies with the sort; cub's own temporary storage is not
    modelled), ``count`` with ``scale_grad_by_freq``; then EmbeddingBackwardKernel.cu,
    ``embedding_backward_cuda_kernel``: ``segment_offsets {numel}``, a scalar segment count,
    ``partials_per_segment`` and its offsets ``{max_segments = min(numel, num_weights)}``, a scalar,
    ``partial_segment_offset {max_partial_segment = numel / NROWS_PER_THREAD + max_segments}`` and
    ``grad_weight_per_segment {max_partial_segment, stride}`` in the accumulate type (fp32 for
    half and bfloat16 gradients). All are freed when the op returns.
    """
    numel = indices.numel()
    # the direct path (few indices, no frequency scaling) allocates nothing: the same buffers are
    # listed with 0 bytes, so a step's events have one structure at every batch size (fit's
    # affine timeline re-runs the rule per size; 0-byte requests take no memory)
    on = numel > 3072 or scale_grad_by_freq
    idx = indices.element_size() if on else 0
    stride = int(grad_output.shape[-1])
    acc = 4 if grad_output.dtype in _HALF else grad_output.element_size()
    max_segments = min(numel, int(num_weights))
    max_partial = numel // NROWS_PER_THREAD + max_segments
    copy = on and not grad_output.is_contiguous()
    return [
        ("alloc", "grad_contiguous", grad_output.numel() * grad_output.element_size() if copy else 0),
        ("alloc", "sorted_indices", numel * idx),
        ("alloc", "orig_indices", numel * idx),
        ("alloc", "range", numel * idx),
        ("free", "range"),
        ("alloc", "count", numel * idx if scale_grad_by_freq else 0),
        ("alloc", "segment_offsets", numel * idx),
        ("alloc", "num_of_segments", _INT64_BYTES if on else 0),
        ("alloc", "partials_per_segment", max_segments * idx),
        ("alloc", "partials_per_segment_offset", max_segments * idx),
        ("alloc", "num_of_partial_segments", _INT64_BYTES if on else 0),
        ("alloc", "partial_segment_offset", max_partial * idx),
        ("alloc", "grad_weight_per_segment", max_partial * stride * acc if on else 0),
    ]


def _embedding_backward(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    grad_output, indices, num_weights, _padding_idx, scale = args[:5]
    return embedding_backward_program(grad_output, indices, int(num_weights), bool(scale))


# -- foreach norm (clip_grad_norm_) ----------------------------------------------------------------

K_CHUNK_SIZE = 65536  # aten/src/ATen/native/cuda/MultiTensorApply.cuh, kChunkSize


def foreach_norm_program(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[Step]:
    """``_foreach_norm`` on CUDA's fast route (``p`` 1, 2 or inf on floating tensors).

    aten/src/ATen/native/cuda/ForeachReduceOp.cu, ``foreach_tensor_norm_cuda``:
    ``output_per_tensor = zeros({ntensors * max_chunks_per_tensor}, opmath(dtype))`` with
    ``max_chunks_per_tensor = max(ceil(numel / kChunkSize))``, one partial sum per chunk; it dies
    when the op returns (the per-tensor results are the op's outputs). Whether the fast route is
    taken (same device, dtype and layout) cannot be told from shapes alone: the larger figure is
    taken (the slow route allocates only its outputs).
    """
    if not tensors:
        return []
    chunks = max(_ceil_div(t.numel(), K_CHUNK_SIZE) for t in tensors)
    out_dtype = dtype or tensors[0].dtype
    opmath = 4 if out_dtype in _HALF else torch.empty((), dtype=out_dtype, device="meta").element_size()
    return [("alloc", "output_per_tensor", len(tensors) * chunks * opmath)]


def _foreach_norm(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    tensors = list(args[0])
    ord_ = float(args[1]) if len(args) > 1 else float(kwargs.get("ord", 2))
    dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
    if ord_ not in (1.0, 2.0, math.inf) or not all(t.is_floating_point() for t in tensors):
        return []
    return foreach_norm_program(tensors, dtype)


# -- matrix products: operands cuBLAS cannot read in place ------------------------------------------


def cublas_operand_copy_bytes(t: torch.Tensor) -> int:
    """Bytes of the copy a 2-D ``mm``/``addmm`` operand needs before cuBLAS can read it.

    aten/src/ATen/native/cuda/Blas.cpp, ``prepare_matrix_for_cublas``: a non-overlapping, dense
    operand is read as it is, so is one with a unit stride and a leading dimension at least its
    other size; anything else is ``tensor.clone(at::MemoryFormat::Contiguous)``, held until the
    GEMM returns. The case that matters: the gradient of a ``.sum()`` is an expanded tensor with
    stride 0, so the backward of the last ``Linear`` copies a whole batch x tokens x vocabulary
    gradient (twice: once for the input's gradient, once for the weight's).
    """
    if t.dim() != 2 or _non_overlapping_and_dense(t):
        return 0
    (n0, n1), (s0, s1) = t.shape, t.stride()
    if (s0 == 1 and s1 >= max(1, n0)) or (s1 == 1 and s0 >= max(1, n1)):
        return 0
    return int(t.numel()) * t.element_size()


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10/core/Contiguity.h, ``_compute_non_overlapping_and_dense``: ordered by stride, the
    dimensions of more than one element are laid out as a contiguous tensor would be."""
    expected = 1
    for stride, size in sorted((int(st), int(n)) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def cublas_operands_program(mat1: torch.Tensor, mat2: torch.Tensor) -> list[Step]:
    """``cublasCommonArgs`` (Blas.cpp) prepares both operands; the copies live through the GEMM.
    Nothing is listed when neither needs a copy (the common case: no events)."""
    copies = [
        ("mat1_contiguous", cublas_operand_copy_bytes(mat1)),
        ("mat2_contiguous", cublas_operand_copy_bytes(mat2)),
    ]
    return [("alloc", name, n) for name, n in copies if n]


def _mm(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    return cublas_operands_program(args[0], args[1])


def _addmm(args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    return cublas_operands_program(args[1], args[2])


# -- the registry ---------------------------------------------------------------------------------

RULES: dict[str, Rule] = {
    "aten._scaled_dot_product_flash_attention_backward.default": _sdpa_flash_backward,
    "aten._scaled_dot_product_efficient_attention.default": _sdpa_efficient_forward,
    "aten._scaled_dot_product_efficient_attention_backward.default": _sdpa_efficient_backward,
    "aten.embedding_dense_backward.default": _embedding_backward,
    "aten._foreach_norm.Scalar": _foreach_norm,
    "aten.mm.default": _mm,
    "aten.addmm.default": _addmm,
}


def _by_overload() -> dict[Any, Rule]:
    out: dict[Any, Rule] = {}
    for key, rule in RULES.items():
        _, name, overload = key.split(".")
        out[getattr(getattr(torch.ops.aten, name), overload)] = rule
    return out


_BY_OVERLOAD = _by_overload()  # looked up once per op of every CUDA trace: no string per op


def kernel_scratch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cc: tuple[int, int]) -> list[Step]:
    """The program of buffers ``func``'s CUDA kernel takes inside itself (``[]`` when none is modelled)."""
    rule = _BY_OVERLOAD.get(func)
    if rule is None:
        return []
    return rule(args, kwargs, cc)


# -- re-running a rule at another batch size (fit's affine timeline) ------------------------------

# (op, storage ids of its buffers in allocation order, described positional arguments, keyword arguments)
KernelCall = tuple[str, tuple[int, ...], Any, dict[str, Any]]


def describe(value: Any) -> Any:
    """The arguments a rule reads, without tensors: shapes, strides and dtypes (see :func:`rebuild`)."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(int(x) for x in value.shape), tuple(int(x) for x in value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return ("L", tuple(describe(v) for v in value))
    return ("V", value)


def rebuild(desc: Any) -> Any:
    """Meta tensors (no memory) with the described shapes, strides and dtypes."""
    kind = desc[0]
    if kind == "T":
        return torch.empty_strided(desc[1], desc[2], dtype=desc[3], device="meta")
    if kind == "L":
        return [rebuild(d) for d in desc[1]]
    return desc[1]


def at_batch(a: Any, b: Any, xa: int, xb: int, x: int) -> Any:
    """The description at batch size ``x`` from those at ``xa`` and ``xb``: every shape and stride
    entry on the line through them; ``None`` when an entry is not (a whole slope per sample) or
    the two differ otherwise.

    >>> at_batch(("T", (4, 8), (8, 1), torch.float32), ("T", (6, 8), (8, 1), torch.float32), 2, 3, 10)
    ('T', (20, 8), (8, 1), torch.float32)
    """
    if a[0] != b[0]:
        return None
    if a[0] == "V":
        return a if a == b else None
    if a[0] == "L":
        if len(a[1]) != len(b[1]):
            return None
        items = [at_batch(u, v, xa, xb, x) for u, v in zip(a[1], b[1])]
        return None if any(i is None for i in items) else ("L", tuple(items))
    if a[3] != b[3] or len(a[1]) != len(b[1]):
        return None
    out = []
    for ua, ub in zip((*a[1], *a[2]), (*b[1], *b[2])):
        if (ub - ua) % (xb - xa):
            return None
        out.append(ua + (ub - ua) // (xb - xa) * (x - xa))
    n = len(a[1])
    return ("T", tuple(out[:n]), tuple(out[n:]), a[3])


def call_sizes(key: str, desc: Any, kwargs: dict[str, Any], cc: tuple[int, int]) -> list[int]:
    """The sizes of a rule's buffers, in allocation order, for described arguments."""
    args = rebuild(desc)
    return [step[2] for step in RULES[key](tuple(args), kwargs, cc) if step[0] == "alloc"]


def peak_bytes(prog: list[Step], round_size: Callable[[int], int] | None = None) -> int:
    """The most the program holds at once (what ``max_memory_allocated`` rises by); ``round_size``
    rounds each request as the caching allocator does (e.g. ``AllocatorConfig().round_size``).

    >>> peak_bytes([("alloc", "a", 10), ("alloc", "b", 5), ("free", "a"), ("alloc", "c", 3)])
    15
    """
    held: dict[str, int] = {}
    peak = 0
    for step in prog:
        if step[0] == "alloc":
            held[step[1]] = round_size(step[2]) if round_size and step[2] > 0 else step[2]  # 0 B takes nothing
        else:
            held.pop(step[1])
        peak = max(peak, sum(held.values()))
    return peak


__all__ = [
    "K_CHUNK_SIZE",
    "NROWS_PER_THREAD",
    "RULES",
    "KernelCall",
    "at_batch",
    "call_sizes",
    "cublas_operand_copy_bytes",
    "cublas_operands_program",
    "describe",
    "efficient_backward_program",
    "efficient_forward_program",
    "embedding_backward_program",
    "flash_backward_program",
    "foreach_norm_program",
    "kernel_scratch",
    "peak_bytes",
    "rebuild",
]
