"""The README's Python example, checked by mypy --strict (pyproject's ``[tool.mypy] files``).

Never run (the functions are not called; pytest collects no test here): it pins that the public
verbs return the types users read attributes from, e.g. ``estimate`` with one batch size a
:class:`batchfit.StepEstimate` and with a list an :class:`batchfit.EstimateReport`.
"""

from __future__ import annotations

from torch import nn
from typing_extensions import assert_type

import batchfit


def readme_example(my_module: nn.Module) -> None:
    assert_type(batchfit.summary("mlp", dataset="mnist").total_params, int)
    r = batchfit.estimate("resnet50", batch_size=128, optimizer="adam", gpu="a100-80gb")
    assert_type(r, batchfit.StepEstimate)
    _ = r.peak_allocated_bytes, r.peak_reserved_bytes, r.total_bytes, r.breakdown, r.peak_where
    assert_type(batchfit.fit("resnet50", gpu="a100-80gb", optimizer="adam").recommended_batch_size, int)
    report = batchfit.estimate(my_module, input_size=(3, 32, 32), batch_size=[64, 256], device="cpu")
    assert_type(report, batchfit.EstimateReport)
    assert_type(report[0].peak_allocated_bytes, int)
    assert_type(batchfit.sweep("mlp", dataset="digits", epochs=10, lr=0.05).recommended_batch_size, int)
    w = batchfit.load_workload("hf:Qwen/Qwen2.5-0.5B", seq_len=1024, lora=16, gradient_checkpointing=True)
    assert_type(batchfit.fit(w, gpu="rtx4090", optimizer="adamw", precision="bf16").max_batch_size, int)
    assert_type(batchfit.fit("mlp", dataset="mnist", gpus=8, strategy="fsdp").global_recommended_batch_size, int)
    options: batchfit.DistOptions = {"gpus": 2, "strategy": "ddp", "bucket_cap_mb": 10}
    assert_type(batchfit.plan("mlp", dataset="mnist", **options).fit.max_batch_size, int)
