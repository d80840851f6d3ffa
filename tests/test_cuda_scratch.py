"""CUDA kernels' own allocations (_cuda_scratch) and the memory outside the allocator (gpus).

Each rule's size is checked against the cited source's formula, computed here independently
(from the source's own expressions, not from the module's helpers); the end-to-end tests check
that a traced CUDA step carries those buffers as transient workspace events.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import _cuda_scratch as cs
from batchfit._errors import BatchfitError
from batchfit._estimate import estimate
from batchfit._gpus import PUBLISHED_CONTEXTS, context_bytes_for, get_gpu, lazy_module_loading, resolve_card
from batchfit._models import load_workload
from batchfit._step import make_spec
from batchfit._trace import trace_step

MiB = 1 << 20


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def grad(b: int, h: int, m: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A gradient contiguous in the attention kernels' [B, M, H, K] layout, seen as [B, H, M, K]."""
    return meta(b, m, h, k, dtype=dtype).transpose(1, 2)


def sizes(prog: list[tuple]) -> dict[str, int]:
    return {step[1]: step[2] for step in prog if step[0] == "alloc"}


# -- flash attention backward (flash_api.cpp, mha_bwd) ------------------------------------------


@pytest.mark.parametrize(("b", "h", "s", "d"), [(2, 8, 1000, 64), (1, 16, 2048, 128), (4, 4, 77, 160)])
def test_flash_backward_matches_mha_bwd(b: int, h: int, s: int, d: int) -> None:
    q = meta(b, h, s, d)
    got = sizes(cs.flash_backward_program(q, q, q, q, (9, 0)))
    seqlen_q_rounded = math.ceil(s / 128) * 128
    multiple = 32 if d <= 128 else 64
    head_size_rounded = math.ceil(d / multiple) * multiple
    assert got == {
        "softmax_d": 4 * b * h * seqlen_q_rounded,
        "dq_accum": 4 * b * seqlen_q_rounded * h * head_size_rounded,
    }


def test_flash_backward_gqa_expands_dk_dv() -> None:
    q, kv = meta(2, 8, 256, 64), meta(2, 2, 256, 64)
    got = sizes(cs.flash_backward_program(q, q, kv, kv, (8, 0)))
    assert got["dk_expanded"] == got["dv_expanded"] == 2 * 256 * 8 * 64 * 2  # {b, seqlen_k, h, d} in bf16


# -- memory-efficient attention backward (attention_backward.cu + kernel_backward.h) ------------


def gq_floats(m: int, k: int, block_i: int, block_j: int) -> int:
    # GradQTempStorage: int32 lock, counter, pad[2], then block_i x block_j fp32: 16 + 4*I*J bytes
    storage_bytes = 16 + 4 * block_i * block_j
    return math.ceil(m / block_i) * math.ceil(k / block_j) * storage_bytes // 4


def test_efficient_backward_half_head64_keeps_dk_dv_in_registers() -> None:
    b, h, m, k = 2, 4, 1024, 64
    q = meta(b, h, m, k)
    got = sizes(cs.efficient_backward_program(grad(b, h, m, k), q, q, q, (9, 0)))
    # cutlassB bf16 sm80: first kernel with kMaxK >= 64 is 64x64_k64_seqaligned (1024 % 64 == 0)
    per_bh = gq_floats(m, k, 64, 64)
    assert got == {"grad_out_contiguous": 0, "delta": 4 * b * h * m, "workspace": 4 * b * h * (per_bh + (-per_bh) % 4)}


def test_efficient_backward_head128_small_smem_card_uses_gmem_accumulators() -> None:
    b, h, n, k = 1, 8, 1024, 128
    q = meta(b, h, n, k, dtype=torch.float16)
    # sm86: the 128x128 kernels need more shared memory than 99 KiB -> 64x64_k128 (kMaxK 128 > I 64:
    # dK/dV accumulate in fp32 global memory, split over keys: min(ceil(1024/64), 200 // 8) = 16)
    got = sizes(cs.efficient_backward_program(grad(b, h, n, k, torch.float16), q, q, q, (8, 6)))
    splits = min(math.ceil(n / 64), 200 // (b * h))
    gk = gv = splits * n * k
    per_bh = gk + gv + gq_floats(n, k, 64, 64)
    assert got["workspace"] == 4 * b * h * per_bh
    # on sm80 the 128x128 kernel fits: dK/dV stay in registers
    got80 = sizes(cs.efficient_backward_program(grad(b, h, n, k, torch.float16), q, q, q, (8, 0)))
    assert got80["workspace"] == 4 * b * h * gq_floats(n, k, 128, 128)


def test_efficient_backward_fp32_computes_delta_outside_the_kernel() -> None:
    b, h, m, k = 2, 3, 100, 32
    q = meta(b, h, m, k, dtype=torch.float32)
    prog = cs.efficient_backward_program(grad(b, h, m, k, torch.float32), q, q, q, (8, 0))
    got = sizes(prog)
    assert got["delta_product"] == 4 * b * m * h * k  # grad_out.float() * out.float(), [B, M, H, Kv]
    assert got["delta_sum"] == got["delta"] == 4 * b * h * m
    # temporaries of one C++ expression: the product dies once summed, the sum once copied
    assert cs.peak_bytes(prog) == max(
        got["delta_product"] + got["delta_sum"], got["delta_sum"] + got["delta"], got["delta"] + got["workspace"]
    )


def test_efficient_backward_fp32_head128_uses_the_128x64_kernel() -> None:
    b, h, m, k = 1, 2, 300, 128
    q = meta(b, h, m, k, dtype=torch.float32)
    got = sizes(cs.efficient_backward_program(grad(b, h, m, k, torch.float32), q, q, q, (8, 0)))
    # dispatch_cutlassB_f32_sm80: 64x64_k32, 64x64_k64, then 128x64_k128; fp32 dK/dV never need
    # global accumulators (output_accum_t == output_t), dQ always does (split keys)
    per_bh = gq_floats(m, k, 128, 64)
    assert got["workspace"] == 4 * b * h * (per_bh + (-per_bh) % 4)


def test_efficient_backward_copies_a_non_contiguous_gradient() -> None:
    q = meta(2, 4, 64, 32)
    contiguous = grad(2, 4, 64, 32)
    strided = meta(2, 4, 64, 32)  # contiguous as [B, H, M, K]: not in the kernel's layout
    assert sizes(cs.efficient_backward_program(contiguous, q, q, q, (8, 0)))["grad_out_contiguous"] == 0
    assert sizes(cs.efficient_backward_program(strided, q, q, q, (8, 0)))["grad_out_contiguous"] == 2 * 4 * 64 * 32 * 2


def test_efficient_forward_accumulates_wide_half_heads_in_fp32() -> None:
    # cutlassF sm80: 64x64 (K <= 64) and 64x128 (K <= 128) keep the output in registers;
    # wider heads take the 32x128 gmem kernel, which needs an fp32 buffer of the output's size
    for k, expected in ((64, 0), (128, 0), (256, 4 * 2 * 100 * 3 * 256)):
        q = meta(2, 3, 100, k)
        assert sizes(cs.efficient_forward_program(q, q)) == {"output_accum": expected}
    q32 = meta(2, 3, 100, 256, dtype=torch.float32)  # output_accum_t == output_t
    assert sizes(cs.efficient_forward_program(q32, q32)) == {"output_accum": 0}


# -- embedding backward (Embedding.cu + EmbeddingBackwardKernel.cu) ------------------------------


def test_embedding_backward_direct_path_allocates_nothing() -> None:
    prog = cs.embedding_backward_program(meta(3072, 64), meta(3072, dtype=torch.int64), 1000, False)
    # the same buffers as the sort path, each 0 bytes (one event structure at every batch size)
    assert prog and all(step[2] == 0 for step in prog if step[0] == "alloc")
    assert cs.peak_bytes(prog) == cs.peak_bytes(prog, lambda n: max(512, n)) == 0  # 0 B requests take nothing


def test_embedding_backward_sort_path() -> None:
    numel, dim, vocab = 8 * 512, 768, 50257
    prog = cs.embedding_backward_program(meta(numel, dim), meta(8, 512, dtype=torch.int64), vocab, False)
    got = sizes(prog)
    max_segments = min(numel, vocab)
    max_partial_segment = numel // 10 + max_segments  # NROWS_PER_THREAD = 10
    assert got["grad_weight_per_segment"] == max_partial_segment * dim * 4  # fp32 accumulators for bf16
    assert got["partial_segment_offset"] == max_partial_segment * 8
    for name in ("sorted_indices", "orig_indices", "range", "segment_offsets"):
        assert got[name] == numel * 8
    assert got["partials_per_segment"] == got["partials_per_segment_offset"] == max_segments * 8
    assert ("free", "range") in prog  # arange for the sort dies with it
    # fp32 gradients accumulate in fp32 too
    fp32 = sizes(
        cs.embedding_backward_program(
            meta(numel, dim, dtype=torch.float32), meta(numel, dtype=torch.int64), vocab, False
        )
    )
    assert fp32["grad_weight_per_segment"] == max_partial_segment * dim * 4


# -- _foreach_norm (ForeachReduceOp.cu) ------------------------------------------------------------


def test_foreach_norm_partial_sums() -> None:
    tensors = [meta(1000, 1000), meta(10), meta(70000)]
    max_chunks = math.ceil(1_000_000 / 65536)
    assert sizes(cs.foreach_norm_program(tensors)) == {"output_per_tensor": 3 * max_chunks * 4}
    assert sizes(cs.foreach_norm_program([meta(10, dtype=torch.float64)])) == {"output_per_tensor": 8}


def test_registry_keys_are_real_aten_ops() -> None:
    for key in cs.RULES:
        _, name, overload = key.split(".")
        assert str(getattr(getattr(torch.ops.aten, name), overload)) == key


# -- end to end: a traced CUDA step carries the buffers ---------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 128, heads: int = 2) -> None:
        super().__init__()
        self.emb, self.qkv, self.out, self.heads = (
            nn.Embedding(vocab, d),
            nn.Linear(d, 3 * d),
            nn.Linear(d, vocab),
            heads,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        b, t, d = e.shape
        q, k, v = self.qkv(e).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return self.out(a)  # type: ignore[no-any-return]


def kernel_events(precision: str) -> list:
    with torch.device("meta"):
        model = TinyLM()
    workload = load_workload(model, ("1024:int64",))
    spec = make_spec("cuda", "sgd", precision, None, None, "train")
    trace = trace_step(workload, 4, spec, cuda_workspaces=(1000, 0), compute_capability=(9, 0))
    # the cuBLAS workspaces (1,000 B here) are kept; the kernels' buffers are transient
    return [e for e in trace.events if e.category == "workspaces" and e.nbytes != 1000]


def test_traced_bf16_step_has_flash_and_embedding_buffers() -> None:
    events = kernel_events("bf16")
    b, h, t, d = 4, 2, 1024, 64
    flash = [4 * b * h * t, 4 * b * t * h * d]  # softmax_d, dq_accum (1024 and 64 are already rounded)
    born = [e.nbytes for e in events if e.is_alloc and e.iteration == 1 and e.nbytes]
    assert born[:2] == flash
    assert 4 * (b * t // 10 + 100) * 128 in born  # grad_weight_per_segment: 4096 tokens, vocabulary 100
    # every buffer is born and dies in the backward of its iteration, and nothing outlives its op:
    # each op's buffers are freed before the next op's are born
    assert {e.phase for e in events if e.nbytes} == {"backward"}
    alive: set[int] = set()
    for e in events:
        if e.is_alloc:
            alive.add(e.storage)
        else:
            alive.discard(e.storage)
    assert not alive
    for it in (1, 2):
        assert [e.nbytes for e in events if e.iteration == it and e.is_alloc and e.nbytes][:2] == flash


def test_traced_fp32_step_has_efficient_attention_workspace() -> None:
    events = kernel_events("fp32")
    b, h, t, d = 4, 2, 1024, 64
    q = meta(b, h, t, d, dtype=torch.float32)
    expected = cs.efficient_backward_program(grad(b, h, t, d, torch.float32), q, q, q, (9, 0))
    born = [e.nbytes for e in events if e.is_alloc and e.iteration == 1 and e.phase == "backward"]
    assert born[: len(sizes(expected))] == [step[2] for step in expected if step[0] == "alloc"]  # 0 B copy first
    assert 4 * b * t * h * d in born  # the fp32 delta's product grad_out * out


def test_fit_sizes_kernel_buffers_per_batch_size() -> None:
    """fit's affine timeline re-runs the rules: the embedding backward switches to its sort path
    above 3,072 indices (not a line in the batch size), yet the timeline equals a trace there."""
    from batchfit._fit import AffineTimeline

    with torch.device("meta"):
        model = TinyLM(vocab=1000)
    workload = load_workload(model, ("1000:int64",))
    spec = make_spec("cuda", "sgd", "bf16", None, None, "train")

    def trace(b: int):  # type: ignore[no-untyped-def]
        return trace_step(workload, b, spec, cuda_workspaces=(1000, 0), compute_capability=(9, 0))

    from batchfit._compose import compose

    two = trace(2)
    three = compose(
        two, trace_step(workload, 3, spec, cuda_workspaces=(1000, 0), compute_capability=(9, 0), window_only=True)
    )
    assert three is not None  # fit composes its traces from window-only ones
    timeline = AffineTimeline(two, three)  # 2,000 and 3,000 indices: the direct path
    assert timeline.ok
    at7 = trace(7)  # 7,000 indices: sorted
    assert 4 * (7000 // 10 + 1000) * 128 in [e.nbytes for e in at7.events if e.category == "workspaces"]
    assert timeline.matches(at7)


def test_cpu_trace_has_no_kernel_buffers() -> None:
    with torch.device("meta"):
        model = TinyLM()
    trace = trace_step(load_workload(model, ("64:int64",)), 2, make_spec("cpu", "sgd", "fp32", None, None, "train"))
    assert not [e for e in trace.events if e.category == "workspaces"]


# -- memory outside the allocator ------------------------------------------------------------------


def test_lazy_loading_follows_cuda_version_and_environment() -> None:
    assert lazy_module_loading("11.7") and lazy_module_loading("13.0", {"CUDA_MODULE_LOADING": "lazy"})
    assert not lazy_module_loading("11.6")
    assert not lazy_module_loading("12.8", {"CUDA_MODULE_LOADING": "EAGER"})


def test_context_model_takes_the_largest_published_figure_of_the_mode() -> None:
    card = get_gpu("a100")
    eager = max(f.nbytes for f in PUBLISHED_CONTEXTS if not f.lazy)
    assert eager == 1343 * MiB
    nbytes, prov = context_bytes_for(card, "11.2")
    assert (nbytes, prov.status) == (eager, "reported")
    # lazy: the published bare contexts (<= 426 MiB) are below the catalogue's 512 MiB, which stays
    lazy_max = max(f.nbytes for f in PUBLISHED_CONTEXTS if f.lazy)
    assert lazy_max == 426 * MiB < card.non_allocator_bytes
    assert context_bytes_for(card, "12.4") == (card.non_allocator_bytes, card.provenance["non_allocator"])


def test_context_override_sets_the_budget() -> None:
    budget = resolve_card("h100", None, False, local=None, context="1GiB")
    assert budget.card.non_allocator_bytes == 1 << 30
    assert budget.device_limit_bytes == budget.budget_bytes - (1 << 30)
    assert budget.card.provenance["non_allocator"].source == "--context"
    assert str(budget.card.provenance["non_allocator"]) == "given with --context"
    with pytest.raises(BatchfitError):
        resolve_card("h100", None, False, local=None, context=-1)


def test_estimate_context_bytes_moves_only_the_total() -> None:
    base = estimate("mlp", batch_size=8, gpu="h100")
    more = estimate("mlp", batch_size=8, gpu="h100", context_bytes=base_context_plus(base, 100 * MiB))
    assert more.peak_reserved_bytes == base.peak_reserved_bytes
    assert more.total_bytes - base.total_bytes == 100 * MiB
    with pytest.raises(BatchfitError):
        estimate("mlp", batch_size=8, device="cpu", context_bytes="1GiB")


def base_context_plus(base, extra: int) -> int:  # type: ignore[no-untyped-def]
    return base.total_bytes - base.peak_reserved_bytes + extra


def test_cli_context_option() -> None:
    import json

    from typer.testing import CliRunner

    from batchfit.cli import app

    runner = CliRunner()
    args = ["estimate", "mlp", "--dataset", "mnist", "--batch-size", "64", "--gpu", "h100", "--json"]
    base = json.loads(runner.invoke(app, args).stdout)["results"][0]
    more = json.loads(runner.invoke(app, [*args, "--context", "2GiB"]).stdout)["results"][0]
    assert more["total_bytes"] == more["peak_reserved_bytes"] + 2 * 2**30
    assert more["peak_reserved_bytes"] == base["peak_reserved_bytes"]
    bad = runner.invoke(app, [*args, "--context", "-5"])
    assert bad.exit_code != 0 and "context" in bad.output


# -- matrix products: operands cuBLAS cannot read in place (Blas.cpp, prepare_matrix_for_cublas) ---


@pytest.mark.parametrize(
    ("operand", "copied"),
    [
        (meta(1, dtype=torch.float16).expand(12, 7), True),  # a .sum()'s gradient: stride 0
        (meta(1, dtype=torch.float16).expand(12, 7).t(), True),
        (meta(12, 7), False),  # contiguous
        (meta(12, 7).t(), False),  # transposed: unit stride, leading dimension 7 >= 7
        (meta(12, 14)[:, :7], False),  # unit stride, leading dimension 14 >= 7
        (meta(12, 14)[:, ::2], True),  # no unit stride
        (meta(1, 7).expand(1, 7), False),  # one row: non-overlapping and dense
    ],
)
def test_cublas_operand_copy(operand: torch.Tensor, copied: bool) -> None:
    assert cs.cublas_operand_copy_bytes(operand) == (operand.numel() * operand.element_size() if copied else 0)


def test_traced_sum_loss_copies_the_expanded_gradient_twice() -> None:
    """``outputs.sum()`` (Hugging Face's benchmark loss): the last Linear's backward reads a stride-0
    gradient, which cuBLAS gets as a contiguous copy for the input's gradient and the weight's."""
    from batchfit._models import InputSpec, Workload
    from batchfit._training import LossSpec

    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 300))
    workload = Workload("sum-loss", model, inputs=(InputSpec((64,), torch.long),))
    spec = make_spec("cuda", "sgd", "fp32", LossSpec("sum", lambda out, labels: out.sum(), lambda out: None))
    trace = trace_step(workload, 4, spec, cuda_workspaces=(1000, 0), compute_capability=(9, 0))
    logits = 4 * 64 * 300 * 4
    copies = [e for e in trace.events if e.category == "workspaces" and e.is_alloc and e.nbytes == logits]
    assert [(e.phase, e.iteration) for e in copies] == [("backward", 1)] * 2 + [("backward", 2)] * 2
