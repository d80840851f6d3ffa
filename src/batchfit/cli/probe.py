"""``batchfit probe``: the exact largest batch size on this machine's GPU, starting from the estimate."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated, Optional

import typer

from .._render import show
from ._app import command, err_console
from ._common import (
    AllocConfOpt,
    ClassesOpt,
    DatasetOpt,
    FreeOpt,
    InputOpt,
    JsonOpt,
    LossOpt,
    ModelArg,
    ModeOpt,
    OptimizerOpt,
    PrecisionOpt,
    StepOpt,
)


@command("probe")
def probe_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    optimizer: OptimizerOpt = "sgd",
    precision: PrecisionOpt = "fp32",
    loss: LossOpt = None,
    step: StepOpt = None,
    mode: ModeOpt = "train",
    free: FreeOpt = False,
    alloc_conf: AllocConfOpt = None,
    safety: Annotated[
        float, typer.Option("--safety", help="Recommend floor(SAFETY x the measured max) (the lesson's 0.8).")
    ] = 0.8,
    start: Annotated[
        Optional[int],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option("--start", help="Start the search here instead of at the estimated max.", min=1),
    ] = None,
    from_batch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--from",
            help="The lesson's method for comparison: start here (e.g. 16), double until out of memory, then bisect.",
            min=1,
        ),
    ] = None,
    isolate: Annotated[
        bool,
        typer.Option("--isolate", help="Run each attempt in a fresh child process (nothing carries over)."),
    ] = False,
    max_batch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--max", help="Never try a batch size above this.", min=1),
    ] = None,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Also run the recommended size once (one more attempt).")
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="Where the attempts run: cuda, or cpu (host memory, which does not run out like a GPU's: needs --max).",
        ),
    ] = "cuda",
    peer_timeout: Annotated[
        float,
        typer.Option(
            "--peer-timeout",
            help="Under torchrun: seconds a rank waits inside a collective for a rank that failed.",
            min=1,
        ),
    ] = 120.0,
    no_estimates: Annotated[
        bool, typer.Option("--no-estimates", help="Do not compute the estimate beside each attempt.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find the exact largest batch size on this machine's CUDA GPU (a size that runs, + 1 failing).

    Starts at batchfit's estimated max, gallops with a growing step, then bisects: 2 attempts when
    the estimate is exact. Under torchrun every rank runs each attempt (DDP) and rank 0 reports.
    """
    from .._probe import probe

    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    spinner = contextlib.nullcontext(None) if quiet else err_console.status("probing", spinner="dots")
    with spinner as status:
        result = probe(
            model,
            inputs or None,
            dataset=dataset,
            num_classes=num_classes,
            optimizer=optimizer,
            precision=precision,
            loss=loss,
            step=step,
            mode=mode,
            safety=safety,
            start=start,
            from_batch=from_batch,
            isolate=isolate,
            max_batch_size=max_batch,
            free=free,
            alloc_conf=alloc_conf,
            estimates=not no_estimates,
            confirm=confirm,
            progress=(lambda text: status.update(text)) if status is not None else None,
            device=device,
            peer_timeout_s=peer_timeout,
        )
    if result.rank != 0:
        return
    if as_json:
        print(result.to_json())
        return
    show(result)
