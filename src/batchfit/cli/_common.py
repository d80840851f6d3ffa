"""Options shared by the commands (one definition each), and turning them into a workload."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar, cast

import typer

from .._errors import BatchfitError
from .._i18n import tr
from .._models import Workload, load_workload

if TYPE_CHECKING:
    from .._distributed import DistOptions
    from .._gpus import Budget

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model: mlp, cnn, any torchvision classification model (resnet18, vit_b_16, ...), "
        "timm:NAME, hf:ID_OR_PATH (a Hugging Face config: built-in, a path, or the local cache), "
        "path/to/file.py:NAME or package.module:NAME.",
        show_default=False,
    ),
]
InputOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--input",
        "-i",
        help="One sample's shape WITHOUT the batch dimension, e.g. 1,28,28; repeat for several inputs; "
        "a dtype suffix such as 128:int64 gives integer (zero) inputs. Replaces a model file's example_inputs.",
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
        "--num-classes",
        help="Size of the classifier head (default: the dataset's, else the model's own: 1000 for torchvision, "
        "timm's pretrained cfg for timm:NAME, 10 for mlp/cnn); passed as num_classes= to your own model.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@dataclass(frozen=True)
class ModelExtras:
    """The options that reshape a model: Hugging Face ones (``hf:`` models) and LoRA (any model)."""

    seq_len: int | None = None
    task: str | None = None
    attn: str | None = None
    gradient_checkpointing: bool = False
    selective_checkpointing: bool = False
    lora: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | None = None
    quantize: str | None = None

    def lora_spec(self) -> Any:
        from .._lora import LoraSpec

        given = {
            "--lora-alpha": self.lora_alpha,
            "--lora-dropout": self.lora_dropout,
            "--lora-targets": self.lora_targets,
        }
        if self.lora is None:
            extra = [flag for flag, value in given.items() if value is not None]
            if extra:
                raise BatchfitError(tr("{names} need --lora R", names=", ".join(extra)), hint=tr("e.g. --lora 16"))
            return None
        return LoraSpec.parse(self.lora, self.lora_alpha, self.lora_dropout, self.lora_targets)


_EXTRA_OPTIONS: dict[str, tuple[Any, Any]] = {
    "seq_len": (
        Optional[int],  # noqa: UP045
        typer.Option("--seq-len", help="hf: models: tokens per sample (the batch size counts sequences). Default 512."),
    ),
    "task": (
        Optional[str],  # noqa: UP045
        typer.Option(
            "--task", help="hf: models: causal-lm, masked-lm or seq-cls (default: the config's architecture)."
        ),
    ),
    "attn": (
        Optional[str],  # noqa: UP045
        typer.Option("--attn", help="hf: models: eager, sdpa or flash_attention_2 (default: transformers' choice)."),
    ),
    "gradient_checkpointing": (
        bool,
        typer.Option("--gradient-checkpointing", help="hf: models: the model's own gradient checkpointing."),
    ),
    "selective_checkpointing": (
        bool,
        typer.Option(
            "--selective-checkpointing",
            help="hf: models: gradient checkpointing that keeps what torchtitan's per-op policy saves "
            "(matmul and attention outputs, except every second matmul); implies --gradient-checkpointing.",
        ),
    ),
    "lora": (
        Optional[int],  # noqa: UP045
        typer.Option("--lora", help="Add LoRA adapters of this rank (peft); the base is frozen.", show_default=False),
    ),
    "lora_alpha": (Optional[float], typer.Option("--lora-alpha", help="LoRA alpha (peft's default: 8).")),  # noqa: UP045
    "lora_dropout": (Optional[float], typer.Option("--lora-dropout", help="LoRA dropout (peft's default: 0).")),  # noqa: UP045
    "lora_targets": (
        Optional[str],  # noqa: UP045
        typer.Option(
            "--lora-targets", help="all-linear (default), or module names separated by commas, e.g. q_proj,v_proj."
        ),
    ),
    "quantize": (
        Optional[str],  # noqa: UP045
        typer.Option(
            "--quantize",
            help="QLoRA: store the frozen base as bitsandbytes does, 4bit (NF4, double quantisation), fp4 "
            "or 8bit (LLM.int8) (modelled from bitsandbytes' source).",
        ),
    ),
}
NO_EXTRAS = _DEFAULTS = ModelExtras()

F = TypeVar("F", bound=Callable[..., Any])


def model_options(fn: F) -> F:
    """Give a command the options of :class:`ModelExtras`; it receives them as ``extras``.

    One definition for every command that builds a model, instead of eight parameters each.
    """
    signature = inspect.signature(fn)
    # evaluated annotations: typer reads the options (Annotated metadata) from the signature
    hints = typing.get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "extras"]
    added = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=getattr(_DEFAULTS, name), annotation=Annotated[kind, option]
        )
        for name, (kind, option) in _EXTRA_OPTIONS.items()
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        extras = ModelExtras(**{name: kwargs.pop(name, getattr(_DEFAULTS, name)) for name in _EXTRA_OPTIONS})
        return fn(*args, **kwargs, extras=extras)

    wrapper.__signature__ = signature.replace(parameters=[*params, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*params, *added]}
    return wrapper  # type: ignore[return-value]


def workload_from_options(
    model: str,
    inputs: list[str] | None,
    dataset: str | None,
    num_classes: int | None,
    extras: ModelExtras | None = None,
) -> Workload:
    extras = extras or _DEFAULTS
    if model.startswith("hf:") or extras.lora is not None:
        _quiet_libraries()
    return load_workload(
        model,
        inputs or None,
        dataset=dataset,
        num_classes=num_classes,
        seq_len=extras.seq_len,
        task=extras.task,
        attn=extras.attn,
        gradient_checkpointing="selective" if extras.selective_checkpointing else extras.gradient_checkpointing,
        lora=extras.lora_spec(),
        quantize=extras.quantize,
    )


def parse_int_list(text: str, what: str | None = None) -> list[int]:
    """``"64,256,1024"`` -> ``[64, 256, 1024]`` with a clear error."""
    from .._errors import BatchfitError

    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise BatchfitError(
            tr("cannot read the {what} {text!r}", what=tr("batch sizes") if what is None else what, text=text),
            hint=tr("give positive integers separated by commas, e.g. 64,256,1024"),
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
        help='sgd, sgd-momentum, adam, adamw, rmsprop, adagrad, adafactor (transformers, as its Trainer sets it), adamw8bit, paged-adamw8bit (bitsandbytes), or any torch.optim class with keyword arguments, e.g. "SGD(lr=0.1, momentum=0.9, nesterov=True)".',
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
        help="Default: the model's own loss, or cross-entropy over the last dimension of (N, C) / (N, T, V) logits; "
        "other outputs need one of: cross-entropy (classes on dim 1), token-cross-entropy (classes last), mse, "
        "or path/to/file.py:fn with fn(output, labels).",
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
GradAccumOpt = Annotated[
    int,
    typer.Option(
        "--grad-accum",
        help="Gradient accumulation: micro-batches of the batch size per optimizer step (the Trainer's "
        "gradient_accumulation_steps; the effective batch is batch size x this). --loop pytorch.",
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

ContextOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--context",
        help="The process's GPU memory outside PyTorch's allocator (CUDA context, libraries' kernels and handles), "
        "e.g. 600MiB; default: the catalogue's figure, or the largest published one for the CUDA runtime's module loading.",
        show_default=False,
    ),
]


def budget_from_options(gpu: str | None, memory: str | None, free: bool) -> Budget:
    """The budget the three options describe (see :func:`batchfit._gpus.resolve_card`)."""
    from .._gpus import resolve_card

    return resolve_card(gpu, memory, free)


def _quiet_libraries() -> None:
    """On the command line, transformers' deprecation warnings and info logs, and bitsandbytes'
    import-time warnings (peft imports it when installed), are noise around the answer."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\b")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()


# -- several GPUs: one definition of the distributed options (estimate; fit, plan and probe too) --

_DIST_OPTIONS: dict[str, tuple[Any, Any, Any]] = {
    "gpus": (
        Optional[int],  # noqa: UP045
        None,
        typer.Option(
            "--gpus",
            help="GPUs per node of a distributed run (with --device cpu: gloo processes); figures are per GPU "
            "and the batch size is per GPU (docs/distributed.md).",
            show_default=False,
        ),
    ),
    "nodes": (int, 1, typer.Option("--nodes", help="Nodes (machines); the world size is --gpus times --nodes.")),
    "strategy": (
        Optional[str],  # noqa: UP045
        None,
        typer.Option("--strategy", help="ddp (default), zero1, fsdp (FSDP2, fully_shard) or fsdp-hybrid."),
    ),
    "no_reshard": (
        bool,
        False,
        typer.Option(
            "--no-reshard", help="FSDP2: reshard_after_forward=False (keep gathered parameters until backward)."
        ),
    ),
    "param_dtype": (
        Optional[str],  # noqa: UP045
        None,
        typer.Option("--param-dtype", help="FSDP2 MixedPrecisionPolicy param_dtype: bf16, fp16 or fp32."),
    ),
    "reduce_dtype": (
        Optional[str],  # noqa: UP045
        None,
        typer.Option("--reduce-dtype", help="FSDP2 MixedPrecisionPolicy reduce_dtype: bf16, fp16 or fp32."),
    ),
    "cpu_offload": (
        bool,
        False,
        typer.Option("--cpu-offload", help="FSDP2: CPUOffloadPolicy (parameters on the host)."),
    ),
    "bucket_cap_mb": (
        Optional[float],  # noqa: UP045
        None,
        typer.Option("--bucket-cap-mb", help="DDP: bucket_cap_mb (default 25, with a 1 MiB first bucket)."),
    ),
    "gradient_as_bucket_view": (
        bool,
        False,
        typer.Option(
            "--gradient-as-bucket-view", help="DDP: gradient_as_bucket_view=True (gradients live in the buckets)."
        ),
    ),
    "static_graph": (
        bool,
        False,
        typer.Option(
            "--static-graph",
            help="DDP: static_graph=True (the first iteration reduces every bucket after the backward).",
        ),
    ),
    "broadcast_buffers": (
        bool,
        True,
        typer.Option(
            "--broadcast-buffers/--no-broadcast-buffers",
            help="DDP: broadcast_buffers (default on, as DDP's: the buffers are broadcast from rank 0 at each forward).",
        ),
    ),
    "wrap": (
        Optional[str],  # noqa: UP045
        None,
        typer.Option(
            "--wrap", help="FSDP2: the module class to shard per block (default: the model's repeated blocks)."
        ),
    ),
}


def dist_options(fn: F) -> F:
    """Give a command the distributed options; it receives a ``DistSpec`` or None as ``dist``."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "dist"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])
        for name, (kind, default, option) in _DIST_OPTIONS.items()
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .._distributed import make_dist

        given = {name: kwargs.pop(name, default) for name, (_, default, _) in _DIST_OPTIONS.items()}
        given["reshard_after_forward"] = not given.pop("no_reshard")
        dist = make_dist(**cast("DistOptions", given))
        return fn(*args, **kwargs, dist=dist)

    wrapper.__signature__ = signature.replace(parameters=[*params, *added])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*params, *added]}
    return wrapper  # type: ignore[return-value]
