"""One estimate of ResNet-50 at one batch size: batchfit's own work vs PyTorch's MemTracker.

Both run the same step (two iterations of forward, backward, optimizer step) on fake tensors in
this process; timings are wall clock of the work itself (imports and a warm-up run excluded),
best of ``--repeat``. Prints both and the ratio, and both peaks beside a real CPU step's.

    PYTHONPATH=src:bench python bench/estimate_speed.py [--batch-size 64] [--optimizer adam]
"""

from __future__ import annotations

import argparse
import time

import torchvision

from batchfit._estimate import Estimator
from batchfit._models import load_workload
from batchfit._step import make_spec
from memtracker_peer import memtracker_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    workload = load_workload(args.model)
    build = lambda: torchvision.models.get_model(args.model, weights=None)  # noqa: E731
    rows = []
    for device in ("cpu", "cuda"):
        est = Estimator(workload, make_spec(device, args.optimizer))
        est.trace(args.batch_size)  # warm-up (imports, caches, CPU kernel scratch measured once)
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            trace = est.trace(args.batch_size)
            best = min(best, time.perf_counter() - start)
        from batchfit._estimate import estimate_trace

        result = estimate_trace(trace, workload, est.spec, est.budget, est.alloc_config)
        rows.append((f"batchfit ({device} semantics)", best, result.peak_allocated_bytes))
    memtracker_peak(build, (3, 224, 224), args.batch_size, args.optimizer)  # warm-up
    peak, seconds = min(
        (memtracker_peak(build, (3, 224, 224), args.batch_size, args.optimizer) for _ in range(args.repeat)),
        key=lambda r: r[1],
    )
    rows.append(("MemTracker (fake CPU)", seconds, peak))
    print(f"{args.model}, batch {args.batch_size}, {args.optimizer}, two iterations, best of {args.repeat}")
    print(f"{'tool':<28}{'seconds':>9}{'peak bytes':>18}")
    for name, s, p in rows:
        print(f"{name:<28}{s:9.2f}{p:18,}")
    print(f"ratio batchfit(cuda) / MemTracker time: {rows[1][1] / seconds:.2f}")
    print(f"ratio batchfit(cpu) / MemTracker time:  {rows[0][1] / seconds:.2f}")


if __name__ == "__main__":
    main()
