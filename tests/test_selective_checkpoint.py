"""Selective activation checkpointing (SAC): ``torch.utils.checkpoint.checkpoint`` with a
``create_selective_checkpoint_contexts`` policy, as torchtitan trains with it.

On CPU the estimate must equal a real step measured by the profiler, to the byte; the outputs the
policy saves are activations in the breakdown (they are saved for backward, in SAC's own cache).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from batchfit import BatchfitError, estimate
from batchfit._hf import torchtitan_sac_context
from batchfit._measure import measure_step
from batchfit._models import InputSpec, Workload
from batchfit._step import make_spec

aten = torch.ops.aten


def _save_mm(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func is aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


POLICIES: dict[str, Any] = {
    "none": None,
    "full": noop_context_fn,  # checkpoint's default: recompute everything
    "mm": functools.partial(create_selective_checkpoint_contexts, _save_mm),
    "torchtitan": torchtitan_sac_context,
    # the list form (MUST_SAVE for these ops, PREFER_RECOMPUTE for the rest)
    "list": functools.partial(create_selective_checkpoint_contexts, [aten.mm.default, aten.silu.default]),
    "all": functools.partial(create_selective_checkpoint_contexts, lambda ctx, func, *a, **k: True),
}


class Block(nn.Module):
    """A Llama-like block (RMSNorm, causal attention, SwiGLU), bias-free linears: 7 matmuls."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
        self.w2 = nn.Linear(3 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.n1(x)
        q, k, v = (lin(y).view(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class DropoutBlock(Block):
    """Randomness inside the region: the recomputation replays the forward's dropout mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), 0.1, self.training)


class Net(nn.Module):
    def __init__(self, policy: str, d: int = 64, blocks: int = 3, vocab: int = 100, dropout: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList((DropoutBlock if dropout else Block)(d, 4) for _ in range(blocks))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.context_fn = POLICIES[policy]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for block in self.blocks:
            if self.context_fn is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=False, context_fn=self.context_fn)
        return self.head(self.norm(x))


SEQ = 32
D = 64


def _net(policy: str, dropout: bool = False) -> Workload:
    with torch.device("meta"):
        model = Net(policy, dropout=dropout)
    return Workload("sac", model, (InputSpec((SEQ,), torch.int64),))


@pytest.mark.parametrize(
    ("policy", "batch_size", "dropout"),
    [("mm", 2, False), ("mm", 8, False), ("torchtitan", 2, False), ("torchtitan", 8, False),
     ("list", 8, False), ("mm", 8, True)],
)  # fmt: skip
def test_selective_checkpointing_equals_a_real_cpu_step(policy: str, batch_size: int, dropout: bool) -> None:
    w = _net(policy, dropout)
    est = estimate(w, batch_size=batch_size, optimizer="adamw", device="cpu")
    real = measure_step(w, batch_size, make_spec("cpu", "adamw"))
    assert est.peak_allocated_bytes == real.peak_allocated_bytes


def test_a_mutated_cache_fails_as_the_real_step_does() -> None:
    """Saving every op keeps outputs that later in-place ops change: torch refuses that in the
    backward ("Tensor cached during selective activation checkpoint has been mutated"), and so does
    the estimate, instead of answering for a step that cannot run."""
    w = _net("all")
    with pytest.raises(BatchfitError, match="has been mutated"):
        measure_step(w, 2, make_spec("cpu", "sgd"))
    with pytest.raises(BatchfitError, match="has been mutated"):
        estimate(w, batch_size=2, optimizer="sgd", device="cpu")


def test_the_policies_change_the_real_step() -> None:
    """The comparison above can fail: each policy keeps a different amount, in the real step too."""
    peaks = {
        p: measure_step(_net(p), 8, make_spec("cpu", "adamw")).peak_allocated_bytes
        for p in ("none", "full", "mm", "torchtitan")
    }
    assert peaks["full"] < peaks["torchtitan"] < peaks["mm"] < peaks["none"]


def _block_activations(policy: str, batch_size: int, device: str = "cpu") -> int:
    with warnings.catch_warnings():
        # the tracer's own saved-tensor hooks must not make torch warn about SAC (a user's step has none)
        warnings.simplefilter("error", FutureWarning)
        r = estimate(_net(policy), batch_size=batch_size, optimizer="sgd", device=device)
    return sum(v for k, v in r.activation_bytes_by_module.items() if k.startswith("blocks."))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_outputs_a_policy_saves_are_activations(device: str) -> None:
    """SAC keeps the saved ops' outputs in its own cache, which no saved-tensor hook sees: they are
    filed as activations all the same, each block's matmul outputs (fp32) over the full checkpoint's."""
    b = 2
    full = _block_activations("full", b, device)
    # per block: q, k, v, o (d each), w1, w3 (3d each), w2 (d) -> 11 d outputs of (b, SEQ)
    assert _block_activations("mm", b, device) - full == 3 * b * SEQ * 11 * D * 4
    # torchtitan's rule saves every other matmul of a block (the 1st, 3rd, ...: q, v, w1, w2)
    mms = 3 * b * SEQ * (D + D + 3 * D + D) * 4
    # and, on CUDA, the memory-efficient attention kernel's results (fp32 picks it): the output
    # (b, heads, SEQ, D / heads), fp32 log-sum-exp (b, heads, SEQ rounded up to 32) and the 0-dim
    # int64 philox seed and offset (torch/_meta_registrations.py, meta__scaled_dot_product_efficient_attention);
    # on CPU the attention op is _scaled_dot_product_flash_attention_for_cpu, not in the list
    attention = 3 * (b * SEQ * D * 4 + b * 4 * 32 * 4 + 2 * 8) if device == "cuda" else 0
    assert _block_activations("torchtitan", b, device) - full == mms + attention


SAC_MODEL = f"{Path(__file__).with_name('dist_models.py')}:SacBlocks"


def test_fsdp2_with_selective_checkpointing_matches_real_gloo_processes() -> None:
    """torchtitan's arrangement at world 2: each block in ``checkpoint_wrapper`` with the per-op
    policy, FSDP2 on the wrappers; each rank's estimate equals real gloo processes (the count
    most of three runs agree on, as in tests/test_distributed.py)."""
    from batchfit._dist_measure import measure_ranks
    from batchfit._distributed import DistSpec, estimate_ranks
    from batchfit._models import load_workload

    dist = DistSpec(2, strategy="fsdp", wrap="CheckpointWrapper")
    spec = make_spec("cpu", "adam", threads=1)
    (measured,) = measure_ranks(SAC_MODEL, 8, spec, [dist], input_size=[12], repeats=3)
    result = estimate_ranks(load_workload(SAC_MODEL, [12]), 8, spec, dist)
    by_rank = {r: rank.estimate.peak_allocated_bytes for rank in result.ranks for r in rank.same_as}
    assert [by_rank[r] for r in range(2)] == [m.peak_allocated_bytes for m in measured]


def _torchtitan_bench() -> Any:
    import importlib.util
    import sys

    path = Path(__file__).parents[1] / "bench" / "published" / "torchtitan_llama3_8b.py"
    spec = importlib.util.spec_from_file_location("bench_torchtitan_llama3_8b", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_torchtitans_llama_as_rebuilt_equals_a_real_cpu_step() -> None:
    """bench/published/torchtitan_llama3_8b.py: its model at full size is the 8B (Meta's published
    count, the same as the hf: built-in's), and a small one with torchtitan's step (logits cast to
    fp32 for the loss, clipping, SAC on every block) is estimated exactly on the CPU."""
    from batchfit._models import count_parameters

    bench = _torchtitan_bench()
    assert count_parameters(bench.build(32, 4096, 8192, 128_256)) == 8_030_261_248
    model = bench.build(2, 256, 64, 1000)
    w = Workload("torchtitan-small", model, (InputSpec((64,), torch.int64),))
    est = estimate(w, batch_size=2, optimizer="adamw", device="cpu", step=bench.train_step)
    real = measure_step(w, 2, make_spec("cpu", "adamw", step=bench.train_step))
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
