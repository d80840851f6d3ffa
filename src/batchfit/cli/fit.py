"""``batchfit fit``: the largest batch that fits a GPU, and the batch size to use."""

from __future__ import annotations

from typing import Annotated

import typer

from .._render import show
from ..fit import fit
from ..models import load_workload
from ._app import command, err_console
from ._common import (
    AllocConfOpt,
    ClassesOpt,
    DatasetOpt,
    EvalBatchOpt,
    FreeOpt,
    GpuOpt,
    InputOpt,
    JsonOpt,
    LastBatchOpt,
    LoopOpt,
    LossOpt,
    MemoryOpt,
    ModelArg,
    OptimizerOpt,
    PrecisionOpt,
    StepOpt,
)

SafetyOpt = Annotated[
    float, typer.Option("--safety", help="Use this fraction of the largest batch that fits (the seed's rule: 0.8).")
]


@command("fit")
def fit_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    gpu: GpuOpt = None,
    memory: MemoryOpt = None,
    free: FreeOpt = False,
    optimizer: OptimizerOpt = "sgd",
    precision: PrecisionOpt = "fp32",
    safety: SafetyOpt = 0.8,
    loss: LossOpt = None,
    step: StepOpt = None,
    loop: LoopOpt = "pytorch",
    last_batch: LastBatchOpt = None,
    eval_batch_size: EvalBatchOpt = None,
    alloc_conf: AllocConfOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the largest batch size whose training step fits the GPU, and recommend safety x that.

    Exit code 4 when even batch size 1 does not fit (the message says what would help).
    """
    workload = load_workload(model, inputs or None, dataset=dataset, num_classes=num_classes)
    with err_console.status("estimating...") as status:
        result = fit(
            workload,
            gpu=gpu,
            memory=memory,
            free=free,
            optimizer=optimizer,
            precision=precision,
            safety=safety,
            loss=loss,
            step=step,
            alloc_conf=alloc_conf,
            progress=lambda text: status.update(text),
            loop=loop,
            last_batch=last_batch,
            eval_batch_size=eval_batch_size,
        )
    if as_json:
        print(result.to_json())
        return
    show(result)
