"""``batchfit estimate`` and ``batchfit measure``: one training step's memory, simulated or real."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .._distributed import DistSpec
from .._errors import BatchfitError, ExitCode
from .._estimate import EstimateReport, estimate, threads_text
from .._i18n import tr
from .._models import Workload
from .._render import Table, show
from .._step import StepSpec, make_spec
from .._units import format_bytes
from ._app import command
from ._common import (
    NO_EXTRAS,
    AllocConfOpt,
    BatchSizesOpt,
    ClassesOpt,
    ContextOpt,
    DatasetOpt,
    DeviceOpt,
    EvalBatchOpt,
    FreeOpt,
    GpuOpt,
    GradAccumOpt,
    InputOpt,
    JsonOpt,
    LastBatchOpt,
    LoopOpt,
    LossOpt,
    MemoryOpt,
    ModelArg,
    ModelExtras,
    ModeOpt,
    OptimizerOpt,
    PrecisionOpt,
    StepOpt,
    dist_options,
    model_options,
    parse_int_list,
    workload_from_options,
)
from ._outputs import ReportOpt, SnapshotOpt, check_paths, write_report, write_snapshots

ThreadsOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--threads",
        help="CPU: torch's intra-op threads of the run to simulate or measure (default: torch.get_num_threads()); "
        "CPU kernels' scratch memory depends on it.",
        show_default=False,
    ),
]


@command("estimate")
@model_options
@dist_options
def estimate_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    batch_size: BatchSizesOpt = "64,256,1024,4096",
    optimizer: OptimizerOpt = "sgd",
    precision: PrecisionOpt = "fp32",
    device: DeviceOpt = "cuda",
    loss: LossOpt = None,
    step: StepOpt = None,
    loop: LoopOpt = "pytorch",
    grad_accum: GradAccumOpt = 1,
    last_batch: LastBatchOpt = None,
    eval_batch_size: EvalBatchOpt = None,
    mode: ModeOpt = "train",
    gpu: GpuOpt = None,
    memory: MemoryOpt = None,
    free: FreeOpt = False,
    context: ContextOpt = None,
    alloc_conf: AllocConfOpt = None,
    threads: ThreadsOpt = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also show each module's saved activations.")] = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run the step for real on this machine's device and show the error.")
    ] = False,
    events: Annotated[bool, typer.Option("--events", help="With --json: include the event timeline.")] = False,
    as_json: JsonOpt = False,
    snapshot_path: SnapshotOpt = None,
    report_path: ReportOpt = None,
    extras: ModelExtras = NO_EXTRAS,
    dist: DistSpec | None = None,
) -> None:
    """Simulate the memory of one training step per batch size, on fake tensors (no GPU needed)."""
    check_paths(snapshot_path, report_path, device)
    if dist is not None and compare:
        raise BatchfitError(
            tr("--compare with --gpus is not available"),
            hint=tr("the gloo ground truth is in tests/test_distributed.py"),
        )
    workload = workload_from_options(model, inputs, dataset, num_classes, extras)
    report = estimate(
        workload,
        batch_size=parse_int_list(batch_size),
        optimizer=optimizer,
        precision=precision,
        device=device,
        loss=loss,
        step=step,
        mode=mode,
        gpu=gpu,
        memory=memory,
        free=free,
        alloc_conf=alloc_conf,
        context_bytes=context,
        threads=threads,
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
        grad_accum=grad_accum,
        **(dist.options() if dist is not None else {}),
    )
    report.per_layer = per_layer
    comparison = _compare(report, workload) if compare else None
    if as_json:
        out = report.to_dict(events=events)
        if comparison is not None:
            out["measured"] = comparison[1]
        print(json.dumps(out, indent=2))
    else:
        show(report, *([comparison[0]] if comparison else []))
    # the files after the answer: a file that cannot be made does not hide the answer
    write_snapshots(snapshot_path, report.results)
    write_report(report_path, report, workload=workload, budget=report.budget)


def _compare(report: EstimateReport, workload: Workload) -> tuple[Table, list[dict[str, int]]]:
    from .._measure import measure_step

    spec = report.spec
    assert spec is not None  # estimate() keeps the step it simulated
    rows = []
    data = []
    for r in report:
        m = measure_step(workload, r.batch_size, spec)
        err = (r.peak_allocated_bytes - m.peak_allocated_bytes) / m.peak_allocated_bytes
        row = [f"{r.batch_size:,}", f"{r.peak_allocated_bytes:,}", f"{m.peak_allocated_bytes:,}", f"{err:+.3%}"]
        item = {"batch_size": r.batch_size, "measured_peak_allocated_bytes": m.peak_allocated_bytes}
        if m.peak_reserved_bytes is not None and r.peak_reserved_bytes is not None:
            row += [f"{r.peak_reserved_bytes:,}", f"{m.peak_reserved_bytes:,}"]
            item["measured_peak_reserved_bytes"] = m.peak_reserved_bytes
        rows.append(row)
        data.append(item)
    columns = ["batch", "estimated peak (B)", "measured peak (B)", "error"]
    if any(len(r) > 4 for r in rows):
        columns += ["est. reserved (B)", "meas. reserved (B)"]
    return Table(f"estimate vs a real step on this machine ({_device_text(spec)})", columns, rows), data


@command("measure")
@model_options
def measure_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    batch_size: BatchSizesOpt = "64",
    optimizer: OptimizerOpt = "sgd",
    precision: PrecisionOpt = "fp32",
    device: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--device", help="cpu, or cuda when this machine has a GPU (default: cuda if present, else cpu)."),
    ] = None,
    loss: LossOpt = None,
    step: StepOpt = None,
    loop: LoopOpt = "pytorch",
    grad_accum: GradAccumOpt = 1,
    last_batch: LastBatchOpt = None,
    eval_batch_size: EvalBatchOpt = None,
    mode: ModeOpt = "train",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    extras: ModelExtras = NO_EXTRAS,
) -> None:
    """Run the reference step for real on this machine's device and measure its peak memory."""
    import torch

    from .._measure import measure_step

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            tr("--device cuda needs a GPU, and this machine has none"),
            hint=tr("use `batchfit estimate` to simulate a GPU, or --device cpu to measure a CPU run"),
            exit_code=ExitCode.NO_DEVICE,
        )
    workload = workload_from_options(model, inputs, dataset, num_classes, extras)
    spec = make_spec(
        dev,
        optimizer,
        precision,
        loss,
        step,
        mode,
        threads,
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
        grad_accum=grad_accum,
    )
    results = [measure_step(workload, b, spec) for b in parse_int_list(batch_size)]
    if as_json:
        print(
            json.dumps(
                {
                    "schema_version": 1,
                    "model": workload.name,
                    "device": dev,
                    "optimizer": str(spec.optimizer),
                    "precision": spec.precision.name,
                    "threads": spec.threads,
                    "loss": results[0].loss if results else None,
                    "results": [m.to_dict() for m in results],
                },
                indent=2,
            )
        )
        return
    rows = [
        [
            f"{m.batch_size:,}",
            format_bytes(m.peak_allocated_bytes, "MiB"),
            format_bytes(m.peak_reserved_bytes, "MiB") if m.peak_reserved_bytes is not None else "-",
            format_bytes(m.device_used_bytes, "MiB") if m.device_used_bytes is not None else "-",
            f"{m.samples_per_second:,.0f}",
        ]
        for m in results
    ]
    title = f"{workload.name}: a real training step on {_device_text(spec)} ({spec.optimizer}, {spec.precision.name}), measured"
    footer = [f"loss: {text}" for text in dict.fromkeys(m.loss for m in results) if text]
    show(Table(title, ["batch", "peak allocated", "peak reserved", "device in use", "samples/s"], rows, footer=footer))


def _device_text(spec: StepSpec) -> str:
    """``cpu, 2 threads`` or ``cuda``: where a real step ran."""
    return f"cpu, {threads_text(spec.threads)}" if spec.device == "cpu" else spec.device
