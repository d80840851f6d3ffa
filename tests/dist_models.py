"""Small models for the distributed tests (loaded by path in each gloo process: ``tests/dist_models.py:Blocks``).

Sizes are chosen so that dimension 0 of most parameters does not divide by 2 or 3 (uneven FSDP2
shards), and the ZeRO-1 partition differs between ranks.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.down(self.act(self.up(x)))


class Blocks(nn.Module):
    """Linear(12, 29), three residual blocks (29 -> 61 -> 29), a 7-way head."""

    def __init__(self, features: int = 12, dim: int = 29, hidden: int = 61, depth: int = 3, classes: int = 7) -> None:
        super().__init__()
        self.inp = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class NormBlocks(Blocks):
    """:class:`Blocks` with a BatchNorm1d after the input layer and a 40,000-float buffer read in
    the forward: buffers for DDP to broadcast at each forward (two float vectors and an int64 count,
    and one large enough that the broadcast's flat copy of the float buffers makes the peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(29)
        self.register_buffer("table", torch.ones(40_000))

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.norm(self.inp(x)) * self.table[:29]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def clipped_step(model, inputs, labels, optimizer):  # type: ignore[no-untyped-def]
    """A user's ``--step`` (``fn(model, inputs, labels, optimizer)``): cross-entropy, backward, the
    gradients clipped, one optimizer step. Importable by name (``dist_models``) in spawned processes."""
    loss = torch.nn.functional.cross_entropy(model(*inputs), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class SacBlocks(nn.Module):
    """Bias-free residual blocks (their matmuls are ``aten.mm``), each wrapped as torchtitan wraps
    its blocks: ``checkpoint_wrapper`` with torchtitan's per-op selective checkpointing policy."""

    def __init__(self, features: int = 12, dim: int = 29, hidden: int = 61, depth: int = 3, classes: int = 7) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        from batchfit._hf import torchtitan_sac_context

        super().__init__()
        self.inp = nn.Linear(features, dim)
        blocks = []
        for _ in range(depth):
            block = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
            blocks.append(checkpoint_wrapper(block, context_fn=torchtitan_sac_context, preserve_rng_state=False))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)
