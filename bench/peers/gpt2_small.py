"""A GPT-2-small-shaped language model from plain nn layers (no downloads), for the GPU validation.

12 layers, d_model 768, 12 heads, vocab 50257, learned positions, tied embedding and head, pre-norm
blocks with causal ``scaled_dot_product_attention``; dropout 0 (as nanoGPT's default). 124M
parameters like GPT-2 small. Loaded by batchfit as ``bench/peers/gpt2_small.py:GPT2Small``; the
module-level :func:`example_inputs` gives int64 token ids of length ``SEQ_LEN``.

    PYTHONPATH=src python -m batchfit estimate bench/peers/gpt2_small.py:GPT2Small -b 4,8 -p amp-bf16 -o adamw
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 50257
SEQ_LEN = 512
D_MODEL = 768
HEADS = 12
LAYERS = 12


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2Small(nn.Module):
    """GPT-2 small's shape: returns logits (batch, seq, vocab); batchfit's default loss is cross-entropy."""

    def __init__(
        self,
        vocab: int = VOCAB,
        seq_len: int = SEQ_LEN,
        d_model: int = D_MODEL,
        heads: int = HEADS,
        layers: int = LAYERS,
    ) -> None:
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # batchfit fills integer inputs it makes from example_inputs' shapes without initialising them:
        # fold any value into the vocabulary so a real run never indexes out of range (a tiny int64 temporary)
        idx = idx.remainder(self.vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def example_inputs(batch_size: int) -> tuple[torch.Tensor]:
    """Token ids, int64, (batch, SEQ_LEN)."""
    return (torch.zeros(batch_size, SEQ_LEN, dtype=torch.int64),)
