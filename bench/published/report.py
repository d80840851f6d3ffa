"""The published cases' table for docs/accuracy.md, from the JSON rows the bench files write.

python3 bench/published/report.py bench/published/results/*.json
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    rows = []
    for path in paths:
        with open(path) as fh:
            # the benchmark-loop rows (published_mb); bert_large_trainer.py's rows print their own table
            rows += [r for r in json.load(fh) if "published_mb" in r]
    rows.sort(key=lambda r: (r["model"], r["transformers"], r["attention"], r["batch"], r["seq"]))
    print("| model | transformers | batch x tokens | attention | published MB | batchfit MB | error | peak in |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['transformers']} | {r['batch']} x {r['seq']} | {r['attention']} | "
            f"{r['published_mb']:,.2f} | {r['batchfit_mb']:,.1f} | {r['error']:+.2%} | {r['peak_phase']} |"
        )
    for release in sorted({r["transformers"] for r in rows}):
        errors = [abs(r["error"]) for r in rows if r["transformers"] == release]
        low = min(r["error"] for r in rows if r["transformers"] == release)
        print(
            f"\ntransformers {release}: {len(errors)} cases, median |error| {statistics.median(errors):.2%}, "
            f"worst |error| {max(errors):.2%}, most negative {low:+.2%}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
