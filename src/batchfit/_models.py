"""Models by name, their inputs, and building them without spending real memory.

A *workload* is what every verb works on: a model (built on the ``meta`` device when batchfit
builds it, or the user's own module left untouched) plus the inputs of one sample.

>>> w = load_workload("mlp", dataset="mnist")
>>> w.model[1], w.inputs
(Linear(in_features=784, out_features=128, bias=True), (InputSpec(shape=(1, 28, 28), dtype=torch.float32),))
>>> count_parameters(w.model)
101770
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ._datasets import DatasetInfo, get_dataset
from ._errors import BatchfitError
from ._i18n import tr

if TYPE_CHECKING:
    from ._lora import LoraSpec
    from ._quantize import QuantSpec

ModelBuilder = Callable[..., nn.Module]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class InputSpec:
    """One input of one sample: its shape **without** the batch dimension, and its dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """``"1,28,28"``, ``"3x224x224"`` or ``"128:int64"`` (integer inputs are zeros).

        >>> InputSpec.parse("128:int64")
        InputSpec(shape=(128,), dtype=torch.int64)
        """
        body, _, dtype_name = text.strip().partition(":")
        dtype = torch.float32
        if dtype_name:
            if dtype_name.strip().lower() not in _DTYPES:
                raise BatchfitError(
                    tr("unknown dtype {dtype_name!r} in `input_size={text!r}`", dtype_name=dtype_name, text=text),
                    hint=tr("use one of {names}", names=', '.join(sorted(set(_DTYPES)))),
                )
            dtype = _DTYPES[dtype_name.strip().lower()]
        parts = [p for p in re.split(r"[,x× ]+", body.strip().strip("()[]")) if p]
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise BatchfitError(
                tr("cannot read the input shape {text!r}", text=text),
                hint=tr("give one sample's shape without the batch dimension, e.g. `input_size=(1, 28, 28)` or `input_size='128:int64'`"),
            )
        return cls(shape, dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return dims if self.dtype == torch.float32 else f"{dims}:{str(self.dtype).removeprefix('torch.')}"


ExampleInputs = Callable[[int], Any]  # returns a batch of inputs in one of the forms ModelInputs.of reads
# one sample's shape without the batch dimension, several inputs' shapes, or their text (``"3,32,32"``)
InputSize = Sequence[int] | Sequence[Sequence[int] | InputSpec | str] | str | InputSpec | None


@dataclass(frozen=True)
class ModelInputs:
    """One batch of a model's inputs: positional and keyword arguments, ``model(*args, **kwargs)``.

    :meth:`of` reads what ``example_inputs(batch_size)`` returns:

    - a tensor: the one positional input;
    - a tuple or list: positional inputs (``(ids, mask)``; ``(batch_dict,)`` passes a dict
      positionally, as one argument);
    - a dict: keyword inputs, ``model(**d)`` (``input_ids=``, ``attention_mask=``, ``labels=``);
    - a pair ``(tuple_or_list, dict)``: positional and keyword inputs.

    >>> x = torch.zeros(2, 3)
    >>> ModelInputs.of({"x": x}).kwargs.keys(), len(ModelInputs.of(({"x": x},)).args)
    (dict_keys(['x']), 1)
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, made: Any) -> ModelInputs:
        if isinstance(made, ModelInputs):
            return made
        if isinstance(made, dict):
            return cls((), dict(made))
        if (
            isinstance(made, tuple)
            and len(made) == 2
            and isinstance(made[0], (tuple, list))
            and isinstance(made[1], dict)
        ):
            return cls(tuple(made[0]), dict(made[1]))
        if isinstance(made, (tuple, list)):
            return cls(tuple(made))
        return cls((made,))

    def call(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)

    def map(self, fn: Callable[[Any], Any]) -> ModelInputs:
        """The same structure with ``fn`` applied to every leaf (tensors and other values)."""
        from torch.utils._pytree import tree_map

        return ModelInputs(tuple(tree_map(fn, list(self.args))), tree_map(fn, self.kwargs))

    def floating_to(self, dtype: torch.dtype) -> ModelInputs:
        """Floating-point tensors converted to ``dtype`` (bf16/fp16 training), the others as they are."""
        return self.map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)

    def tensors(self) -> list[torch.Tensor]:
        from torch.utils._pytree import tree_leaves

        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    def as_given(self) -> Any:
        """The form a ``--step`` function receives: the positional tuple when there are no keyword
        inputs (``model(*inputs)``), the dict when there are only keyword inputs (``model(**inputs)``),
        else the ``(args, kwargs)`` pair."""
        if not self.kwargs:
            return self.args
        return self.kwargs if not self.args else (self.args, self.kwargs)


@dataclass
class Workload:
    """A model and one sample's inputs; everything the verbs need to build a batch."""

    name: str
    model: nn.Module
    inputs: tuple[InputSpec, ...] = ()
    example_inputs: ExampleInputs | None = None
    dataset: DatasetInfo | None = None
    notes: list[str] = field(default_factory=list)
    num_classes: int | None = None  # the head batchfit built (None: the user's code chose it)

    def make_inputs(self, batch_size: int, device: torch.device | str, *, values: bool = False) -> ModelInputs:
        """The model's inputs at ``batch_size`` on ``device``; call inside a fake mode to spend no memory.

        Float inputs are uniform noise, integer inputs are zeros (valid for any embedding).
        ``values``: for a real run, tensors from ``example_inputs`` keep their values (detection
        targets, sequence lengths: a model may read them, and noise or zeros can be invalid there).
        """
        if batch_size < 1:
            raise BatchfitError(tr("batch size must be at least 1, got {batch_size}", batch_size=batch_size))
        if self.example_inputs is not None:
            if values:
                made: Any = self.example_inputs(batch_size)
            else:
                with torch.device("meta"):
                    made = self.example_inputs(batch_size)

            reused: set[int] = set()

            def fresh(t: Any) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                if values and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
                    return t.to(device)  # expanded: a copy into its layout would write elements twice
                if values and _is_own_dense_storage(t, device) and t.untyped_storage().data_ptr() not in reused:
                    # already on the device: ``x.to(device)`` in the user's loop returns it itself, so the
                    # real run holds one copy, as the fake one does (a copy here would hold two at once
                    # while the batch is made: a CPU run's peak rose by it mid-run, at a tail's new batch)
                    reused.add(t.untyped_storage().data_ptr())
                    return t
                # the same layout as the fake run's tensor, so a real run holds the same bytes
                out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                if values:
                    return out.copy_(t)
                return out.uniform_() if out.is_floating_point() else out.zero_()

            return ModelInputs.of(made).map(fresh)
        if not self.inputs:
            raise BatchfitError(
                tr("no input shape for model {name!r}", name=self.name),
                hint=tr("give one sample's shape as `input_size` (e.g. `input_size=(3, 224, 224)`) or a preset as `dataset`"),
            )
        out = []
        for spec in self.inputs:
            shape = (batch_size, *spec.shape)
            if spec.dtype.is_floating_point:
                out.append(torch.rand(shape, dtype=spec.dtype, device=device))
            else:
                out.append(torch.zeros(shape, dtype=spec.dtype, device=device))
        return ModelInputs(tuple(out))


def _is_own_dense_storage(t: torch.Tensor, device: torch.device | str) -> bool:
    """``t`` is on ``device`` and its storage is exactly what ``empty_strided`` of its shape and
    strides makes there (what the fake run allocates for it): no offset, no larger base."""
    want = torch.device(device)
    if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
        return False
    span = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").untyped_storage().nbytes()
    return bool(t.storage_offset() == 0 and t.untyped_storage().nbytes() == span)


# ---------------------------------------------------------------------------------------------
# Built-in models (the seed's)


class MLP(nn.Sequential):
    """The seed's two-layer MLP: Flatten -> Linear(prod(input), hidden) -> ReLU -> Linear(hidden, classes)."""

    def __init__(self, input_size: int = 784, hidden: int = 128, num_classes: int = 10):
        super().__init__(nn.Flatten(), nn.Linear(input_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class CNN(nn.Module):
    """A small convolutional net for 28x28 / 32x32 images (the seed's next lesson)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def _single_input(inputs: Sequence[InputSpec], model: str) -> InputSpec:
    if len(inputs) != 1:
        raise BatchfitError(tr("model {model!r} takes one input, got {n}", model=model, n=len(inputs)), hint=tr("give one shape as `input_size`"))
    return inputs[0]


def _build_mlp(inputs: Sequence[InputSpec], num_classes: int, hidden: int = 128) -> nn.Module:
    return MLP(_single_input(inputs, "mlp").numel, hidden, num_classes)


def _build_cnn(inputs: Sequence[InputSpec], num_classes: int) -> nn.Module:
    spec = _single_input(inputs, "cnn")
    if len(spec.shape) != 3 or spec.shape[1] != spec.shape[2] or spec.shape[1] % 4:
        raise BatchfitError(
            tr("the cnn model needs square images whose side is a multiple of 4, got {spec}", spec=spec),
            hint=tr("use `dataset='mnist'`, `dataset='cifar10'` or e.g. `input_size=(3, 32, 32)`"),
        )
    return CNN(spec.shape[0], spec.shape[1], num_classes)


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it and the input it takes when none is given.

    ``default_classes``: the head's size when neither ``--num-classes`` nor a dataset gives one
    (None: the model's own default); ``has_head``: False for the user's own models, which get
    ``num_classes`` only when asked for it.
    """

    build: ModelBuilder  # build(inputs, num_classes, **kwargs); num_classes None = the model's default
    default_dataset: str | None = None
    default_input: tuple[int, ...] | None = None
    description: str = ""
    default_classes: int | None = 10
    has_head: bool = True


BUILTIN_MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(_build_mlp, "mnist", description="the lesson's MLP: Flatten-Linear(784,128)-ReLU-Linear(128,10)"),
    "cnn": ModelEntry(_build_cnn, "mnist", description="a small conv net with BatchNorm and dropout"),
}


@cache
def torchvision_model_names() -> tuple[str, ...]:
    """Every torchvision classification model (``resnet18``, ``vit_b_16``, ...)."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision_entry(name: str) -> ModelEntry:
    import torchvision.models

    side = 299 if name == "inception_v3" else 224

    def build(inputs: Sequence[InputSpec], num_classes: int, **kwargs: Any) -> nn.Module:
        extra: dict[str, Any] = (
            {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        )
        model: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra, **kwargs)
        return model

    return ModelEntry(
        build,
        default_input=(3, side, side),
        default_dataset="imagenet",
        description="torchvision",
        default_classes=1000,
    )


def _timm_entry(name: str) -> ModelEntry:
    try:
        import timm
    except ImportError as exc:
        raise BatchfitError(
            tr("model {name!r} needs the timm package, which is not installed", name="timm:" + name),
            hint=tr("pip install timm"),
        ) from exc
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise BatchfitError(
            tr("timm has no model {name!r}", name=name),
            hint=tr("did you mean {names}?", names=", ".join("timm:" + c for c in close))
            if close
            else tr("see timm.list_models()"),
        )
    cfg = timm.get_pretrained_cfg(name)
    default_input = tuple(cfg.input_size) if cfg is not None and getattr(cfg, "input_size", None) else (3, 224, 224)

    def build(inputs: Sequence[InputSpec], num_classes: int | None, **kwargs: Any) -> nn.Module:
        # without num_classes, timm's builder takes the head from the model's pretrained cfg
        # (timm/models/_builder.py, _update_default_model_kwargs): 1000 for ImageNet-1k models
        classes: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        model: nn.Module = timm.create_model(name, pretrained=False, **classes, **kwargs)
        return model

    return ModelEntry(build, default_input=default_input, description="timm", default_classes=None)


_USER_MODULE = "_batchfit_user_"  # the name prefix of model files imported by path


def import_target(spec: str) -> tuple[Any, Any]:
    """``path/to/file.py:NAME`` or ``package.module:NAME`` -> (module object, attribute)."""
    location, _, attr = spec.rpartition(":")
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location)
        if not path.is_file():
            raise BatchfitError(
                tr("model file {path!r} does not exist", path=str(path)), hint=tr("check the path before ':'")
            )
        mod_name = f"{_USER_MODULE}{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise BatchfitError(tr("cannot import {path!r} as a Python file", path=str(path)))
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            with _folder_on_path(module):
                loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise BatchfitError(
                tr(
                    "importing model file {path!r} failed: {name}: {exc}",
                    path=str(path),
                    name=type(exc).__name__,
                    exc=exc,
                ),
                hint=tr("fix the error in that file (rerun with --debug for the traceback)"),
            ) from exc
    else:
        try:
            module = importlib.import_module(location)
        except Exception as exc:
            raise BatchfitError(
                tr(
                    "importing module {location!r} failed: {name}: {exc}",
                    location=location,
                    name=type(exc).__name__,
                    exc=exc,
                ),
                hint=tr("check that the package is installed and importable (rerun with --debug for the traceback)"),
            ) from exc
    if not hasattr(module, attr):
        names = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)]
        close = difflib.get_close_matches(attr, names, n=3)
        raise BatchfitError(
            tr("{location!r} defines no {attr!r}", location=location, attr=attr),
            hint=tr("did you mean {names}?", names=", ".join(repr(c) for c in close))
            if close
            else tr("name an nn.Module class or a function"),
        )
    return module, getattr(module, attr)


@contextlib.contextmanager
def _folder_on_path(module: Any) -> Iterator[None]:
    """The folder of a model file first on ``sys.path``, as ``python file.py`` puts it, so that the
    file can import its neighbours; taken off again afterwards (the modules it imported stay
    imported). A module imported by name (``package.module:NAME``) is left alone."""
    file = getattr(module, "__file__", None)
    if not file or not str(getattr(module, "__name__", "")).startswith(_USER_MODULE):
        yield
        return
    folder = str(Path(file).resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the file may have taken it off itself
            sys.path.remove(folder)


def _user_entry(spec: str) -> tuple[ModelEntry, ExampleInputs | None]:
    module, target = import_target(spec)
    if not callable(target):
        raise BatchfitError(
            tr("{spec!r} is not a class or function", spec=spec),
            hint=tr("name an nn.Module class or a function returning one"),
        )

    def build(inputs: Sequence[InputSpec], num_classes: int | None, **kwargs: Any) -> nn.Module:
        if num_classes is not None:
            kwargs = {**kwargs, "num_classes": num_classes}
        try:
            with _folder_on_path(module):  # imports made while building, as at import time
                made = target(**kwargs)
        except TypeError as exc:
            if num_classes is None or "num_classes" not in str(exc):
                raise
            raise BatchfitError(
                tr("`num_classes={num_classes}` was given, but {spec!r} takes no num_classes argument ({exc})", num_classes=num_classes, spec=spec, exc=exc),
                hint=tr("drop `num_classes` (your code builds the head), or give the class/function a num_classes parameter"),
            ) from exc
        if not isinstance(made, nn.Module):
            raise BatchfitError(tr("{spec!r} returned {name}, not an nn.Module", spec=spec, name=type(made).__name__))
        return made

    example = getattr(module, "example_inputs", None)
    entry = ModelEntry(build, description="user model", default_classes=None, has_head=False)
    return entry, example if callable(example) else None


def model_names() -> list[str]:
    """All names the registry knows (built-ins and torchvision; ``timm:NAME`` and files come on top)."""
    return [*BUILTIN_MODELS, *torchvision_model_names()]


def _resolve(name: str) -> tuple[ModelEntry, ExampleInputs | None]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name], None
    if name.startswith("timm:"):
        return _timm_entry(name.removeprefix("timm:")), None
    if ":" in name:
        return _user_entry(name)
    if name.lower() in torchvision_model_names():
        return _torchvision_entry(name.lower()), None
    close = difflib.get_close_matches(name.lower(), model_names(), n=3, cutoff=0.6)
    raise BatchfitError(
        tr("unknown model {name!r}", name=name),
        hint=(tr("did you mean {names}?", names=", ".join(repr(c) for c in close)) + " " if close else "")
        + tr("see `batchfit models`; or use timm:NAME, path/to/file.py:NAME or package.module:NAME"),
    )


def load_workload(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    dataset: str | DatasetInfo | None = None,
    num_classes: int | None = None,
    example_inputs: ExampleInputs | None = None,
    seq_len: int | None = None,
    task: str | None = None,
    attn: str | None = None,
    gradient_checkpointing: bool | str = False,
    lora: int | LoraSpec | None = None,
    quantize: str | QuantSpec | None = None,
    **model_kwargs: Any,
) -> Workload:
    """Resolve a model (a registry name or an ``nn.Module``) and its inputs into a :class:`Workload`.

    ``input_size`` is one sample's shape without the batch dimension (``(1, 28, 28)``), or a list of
    such shapes / :class:`InputSpec` / ``"128:int64"`` strings for several inputs.
    ``hf:ID_OR_PATH`` models (see :mod:`batchfit._hf`) take ``seq_len``, ``task``, ``attn`` and
    ``gradient_checkpointing`` (``True``, or ``"selective"`` for torchtitan's per-op policy);
    ``lora`` (a rank or a :class:`~batchfit._lora.LoraSpec`) adds peft's
    LoRA adapters to any model (a model of yours is copied first, never changed); ``quantize``
    (``"4bit"``, see :mod:`batchfit._quantize`) stores the frozen base as bitsandbytes' QLoRA does.
    """
    if isinstance(model, Workload):  # already resolved (the verbs accept both)
        return model
    if isinstance(model, str) and model.startswith("hf:"):
        workload = _hf_workload(model, input_size, dataset, num_classes, seq_len, task, attn, gradient_checkpointing)
    else:
        hf_only = {"seq_len": seq_len, "task": task, "attn": attn, "gradient_checkpointing": gradient_checkpointing}
        given = [name for name, value in hf_only.items() if value]
        if given:
            raise BatchfitError(
                tr("{names} apply to Hugging Face models only (hf:ID_OR_PATH)", names=", ".join(given)),
                hint=tr("name the model as hf:ID or hf:path/to/config.json, or drop the option"),
            )
        workload = _load_workload(model, input_size, dataset, num_classes, example_inputs, **model_kwargs)
    if quantize is not None:
        workload = _quantized(workload, quantize)
    if lora is not None:
        workload = _with_lora(workload, lora, quantized=quantize is not None)
    return workload


def _hf_workload(
    ref: str,
    input_size: Any,
    dataset: Any,
    num_classes: int | None,
    seq_len: int | None,
    task: str | None,
    attn: str | None,
    gradient_checkpointing: bool | str,
) -> Workload:
    from ._hf import build_hf_model

    if input_size is not None or dataset is not None:
        raise BatchfitError(
            tr("hf: models take token ids: `input_size` and `dataset` do not apply"),
            hint=tr("set the tokens per sample with `seq_len`"),
        )
    built = build_hf_model(
        ref,
        seq_len=seq_len,
        task=task,
        attn=attn,
        num_classes=num_classes,
        gradient_checkpointing=gradient_checkpointing,
    )
    return Workload(
        ref,
        built.model,
        (InputSpec((built.seq_len,), torch.int64),),
        built.example_inputs(),
        None,
        [f"task {built.task}", *built.notes],
    )


def _own_copy(model: nn.Module) -> nn.Module:
    """The model to change in place: a copy of a model of yours (it stays as it was), a meta model as is."""
    import copy

    if any(not t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return copy.deepcopy(model)
    return model


def _quantized(workload: Workload, quantize: str | QuantSpec) -> Workload:
    from ._quantize import QuantSpec, quantize_model

    spec = QuantSpec.parse(quantize)
    model, layers = quantize_model(_own_copy(workload.model), spec)
    return Workload(
        workload.name,
        model,
        workload.inputs,
        workload.example_inputs,
        workload.dataset,
        [*workload.notes, f"{spec} ({layers} layers)"],
    )


def _with_lora(workload: Workload, lora: int | LoraSpec, *, quantized: bool = False) -> Workload:
    from ._lora import LoraSpec, apply_lora

    spec = LoraSpec.parse(lora)
    model = workload.model if quantized else _own_copy(workload.model)
    wrapped = apply_lora(model, spec)
    return Workload(
        workload.name, wrapped, workload.inputs, workload.example_inputs, workload.dataset, [*workload.notes, str(spec)]
    )


def _load_workload(
    model: str | nn.Module,
    input_size: Any,
    dataset: str | DatasetInfo | None,
    num_classes: int | None,
    example_inputs: ExampleInputs | None,
    **model_kwargs: Any,
) -> Workload:
    info = get_dataset(dataset) if isinstance(dataset, str) else dataset
    inputs = parse_inputs(input_size)
    if inputs and example_inputs is not None:
        raise BatchfitError(
            tr("both input_size and example_inputs were given: batchfit would use only one of them"),
            hint=tr("give one: input_size for inputs made from shapes, or example_inputs for your own"),
        )
    if isinstance(model, nn.Module):
        if not inputs and info is not None:
            inputs = (InputSpec(info.shape),)
        return Workload(type(model).__name__, model, inputs, example_inputs, info)
    entry, file_example = _resolve(model)
    # --input on the command line wins over the file's example_inputs (as a flag overrides a default)
    example_inputs = example_inputs or (None if inputs else file_example)
    if not inputs and example_inputs is None:
        if info is None and entry.default_dataset is not None and entry.default_input is None:
            info = get_dataset(entry.default_dataset)
        if info is not None:
            inputs = (InputSpec(info.shape),)
        elif entry.default_input is not None:
            inputs = (InputSpec(entry.default_input),)
    if entry.has_head:
        classes = num_classes or (info.num_classes if info is not None else entry.default_classes)
    else:
        classes = num_classes
    try:
        with torch.device("meta"):
            built = entry.build(inputs, classes, **model_kwargs)
    except BatchfitError:
        raise
    except TypeError as exc:
        raise BatchfitError(
            tr("building model {model!r} failed: {exc}", model=model, exc=exc), hint=tr("check the model's arguments")
        ) from exc
    except Exception as exc:
        raise BatchfitError(
            tr("building model {model!r} failed: {name}: {exc}", model=model, name=type(exc).__name__, exc=exc),
            hint=tr("rerun with --debug for the traceback"),
        ) from exc
    if entry.has_head and classes is None:
        own = getattr(built, "num_classes", None)  # the model's own default (timm models keep it there)
        classes = own if isinstance(own, int) else None
    return Workload(model, built, inputs, example_inputs, info, num_classes=classes)


def parse_inputs(
    input_size: Sequence[int] | Sequence[Sequence[int] | InputSpec | str] | str | InputSpec | None,
) -> tuple[InputSpec, ...]:
    if input_size is None:
        return ()
    if isinstance(input_size, (str, InputSpec)):
        input_size = [input_size]
    items = list(input_size)
    if items and all(isinstance(d, int) for d in items):
        return (InputSpec(tuple(int(d) for d in items)),)  # type: ignore[arg-type]
    specs = []
    for item in items:
        if isinstance(item, InputSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(InputSpec.parse(item))
        else:
            specs.append(InputSpec(tuple(int(d) for d in item)))  # type: ignore[union-attr]
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Parameters, counted once, and fake state


def unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Each parameter once (tied and shared parameters under their first name)."""
    yield from model.named_parameters(remove_duplicate=True)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for _, p in unique_parameters(model) if p.requires_grad or not trainable_only)


def fake_state(
    model: nn.Module,
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh tensors for every parameter and buffer of ``model``, keyed by every name they have.

    Call it inside a ``FakeTensorMode``: the tensors then cost no memory. Tied and shared tensors
    map to one new tensor (by identity, not by name), which ``to_empty`` would not do; parameters
    stay ``nn.Parameter`` with their ``requires_grad``. ``dtype`` converts floating tensors (bf16/fp16
    training). The model itself is not touched: run it under ``_reparametrize_module``/``functional_call``.
    """
    return _new_state(model, lambda t, dt: torch.empty_strided(t.shape, t.stride(), dtype=dt, device=device), dtype)


def state_in_place(model: nn.Module, state: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
    """Put ``state`` (from :func:`fake_state` / :func:`real_state`) in ``model`` for a call, and give
    the model its own tensors back afterwards.

    The state names every tensor by every name it has, so a module reachable under several names
    (transformers 4's T5 holds one embedding as ``shared``, ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``) is swapped once per name: each swap after the first records the
    previous swap's tensor as "the original". ``stack_weights=True`` restores in reverse order
    (torch/nn/utils/stateless.py ``_reparametrize_module``), which ends on the true original.
    """
    return _reparametrize_module(model, state, tie_weights=True, stack_weights=True)


def real_state(
    model: nn.Module,
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`fake_state`, with real memory: copies of real tensors, and for a model built on
    ``meta`` small random parameters (values only matter for numerics, not for memory)."""

    def make(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        if not t.is_meta:
            return t.detach().to(device=device, dtype=dt, copy=True)
        out = torch.empty_strided(t.shape, t.stride(), dtype=dt, device=device)
        if out.is_floating_point():
            out.normal_(0.0, 0.02)
        else:
            out.zero_()
        return out

    state = _new_state(model, make, dtype)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if t.is_meta and name.rsplit(".", 1)[-1] == "running_var":
                state[name].fill_(1.0)  # a variance must be positive
    return state


def _new_state(
    model: nn.Module,
    make: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    made: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, t in named:
        if id(t) not in made:
            # keep_dtype: tensors whose dtype does not follow the model's (bitsandbytes' quantisation state)
            convert = dtype is not None and t.dtype.is_floating_point and not getattr(t, "keep_dtype", False)
            new = make(t, dtype if dtype is not None and convert else t.dtype)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            made[id(t)] = new
        out[name] = made[id(t)]
    return out
