"""QLoRA's frozen base as bitsandbytes stores it: 4-bit (NF4/FP4) weights and their temporaries.

bitsandbytes' ``Linear4bit`` does not run on batchfit's fake tensors (its weight is a
``Params4bit`` carrying a ``QuantState`` of further tensors; with bitsandbytes 0.50.2 the fake
re-parametrisation fails: "Creating a new Tensor subclass Params4bit but the raw Tensor object is
already associated to a python object of type FakeTensor"), so each ``nn.Linear`` of the base is replaced, on the meta model and before
LoRA, by :class:`Linear4bitModel`: a stand-in with the same storage and the same temporaries as
bitsandbytes 0.50's code, cited below. The figure is modelled, and the output says so.

Storage of one ``N x K`` weight of ``n = N*K`` elements (bitsandbytes/functional.py ``quantize_4bit``,
its fake kernel in bitsandbytes/_ops.py ``quantize_4bit``, ``quantize_blockwise``, ``get_4bit_type``):

* the packed weight: ``uint8[(n + 1) // 2, 1]`` (two 4-bit codes a byte);
* ``code``: the 16 NF4/FP4 values, ``float32[16]``;
* without double quantisation: ``absmax``, ``float32[ceil(n / 64)]`` (one per block of 64);
* with it (``bnb_4bit_use_double_quant=True``, as QLoRA sets it): ``absmax`` quantised to
  ``uint8[ceil(n / 64)]``, its ``offset`` (a ``float32`` scalar), and ``state2``: ``absmax``
  ``float32[ceil(ceil(n / 64) / 256)]`` and a copy of the dynamic map, ``float32[256]``.

>>> spec = QuantSpec.parse("4bit")
>>> spec.quant_type, spec.double_quant, spec.blocksize
('nf4', True, 64)
>>> [(name, tuple(shape), str(dtype)) for name, shape, dtype in storage_4bit(1000 * 300, spec)][:2]
[('weight', (150000, 1), 'torch.uint8'), ('code', (16,), 'torch.float32')]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import BatchfitError
from ._i18n import tr

# bitsandbytes/functional.py quantize_4bit: the default blocksize of the weights (64) and of the
# second, nested quantisation of their absmax (quantize_blockwise(..., blocksize=256))
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class QuantSpec:
    """``--quantize 4bit|nf4|fp4``: how the frozen base is stored.

    ``4bit`` is QLoRA's setting as transformers' ``BitsAndBytesConfig`` takes it
    (``load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True``).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = BLOCKSIZE

    @classmethod
    def parse(cls, value: str | QuantSpec) -> QuantSpec:
        if isinstance(value, QuantSpec):
            return value
        key = str(value).strip().lower().replace("-", "")
        if key in ("4bit", "4", "nf4"):
            return cls()
        if key == "fp4":
            return cls(quant_type="fp4")
        if key in ("8bit", "8", "int8"):
            raise BatchfitError(
                tr("`quantize='8bit'` (LLM.int8) is not modelled yet"),
                hint=tr("use `quantize='4bit'` (QLoRA's NF4 with double quantisation)"),
            )
        raise BatchfitError(
            tr("unknown quantisation {value!r}", value=value), hint=tr("use `quantize='4bit'` (NF4), nf4 or fp4")
        )

    def __str__(self) -> str:
        nested = " with double quantisation" if self.double_quant else ""
        return f"bitsandbytes {self.quant_type.upper()} 4-bit base (blocks of {self.blocksize}){nested}, modelled"


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def storage_4bit(n: int, spec: QuantSpec) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors bitsandbytes keeps for a weight of ``n`` elements: (name, shape, dtype)."""
    blocks = _blocks(n, spec.blocksize)
    out: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("weight", ((n + 1) // 2, 1), torch.uint8),
        ("code", (16,), torch.float32),
    ]
    if spec.double_quant:
        out += [
            ("absmax", (blocks,), torch.uint8),
            ("offset", (), torch.float32),
            ("nested_absmax", (_blocks(blocks, NESTED_BLOCKSIZE),), torch.float32),
            ("nested_code", (256,), torch.float32),
        ]
    else:
        out.append(("absmax", (blocks,), torch.float32))
    return out


class Linear4bitModel(nn.Linear):
    """A stand-in for bitsandbytes' ``Linear4bit``: its storage, and its kernels' temporaries.

    An ``nn.Linear`` subclass so that peft's ``all-linear`` finds it, as it finds ``Linear4bit``.
    The quantisation state is ``float32`` whatever the model's dtype (bitsandbytes makes it so):
    its tensors are marked to keep their dtype when batchfit builds the model in bf16.
    """

    absmax: torch.Tensor
    offset: torch.Tensor
    loaded_dtype: torch.Tensor

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.spec = linear.in_features, linear.out_features, spec
        device = linear.weight.device
        for name, shape, dtype in storage_4bit(linear.weight.numel(), spec):
            t = torch.empty(shape, dtype=dtype, device=device)
            t.keep_dtype = True  # type: ignore[attr-defined]
            if name == "weight":  # Params4bit: a frozen parameter
                self.weight = nn.Parameter(t, requires_grad=False)
            else:
                self.register_buffer(name, t)
        self.bias = linear.bias
        # QuantState.dtype, the dtype the weight had when it was quantised (it follows the model's:
        # a 0-element tensor, no memory, converted with the model's floating tensors)
        self.register_buffer("loaded_dtype", torch.empty(0, dtype=linear.weight.dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Linear4bit.forward: set_compute_type makes the compute dtype the input's (fp32/bf16), so
        # x.to(compute_dtype) does not copy; bnb.matmul_4bit runs MatMul4Bit when a gradient is needed
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _MatMul4bit.apply(x, self.bias, self)  # type: ignore[no-any-return]
        return _forward_4bit(x, self.bias, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}"


def _forward_4bit(x: torch.Tensor, bias: torch.Tensor | None, layer: Linear4bitModel) -> torch.Tensor:
    """bitsandbytes' ``gemm_4bit`` on CUDA as it runs for training-sized inputs (more than 1536
    rows): bitsandbytes/backends/cuda/ops.py ``_dequant_linear_fallback``."""
    if layer.spec.double_quant:
        absmax_dq = torch.empty_like(layer.absmax, dtype=torch.float32)  # dequantised absmax
        absmax = absmax_dq + layer.offset
    weight = torch.empty((layer.out_features, layer.in_features), dtype=x.dtype, device=x.device)  # B_dq
    out = nn.functional.linear(x, weight, bias)
    if layer.spec.double_quant:
        del absmax_dq, absmax
    del weight
    return out


class _MatMul4bit(torch.autograd.Function):
    """bitsandbytes/autograd/_functions.py ``MatMul4Bit``: saves no activation (only the packed
    weight, which is alive anyway); backward dequantises the weight again for the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: Linear4bitModel) -> torch.Tensor:
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward_4bit(x, bias, layer)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        layer: Linear4bitModel = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_output, _dequantize_4bit(layer).to(grad_output.dtype))
        return grad_x, grad_bias, None


def _dequantize_4bit(layer: Linear4bitModel) -> torch.Tensor:
    """bitsandbytes/functional.py ``dequantize_4bit``: the nested absmax dequantised (a float32 block
    per 64 weights, ``dequantize_blockwise``, then ``+= offset`` in place), freed on return; the
    weight in ``QuantState.dtype``."""
    absmax = torch.empty_like(layer.absmax, dtype=torch.float32) if layer.spec.double_quant else None
    weight = torch.empty(
        (layer.out_features, layer.in_features), dtype=layer.loaded_dtype.dtype, device=layer.weight.device
    )
    del absmax
    return weight


def quantized_note(model: nn.Module) -> list[str]:
    """The label an estimate with the 4-bit stand-in carries (empty when the model has none)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bitModel)]
    if not layers:
        return []
    return [
        f"{layers[0].spec} for {len(layers)} layers: its storage and its kernels' temporaries from bitsandbytes' "
        "source (dequantise + linear, as for more than 1536 rows; fewer may use its fused kernel on some GPUs, "
        "without the dequantised weight)"
    ]


def _skipped(model: nn.Module) -> set[str]:
    """The modules transformers keeps unquantised (``llm_int8_skip_modules`` unset): its own
    ``get_keys_to_not_convert`` (transformers/quantizers/base.py: tied weights, the last module,
    the output embeddings); for another model, the module of its last parameter, by the same rule."""
    if hasattr(model, "get_output_embeddings") and hasattr(model, "all_tied_weights_keys"):
        from transformers.quantizers.base import get_keys_to_not_convert

        return set(get_keys_to_not_convert(model))
    names = [name for name, _ in model.named_parameters()]
    return {names[-1].rsplit(".", 1)[0]} if names else set()


def _linears(model: nn.Module, skip: set[str]) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(full == k or full.endswith("." + k) for k in skip):
                yield module, child_name, child


def quantize_model(model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, int]:
    """Replace the base's ``nn.Linear`` layers (all but those transformers keeps) by the 4-bit stand-in,
    in place (call it on a model built on meta or on a copy); returns the model and how many layers."""
    replaced = [(parent, name, child) for parent, name, child in _linears(model, _skipped(model))]
    if not replaced:
        raise BatchfitError(
            tr("`quantize` found no nn.Linear layer to quantise"),
            hint=tr("it applies to models built of nn.Linear layers"),
        )
    for parent, name, child in replaced:
        setattr(parent, name, Linear4bitModel(child, spec))
    for p in model.parameters():  # QLoRA: the base is frozen (peft trains only its adapters)
        p.requires_grad_(False)
    return model, len(replaced)


def peft_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """LoRA on the stand-in through peft's own wrapper for ``Linear4bit`` (peft/tuners/lora/bnb.py
    ``Linear4bit``: its forward clones the base's output, and casts the adapters' input)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError as exc:
        raise BatchfitError(
            tr("`quantize` with `lora` needs bitsandbytes (peft's QLoRA layers need it)"),
            hint=tr("pip install bitsandbytes"),
        ) from exc
    return {Linear4bitModel: Linear4bit}
