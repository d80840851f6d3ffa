"""What one training step is made of: optimizers, precisions and losses, by name (registries).

>>> parse_optimizer("SGD(lr=0.1, momentum=0.9, nesterov=True)").kwargs
{'lr': 0.1, 'momentum': 0.9, 'nesterov': True}
>>> PRECISIONS["amp-fp16"].grad_scaler, PRECISIONS["bf16"].param_dtype
(True, torch.bfloat16)
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._errors import BatchfitError

# ---------------------------------------------------------------------------------------------
# Optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """A ``torch.optim`` class and its keyword arguments, or a factory ``fn(params) -> Optimizer``."""

    name: str
    cls: type[torch.optim.Optimizer] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    factory: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer] | None = None

    def build(self, params: list[torch.Tensor], *, device_type: str) -> torch.optim.Optimizer:
        """Build it as PyTorch would on ``device_type``.

        On CUDA, ``torch.optim`` picks the foreach implementation by default; it cannot see that
        fake parameters stand for CUDA tensors (they fail its type check), so the choice is made
        here, explicitly, exactly when PyTorch would make it.
        """
        if self.factory is not None:
            return self.factory(params)
        assert self.cls is not None
        kwargs = dict(self.kwargs)
        if (
            device_type == "cuda"
            and "foreach" in _init_params(self.cls)
            and kwargs.get("foreach") is None
            and not kwargs.get("fused")
            and not kwargs.get("differentiable")
        ):
            kwargs["foreach"] = True
        try:
            return self.cls(params, **kwargs)
        except (TypeError, ValueError) as exc:
            raise BatchfitError(
                f"cannot build optimizer {self.name}: {exc}", hint="check its keyword arguments"
            ) from exc

    def __str__(self) -> str:
        return self.name


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


def _adafactor(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """transformers' Adafactor as its Trainer builds it for ``optim="adafactor"``
    (transformers/trainer_optimizer.py ``_get_adafactor``: ``scale_parameter=False,
    relative_step=False``; the Trainer's default learning rate, 5e-5)."""
    try:
        from transformers.optimization import Adafactor
    except ImportError as exc:
        raise BatchfitError("the adafactor optimizer needs transformers", hint="pip install transformers") from exc
    return Adafactor(params, lr=5e-5, scale_parameter=False, relative_step=False)  # type: ignore[no-any-return]


def _adamw8bit(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit`` with its defaults: uint8 first and second moments with a float32
    absmax per block of 256 for every parameter of at least ``min_8bit_size`` (4096) elements,
    float32 moments for smaller ones (bitsandbytes/optim/optimizer.py ``Optimizer2State.init_state``)."""
    from ._bnb import optimizer_8bit

    return optimizer_8bit("AdamW8bit", params)


def _paged_adamw8bit(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """bitsandbytes' ``PagedAdamW8bit``: ``AdamW8bit`` whose moments of parameters of at least 1e5
    elements live in CUDA managed memory (``Optimizer8bit.get_state_buffer``, ``functional.get_paged``)."""
    from ._bnb import optimizer_8bit

    return optimizer_8bit("PagedAdamW8bit", params)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adafactor": OptimizerSpec("adafactor", factory=_adafactor),
    "adamw8bit": OptimizerSpec("adamw8bit", factory=_adamw8bit),
    "paged-adamw8bit": OptimizerSpec("paged-adamw8bit", factory=_paged_adamw8bit),
    "sgd": OptimizerSpec("sgd", torch.optim.SGD, {"lr": 0.01}),
    "sgd-momentum": OptimizerSpec("sgd-momentum", torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": OptimizerSpec("adam", torch.optim.Adam, {"lr": 1e-3}),
    "adamw": OptimizerSpec("adamw", torch.optim.AdamW, {"lr": 1e-3}),
    "rmsprop": OptimizerSpec("rmsprop", torch.optim.RMSprop, {"lr": 1e-2}),
    "adagrad": OptimizerSpec("adagrad", torch.optim.Adagrad, {"lr": 1e-2}),
}


def _optim_classes() -> dict[str, type[torch.optim.Optimizer]]:
    return {
        name: obj
        for name, obj in vars(torch.optim).items()
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }


def parse_optimizer(spec: str | OptimizerSpec | type | Callable[..., Any]) -> OptimizerSpec:
    """A registry name (``adam``), ``"SGD(lr=0.1, momentum=0.9)"``, a ``torch.optim`` class or a factory."""
    if isinstance(spec, OptimizerSpec):
        return spec
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return OptimizerSpec(spec.__name__, spec, {"lr": 1e-3} if "lr" in _init_params(spec) else {})
    if callable(spec) and not isinstance(spec, str):
        return OptimizerSpec(getattr(spec, "__name__", "custom"), factory=spec)
    text = str(spec).strip()
    if text.lower() in OPTIMIZERS:
        return OPTIMIZERS[text.lower()]
    classes = _optim_classes()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        tree = None
    if isinstance(tree, ast.Name):
        tree = ast.Call(func=tree, args=[], keywords=[])
    if isinstance(tree, ast.Call) and isinstance(tree.func, (ast.Name, ast.Attribute)) and not tree.args:
        cls_name = tree.func.id if isinstance(tree.func, ast.Name) else tree.func.attr
        if cls_name in classes:
            try:
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords if kw.arg}
            except ValueError as exc:
                raise BatchfitError(
                    f"cannot read the optimizer arguments in {text!r}",
                    hint='use literal keyword arguments, e.g. "SGD(lr=0.1, momentum=0.9)"',
                ) from exc
            cls = classes[cls_name]
            if "lr" in _init_params(cls) and "lr" not in kwargs:
                kwargs["lr"] = 1e-3
            return OptimizerSpec(text, cls, kwargs)
    close = difflib.get_close_matches(text, [*OPTIMIZERS, *classes], n=3, cutoff=0.5)
    raise BatchfitError(
        f"unknown optimizer {text!r}",
        hint=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
        + f"use {', '.join(OPTIMIZERS)}, or a torch.optim class with keyword arguments, "
        'e.g. "SGD(lr=0.1, momentum=0.9, nesterov=True)"',
    )


# ---------------------------------------------------------------------------------------------
# Precisions


@dataclass(frozen=True)
class Precision:
    """How a step handles dtypes: pure low precision (params, grads, state in that dtype) or AMP."""

    name: str
    param_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    grad_scaler: bool = False


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32"),
        Precision("bf16", param_dtype=torch.bfloat16),
        Precision("fp16", param_dtype=torch.float16),
        Precision("amp-bf16", autocast_dtype=torch.bfloat16),
        Precision("amp-fp16", autocast_dtype=torch.float16, grad_scaler=True),
    )
}


def parse_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    key = name.strip().lower().replace("_", "-")
    if key in PRECISIONS:
        return PRECISIONS[key]
    raise BatchfitError(f"unknown precision {name!r}", hint=f"use one of {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------------------------------
# Losses

LossFn = Callable[[Any, Any], torch.Tensor]


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for v in output.values():
            found = _first_tensor(v)
            if found is not None:
                return found
    if isinstance(output, (tuple, list)):
        for v in output:
            found = _first_tensor(v)
            if found is not None:
                return found
    return None


def output_is_loss(output: Any) -> torch.Tensor | None:
    """The loss when the model computes it: a scalar output, or a dict's ``"loss"`` entry."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def logits_of(output: Any) -> torch.Tensor:
    """The tensor a default loss applies to: the output, a tuple's first tensor, a dict's first tensor."""
    found = _first_tensor(output)
    if found is None:
        raise BatchfitError(
            "the model's output holds no tensor to compute a loss from",
            hint="return a tensor, or pass --loss / --step",
        )
    return found


@dataclass(frozen=True)
class LossSpec:
    """How the reference step turns the model's output into a loss.

    ``labels(logits)`` makes the labels once (before the measured window, as a DataLoader would);
    ``fn(output, labels)`` computes the loss.
    """

    name: str
    fn: LossFn
    make_labels: Callable[[torch.Tensor], torch.Tensor | None]


def _cross_entropy(output: Any, labels: Any) -> torch.Tensor:
    logits = logits_of(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _ce_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)


def _mse(output: Any, labels: Any) -> torch.Tensor:
    return nn.functional.mse_loss(logits_of(output), labels)


def _mse_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)


LOSSES: dict[str, LossSpec] = {
    "cross-entropy": LossSpec("cross-entropy", _cross_entropy, _ce_labels),
    "mse": LossSpec("mse", _mse, _mse_labels),
}


def parse_loss(spec: str | LossSpec | Callable[..., Any] | None) -> LossSpec:
    """``None``/``"cross-entropy"``, ``"mse"``, ``"file.py:fn"``, or a callable ``fn(output, labels)``."""
    if spec is None:
        return LOSSES["cross-entropy"]
    if isinstance(spec, LossSpec):
        return spec
    if callable(spec):
        return LossSpec(getattr(spec, "__name__", "custom"), spec, _ce_labels)
    key = spec.strip().lower().replace("_", "-")
    if key in LOSSES:
        return LOSSES[key]
    if ":" in spec:
        from .models import import_target

        _, fn = import_target(spec)
        if not callable(fn):
            raise BatchfitError(f"{spec!r} is not a function", hint="name a function fn(output, labels) -> loss")
        return LossSpec(spec, fn, _ce_labels)
    raise BatchfitError(f"unknown loss {spec!r}", hint=f"use {', '.join(LOSSES)} or path/to/file.py:fn")


StepFn = Callable[[nn.Module, tuple[torch.Tensor, ...], Any, torch.optim.Optimizer], Any]


def parse_step(spec: str | StepFn | None) -> StepFn | None:
    """A user's own training step ``fn(model, inputs, labels, optimizer)`` from ``file.py:fn``."""
    if spec is None or callable(spec):
        return spec
    from .models import import_target

    _, fn = import_target(spec)
    if not callable(fn):
        raise BatchfitError(f"{spec!r} is not a function", hint="name a function fn(model, inputs, labels, optimizer)")
    return fn  # type: ignore[no-any-return]
