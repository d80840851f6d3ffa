"""``batchfit sweep``: short real training runs along the batch axis, and the batch size that trains well."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._i18n import tr
from .._render import show
from ._app import command, err_console
from ._common import ClassesOpt, FreeOpt, GpuOpt, JsonOpt, MemoryOpt, ModelArg, OptimizerOpt

SweepDatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="digits (scikit-learn's bundled 8x8 digits, no download), or mnist, fashion-mnist, cifar10 read "
        "from --root (their real files; the train split trains, the test split validates).",
    ),
]
RootOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--root", help="Where mnist/cifar10 files are (torchvision's layout; default $BATCHFIT_DATA or ./data)."
    ),
]
SamplesOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--samples", help="Training samples per run (the same for every batch size). Default: --epochs."),
]
EpochsOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--epochs", help="Training budget per run in epochs of the training set (default 2)."),
]
LrOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--lr", help="Learning rate at the smallest batch size (default: the optimizer's, 0.01 for sgd)."),
]
ScalingOpt = Annotated[
    str,
    typer.Option(
        "--lr-scaling",
        help="How the learning rate grows with the batch: linear (Goyal et al. 2017, with warm-up), "
        "sqrt (Krizhevsky 2014; Hoffer et al. 2017) or none.",
    ),
]
WarmupOpt = Annotated[
    float, typer.Option("--warmup", help="Fraction of each run's steps over which the learning rate ramps up.")
]
MaxBatchOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--max-batch", help="Largest batch size to run (default: the largest that fits the card, by fit)."),
]
MinBatchOpt = Annotated[int, typer.Option("--min-batch", help="Smallest batch size (the lesson starts at 16).")]
MetricOpt = Annotated[str, typer.Option("--metric", help="accuracy or loss: the validation metric that decides.")]
ToleranceOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--tolerance",
        help="How far from the best run a batch size may fall: points of accuracy (default 1) or a fraction "
        "of the loss (default 0.02).",
    ),
]
SweepDeviceOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--device", help="cuda or cpu (default: cuda when there is a GPU)."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the initialisation and of the sample order.")]
NoiseOpt = Annotated[
    int,
    typer.Option("--noise-samples", help="Examples for the gradient noise scale (0: skip it)."),
]
NoMemoryOpt = Annotated[
    bool, typer.Option("--no-memory", help="Skip measuring one training step per batch size beside the estimate.")
]
SweepPlotOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--plot",
        help="Also draw training loss against samples seen per batch size, and throughput against batch size, "
        "into FILE.png or FILE.svg.",
        show_default=False,
    ),
]


@command("sweep")
def sweep_cmd(
    model: ModelArg,
    dataset: SweepDatasetOpt = "digits",
    root: RootOpt = None,
    num_classes: ClassesOpt = None,
    optimizer: OptimizerOpt = "sgd",
    lr: LrOpt = None,
    lr_scaling: ScalingOpt = "linear",
    warmup: WarmupOpt = 0.1,
    samples: SamplesOpt = None,
    epochs: EpochsOpt = None,
    min_batch: MinBatchOpt = 16,
    max_batch: MaxBatchOpt = None,
    gpu: GpuOpt = None,
    memory: MemoryOpt = None,
    free: FreeOpt = False,
    metric: MetricOpt = "accuracy",
    tolerance: ToleranceOpt = None,
    device: SweepDeviceOpt = None,
    seed: SeedOpt = 0,
    noise_samples: NoiseOpt = 512,
    no_memory: NoMemoryOpt = False,
    plot: SweepPlotOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train MODEL for real, briefly, at batch sizes 16, 32, 64, ... up to the largest that fits, each on
    the same budget of samples; report speed, loss and validation accuracy per size, the gradient noise
    scale, and the largest batch size that still trains as well as the best (capped by 0.8 x the max).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .._plan import check_plot_path
    from .._sweep import sweep

    if plot is not None:
        check_plot_path(plot)  # before the runs, not after
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading the data", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = sweep(
            model,
            dataset=dataset,
            root=root,
            num_classes=num_classes,
            optimizer=optimizer,
            lr=lr,
            lr_scaling=lr_scaling,
            warmup=warmup,
            samples=samples,
            epochs=epochs,
            min_batch=min_batch,
            max_batch=max_batch,
            gpu=gpu,
            memory_budget=memory,
            free=free,
            metric=metric,
            tolerance=tolerance,
            device=device,
            seed=seed,
            noise_samples=noise_samples,
            memory=not no_memory,
            progress=progress,
        )
    if plot is not None:
        written = result.save_plot(plot)
    if as_json:
        print(result.to_json())
    else:
        show(result)
    if plot is not None:
        err_console.print(tr("plot written to {path}", path=written), soft_wrap=True)
