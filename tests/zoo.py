"""A zoo of awkward models, shared by the test files (summary, estimator, ...).

Each entry builds a small model and its inputs, and carries its parameter count worked out by
hand (so tests compare against arithmetic, not against torch's own counting). Build under
``torch.device("meta")`` to spend no memory::

    from zoo import ZOO
    entry = ZOO["tied_lm"]
    model = entry.build()
    inputs = entry.inputs(batch_size=4)       # real CPU tensors, in a form ModelInputs.of reads
    ModelInputs.of(inputs).call(model)        # model(*args, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == entry.params

``LlamaConfig`` / ``Llama`` give a LLaMA-shaped decoder from plain nn layers (``LLAMA_7B`` is the
7-billion-parameter shape; build it on meta).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchfit._models import InputSpec, Workload

# ---------------------------------------------------------------------------------------------
# The awkward models


class Reused(nn.Module):
    """One Linear applied three times in a forward (a module used several times)."""

    def __init__(self, width: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.block = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.act(self.block(x))
        return self.head(x)


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight (tied weights), a Linear on 3-d inputs."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(ids))))


class Frozen(nn.Module):
    """A frozen backbone (conv + BatchNorm) under a trainable head; one layer half frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Linear(8, 8)
        self.neck.weight.requires_grad_(False)  # weight frozen, bias trainable
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.pool(self.backbone(x)).flatten(1)))


class LSTMNet(nn.Module):
    """A two-layer LSTM (tuple-of-tuple output) and a head on the last step."""

    def __init__(self, features: int = 10, hidden: int = 20, num_classes: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (_h, _c) = self.lstm(x)
        return self.head(out[:, -1])


class DictInput(nn.Module):
    """Takes one dict of tensors (image + tabular features) and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        self.table = nn.Linear(6, 16)
        self.head = nn.Linear(32, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = torch.cat([self.image(batch["image"]), self.table(batch["table"])], dim=1)
        return {"logits": self.head(h), "features": h}


class KeywordInputs(nn.Module):
    """Token ids positionally and a keyword-only mask (as transformers' ``attention_mask=``)."""

    def __init__(self, vocab: int = 30, dim: int = 12, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))


class TwoInputs(nn.Module):
    """Two positional image inputs (torchsummary handles a list of input sizes of equal rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(14 * 14, 32))
        self.head = nn.Linear(64, 10)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(image), self.b(extra)], dim=1))


class ParamHolders(nn.Module):
    """Parameters held directly: a bare nn.Parameter on the model and an nn.ParameterList."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.offsets = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(3)])
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for offset in self.offsets:
            x = x + offset
        return self.proj(x * self.scale)


class NestedLists(nn.Module):
    """A ModuleList of ModuleLists (never called themselves; their members are)."""

    def __init__(self, dim: int = 8, stages: int = 2, blocks: int = 3) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks)) for _ in range(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            for layer in stage:
                x = torch.relu(layer(x))
        return x


class Encoder(nn.Module):
    """nn.TransformerEncoder, which deep-copies its layer at construction."""

    def __init__(self, d_model: int = 32, nhead: int = 4, ff: int = 64, layers: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


# ---------------------------------------------------------------------------------------------
# A LLaMA-shaped decoder from plain nn layers


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    d_ff: int = 11008

    @property
    def params(self) -> int:
        """Parameters by hand: embedding + layers (4 attention projections, 3 MLP, 2 norms) + norm + head."""
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        return self.vocab * d + self.n_layers * per_layer + d + d * self.vocab

    def mult_adds(self, batch: int, seq: int) -> int:
        """Multiply-adds of one forward: projections, MLP, head, and attention's two matmuls (no causal saving)."""
        d, f, tokens = self.d_model, self.d_ff, batch * seq
        per_layer = tokens * (4 * d * d + 3 * d * f) + 2 * batch * seq * seq * d
        return self.n_layers * per_layer + tokens * d * self.vocab


LLAMA_7B = LlamaConfig()
LLAMA_TINY = LlamaConfig(vocab=100, d_model=32, n_layers=2, n_heads=4, d_ff=64)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (
            proj(x).view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.post_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_norm(x))


class Llama(nn.Module):
    """Token ids (batch, seq) int64 -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig = LLAMA_7B) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: ``build()``, one sample's ``input_size`` (or ``inputs(batch)`` for awkward
    inputs), and ``params`` counted by hand."""

    build: Callable[[], nn.Module]
    params: int
    trainable_params: int
    input_size: tuple[int, ...] | list[tuple[int, ...]] | None = None
    make_inputs: Callable[[int], Any] | None = None
    note: str = ""

    def inputs(self, batch_size: int) -> Any:
        """The inputs at ``batch_size`` (CPU tensors): a tuple of positional inputs, or any form
        :meth:`batchfit._models.ModelInputs.of` reads (a dict of keyword inputs, an (args, kwargs) pair)."""
        if self.make_inputs is not None:
            return self.make_inputs(batch_size)
        sizes = [self.input_size] if isinstance(self.input_size, tuple) else list(self.input_size or [])
        return tuple(torch.rand(batch_size, *s) for s in sizes)


def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _lstm(features: int, hidden: int, layers: int) -> int:
    first = 4 * hidden * (features + hidden) + 8 * hidden
    return first + (layers - 1) * (4 * hidden * (2 * hidden) + 8 * hidden)


def _encoder_layer(d: int, ff: int) -> int:
    # in-projection (3d x d + 3d), out-projection, two feed-forward linears, two LayerNorms
    return _lin(d, 3 * d) + _lin(d, d) + _lin(d, ff) + _lin(ff, d) + 2 * 2 * d


_FROZEN_BACKBONE = (3 * 8 * 9 + 8) + 2 * 8

ZOO: dict[str, ZooModel] = {
    "reused": ZooModel(Reused, _lin(8, 8) + _lin(8, 3), _lin(8, 8) + _lin(8, 3), (8,), note="module called 3x"),
    "tied_lm": ZooModel(
        TiedLM,
        50 * 16 + _lin(16, 16),
        50 * 16 + _lin(16, 16),
        make_inputs=lambda b: (torch.zeros(b, 12, dtype=torch.long),),
        note="embedding and head share a weight; Linear on 3-d input",
    ),
    "frozen": ZooModel(
        Frozen,
        _FROZEN_BACKBONE + _lin(8, 8) + _lin(8, 4),
        8 + _lin(8, 4),
        (3, 16, 16),
        note="frozen backbone, half-frozen neck",
    ),
    "lstm": ZooModel(
        LSTMNet, _lstm(10, 20, 2) + _lin(20, 5), _lstm(10, 20, 2) + _lin(20, 5), (7, 10), note="tuple output"
    ),
    "dict_input": ZooModel(
        DictInput,
        _lin(64, 16) + _lin(6, 16) + _lin(32, 2),
        _lin(64, 16) + _lin(6, 16) + _lin(32, 2),
        # a 1-tuple holding the dict: the dict is one positional argument (a bare dict would be keywords)
        make_inputs=lambda b: ({"image": torch.rand(b, 1, 8, 8), "table": torch.rand(b, 6)},),
        note="one dict argument, dict output",
    ),
    "keyword_inputs": ZooModel(
        KeywordInputs,
        30 * 12 + _lin(12, 4),
        30 * 12 + _lin(12, 4),
        make_inputs=lambda b: ((torch.zeros(b, 9, dtype=torch.long),), {"mask": torch.ones(b, 9)}),
        note="an (args, kwargs) pair: ids positionally, mask= by keyword",
    ),
    "two_inputs": ZooModel(
        TwoInputs,
        _lin(784, 32) + _lin(196, 32) + _lin(64, 10),
        _lin(784, 32) + _lin(196, 32) + _lin(64, 10),
        [(1, 28, 28), (1, 14, 14)],
    ),
    "param_holders": ZooModel(
        ParamHolders,
        12 + 3 * 12 + _lin(12, 12),
        12 + 3 * 12 + _lin(12, 12),
        (12,),
        note="bare Parameter, ParameterList",
    ),
    "nested_lists": ZooModel(NestedLists, 6 * _lin(8, 8), 6 * _lin(8, 8), (8,), note="ModuleList of ModuleLists"),
    "transformer_encoder": ZooModel(
        Encoder, 2 * _encoder_layer(32, 64), 2 * _encoder_layer(32, 64), (10, 32), note="deep-copied layers"
    ),
    "llama_tiny": ZooModel(
        lambda: Llama(LLAMA_TINY),
        LLAMA_TINY.params,
        LLAMA_TINY.params,
        make_inputs=lambda b: (torch.zeros(b, 16, dtype=torch.long),),
        note="LLaMA-shaped decoder, tiny config",
    ),
}


def zoo_workload(name: str) -> Workload:
    """The zoo entry ``name`` built on ``meta``, as a Workload (its inputs or example inputs)."""
    entry = ZOO[name]
    with torch.device("meta"):
        model = entry.build()
    if entry.make_inputs is not None:
        return Workload(name, model, example_inputs=entry.make_inputs)
    sizes = [entry.input_size] if isinstance(entry.input_size, tuple) else list(entry.input_size or [])
    return Workload(name, model, tuple(InputSpec(tuple(s)) for s in sizes))
