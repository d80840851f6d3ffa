"""Scratch memory that CPU kernels allocate inside themselves, measured once and remembered.

No dispatch mode sees the buffers a kernel allocates and frees before it returns: oneDNN
convolutions reorder their inputs and weights, batch-norm backward and the oneDNN LSTM keep
workspaces. For ``--device cpu`` the tracer asks this module, for each such op, how far memory
rises inside the op beyond what it returns, by running that one op for real at the same shapes
under the profiler (milliseconds), cached by op, shapes and thread count (the tracer sets torch's
thread count to the one the user's run will have, ``--threads``). When the real op would be too large
to run here, it is measured at batch sizes 1 and 2 and extrapolated linearly in the batch.

Most ops are pure arithmetic, so random data of the right shapes gives the same allocations. The
oneDNN LSTM's backward reads the forward's opaque workspace: it is run on the real outputs of
the measured forward (by storage), and skipped (and reported) when those are not at hand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._pytree import tree_flatten, tree_map


def _chunk_cat_padding(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """``_chunk_cat``'s CPU kernel (aten/src/ATen/native/TensorShape.cpp ``_chunk_cat`` /
    ``_chunk_cat_out`` -> ``_pad_chunk``) copies every input whose size along ``dim`` does not divide
    by ``num_chunks`` into ``tensor.new_zeros(padded_size)``, all held until ``cat`` has read them.
    When ``out`` has another dtype than the inputs, ``cat_out_cpu`` copies each (padded) input
    through a TensorIterator with ``cast_common_dtype_to_outputs``, which writes into a temporary of
    the inputs' dtype and the slice's shape and casts that into ``out`` (TensorIterator.cpp
    ``compute_types``), one input at a time: the largest such temporary on top of the padding.
    FSDP2's reduce-scatter copy-in calls it on the unsharded gradients (``_fsdp_collectives.py``
    ``foreach_reduce_scatter_copy_in``). CUDA's kernel (aten/src/ATen/native/cuda/TensorShape.cu
    ``_chunk_cat_out_cuda``) copies contiguous inputs directly and pads nothing."""
    tensors, dim, chunks, out = _chunk_cat_args(args, kwargs)
    out_dtype = tensors[0].dtype if out is None else out.dtype  # ``_chunk_cat`` without ``out``: the inputs' own
    padding = sum(_padded_numel(t, dim, chunks) * t.element_size() for t in tensors if _pads(t, dim, chunks))
    # the cast temporary: one input at a time, on top of all the padded copies
    cast = max((_padded_numel(t, dim, chunks) * t.element_size() for t in tensors if t.dtype != out_dtype), default=0)
    return padding + cast


def _chunk_cat_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], int, int, Any]:
    """``(tensors, dim, num_chunks, out)`` of a ``_chunk_cat`` call (``out`` None without one)."""
    named = dict(zip(("tensors", "dim", "num_chunks"), args)) | kwargs
    return list(named["tensors"]), int(named["dim"]), int(named["num_chunks"]), named.get("out")


def _pads(t: torch.Tensor, dim: int, num_chunks: int) -> bool:
    return _padded_numel(t, dim, num_chunks) != t.numel()


def _padded_numel(t: torch.Tensor, dim: int, num_chunks: int) -> int:
    """Elements of ``t`` once ``_pad_chunk`` has rounded its size along ``dim`` up to ``num_chunks``."""
    d = dim % t.dim() if t.dim() else 0
    rows = t.shape[d] if t.dim() else 1
    return t.numel() // max(rows, 1) * (-(-rows // num_chunks) * num_chunks)


def _chunk_cat_mixed_dtype_scratch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """torch 2.15's FSDP2 copy-in op in place of ``fsdp.chunk_cat`` (``_fsdp_collectives.py``
    ``foreach_reduce_scatter_copy_in``: ``torch.ops.fsdp.chunk_cat_mixed_dtype``), a C++ composite
    whose inner calls run below the tracer's mode (torch/csrc/distributed/fsdp/ChunkCat.cpp
    ``chunk_cat_mixed_dtype``): inputs of one dtype go to ``at::_chunk_cat_out`` as they are (above);
    otherwise every input is cast first, ``tensor.to(out.scalar_type())`` (a copy of each input of
    another dtype; ``to`` returns the others themselves), all held while ``_chunk_cat_out`` pads the
    cast inputs, which then have ``out``'s dtype."""
    tensors, dim, chunks, out = _chunk_cat_args(args, kwargs)
    if len({t.dtype for t in tensors}) <= 1:
        return _chunk_cat_padding(args, kwargs)
    size: int = out.element_size()
    casts = sum(t.numel() * size for t in tensors if t.dtype != out.dtype)
    return casts + sum(_padded_numel(t, dim, chunks) * size for t in tensors if _pads(t, dim, chunks))


@dataclass(frozen=True)
class ScratchOp:
    batched: tuple[int, ...] = ()  # positions of arguments whose dim 0 is the batch (to shrink huge calls)
    keeps_outputs: bool = False  # its real outputs feed a later op that reads opaque state
    needs_forward: bool = False  # reads a forward's opaque outputs: run on those, never on random data
    # the scratch from the kernel's source instead of a measurement (args, kwargs -> bytes)
    rule: Callable[[tuple[Any, ...], dict[str, Any]], int] | None = None
    # the calls that have scratch at all (None: every call); the others are not run for real
    applies: Callable[[tuple[Any, ...]], bool] | None = None
    # too large to run here and not batched: skipped (and reported) instead of extrapolated
    skip_large: bool = False


def _reduced_precision(args: tuple[Any, ...]) -> bool:
    """A bf16 / fp16 operand: the CPU matmul goes to oneDNN (aten/src/ATen/native/LinearAlgebra.cpp
    ``addmm_impl_cpu_`` -> ``use_mkldnn_matmul`` -> mkldnn/Matmul.cpp ``mkldnn_matmul``), whose
    scratchpad and reorders come from c10's CPU allocator (mkldnn/IDeepRegistration.cpp registers
    it as the engine's allocator). Measured on this machine (AMX): a bf16 ``mm`` of (64, 64) x (64, 128)
    takes 21,504 B inside the op, fp16 50,304 B, fp32 none (its BLAS path allocates nothing)."""
    return any(isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) for a in args)


_MATMUL = ScratchOp(applies=_reduced_precision, skip_large=True)


SCRATCH_OPS: dict[str, ScratchOp] = {
    "aten.convolution.default": ScratchOp((0,)),
    "aten.convolution_backward.default": ScratchOp((0, 1)),
    "aten.native_batch_norm_backward.default": ScratchOp((0, 1)),
    "aten.mkldnn_rnn_layer.default": ScratchOp(keeps_outputs=True),
    "aten.mkldnn_rnn_layer_backward.default": ScratchOp(needs_forward=True),
    "aten._chunk_cat.default": ScratchOp(rule=_chunk_cat_padding),
    "aten._chunk_cat.out": ScratchOp(rule=_chunk_cat_padding),
    # FSDP2's own op around it (_fsdp_collectives.py ``chunk_cat``: torch._chunk_cat(..., out=out)),
    # whose inner call runs below the tracer's mode
    "fsdp.chunk_cat.default": ScratchOp(rule=_chunk_cat_padding),
    # torch 2.15's replacement for it in FSDP2 (an op name absent from older torch: never met there)
    "fsdp.chunk_cat_mixed_dtype.default": ScratchOp(rule=_chunk_cat_mixed_dtype_scratch),
    # reduced-precision matmuls (autocast's linears, pure bf16/fp16): oneDNN's own buffers
    "aten.mm.default": _MATMUL,
    "aten.addmm.default": _MATMUL,
    "aten.bmm.default": _MATMUL,
}
_MAX_REAL_BYTES = 256 * 1024**2  # larger calls are measured at batch 1 and 2 and extrapolated


def is_scratch_op(func: Any, args: tuple[Any, ...]) -> bool:
    op = SCRATCH_OPS.get(str(func))
    return op is not None and (op.applies is None or op.applies(args))


class ScratchMeter:
    """Measures scratch for one trace; remembers results across traces (by op and shapes)."""

    _cache: ClassVar[dict[tuple[Any, ...], tuple[int, bool]]] = {}  # shared by every trace in the process

    def __init__(self) -> None:
        self.real_of: dict[int, torch.Tensor] = {}  # fake storage _cdata -> real tensor (opaque state)
        self.skipped: list[str] = []
        self.resized: list[tuple[torch.Tensor, int]] = []  # fake outputs whose real size differs

    def measure(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> tuple[int, bool]:
        """Peak rise inside ``func`` beyond its outputs, in bytes, and whether it was extrapolated."""
        op = SCRATCH_OPS[str(func)]
        if op.rule is not None:
            return op.rule(args, kwargs), False
        key = _key(func, args, kwargs)
        if key in self._cache and not op.keeps_outputs and not op.needs_forward:
            return self._cache[key]
        if op.skip_large and _bytes(args) > _MAX_REAL_BYTES:
            self.skipped.append(f"{func} (operands over {_MAX_REAL_BYTES // 1024**2} MiB: not run here)")
            return 0, False
        if op.needs_forward:
            real_args, missing = self._from_forward(args)
            if missing:
                self.skipped.append(f"{func} (its forward's workspace was not measured)")
                return 0, False
            with unset_fake_temporarily():
                result = (_profile_rise(lambda: func(*real_args, **kwargs))[0], False)
        else:
            result, real_out = _measure(func, op, args, kwargs)
            if op.keeps_outputs and real_out is not None:
                fakes, _ = tree_flatten(out)
                reals, _ = tree_flatten(real_out)
                for f, r in zip(fakes, reals):
                    if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor):
                        self.real_of[f.untyped_storage()._cdata] = r
                        if r.untyped_storage().nbytes() != f.untyped_storage().nbytes():
                            # e.g. the oneDNN LSTM's workspace: the meta kernel returns it empty
                            self.resized.append((f, r.untyped_storage().nbytes()))
        self._cache[key] = result
        return result

    def _from_forward(self, args: tuple[Any, ...]) -> tuple[list[Any], bool]:
        missing = False

        def swap(a: Any) -> Any:
            nonlocal missing
            if not isinstance(a, torch.Tensor):
                return a
            real = self.real_of.get(a.untyped_storage()._cdata)
            if real is not None and real.dtype == a.dtype:
                return real
            if a.dtype in (torch.uint8, torch.int8) or (a.dim() == 1 and a.dtype != torch.float32):
                missing = True  # opaque bytes (a workspace) with no real forward to take them from
            return _random_like(a)

        with unset_fake_temporarily():
            real_args = [tree_map(swap, a) for a in args]
        return real_args, missing


def _key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    def one(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), tuple(a.stride()), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(one(x) for x in a)
        return a

    # kernels size their scratch by the thread count: oneDNN's convolution backward books a private
    # weights buffer for each thread beyond the first that splits the batch (key_conv_wei_reduction,
    # e.g. jit_avx512_common_conv_bwd_weights_kernel_f32::init_scratchpad), plus per-thread buffers
    threads = torch.get_num_threads()
    return (str(func), threads, one(args), tuple(sorted((k, one(v)) for k, v in kwargs.items())))


def _bytes(args: Any) -> int:
    total = 0

    def add(a: Any) -> Any:
        nonlocal total
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        return a

    tree_map(add, args)
    return total


def _measure(func: Any, op: ScratchOp, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[int, bool], Any]:
    first = args[op.batched[0]] if op.batched else None
    batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    if _bytes(args) <= _MAX_REAL_BYTES or not op.batched or batch <= 2:
        rise, out = _run(func, args, kwargs, None)
        return (rise, False), out
    s1, _ = _run(func, args, kwargs, (op.batched, 1))
    s2, _ = _run(func, args, kwargs, (op.batched, 2))
    return (max(0, s1 + (s2 - s1) * (batch - 1)), True), None


def _random_like(a: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    shape = list(a.shape)
    if batch is not None and shape:
        shape[0] = batch
    out = torch.empty_strided(shape, _strides_for(shape, list(a.stride())), dtype=a.dtype, device="cpu")
    return out.normal_() if out.is_floating_point() else out.zero_()


def _run(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], shrink: tuple[tuple[int, ...], int] | None
) -> tuple[int, Any]:
    def real(a: Any, batch: int | None = None) -> Any:
        return _random_like(a, batch) if isinstance(a, torch.Tensor) else a

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


def _profile_rise(call: Callable[[], Any]) -> tuple[int, Any]:
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
    # `running` ends at what the op returned (still alive here): the rest was scratch
    return max(0, peak - running), out
