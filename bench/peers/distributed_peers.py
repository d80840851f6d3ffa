"""Per-GPU memory of FSDP2 training, from batchfit and its peers, on the same models at world 2, 4 and 8.

    PYTHONPATH=src python bench/peers/distributed_peers.py            # the table (about a minute here)
    PYTHONPATH=src python bench/peers/distributed_peers.py --json out.json

For each model and world size, rank 0's figures:

* batchfit: ``batchfit._distributed.estimate_ranks`` at ``--device cpu`` (the per-rank peak of the
  traced step on PyTorch's fake process group, replayed like a single-process CPU step), wrapped the
  same way as the peer (``fully_shard`` per block, then the root);
* FSDPMemTracker: PyTorch's own tracker on the same fake group (bench/peers/fsdp_memtracker.py);
* DeepSpeed's ZeRO-2 / ZeRO-3 estimators (bench/peers/zero_formulas.py): model states only, for
  16-bit training with 32-bit master weights and Adam, whatever the model actually trains in.

Then the published figures the formulas are checked against (tests/test_peers_distributed.py).
Nothing here needs a GPU; see docs/distributed_peers.md for the numbers and what they mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fsdp_memtracker  # noqa: E402
import zero_formulas  # noqa: E402

BATCH = 8


class MLP(nn.Module):
    """The lesson's MNIST MLP shape (784-512-512-10); each Linear is a block."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 512), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.flatten(x))))))


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    block: str
    model_ref: str  # how batchfit loads it
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    loss: Callable[[Any, tuple[torch.Tensor, ...]], torch.Tensor]
    batchfit_inputs: list[str] | None = None


def _cases() -> list[Case]:
    import gpt2_small

    def mlp_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, 1, 28, 28),)

    def gpt_inputs(b: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, gpt2_small.VOCAB, (b, gpt2_small.SEQ_LEN)),)

    def ce(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits = out.reshape(-1, out.shape[-1])
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    return [
        Case("mlp (784-512-512-10)", MLP, "Linear", f"{Path(__file__).resolve()}:MLP", mlp_inputs, ce, ["1,28,28"]),
        Case(
            "gpt2-small shape (124M, seq 512)",
            gpt2_small.GPT2Small,
            "Block",
            f"{HERE / 'gpt2_small.py'}:GPT2Small",
            gpt_inputs,
            ce,
        ),
    ]


def batchfit_rank0(case: Case, world: int) -> dict[str, Any]:
    """batchfit's estimate for rank 0 (``--device cpu --gpus W --strategy fsdp --wrap BLOCK``)."""
    try:
        from batchfit._distributed import estimate_ranks, make_dist
    except ImportError as exc:
        return {"error": f"the distributed engine is not in this tree ({exc})"}
    from batchfit._estimate import make_spec
    from batchfit._models import load_workload

    start = time.perf_counter()
    workload = load_workload(case.model_ref, case.batchfit_inputs)
    spec = make_spec("cpu", "adamw")
    est = estimate_ranks(workload, BATCH, spec, make_dist(world, strategy="fsdp", wrap=case.block))
    rank0 = next(r for r in est.ranks if 0 in r.same_as)
    e = rank0.estimate
    states = sum(e.breakdown.get(k, 0) for k in ("parameters", "gradients", "optimizer_state"))
    return {
        "peak_bytes": e.peak_allocated_bytes,
        "model_states_bytes": states,
        "breakdown": dict(e.breakdown),
        "seconds": time.perf_counter() - start,
    }


def run(worlds: list[int], only: list[str]) -> list[dict[str, Any]]:
    rows = []
    for case in _cases():
        if only and not any(o in case.name for o in only):
            continue
        with torch.device("meta"):
            total, largest = zero_formulas.model_params(case.build())
        for world in worlds:
            torch.manual_seed(0)
            fmt = fsdp_memtracker.fsdp_peak(
                case.build,
                case.inputs,
                BATCH,
                world_size=world,
                block=case.block,
                loss=lambda out, c=case: c.loss(out, ()),
            )
            bd = fmt["breakdown"]
            rows.append(
                {
                    "model": case.name,
                    "params": total,
                    "largest_layer_params": largest,
                    "world_size": world,
                    "batch_per_rank": BATCH,
                    "batchfit": batchfit_rank0(case, world),
                    "fsdp_memtracker": {
                        **fmt,
                        "model_states_bytes": bd["SHARDED_PARAM"] + bd["SHARDED_GRAD"] + bd["OPT"],
                    },
                    "deepspeed_zero2_gpu_bytes": zero_formulas.zero2(total, gpus_per_node=world).gpu_bytes,
                    "deepspeed_zero3_gpu_bytes": zero_formulas.zero3(total, largest, gpus_per_node=world).gpu_bytes,
                }
            )
            print(f"  {case.name} at world {world}: done", file=sys.stderr, flush=True)
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"FSDP2 (fully_shard per block, then the root), AdamW fp32, batch {BATCH} per rank, rank 0, --device cpu; MiB\n"
    )
    head = (
        f"{'model':<34}{'world':>6}{'batchfit peak':>15}{'MemTracker':>12}{'diff':>10}"
        f"{'states bf':>11}{'states MT':>11}{'ZeRO-2':>10}{'ZeRO-3':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        bf, mt = r["batchfit"], r["fsdp_memtracker"]
        diff = bf["peak_bytes"] - mt["peak_bytes"] if "peak_bytes" in bf else None
        print(
            f"{r['model']:<34}{r['world_size']:>6}{_mib(bf.get('peak_bytes')):>15}{_mib(mt['peak_bytes']):>12}"
            f"{'-' if diff is None else f'{diff:+,} B':>10}{_mib(bf.get('model_states_bytes')):>11}"
            f"{_mib(mt['model_states_bytes']):>11}{_mib(r['deepspeed_zero2_gpu_bytes']):>10}"
            f"{_mib(r['deepspeed_zero3_gpu_bytes']):>10}"
        )
        if "error" in bf:
            print(f"    batchfit: {bf['error']}")
    print(
        "\nstates = parameters + gradients + optimizer state at the peak (bf: batchfit's breakdown; MT: "
        "FSDPMemTracker's sharded params + sharded grads + optimizer at its peak); ZeRO-2/3: DeepSpeed's per-GPU "
        "model states (16-bit params and grads, 32-bit master and Adam: a different training setup)"
    )
    print("\nPublished (DeepSpeed's estimator for bigscience/T0_3B, printed in Hugging Face transformers' docs):")
    for gpus in (1, 2):
        z = zero_formulas.zero3(2_783_959_040, 65_798_144, gpus_per_node=gpus)
        print(f"  ZeRO-3, no offload, {gpus} GPU(s): {zero_formulas.gb(z.gpu_bytes)} GB per GPU (this formula: same)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4,8", help="world sizes (comma-separated)")
    parser.add_argument("--only", action="append", default=[], help="only models whose name contains this")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run([int(w) for w in args.worlds.split(",")], args.only)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
