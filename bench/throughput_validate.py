"""The roofline estimate of throughput beside measured samples/s on a real GPU (issue 16, "On a GPU").

One command on a machine with a CUDA GPU (a minute or two on an H100)::

    PYTHONPATH=src python3 bench/throughput_validate.py --out $OUT

For each case (the lesson's MLP at MNIST's shape; resnet18 at CIFAR-10's shape; SGD; fp32 and
amp-bf16) and each batch size (powers of two up to ``--max-batch``), it measures samples/s of the
reference step's steady iteration (``measure_step`` on cuda: the second iteration alone, timed
between ``torch.cuda.synchronize`` calls; the median of ``--repeats`` runs after one warm-up) beside
the roofline estimate for the local card (``batchfit._roofline.roofline`` with the catalogue's
peaks), and the smallest batch within 5% of the best of each (measured, estimated). A size that
runs out of memory ends that case. Writes ``throughput.json`` (a list of records) under ``--out``
and prints a table.

Without CUDA (or with ``--dry-run``) it measures the MLP on the CPU against the
default card's estimate (one size, one run), and marks every record ``"dry_run": true``: the path works, the numbers
compare nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

SCHEMA_VERSION = 1
DRY_RUN_CARD = "h100-sxm"
CASES = (  # (model, dataset, precision)
    ("mlp", "mnist", "fp32"),
    ("mlp", "mnist", "amp-bf16"),
    ("resnet18", "cifar10", "fp32"),
    ("resnet18", "cifar10", "amp-bf16"),
)


def measured_samples_per_second(
    workload: Any, spec: Any, batch_size: int, repeats: int, *, warm_up: bool = True
) -> float | None:
    """Median samples/s of the steady iteration over ``repeats`` runs (None: out of memory)."""
    import torch

    from batchfit._measure import measure_step
    from batchfit._probe import is_oom

    rates = []
    for i in range(repeats + warm_up):
        try:
            m = measure_step(workload, batch_size, spec, explain_errors=False)
        except Exception as exc:
            if is_oom(exc):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return None
            raise
        if (i or not warm_up) and m.steady_seconds:  # a first run warms up (cuBLAS handles, cuDNN's choices)
            rates.append(batch_size / m.steady_seconds)
    return statistics.median(rates) if rates else None


def run(out: Path, *, dry_run: bool, max_batch: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    from batchfit._gpus import card_for_local, get_gpu, probe_local_gpu
    from batchfit._models import load_workload
    from batchfit._roofline import roofline, smallest_within
    from batchfit._step import make_spec

    local = None if dry_run else probe_local_gpu()
    dry_run = dry_run or local is None
    card = get_gpu(DRY_RUN_CARD) if local is None else card_for_local(local)
    device = "cpu" if dry_run else "cuda"
    cases = CASES[:1] if dry_run else CASES
    sizes = [8] if dry_run else [2**k for k in range(0, max_batch.bit_length()) if 2**k <= max_batch]
    records: list[dict[str, Any]] = []
    for model, dataset, precision in cases:
        workload = load_workload(model, dataset=dataset)
        measured: list[tuple[int, float]] = []
        for b in sizes:
            spec = make_spec(device, precision=precision)
            sps = measured_samples_per_second(workload, spec, b, repeats, warm_up=not dry_run)
            if sps is None:
                break
            measured.append((b, sps))
        ran = [b for b, _ in measured]
        estimate = roofline(workload, make_spec("cuda", precision=precision), card, ran, model=model)
        est = {p.batch_size: p.samples_per_second for p in estimate.points}
        for b, sps in measured:
            records.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "dry_run": dry_run,
                    "gpu": card.name,
                    "torch": torch.__version__,
                    "model": model,
                    "dataset": dataset,
                    "precision": precision,
                    "batch_size": b,
                    "measured_samples_per_second": sps,
                    "roofline_samples_per_second": est.get(b),
                    "measured_saturation_batch_size": smallest_within(measured),
                    "roofline_saturation_batch_size": estimate.saturation_batch_size,
                    "roofline_unavailable": estimate.unavailable,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = ["model     precision  batch  measured samples/s  roofline samples/s  measured/roofline"]
    for r in records:
        est = r["roofline_samples_per_second"]
        ratio = f"{r['measured_samples_per_second'] / est:.3f}" if est else "-"
        lines.append(
            f"{r['model']:<9} {r['precision']:<10} {r['batch_size']:>5}  {r['measured_samples_per_second']:>18,.0f}"
            f"  {est or 0:>18,.0f}  {ratio:>17}"
        )
    seen = {(r["model"], r["precision"]): r for r in records}
    for (model, precision), r in seen.items():
        lines.append(
            f"{model} {precision}: saturates from {r['measured_saturation_batch_size']} measured, "
            f"{r['roofline_saturation_batch_size']} by the roofline estimate"
        )
    if records and records[0]["dry_run"]:
        lines.append("dry run: measured on the CPU against a GPU's estimate; the numbers compare nothing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(table(run(args.out, dry_run=args.dry_run, max_batch=args.max_batch, repeats=args.repeats)))


if __name__ == "__main__":
    main()
