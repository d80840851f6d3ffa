"""``batchfit plan``: the one-screen answer - the model, its memory, the batch size, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._distributed import DistSpec
from .._i18n import tr
from .._plan import check_plot_path, plan
from .._render import show
from ._app import command, err_console
from ._common import (
    NO_EXTRAS,
    AllocConfOpt,
    ClassesOpt,
    ContextOpt,
    DatasetOpt,
    FreeOpt,
    GpuOpt,
    GradAccumOpt,
    InputOpt,
    JsonOpt,
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
from .fit import SafetyOpt

PlotOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--plot",
        help="Also draw memory against the batch size (stacked by category, the card as a line) into FILE.png or FILE.svg.",
        show_default=False,
    ),
]

ThroughputOpt = Annotated[
    bool,
    typer.Option(
        "--throughput/--no-throughput",
        help="Add the roofline estimate of samples/s by batch size from the step's FLOPs and bytes and the "
        "card's catalogue peaks (an optimistic ceiling, not a measurement; three more fake traces).",
    ),
]


@command("plan")
@model_options
@dist_options
def plan_cmd(
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
    grad_accum: GradAccumOpt = 1,
    alloc_conf: AllocConfOpt = None,
    plot: PlotOpt = None,
    throughput: ThroughputOpt = True,
    as_json: JsonOpt = False,
    snapshot_path: SnapshotOpt = None,
    report_path: ReportOpt = None,
    extras: ModelExtras = NO_EXTRAS,
    dist: DistSpec | None = None,
) -> None:
    """The one-screen answer: model totals, the largest and the recommended batch size, the memory
    breakdown, a table at standard batch sizes, the roofline estimate of samples/s by batch size
    (labelled: not measured), and (with --plot) a plot of memory by batch size.

    Exit code 4 when even batch size 1 does not fit (the message says what would help).
    --snapshot writes the step at the recommended batch size.
    """
    check_paths(snapshot_path, report_path)
    if plot is not None:
        check_plot_path(plot)  # before minutes of work, not after
    workload = workload_from_options(model, inputs, dataset, num_classes, extras)
    with err_console.status("planning...") as status:
        result = plan(
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
            grad_accum=grad_accum,
            dist=dist,
            throughput=throughput,
        )
        if plot is not None:
            status.update(f"drawing {plot}")
            written = result.save_plot(plot)
    if as_json:
        print(result.to_json())
    else:
        show(result)
    if result.fit.estimate_at_recommended is not None:
        write_snapshots(snapshot_path, [result.fit.estimate_at_recommended])
    write_report(report_path, result)
    if plot is not None:
        err_console.print(tr("plot written to {path}", path=written), soft_wrap=True)
