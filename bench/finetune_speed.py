"""The fine-tuning question, timed as a user runs it: Llama-3.1-8B, LoRA 16, gradient checkpointing.

Targets (the fine-tuning issue): `estimate ... --seq-len 4096 -b 1` under 30 s and under 3 GiB of
host memory; `fit` of the same on an RTX 4090 under 60 s. Each command runs in a fresh process;
its wall time and peak resident memory (the child's ru_maxrss) are printed beside the time of one
real-model import (`import torch, transformers, peft` and building Llama-3.1-8B on the meta
device), since this shared machine's speed varies by tens of percent.

    python bench/finetune_speed.py [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "hf:meta-llama/Llama-3.1-8B"
COMMON = ["--seq-len", "4096", "--lora", "16", "--gradient-checkpointing", "--precision", "bf16"]
COMMANDS = {
    "estimate": ["estimate", MODEL, "-b", "1", *COMMON],
    "fit": ["fit", MODEL, "--gpu", "rtx4090", *COMMON],
}
IMPORT = (
    "import os, torch, transformers, peft\n"
    "from batchfit._hf import build_hf_model\n"
    f"build_hf_model({MODEL!r}, seq_len=4096)\n"
    "os._exit(0)"
)


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system), this child's own peak RSS in GiB (os.wait4's
    rusage), and its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if child.returncode not in (0, 4):  # 4: does not fit even at batch size 1, an answer too
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{text}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, usage.ru_maxrss / 2**20, text  # ru_maxrss is in KiB on Linux


def load() -> str:
    """The 1-minute load average: on a shared machine the wall time follows it, the CPU time much less."""
    return f"load average {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", choices=sorted(COMMANDS), help="time one command (and the import)")
    args = parser.parse_args()
    for _ in range(args.runs):
        before = load()
        seconds, cpu, rss, _ = timed([sys.executable, "-c", IMPORT])
        print(
            f"import torch+transformers+peft and build the 8B model on meta: {seconds:.1f} s wall, "
            f"{cpu:.1f} s CPU, {rss:.2f} GiB ({before} at the start)"
        )
        for name, argv in COMMANDS.items():
            if args.only is not None and name != args.only:
                continue
            before = load()
            seconds, cpu, rss, out = timed([sys.executable, "-m", "batchfit", *argv])
            print(out.strip())
            print(
                f"batchfit {' '.join(argv)}: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.2f} GiB "
                f"({before} at the start)\n"
            )


if __name__ == "__main__":
    main()
