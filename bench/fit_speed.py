"""How long `batchfit fit` takes, start-up included, as a user runs it (the issue's target: under 10 s).

Runs the command in fresh processes (``--runs`` times) and prints each wall time, plus the
import time alone (``import torch, torchvision``, then ``os._exit`` as batchfit leaves) for scale. Shared, noisy machines
vary by tens of percent between runs: read the spread, not one number.

    python bench/fit_speed.py [--runs 3] [-- extra fit arguments]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["resnet50", "--input", "3,224,224", "--gpu", "A100-80GB", "--optimizer", "adam"]


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("fit_args", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    fit_cmd = [sys.executable, "-m", "batchfit", "fit", *args.fit_args]
    # the import alone, leaving as batchfit does (os._exit: no teardown, which takes ~2 s after torch here)
    imports = [timed([sys.executable, "-c", "import os, torch, torchvision; os._exit(0)"])[0] for _ in range(args.runs)]
    runs = []
    out = ""
    for _ in range(args.runs):
        seconds, out = timed(fit_cmd)
        runs.append(seconds)
    print(out.strip())
    print()
    print(f"command: batchfit fit {' '.join(args.fit_args)}")
    print(f"import torch + torchvision alone: {', '.join(f'{s:.2f}' for s in imports)} s")
    print(f"after the imports (medians): {statistics.median(runs) - statistics.median(imports):.2f} s")
    print(
        f"whole command, start-up included: {', '.join(f'{s:.2f}' for s in runs)} s (median {statistics.median(runs):.2f})"
    )


if __name__ == "__main__":
    main()
