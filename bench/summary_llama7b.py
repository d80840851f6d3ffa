"""Benchmark: ``batchfit._summary`` of a 7-billion-parameter LLaMA-shaped decoder (not a test).

The model (tests/zoo.py: 32 layers, d_model 4096, 32 heads, SwiGLU 11008, vocab 32000, RMSNorm)
is built on the meta device and run on fake tensors, so it needs no weight memory. Prints the
wall time of building and of the summary, and the process's peak resident memory.

    PYTHONPATH=src python bench/summary_llama7b.py [--seq 2048] [--batch 1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch

from batchfit import format_bytes, summary
from zoo import LLAMA_7B, Llama


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (tokens per sample)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    rss_start = peak_rss_bytes()
    start = time.perf_counter()
    with torch.device("meta"):
        model = Llama(LLAMA_7B)
    built = time.perf_counter()
    result = summary(model, input_size=f"{args.seq}:int64", batch_size=args.batch, depth=2)
    done = time.perf_counter()
    text = str(result)
    peak = peak_rss_bytes()

    print(text.splitlines()[0])
    print("\n".join(text.splitlines()[-10:]))
    print(f"params: {result.total_params:,} (by hand: {LLAMA_7B.params:,})")
    print(f"mult-adds: {result.total_mult_adds:,} (by hand: {LLAMA_7B.mult_adds(args.batch, args.seq):,})")
    print(f"build on meta: {built - start:.2f} s; summary: {done - built:.2f} s; total wall: {done - start:.2f} s")
    print(f"peak RSS: {format_bytes(peak, 'MiB')} (after imports: {format_bytes(rss_start, 'MiB')})")


if __name__ == "__main__":
    main()
