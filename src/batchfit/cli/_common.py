"""Options shared by the commands (one definition each), and turning them into a workload."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..models import Workload, load_workload

if TYPE_CHECKING:
    from ..gpus import Budget

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model: mlp, cnn, any torchvision classification model (resnet18, vit_b_16, ...), "
        "timm:NAME, path/to/file.py:NAME or package.module:NAME.",
        show_default=False,
    ),
]
InputOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--input",
        "-i",
        help="One sample's shape WITHOUT the batch dimension, e.g. 1,28,28; repeat for several inputs; "
        "a dtype suffix such as 128:int64 gives integer (zero) inputs.",
        show_default=False,
    ),
]
DatasetOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--dataset",
        "-d",
        help="A dataset preset for the input shape and classes: mnist, fashion-mnist, cifar10, imagenet.",
    ),
]
ClassesOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--num-classes", help="Number of output classes (default: the dataset's, else 10; 1000 for torchvision models)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def workload_from_options(
    model: str, inputs: list[str] | None, dataset: str | None, num_classes: int | None
) -> Workload:
    return load_workload(model, inputs or None, dataset=dataset, num_classes=num_classes)


def parse_int_list(text: str, what: str = "batch sizes") -> list[int]:
    """``"64,256,1024"`` -> ``[64, 256, 1024]`` with a clear error."""
    from .._errors import BatchfitError

    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise BatchfitError(
            f"cannot read the {what} {text!r}", hint="give positive integers separated by commas, e.g. 64,256,1024"
        )
    return values


# -- the training step: one definition of each option for estimate, measure, fit, plan, probe -----

BatchSizesOpt = Annotated[
    str, typer.Option("--batch-size", "-b", help="One or more batch sizes, comma-separated, e.g. 64,256,1024,4096.")
]
OptimizerOpt = Annotated[
    str,
    typer.Option(
        "--optimizer",
        "-o",
        help='sgd, sgd-momentum, adam, adamw, rmsprop, adagrad, or any torch.optim class with keyword arguments, e.g. "SGD(lr=0.1, momentum=0.9, nesterov=True)".',
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        "-p",
        help="fp32, bf16 / fp16 (parameters, gradients and optimizer state in that dtype), amp-bf16 / amp-fp16 (fp32 parameters with autocast; fp16 adds a GradScaler).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="cuda: simulate a CUDA GPU (on any machine); cpu: simulate a CPU training run (host RAM)."
    ),
]
LossOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--loss",
        help="cross-entropy (default, unless the model returns its loss), mse, or path/to/file.py:fn with fn(output, labels).",
    ),
]
StepOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--step",
        help="Your own training step, path/to/file.py:fn with fn(model, inputs, labels, optimizer), instead of the reference step.",
    ),
]
LoopOpt = Annotated[
    str,
    typer.Option(
        "--loop",
        help="The training loop: pytorch (PyTorch's tutorial loop: outputs and loss alive until rebound), "
        "hf-trainer (transformers' Trainer), lightning (Lightning's automatic optimization). See docs/estimate.md.",
    ),
]
LastBatchOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--last-batch",
        help="Add the epoch's last, smaller batch: a size, or auto (the --dataset's size modulo the batch size).",
    ),
]
EvalBatchOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--eval-batch-size", help="Add an evaluation pass under no_grad at this batch size (same process)."),
]
ModeOpt = Annotated[
    str, typer.Option("--mode", help="train (the reference step) or inference (one forward under no_grad).")
]
AllocConfOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--alloc-conf",
        help="Caching-allocator settings as in PYTORCH_CUDA_ALLOC_CONF (read from the environment too), e.g. expandable_segments:True.",
    ),
]

# -- the memory budget: one definition of --gpu / --memory / --free for every command -----------

GpuOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--gpu",
        "-g",
        help="Plan for this card (see `batchfit gpus`): h100, a100-40gb, rtx4090, ... "
        "Default: the local GPU, else an H100 80GB SXM.",
        show_default=False,
    ),
]
MemoryOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--memory",
        "-m",
        help="Any card by its total memory: 24GiB or 24G (2^30 B each), 24GB (10^9 B each), or bytes.",
        show_default=False,
    ),
]
FreeOpt = Annotated[
    bool,
    typer.Option("--free", help="Use what the local GPU has free right now instead of its total memory."),
]


def budget_from_options(gpu: str | None, memory: str | None, free: bool) -> Budget:
    """The budget the three options describe (see :func:`batchfit.gpus.resolve_card`)."""
    from ..gpus import resolve_card

    return resolve_card(gpu, memory, free)
