"""LoRA adapters through the real peft library: a frozen base and small trainable matrices.

peft's ``get_peft_model`` runs on the meta-device model as on a real one, so the adapters, the
frozen base (no gradients, no optimizer state) and the forward's extra activations are exactly
those of a real run.

>>> spec = LoraSpec.parse(16)
>>> spec.r, spec.alpha, spec.dropout, spec.targets
(16, 8.0, 0.0, 'all-linear')
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import BatchfitError
from ._i18n import tr


@dataclass(frozen=True)
class LoraSpec:
    """``--lora R --lora-alpha A --lora-dropout P --lora-targets all-linear|name,name``.

    The defaults are peft's own (``peft.LoraConfig``: ``lora_alpha=8``, ``lora_dropout=0.0``).
    """

    r: int
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"

    @classmethod
    def parse(
        cls,
        r: int | LoraSpec,
        alpha: float | None = None,
        dropout: float | None = None,
        targets: str | tuple[str, ...] | list[str] | None = None,
    ) -> LoraSpec:
        if isinstance(r, LoraSpec):
            return r
        if r < 1:
            raise BatchfitError(tr("LoRA rank must be at least 1, got {r}", r=r), hint=tr("e.g. `lora=16`"))
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise BatchfitError(tr("LoRA dropout must be in [0, 1), got {dropout}", dropout=dropout))
        if isinstance(targets, str) and targets != "all-linear":
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        elif isinstance(targets, list):
            targets = tuple(targets)
        return cls(
            r,
            cls.alpha if alpha is None else float(alpha),
            cls.dropout if dropout is None else float(dropout),
            cls.targets if targets is None else targets,
        )

    def __str__(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} targets={targets}"


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """``peft.get_peft_model(model, LoraConfig(...))`` on ``model`` (built on meta; it is wrapped, not copied)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise BatchfitError(
            tr("`lora` needs the peft package, which is not installed"), hint=tr("pip install peft")
        ) from exc
    # "all-linear": peft's own rule, every Linear/Conv1D but a transformers model's output layer
    # (peft/tuners/tuners_utils.py `_maybe_include_all_linear_layers`)
    targets: Any = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    # peft types lora_alpha as int and uses it as a number (scaling = alpha / r): a float passes as is
    alpha: Any = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    config = LoraConfig(r=spec.r, lora_alpha=alpha, lora_dropout=spec.dropout, target_modules=targets)
    from ._quantize import QUANTIZED, peft_layers

    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        config._register_custom_module(peft_layers())  # QLoRA: peft's own layers for a 4-/8-bit base
    # a model built on meta gets its adapters made on meta too: peft makes each one on the default
    # device, initialises it (kaiming_uniform_ on real memory: seconds for an 8B model's 448
    # adapters) and moves it to the base layer's device, meta; made there, nothing is computed
    on_meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return get_peft_model(model, config)  # type: ignore[no-any-return]
    except ValueError as exc:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise BatchfitError(
            tr("peft could not add LoRA adapters: {exc}", exc=exc),
            hint=tr(
                "name target modules with `lora_targets` (this model's Linear layers: {names})",
                names=", ".join(names[:12]),
            ),
        ) from exc
