"""accelerate's ``estimate-memory`` beside batchfit, on batchfit's built-in Hugging Face configs.

``accelerate estimate-memory NAME`` asks the Hub for the model's metadata
(accelerate/commands/estimate.py ``create_empty_model`` -> ``verify_on_hub``), so offline it cannot
run; this script runs the rest of its own code on the same configs: ``AutoModel.from_config`` under
``init_empty_weights`` in float32 (as ``create_empty_model`` builds it: the base model, no LM
head), ``calculate_maximum_sizes`` and ``estimate_training_usage``, and its table's figure,
``max(...)`` of that dict ("Training using Adam", ``estimate_command``). Beside it, batchfit's
estimate of one training step at batch size 1 (AdamW, on a simulated H100 SXM: the peak
``max_memory_allocated`` would report, and the card's total with the CUDA context), for the same
two rows accelerate prints: ``float32`` (fp32 training) and ``float16`` (mixed precision: batchfit's
``amp-bf16``, fp32 weights under autocast). The simulated card is given 2 TiB (``memory="2TiB"``)
so that no step runs out of memory and every peak is the whole step's.

    PYTHONPATH=src python bench/peers/accelerate_estimate.py [--seq-len 512] [--models gpt2,bert-base-uncased]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.commands.estimate import estimate_training_usage
from accelerate.utils import calculate_maximum_sizes
from transformers import AutoConfig, AutoModel

import batchfit
from batchfit._hf import BUILTIN_CONFIGS, builtin_names

GIB = 2**30
ROWS = {"float32": "fp32", "float16": "amp-bf16"}  # accelerate's dtype row -> batchfit's --precision


def accelerate_figures(config_json: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """accelerate's total size (bytes, float32) and its 'Training using Adam' figure per dtype row,
    for a model's ``config.json`` values."""
    values = dict(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with init_empty_weights():
        model = AutoModel.from_config(config, torch_dtype=torch.float32)
    total, _largest = calculate_maximum_sizes(model)
    return total, {row: max(estimate_training_usage(total, row).values()) for row in ROWS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--models", default=",".join(builtin_names()))
    args = parser.parse_args()
    print(f"batch size 1, {args.seq_len} tokens, AdamW; batchfit on a simulated H100 SXM given 2 TiB; GiB = 2^30 bytes")
    header = (
        f"{'model':<34} {'row':<8} {'accelerate':>11} {'batchfit peak':>14} {'batchfit total':>15} "
        f"{'peak / acc.':>12} {'s':>5}"
    )
    print(header)
    for name in args.models.split(","):
        total, training = accelerate_figures(BUILTIN_CONFIGS[name])
        workload = batchfit.load_workload(f"hf:{name}", seq_len=args.seq_len)
        for row, precision in ROWS.items():
            start = time.perf_counter()
            est = batchfit.estimate(
                workload,
                batch_size=1,
                optimizer="adamw",
                precision=precision,
                device="cuda",
                gpu="h100-sxm",
                memory="2TiB",
            )
            seconds = time.perf_counter() - start
            assert isinstance(est, batchfit.StepEstimate) and not est.oom
            print(
                f"{name:<34} {row:<8} {training[row] / GIB:>11.2f} {est.peak_allocated_bytes / GIB:>14.2f} "
                f"{(est.total_bytes or 0) / GIB:>15.2f} {est.peak_allocated_bytes / training[row]:>12.2f} "
                f"{seconds:>5.0f}",
                flush=True,
            )
        print(f"{'':<34} accelerate's model size (float32, no LM head): {total / GIB:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
