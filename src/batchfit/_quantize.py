"""QLoRA's frozen base as bitsandbytes stores it: 4-bit (NF4/FP4) or 8-bit (LLM.int8) weights and
their kernels' temporaries. (8-bit: :class:`Linear8bitModel`, :func:`storage_8bit`.)

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
    (``load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True``); ``8bit`` is
    ``load_in_8bit=True`` (LLM.int8, ``llm_int8_threshold=6.0``, ``llm_int8_has_fp16_weight=False``).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = BLOCKSIZE
    # 8-bit (LLM.int8): BitsAndBytesConfig's llm_int8_threshold default (transformers/utils/quantization_config.py)
    threshold: float = 6.0

    @classmethod
    def parse(cls, value: str | QuantSpec) -> QuantSpec:
        if isinstance(value, QuantSpec):
            return value
        key = str(value).strip().lower().replace("-", "")
        if key in ("4bit", "4", "nf4"):
            return cls()
        if key == "fp4":
            return cls(quant_type="fp4")
        if key in ("8bit", "8", "int8", "llm.int8"):
            return cls(bits=8, quant_type="int8", double_quant=False)
        raise BatchfitError(
            tr("unknown quantisation {value!r}", value=value),
            hint=tr("use `quantize='4bit'` (NF4), nf4, fp4 or 8bit (LLM.int8)"),
        )

    def __str__(self) -> str:
        if self.bits == 8:
            return f"bitsandbytes LLM.int8 8-bit base (outlier threshold {self.threshold:g}), modelled"
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
            return _MatMul4bit.apply(x, self.bias, self)  # type: ignore[no-any-return, no-untyped-call]  # untyped on torch 2.11
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


def storage_8bit(out_features: int, in_features: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors bitsandbytes keeps for an ``N x K`` weight in LLM.int8: (name, shape, dtype).

    bitsandbytes/nn/modules.py ``Int8Params._quantize``: ``int8_vectorwise_quant`` of the fp16
    weight gives ``CB`` (the weight itself, ``int8[N, K]``: ``self.data = CB``) and ``SCB``, one
    absmax per row (``float32[N]``); ``Linear8bitLt.init_8bit_state`` moves both to its
    ``MatmulLtState``, and the weight's data stays ``CB`` (the same storage).

    >>> [(name, shape, str(dtype)) for name, shape, dtype in storage_8bit(300, 1000)]
    [('weight', (300, 1000), 'torch.int8'), ('SCB', (300,), 'torch.float32')]
    """
    return [("weight", (out_features, in_features), torch.int8), ("SCB", (out_features,), torch.float32)]


class Linear8bitModel(nn.Linear):
    """A stand-in for bitsandbytes' ``Linear8bitLt`` (``has_fp16_weights=False``), as transformers
    builds it for ``load_in_8bit=True``: its storage (:func:`storage_8bit`) and its kernels' temporaries.

    bitsandbytes/autograd/_functions.py ``matmul`` picks the kernel: in training on the CPU,
    ``MatMul8bitFp`` (dequantise, then ``F.linear``); otherwise ``MatMul8bitLt`` (the int8 matmul of
    LLM.int8). Both keep the layer's input in ``ctx`` (an attribute, not ``save_for_backward``), so it
    stays alive until the autograd graph dies, not only until this layer's backward ran.
    """

    SCB: torch.Tensor

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.spec = linear.in_features, linear.out_features, spec
        device = linear.weight.device
        for name, shape, dtype in storage_8bit(linear.out_features, linear.in_features):
            t = torch.empty(shape, dtype=dtype, device=device)
            t.keep_dtype = True  # type: ignore[attr-defined]
            if name == "weight":  # Int8Params with has_fp16_weights=False: frozen
                self.weight = nn.Parameter(t, requires_grad=False)
            else:
                self.register_buffer(name, t)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Linear8bitLt.forward -> bnb.matmul(x, weight, bias, state); state.is_training = self.training
        function = _MatMul8bitFp if self.training and x.device.type in ("cpu", "xpu") else _MatMul8bitLt
        return function.apply(x, self.bias, self)  # type: ignore[no-any-return, no-untyped-call]  # untyped on torch 2.11

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}"


def _dequantize_8bit(layer: Linear8bitModel, dtype: torch.dtype) -> torch.Tensor:
    """``state.CB.to(dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))``
    (``MatMul8bitFp.forward`` writes ``.data.to(dtype)``, a copy too): the weight in ``dtype``, and a
    ``float32[N, 1]`` scale freed after the in-place multiply."""
    weight = layer.weight.to(dtype, copy=True)
    return weight.mul_(layer.SCB.unsqueeze(1).mul(1.0 / 127.0))


class _MatMul8bitFp(torch.autograd.Function):
    """bitsandbytes/autograd/_functions.py ``MatMul8bitFp`` for a frozen int8 weight (its ops, run as
    they are: plain PyTorch): forward dequantises the weight and runs ``F.linear``; ``ctx.A`` keeps
    the input; backward dequantises again for the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: Linear8bitModel) -> torch.Tensor:
        output = nn.functional.linear(x, _dequantize_8bit(layer, x.dtype), bias)
        ctx.layer, ctx.A, ctx.dtype_bias = layer, x, None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        return _backward_8bit(ctx, grad_output, ctx.A.dtype, ctx.A.shape)


def _backward_8bit(
    ctx: Any, grad_output: torch.Tensor, dtype: torch.dtype, shape: torch.Size
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    """The backward both ``MatMul8bitFp`` and ``MatMul8bitLt`` run for a frozen weight."""
    grad_x = grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_bias = grad_output.sum(0, dtype=ctx.dtype_bias)
    if grad_output.dim() == 3:
        grad_output = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
    if ctx.needs_input_grad[0]:
        weight = _dequantize_8bit(ctx.layer, dtype)  # before grad_output.to(dtype), as bitsandbytes orders them
        grad_x = torch.matmul(grad_output.to(dtype), weight).view(shape)
    return grad_x, grad_bias, None


class _MatMul8bitLt(torch.autograd.Function):
    """bitsandbytes/autograd/_functions.py ``MatMul8bitLt`` for a frozen int8 weight, with the
    buffers its CUDA kernels allocate (bitsandbytes/backends/cuda/ops.py, default/ops.py), modelled:
    the kernels are bitsandbytes' own C code, which fake tensors cannot run.

    Outlier columns (``threshold > 0``: input features with a value of at least 6.0) depend on the
    values: none are counted (see :func:`quantized_note`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: Linear8bitModel) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1]) if x.dim() == 3 else x
        # the fast path (no gradient for the int8 weight): int8_vectorwise_quant(A.to(float16), threshold)
        ca, sca = _vectorwise_quant(a.to(torch.float16), layer.spec.threshold)
        sub_a = None
        if layer.spec.threshold > 0.0:
            # default/ops.py int8_mixed_scaled_mm without outliers: subA = torch.empty(0, dtype=A.dtype)
            sub_a = torch.empty(0, dtype=a.dtype, device=a.device)
        output = _int8_scaled_mm(ca, layer.weight, bias, a.dtype)
        del ca, sca
        ctx.layer, ctx.dtype_bias = layer, None if bias is None else bias.dtype
        ctx.grad_shape, ctx.dtype_a = shape, a.dtype
        # (CAt, subA, A) when the input needs a gradient (the weight does not): kept while the graph lives
        ctx.tensors = (None, sub_a, a) if ctx.needs_input_grad[0] else (None, None, None)
        return output.reshape(*shape[:-1], layer.out_features) if len(shape) == 3 else output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        return _backward_8bit(ctx, grad_output, ctx.dtype_a, ctx.grad_shape)


def _vectorwise_quant(a: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """backends/cuda/ops.py ``int8_vectorwise_quant``: ``row_stats`` (``float32[M]``) and ``out_row``
    (``int8[M, K]``); with a threshold, the outlier test ``A.abs() >= threshold`` (an fp16 and a bool
    ``[M, K]``, the fp16 freed once compared) and ``outliers.any()``, kept until the kernel returns."""
    row_stats = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    out_row = torch.empty(a.shape, dtype=torch.int8, device=a.device)
    if threshold > 0.0:
        outliers = torch.empty(a.shape, dtype=torch.float16, device=a.device)  # A.abs()
        mask = torch.empty(a.shape, dtype=torch.bool, device=a.device)  # >= threshold
        del outliers
        found = torch.empty((), dtype=torch.bool, device=a.device)  # outliers.any(): taken as False
        del found
        none = torch.empty(0, dtype=torch.int64, device=a.device)  # outlier_cols, no bytes
        del mask, none
    return out_row, row_stats


def _int8_scaled_mm(ca: torch.Tensor, cb: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """default/ops.py ``int8_scaled_mm``: cuda/ops.py ``int8_linear_matmul`` (``int32[M, N]``; its
    fp32 fallback when K is not a multiple of 4), then ``int8_mm_dequant`` (``float16[M, N]``, the
    bias added in place, then ``.to(dtype)``: a copy unless fp16)."""
    m, n = ca.shape[0], cb.shape[0]
    if ca.shape[-1] % 4 != 0:  # torch.matmul(B.float(), A.float().t()).to(torch.int32), then out.copy_
        out_i32 = torch.empty((m, n), dtype=torch.int32, device=ca.device)
        a32 = torch.empty(ca.shape, dtype=torch.float32, device=ca.device)
        b32 = torch.empty(cb.shape, dtype=torch.float32, device=ca.device)
        product = torch.empty((m, n), dtype=torch.float32, device=ca.device)
        del a32, b32
        as_i32 = torch.empty((m, n), dtype=torch.int32, device=ca.device)
        del product, as_i32
    else:
        out_i32 = torch.empty((m, n), dtype=torch.int32, device=ca.device)
    out = torch.empty((m, n), dtype=torch.float16, device=ca.device)
    if bias is not None and bias.dtype != torch.float16:
        out.add_(bias.detach())
    result = out.to(dtype)
    del out  # when int8_mm_dequant returns
    del out_i32  # when int8_scaled_mm returns
    return result


def quantized_note(model: nn.Module) -> list[str]:
    """The label an estimate with a quantised stand-in carries (empty when the model has none)."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    if not layers:
        return []
    if isinstance(layers[0], Linear8bitModel):
        return [
            f"{layers[0].spec} for {len(layers)} layers: int8 weights and row scales, and its kernels' "
            "temporaries from bitsandbytes' source (MatMul8bitLt on a GPU, MatMul8bitFp in CPU training); "
            "outlier columns depend on the values and are counted as none (each one adds a column of the "
            "layer's input kept for backward, and small temporaries)"
        ]
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
    """Replace the base's ``nn.Linear`` layers (all but those transformers keeps) by the 4- or 8-bit stand-in,
    in place (call it on a model built on meta or on a copy); returns the model and how many layers."""
    replaced = [(parent, name, child) for parent, name, child in _linears(model, _skipped(model))]
    if not replaced:
        raise BatchfitError(
            tr("`quantize` found no nn.Linear layer to quantise"),
            hint=tr("it applies to models built of nn.Linear layers"),
        )
    stand_in = Linear8bitModel if spec.bits == 8 else Linear4bitModel
    for parent, name, child in replaced:
        setattr(parent, name, stand_in(child, spec))
    for p in model.parameters():  # QLoRA: the base is frozen (peft trains only its adapters)
        p.requires_grad_(False)
    return model, len(replaced)


def peft_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """LoRA on the stand-ins through peft's own wrappers for ``Linear4bit`` and ``Linear8bitLt``
    (peft/tuners/lora/bnb.py: the 4-bit one's forward clones the base's output; both cast the
    adapters' input)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError as exc:
        raise BatchfitError(
            tr("`quantize` with `lora` needs bitsandbytes (peft's QLoRA layers need it)"),
            hint=tr("pip install bitsandbytes"),
        ) from exc
    return {Linear4bitModel: Linear4bit, Linear8bitModel: Linear8bitLt}


QUANTIZED = (Linear4bitModel, Linear8bitModel)
