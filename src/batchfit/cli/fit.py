"""``batchfit fit``: the largest batch that fits a GPU, and the batch size to use."""

from __future__ import annotations

from typing import Annotated

import typer

from .._distributed import DistSpec
from .._fit import fit
from .._render import show
from ._app import command, err_console
from ._common import (
    NO_EXTRAS,
    AllocConfOpt,
    ClassesOpt,
    ContextOpt,
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
    ModelExtras,
    OptimizerOpt,
    PrecisionOpt,
    StepOpt,
    dist_options,
    model_options,
    workload_from_options,
)
from ._outputs import ReportOpt, SnapshotOpt, check_paths, write_report, write_snapshots

SafetyOpt = Annotated[
    float, typer.Option("--safety", help="Use this fraction of the largest batch that fits (the lesson's rule: 0.8).")
]


@command("fit")
@model_options
@dist_options
def fit_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    gpu: GpuOpt = None,
    memory: MemoryOpt = None,
    free: FreeOpt = False,
    context: ContextOpt = None,
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
    snapshot_path: SnapshotOpt = None,
    report_path: ReportOpt = None,
    extras: ModelExtras = NO_EXTRAS,
    dist: DistSpec | None = None,
) -> None:
    """Find the largest batch size whose training step fits the GPU, and recommend safety x that.

    Exit code 4 when even batch size 1 does not fit (the message says what would help).
    --snapshot writes the step at the recommended batch size.
    """
    check_paths(snapshot_path, report_path)
    workload = workload_from_options(model, inputs, dataset, num_classes, extras)
    with err_console.status("estimating...") as status:
        result = fit(
            workload,
            gpu=gpu,
            memory=memory,
            free=free,
            context_bytes=context,
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
            dist=dist,
        )
    if as_json:
        print(result.to_json())
    else:
        show(result)
    if result.estimate_at_recommended is not None:
        write_snapshots(snapshot_path, [result.estimate_at_recommended])
    write_report(report_path, result)
