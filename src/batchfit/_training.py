"""What one training step is made of: optimizers, precisions and losses, by name (registries).

>>> parse_optimizer("SGD(lr=0.1, momentum=0.9, nesterov=True)").kwargs
{'lr': 0.1, 'momentum': 0.9, 'nesterov': True}
>>> PRECISIONS["amp-fp16"].grad_scaler, PRECISIONS["bf16"].param_dtype
(True, torch.bfloat16)
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._errors import BatchfitError
from ._i18n import tr

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
                tr("cannot build optimizer {name}: {exc}", name=self.name, exc=exc),
                hint=tr("check its keyword arguments"),
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
        raise BatchfitError(
            tr("the adafactor optimizer needs transformers"), hint=tr("pip install transformers")
        ) from exc
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


def parse_optimizer(spec: OptimizerLike) -> OptimizerSpec:
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
                    tr("cannot read the optimizer arguments in {text!r}", text=text),
                    hint=tr('use literal keyword arguments, e.g. "SGD(lr=0.1, momentum=0.9)"'),
                ) from exc
            cls = classes[cls_name]
            if "lr" in _init_params(cls) and "lr" not in kwargs:
                kwargs["lr"] = 1e-3
            return OptimizerSpec(text, cls, kwargs)
    close = difflib.get_close_matches(text, [*OPTIMIZERS, *classes], n=3, cutoff=0.5)
    raise BatchfitError(
        tr("unknown optimizer {text!r}", text=text),
        hint=(tr("did you mean {names}?", names=", ".join(repr(c) for c in close)) + " " if close else "")
        + tr(
            'use {names}, or a torch.optim class with keyword arguments, e.g. "SGD(lr=0.1, momentum=0.9, nesterov=True)"',
            names=", ".join(OPTIMIZERS),
        ),
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
    raise BatchfitError(
        tr("unknown precision {name!r}", name=name), hint=tr("use one of {names}", names=", ".join(PRECISIONS))
    )


# ---------------------------------------------------------------------------------------------
# Losses
#
# Without --loss, batchfit trains on the model's own loss where it has one, and otherwise picks a
# loss only where the output's shape says what it is; anything else is refused with the fix
# (docs/estimate.md, "The loss"): a wrong loss is a wrong answer that nothing would point out.

LossFn = Callable[[Any, Any], torch.Tensor]


def _question() -> str:
    return tr(
        "give it: `loss='cross-entropy'` (classes on dim 1, as F.cross_entropy takes them, e.g. (N, C, H, W) "
        "segmentation logits), `loss='token-cross-entropy'` (classes on the last dimension), `loss='mse'`, "
        "`loss='path/to/file.py:fn'` (your fn(output, labels)) or `step='path/to/file.py:fn'` (your whole step)"
    )


def _entry(output: Any, name: str) -> torch.Tensor | None:
    """``output[name]`` of a mapping (a dict, transformers' ``ModelOutput``) or ``output.name`` of
    another object (a dataclass, a named tuple), when it is a tensor."""
    if isinstance(output, torch.Tensor):
        return None
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    return value if isinstance(value, torch.Tensor) else None


def output_is_loss(output: Any) -> tuple[torch.Tensor, str] | None:
    """The loss when the model computes it, and where it was found.

    >>> output_is_loss({"loss": torch.tensor(0.5), "logits": torch.zeros(2, 3)})[1]
    "the model's own loss (its 'loss' entry)"
    """
    if isinstance(output, torch.Tensor):
        return (output, "the model's output (a scalar)") if output.dim() == 0 else None
    own = _entry(output, "loss")
    if own is not None:
        return own, "the model's own loss (its 'loss' entry)"
    if isinstance(output, (tuple, list)):
        first = output[0] if output else None
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            # transformers' models without return_dict return ``(loss,) + outputs`` when given labels
            return first, "the model's own loss (the first element of its output)"
        return None
    if (
        isinstance(output, Mapping)
        and output
        and all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() for v in output.values())
    ):
        # torchvision's detection models in train mode return their losses by name, and its
        # references/detection/engine.py (train_one_epoch) trains on their sum, as here
        total: torch.Tensor = sum(output.values())  # type: ignore[assignment]
        return total, f"the sum of the model's {len(output)} losses ({', '.join(map(str, output))})"
    return None


def _located(output: Any) -> tuple[torch.Tensor, str] | None:
    """The tensor a loss applies to where the output's structure names it: the output itself, its
    ``logits`` entry (transformers' convention), or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output, "output"
    logits = _entry(output, "logits")
    if logits is not None:
        return logits, "output's 'logits' entry"
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], "output's first element"
    return None


def _shape(t: torch.Tensor) -> str:
    """A shape with the batch dimension as N: ``(N, 12, 50)``."""
    return "(" + ", ".join(["N", *(str(d) for d in t.shape[1:])]) + (",)" if t.dim() == 1 else ")")


def _what(output: Any) -> str:
    """The model's output in words, for messages."""
    if isinstance(output, torch.Tensor):
        return tr("a scalar") if output.dim() == 0 else tr("a {shape} tensor", shape=_shape(output))
    kind = type(output).__name__
    if isinstance(output, Mapping):
        keys = ", ".join(repr(k) for k in output) or tr("no entries")
        return tr("a {kind} ({keys}) without a 'loss' or 'logits' entry", kind=kind, keys=keys)
    if isinstance(output, (tuple, list)):
        first = _what(output[0]) if output else tr("nothing")
        return tr("a {kind} whose first element is {first}", kind=kind, first=first)
    return tr("a {kind}", kind=kind)


def _named_target(output: Any) -> tuple[torch.Tensor, str]:
    """The tensor a named loss (``--loss cross-entropy``, ``mse``, ...) applies to: the output, its
    ``logits`` entry or a tuple's first element; anything else is refused (which tensor is meant?)."""
    found = _located(output)
    if found is None or found[0].dim() == 0:
        raise BatchfitError(
            tr("`loss` needs the model's logits, and its output is {what}", what=_what(output)),
            hint=tr("give `loss='path/to/file.py:fn'` (it gets the whole output) or `step='path/to/file.py:fn'`"),
        )
    return found


def logits_of(output: Any) -> torch.Tensor:
    """The tensor a named loss applies to (see :func:`_named_target`)."""
    return _named_target(output)[0]


def _certain_logits(output: Any) -> tuple[torch.Tensor, str]:
    """Logits whose class dimension is certain: (N, C) class logits, or (N, T, V) token logits
    (language models flatten them to (N*T, V): transformers' ``ForCausalLMLoss``)."""
    found = _located(output)
    if found is not None and found[0].dim() in (2, 3):
        return found
    raise BatchfitError(
        tr(
            "batchfit cannot tell which loss trains this model: its output is {what} (it chooses one only for a scalar, a 'loss' entry, or (N, C) / (N, T, V) logits)",
            what=_what(output),
        ),
        hint=_question(),
    )


def first_tensor(output: Any) -> tuple[torch.Tensor, str]:
    """Any tensor of the output, to shape labels for a user's own loss or step."""
    found = _located(output)
    if found is not None:
        return found
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf, "output's first tensor"
    raise BatchfitError(
        tr("the model's output holds no tensor to compute a loss from"),
        hint=tr("return a tensor, or pass `loss` / `step`"),
    )


@dataclass(frozen=True)
class LossSpec:
    """How the reference step turns the model's output into a loss.

    ``target(output)`` finds the tensor the loss applies to (and says where it is);
    ``make_labels(target)`` makes the labels once (before the measured window, as a DataLoader
    would); ``fn(output, labels)`` computes the loss.
    """

    name: str
    fn: LossFn
    make_labels: Callable[[torch.Tensor], torch.Tensor | None]
    target: Callable[[Any], tuple[torch.Tensor, str]] = _named_target

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # the default loss is a sentinel that choose_loss compares by identity: a pickled copy (a
        # StepSpec sent to the gloo truth's spawned processes) must be the module's own AUTO_LOSS, or
        # the child takes "auto" for a user's loss (labels of its own beside the model's loss)
        if self is AUTO_LOSS:
            return "AUTO_LOSS"  # pickle's by-name form: the global of the object's module
        return super().__reduce_ex__(protocol)


@dataclass(frozen=True)
class LossChoice:
    """The loss of one output: the model's own (``own``), or ``spec.fn`` with labels shaped after ``target``."""

    description: str
    spec: LossSpec | None = None
    target: torch.Tensor | None = None
    own: torch.Tensor | None = None

    def labels(self) -> Any:
        """Integer (zero) class labels, or float targets for mse; made outside autograd."""
        if self.spec is None or self.target is None:
            return None
        return self.spec.make_labels(self.target.detach())

    def loss(self, output: Any, labels: Any) -> torch.Tensor:
        if self.own is not None:
            return self.own
        assert self.spec is not None
        return self.spec.fn(output, labels)


def _cross_entropy(output: Any, labels: Any) -> torch.Tensor:
    # PyTorch's convention: classes on dim 1 of (N, C) or (N, C, d1, ..., dK) (nn.CrossEntropyLoss)
    return nn.functional.cross_entropy(logits_of(output), labels)


def _class_labels(logits: torch.Tensor) -> torch.Tensor:
    shape = (*logits.shape[:1], *logits.shape[2:]) if logits.dim() >= 2 else ()
    return torch.zeros(shape, dtype=torch.int64, device=logits.device)


def _token_cross_entropy(output: Any, labels: Any) -> torch.Tensor:
    logits = logits_of(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _ce_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)


def _mse(output: Any, labels: Any) -> torch.Tensor:
    return nn.functional.mse_loss(logits_of(output), labels)


def _mse_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)


LOSSES: dict[str, LossSpec] = {
    "cross-entropy": LossSpec("cross-entropy", _cross_entropy, _class_labels),
    "token-cross-entropy": LossSpec("token-cross-entropy", _token_cross_entropy, _ce_labels),
    "mse": LossSpec("mse", _mse, _mse_labels),
}


def choose_loss(output: Any, spec: LossSpec) -> LossChoice:
    """The loss ``spec`` gives this output, and what it is in words (the estimate's ``loss``).

    >>> choose_loss(torch.zeros(4, 10), AUTO_LOSS).description
    'cross-entropy over the last dimension of the output, (N, 10) class logits'
    """
    if spec is not AUTO_LOSS:
        target, where = spec.target(output)
        return LossChoice(f"{spec.name} (--loss) on the {where}, {_shape(target)}", spec, target)
    own = output_is_loss(output)
    if own is not None:
        return LossChoice(own[1], own=own[0])
    target, where = _certain_logits(output)
    kind = "class" if target.dim() == 2 else "token"
    chosen = LOSSES["cross-entropy" if target.dim() == 2 else "token-cross-entropy"]
    return LossChoice(
        f"{chosen.name} over the last dimension of the {where}, {_shape(target)} {kind} logits", chosen, target
    )


def _auto(output: Any, labels: Any) -> torch.Tensor:
    return choose_loss(output, AUTO_LOSS).loss(output, labels)


# The default (no --loss): the model's own loss, else cross-entropy where the logits are certain
AUTO_LOSS = LossSpec("auto", _auto, _ce_labels, _certain_logits)


def parse_loss(spec: LossLike) -> LossSpec:
    """``None``/``"auto"``, ``"cross-entropy"``, ``"token-cross-entropy"``, ``"mse"``, ``"file.py:fn"``,
    or a callable ``fn(output, labels)``."""
    if spec is None:
        return AUTO_LOSS
    if isinstance(spec, LossSpec):
        return spec
    if callable(spec):
        return LossSpec(getattr(spec, "__name__", "custom"), spec, _ce_labels, first_tensor)
    key = spec.strip().lower().replace("_", "-")
    if key == "auto":
        return AUTO_LOSS
    if key in LOSSES:
        return LOSSES[key]
    if ":" in spec:
        from ._models import import_target

        _, fn = import_target(spec)
        if not callable(fn):
            raise BatchfitError(
                tr("{spec!r} is not a function", spec=spec), hint=tr("name a function fn(output, labels) -> loss")
            )
        return LossSpec(spec, fn, _ce_labels, first_tensor)
    raise BatchfitError(
        tr("unknown loss {spec!r}", spec=spec),
        hint=tr("use auto, {names} or path/to/file.py:fn", names=", ".join(LOSSES)),
    )


StepFn = Callable[[nn.Module, tuple[torch.Tensor, ...], Any, torch.optim.Optimizer], Any]
# what the verbs' ``optimizer=``, ``loss=`` and ``step=`` accept (parse_optimizer, parse_loss, parse_step)
OptimizerLike = str | OptimizerSpec | type | Callable[..., Any]
LossLike = str | LossSpec | Callable[..., Any] | None
StepLike = str | StepFn | None


def parse_step(spec: StepLike) -> StepFn | None:
    """A user's own training step ``fn(model, inputs, labels, optimizer)`` from ``file.py:fn``."""
    if spec is None or callable(spec):
        return spec
    from ._models import import_target

    _, fn = import_target(spec)
    if not callable(fn):
        raise BatchfitError(
            tr("{spec!r} is not a function", spec=spec), hint=tr("name a function fn(model, inputs, labels, optimizer)")
        )
    return fn  # type: ignore[no-any-return]
