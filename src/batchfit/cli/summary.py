"""``batchfit summary MODEL``: the layer table (torchsummary's classic layout or the richer default)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from .._summary import check_options, summary
from ._app import command, err_console, is_terminal
from ._common import (
    NO_EXTRAS,
    ClassesOpt,
    DatasetOpt,
    InputOpt,
    JsonOpt,
    ModelArg,
    ModelExtras,
    model_options,
    workload_from_options,
)


@command("summary")
@model_options
def summary_cmd(
    model: ModelArg,
    inputs: InputOpt = None,
    dataset: DatasetOpt = None,
    num_classes: ClassesOpt = None,
    batch_size: Annotated[
        Optional[int],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option(
            "--batch-size",
            "-b",
            help="Batch size the output shapes are shown at (default 1). With --style classic: "
            "torchsummary's batch_size argument (default -1).",
            show_default=False,
        ),
    ] = None,
    depth: Annotated[int, typer.Option("--depth", help="Show the module tree down to this depth (0 = the model).")] = 3,
    style: Annotated[
        str,
        typer.Option(
            "--style", help="default: the tree with mult-adds and bytes; classic: torchsummary 1.5.1's table."
        ),
    ] = "default",
    module_mode: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--module-mode",
            help="The modules' train/eval mode in the forward: eval, train, or same (the model's own). "
            "Default: eval for the default style, same for classic.",
            show_default=False,
        ),
    ] = None,
    old_mode: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--mode", hidden=True, help="Deprecated: --module-mode."),
    ] = None,
    as_json: JsonOpt = False,
    extras: ModelExtras = NO_EXTRAS,
) -> None:
    """Layers, output shapes, parameters and multiply-adds of MODEL (no GPU, no memory: fake tensors)."""
    if old_mode is not None:
        # the name docs/summary.md gave it until --mode came to mean estimate's train/inference only
        err_console.print("[bold yellow]deprecated:[/] summary's --mode is now --module-mode", soft_wrap=True)
        module_mode = module_mode or old_mode
    check_options(style, module_mode, depth, batch_size)  # before building a model that may take seconds
    workload = workload_from_options(model, inputs, dataset, num_classes, extras)
    result = summary(
        workload,
        batch_size=batch_size,
        depth=depth,
        style=style,  # type: ignore[arg-type]  # checked by summary()
        module_mode=module_mode,  # type: ignore[arg-type]  # checked by check_options()
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    elif is_terminal() and result.style == "default":
        Console().print(result)
    else:
        print(result)
