"""torchtitan's Llama 3.1 8B on 8 H100s, FSDP2 and per-op selective activation checkpointing:
the 82.4 GiB of its Table 1 (and the 67.0 GiB of Table 3, 128 GPUs), rebuilt with batchfit.

    PYTHONPATH=src python3 bench/published/torchtitan_llama3_8b.py [--nodes 16] [--json out.json]
    PYTHONPATH=src python3 bench/published/torchtitan_llama3_8b.py --layers 2 --dim 256 --seq-len 256  # a quick run

Source: pytorch/torchtitan, ``benchmarks/llama3_h100_202412_torchtitan.md``
(https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md), "The
following performance benchmarks were done by the `torchtitan` team at the end of 2024", **Table 1**:
"1D Parallelism (FSDP). Llama 3.1 8B model. 8 GPUs. Local batch size 2, global batch size 16.
Selective activation checkpointing.", row "FSDP": TPS/GPU 5,762, Memory(GiB) 82.4; **Table 3**, the
same on 128 GPUs ("Local batch size 2, global batch size 256"), row "FSDP": 5,605, 67.0 (``--nodes 16``:
FSDP2 over all 128 ranks, the config's ``data_parallel_shard_degree = -1``). Hardware: "Each
host has 8 NVIDIA H100 GPUs fully connected with NVLink. Each H100 GPU is equipped with 96GB HBM2e".
The figure is what torchtitan logs as ``memory: {max_reserved_gib}`` (train.py, ``DeviceMemoryMonitor``:
``torch.cuda.memory_stats()["reserved_bytes.all.peak"]`` in GiB), reset every 10 steps: batchfit's
``peak_reserved_bytes``, not its total (no CUDA context in it).

The run, as torchtitan's code of that time sets it (torchtitan 9dec370 of 2024-12-26, the commit the
benchmark names; file and function for each):

* the model: torchtitan's own Llama (``torchtitan/models/llama/model.py``, ``Transformer`` with the
  ``llama3_configs["8B"]`` arguments of ``torchtitan/models/llama/__init__.py``: dim 4096, 32 layers,
  32 heads, 8 KV heads, ``ffn_dim_multiplier`` 1.3, ``multiple_of`` 1024, so 14,336 hidden; ``rmsnorm``
  (``torchtitan/models/norms.py`` ``RMSNorm``: the norm in fp32, cast back, times the weight); vocab
  128,256 (the tiktoken tokenizer's n_words: 128,000 + 256 reserved special tokens,
  ``torchtitan/datasets/tokenizer/tiktoken.py``); ``max_seq_len`` = the training sequence length
  (train.py); rotary embeddings as complex64 ``freqs_cis`` (a buffer); fp32 weights, built on meta.
  Written below from that file's operations, in its order (the memory depends on each op);
* ``train_configs/llama3_8b.toml``: ``seq_len = 8192``, AdamW ``lr = 3e-4``, ``max_norm = 1.0``,
  ``[activation_checkpoint] mode = 'selective'``, ``selective_ac_option = 'op'``, no compile, no float8;
  the table's local batch 2 (the toml's 1 overridden on the command line);
* activation checkpointing (``torchtitan/parallelisms/parallelize_llama.py``, ``apply_ac`` /
  ``_apply_ac_to_transformer_block``): each ``TransformerBlock`` wrapped by
  ``checkpoint_wrapper(block, context_fn=..., preserve_rng_state=False)`` with the per-op policy
  (``batchfit._hf.torchtitan_sac_context``: ``_save_list``, every second matmul recomputed);
* FSDP2 (same file, ``apply_fsdp``): ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
  (``mixed_precision_param`` / ``_reduce`` defaults, config_manager.py), ``fully_shard`` per block with
  ``reshard_after_forward`` False for the last block only, then the root (resharding);
* the step (train.py): ``optimizers.zero_grad()``; ``pred = model(input_ids)``; ``loss =
  cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))``; ``del pred``; ``loss.backward()``;
  ``utils.clip_grad_norm_(params, 1.0, foreach=True)`` (``get_total_norm`` + ``clip_grads_with_norm_``);
  ``optimizers.step()`` with AdamW (``torchtitan/optimizer.py``: ``fused=False, foreach=True``;
  betas and weight decay change no memory).

batchfit runs that step on fake CUDA tensors (an H100, sm90: SDPA takes the flash kernel for bf16), one
rank of the fake group (8 ranks, or 128: every rank holds the same shards), through its caching-allocator model.
Not modelled: the card's 96 GB (the catalogue's ``h100-sxm`` is 80 GB; the limit is set to 96e9 bytes,
``--memory``), NCCL's own memory (outside the caching allocator: not in reserved), the data loader,
torchtitan's periodic ``gc.collect()``, and the torch nightly of 2024-12-23 the run used (this runs the
installed torch).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from batchfit import _distributed, estimate
from batchfit._hf import torchtitan_sac_context
from batchfit._models import InputSpec, Workload

PUBLISHED_GIB = {1: 82.4, 16: 67.0}  # by nodes of 8 GPUs: Table 1, Table 3
SOURCE = "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.py ``apply_rotary_emb``: q and k as complex numbers in fp32, times the frequencies."""
    q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis[: q.shape[1]].view(1, q.shape[1], 1, q.shape[-1])
    return torch.view_as_real(q * f).flatten(3).type_as(xq), torch.view_as_real(k * f).flatten(3).type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, t, heads, d = x.shape
    return x if n_rep == 1 else x.unsqueeze(3).expand(b, t, heads, n_rep, d).reshape(b, t, heads * n_rep, d)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        xq = self.wq(x).view(b, t, -1, self.head_dim)
        xk = self.wk(x).view(b, t, -1, self.head_dim)
        xv = self.wv(x).view(b, t, -1, self.head_dim)
        xq, xk = rotate(xq, xk, freqs_cis)
        n_rep = self.heads // self.kv_heads
        q, k, v = xq.transpose(1, 2), repeat_kv(xk, n_rep).transpose(1, 2), repeat_kv(xv, n_rep).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, kv_heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


def ffn_hidden(dim: int, multiple_of: int, multiplier: float) -> int:
    """model.py ``FeedForward.__init__`` from hidden_dim = 4 * dim: 14,336 for the 8B."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Transformer(nn.Module):
    def __init__(
        self, dim: int, layers: int, heads: int, kv_heads: int, vocab: int, seq_len: int, hidden: int, theta: float
    ) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        head_dim = dim // heads
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        angles = torch.outer(torch.arange(seq_len, device=freqs.device), freqs).float()
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=True)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(dim, heads, kv_heads, hidden, 1e-5) for i in range(layers)}
        )
        self.norm = RMSNorm(dim, 1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


def build(layers: int, dim: int, seq_len: int, vocab: int) -> nn.Module:
    """The 8B (at its defaults) with torchtitan's per-op SAC on every block (``apply_ac``)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    heads = dim // 128  # the 8B's head_dim 128 (4096 / 32), kept for smaller quick runs
    with torch.device("meta"):
        model = Transformer(dim, layers, heads, max(1, heads // 4), vocab, seq_len, ffn_hidden(dim, 1024, 1.3), 5e5)
    for name, block in list(model.layers.named_children()):
        wrapped = checkpoint_wrapper(block, context_fn=torchtitan_sac_context, preserve_rng_state=False)
        model.layers.register_module(name, wrapped)
    return model


def torchtitan_fsdp(
    model: nn.Module, dist: Any, device_type: str, mesh: Any = None, *, pin_memory: bool = True
) -> nn.Module:
    """parallelize_llama.py ``apply_fsdp``: per block, the last one not resharded after forward, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dist.param_dtype, reduce_dtype=dist.reduce_dtype)
    layers = model.layers
    for layer_id, block in layers.items():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=int(layer_id) < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def train_step(model: nn.Module, inputs: tuple[Any, ...], labels: torch.Tensor, optimizer: Any) -> None:
    """train.py's loop body (no pipeline, no context parallel)."""
    optimizer.zero_grad()
    pred = model(*inputs)
    loss = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))
    del pred
    loss.backward()
    params = list(model.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0, False, True)
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, total, True)
    optimizer.step()


def run(
    layers: int, dim: int, seq_len: int, vocab: int, batch: int, alloc_conf: str | None, nodes: int = 1
) -> tuple[Any, float]:
    model = build(layers, dim, seq_len, vocab)
    workload = Workload("torchtitan-llama3-8b", model, (InputSpec((seq_len,), torch.int64),))
    start = time.perf_counter()
    with mock.patch.object(_distributed, "wrap_model", torchtitan_fsdp):
        est = estimate(
            workload,
            batch_size=batch,
            device="cuda",
            gpu="h100-sxm",
            memory=96 * 10**9,
            optimizer="adamw",
            precision="fp32",
            step=train_step,
            gpus=8,
            nodes=nodes,
            strategy="fsdp",
            param_dtype="bf16",
            reduce_dtype="fp32",
            wrap="CheckpointWrapper",
            alloc_conf=alloc_conf,
        )
    return est, time.perf_counter() - start


def _gib(n: int) -> float:
    return n / 2**30


def row(est: Any, seconds: float, args: argparse.Namespace, alloc_conf: str | None) -> dict[str, Any]:
    ours = _gib(est.peak_reserved_bytes)
    full = (args.layers, args.dim, args.seq_len, args.vocab, args.batch) == (32, 4096, 8192, 128256, 2)
    published = PUBLISHED_GIB.get(args.nodes) if full else None
    return {
        "model": "torchtitan Llama 3.1 8B" if full else f"torchtitan Llama, {args.layers} x {args.dim}",
        "alloc_conf": alloc_conf or "(default)",
        "torch": torch.__version__,
        "batch": args.batch,
        "seq": args.seq_len,
        "gpus": 8 * args.nodes,
        "published_gib": published,
        "batchfit_reserved_gib": round(ours, 2),
        "batchfit_allocated_gib": round(_gib(est.peak_allocated_bytes), 2),
        "error": round((ours - published) / published, 4) if published else None,
        "unit": "GiB (max_memory_reserved)",
        "peak_phase": est.peak_phase,
        "breakdown_gib": {k: round(_gib(v), 2) for k, v in est.breakdown.items() if v},
        "estimate_seconds": round(seconds, 1),
        "source": SOURCE,
        "notes": est.notes,
    }


# torchtitan's launcher (run_llama_train.sh at 9dec370) sets PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True";
# the caching allocator's default segments are shown beside it
ALLOC_CONFS = ("expandable_segments:True", None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1, help="nodes of 8 GPUs (16: Table 3's 128 GPUs)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    out = []
    for alloc_conf in ALLOC_CONFS:
        est, seconds = run(args.layers, args.dim, args.seq_len, args.vocab, args.batch, alloc_conf, args.nodes)
        r = row(est, seconds, args, alloc_conf)
        out.append(r)
        published = f"published {r['published_gib']} GiB, " if r["published_gib"] else ""
        error = f", error {r['error']:+.2%}" if r["error"] is not None else ""
        print(
            f"{r['model']}, batch {args.batch} x {args.seq_len}, {r['gpus']} GPUs FSDP2 + per-op SAC, {r['alloc_conf']}: "
            f"{published}batchfit {r['batchfit_reserved_gib']:.2f} GiB reserved "
            f"({r['batchfit_allocated_gib']:.2f} GiB allocated){error}; estimated in {seconds:.1f} s"
        )
        print("  peak in", est.peak_where, r["breakdown_gib"])
    print("source:", SOURCE)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
