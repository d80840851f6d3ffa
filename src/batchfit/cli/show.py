"""``batchfit show DATASET``: the seed's image-data lesson for a preset or a folder of images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .._data import DatasetReport
from .._errors import BatchfitError
from .._estimate import EstimateReport
from .._i18n import tr
from .._render import Table
from .._render import show as show_table
from .._units import format_bytes
from ._app import command, err_console
from ._common import GpuOpt, JsonOpt, OptimizerOpt, parse_int_list


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise BatchfitError(
            tr("cannot read --{what} {text!r}", what=what, text=text),
            hint=tr("give numbers separated by commas, e.g. --{what} 0.5,0.5,0.5", what=what),
        ) from None


@command("show")
def show(
    dataset: Annotated[
        str,
        typer.Argument(
            help="mnist, fashion-mnist, cifar10, or a folder with one sub-folder of images per class.",
            show_default=False,
        ),
    ],
    root: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
        typer.Option(
            "--root",
            help="Directory holding the presets in torchvision's layout (DIR/MNIST/raw, DIR/cifar-10-batches-py). "
            "Default: $BATCHFIT_DATA, else ./data.",
            show_default=False,
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="Fetch the preset into --root if it is missing.")
    ] = False,
    split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--split", help="train or test (presets; default train). For a folder: a sub-folder name."),
    ] = None,
    size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--size", help="Resize and centre-crop images to SIZE x SIZE (needed for folders of mixed sizes)."
        ),
    ] = None,
    batch_size: Annotated[
        str, typer.Option("--batch-size", "-b", help="Batch sizes to count bytes for, comma-separated.")
    ] = "64,256,1024,4096",
    grid: Annotated[int, typer.Option("--grid", help="Random samples in the image grid (0: no grid).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed for picking the grid's samples.")] = 42,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Save the grid to this image file (e.g. grid.png).", show_default=False),
    ] = None,
    show_window: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--show/--no-show",
            help="Open the grid in a window. Default: when a display exists and --out is not given.",
            show_default=False,
        ),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Compute per-channel mean and std over the split (one pass over it).")
    ] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", help="DataLoader worker processes.")] = 0,
    prefetch_factor: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--prefetch-factor", help="Batches each worker loads ahead (DataLoader default: 2 with workers)."),
    ] = None,
    pin_memory: Annotated[bool, typer.Option("--pin-memory", help="Count pinned-memory copies of each batch.")] = False,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--model",
            help="Also estimate one training step of this model on these batches (e.g. mlp, cnn, resnet18) "
            "and show the GPU memory beside the host RAM.",
        ),
    ] = None,
    gpu: GpuOpt = None,
    optimizer: OptimizerOpt = "sgd",
    mean: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--mean", help="Normalisation mean per channel, e.g. 0.5,0.5,0.5 (default: the lesson's)."),
    ] = None,
    std: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--std", help="Normalisation std per channel (default: the lesson's)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sample shapes (C, H, W) and batches (N, C, H, W), value ranges, classes, bytes per sample and
    per batch, DataLoader host RAM, a grid of denormalised samples, and (--stats) mean/std."""
    from .. import _data as bdata

    sizes = parse_int_list(batch_size)
    if grid < 0:
        raise BatchfitError(
            tr("--grid must be 0 or more, not {grid}", grid=grid), hint=tr("e.g. --grid 16, or --grid 0 for none")
        )
    loaded = bdata.load_dataset(
        dataset,
        root=root,
        split=split,
        download=download,
        size=size,
        mean=_floats(mean, "mean"),
        std=_floats(std, "std"),
    )
    report = bdata.describe(
        loaded,
        batch_sizes=sizes,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        stats=stats,
        progress=stats,
    )
    window = False
    if grid:
        window = (out is None and not as_json and bdata.display_available()) if show_window is None else show_window
        if window and not bdata.display_available():
            err_console.print(tr("note: no display for --show; save the grid with --out grid.png"))
            window = False
        if out is not None or window:
            fig = bdata.sample_grid(loaded, grid, seed, interactive=window)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(out)
            indices = bdata.sample_indices(len(loaded), grid, seed)
            labels = tuple(int(loaded.dataset[i][1]) for i in indices)
            report = report.with_grid(bdata.GridInfo(tuple(indices), labels, seed, str(out) if out else None))
        elif not as_json:
            err_console.print(tr("note: no display here; add --out grid.png to save {grid} random samples", grid=grid))
    beside = _gpu_beside_host(report, model, gpu, optimizer) if model else None
    if as_json:
        data = report.to_dict()
        if beside is not None:
            data["gpu_estimate"] = beside[1].to_dict()
        print(json.dumps(data, indent=2))
    else:
        Console(highlight=False).print(report)
        if beside is not None:
            show_table(beside[0])
    if window:
        import matplotlib.pyplot as plt

        plt.show()


def _gpu_beside_host(
    report: DatasetReport, model: str, gpu: str | None, optimizer: str
) -> tuple[Table, EstimateReport]:
    """One training step of ``model`` on these batches, estimated for a GPU, beside the host RAM."""
    from .._estimate import estimate

    rows_in = report.rows
    sizes = [r.batch_shape[0] for r in rows_in]
    est = estimate(
        model,
        input_size=tuple(report.sample_shape),
        num_classes=len(report.classes),
        batch_size=sorted(set(sizes)),
        optimizer=optimizer,
        gpu=gpu,
    )
    assert isinstance(est, EstimateReport)
    by_size = {r.batch_size: r for r in est}
    rows = []
    for r in rows_in:
        e = by_size[r.batch_shape[0]]
        rows.append(
            [
                f"{r.batch_shape[0]:,}",
                format_bytes(r.input_bytes + r.label_bytes),
                format_bytes(e.peak_allocated_bytes),
                format_bytes(e.total_bytes or 0),
                format_bytes(r.host.total_bytes),
            ]
        )
    title = f"the GPU beside the host: one training step of {model} ({optimizer}) on {est[0].card}, estimated"
    columns = ["batch", "inputs + labels on GPU", "GPU step (max allocated)", "GPU total (nvidia-smi)", "host RAM"]
    footer = ["the GPU figures include parameters, gradients, activations, workspaces; total adds the CUDA context"]
    return Table(title, columns, rows, footer=footer), est
