"""A model that runs out of memory on one rank only, for the distributed probe's tests.

Its gate hands each batch to the probe tests' stand-in device (``test_probe.device_with_max``) on
the rank named by ``BATCHFIT_TEST_OOM_RANK``: above ``BATCHFIT_TEST_OOM_MAX`` samples that device
raises ``torch.OutOfMemoryError``, in the forward for an even batch size and in the backward for an
odd one.
Every other rank, and every size up to the max, runs the real step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from test_probe import device_with_max  # the folder of a model file is on sys.path while it loads


def _stand_in(phase: str, batch_size: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != int(os.environ.get("BATCHFIT_TEST_OOM_RANK", "-1")):
        return
    if phase != ("forward" if batch_size % 2 == 0 else "backward"):
        return
    device_with_max(int(os.environ["BATCHFIT_TEST_OOM_MAX"])).step(batch_size)


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        _stand_in("forward", x.shape[0])
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _stand_in("backward", grad.shape[0])
        return grad


class OneRankOOM(nn.Module):
    """Linear(16, 64), ReLU, the gate, Linear(64, 10): the gate's backward runs after the second
    layer's gradients are ready, before the first layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_Gate.apply(torch.relu(self.fc1(x))))
