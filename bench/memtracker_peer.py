"""PyTorch's own MemTracker (torch.distributed._tools.mem_tracker) on the reference step, on fake CPU tensors.

MemTracker counts live tensor bytes as a dispatch mode, like batchfit's tracer, but with no
allocator, no CUDA context and no batch axis. It is a peer to compare with, not a dependency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}


def memtracker_peak(
    build: Callable[[], nn.Module], input_shape: tuple[int, ...], batch_size: int, optimizer: str = "sgd"
) -> tuple[int, float]:
    """Peak bytes MemTracker reports for two iterations of the reference step, and its seconds."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        model = build()
        opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
        x = torch.randn(batch_size, *input_shape)
        start = time.perf_counter()
        tracker = MemTracker()
        tracker.track_external(model, opt, x)
        with tracker:
            labels = None
            for i in range(2):
                if i:
                    tracker.reset_mod_stats()  # it refuses a module's second call otherwise (keeps the peak)
                out = model(x)
                if labels is None:
                    labels = torch.zeros(out.shape[:-1], dtype=torch.long)
                loss = nn.functional.cross_entropy(out, labels)
                del out
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
        seconds = time.perf_counter() - start
        peak = tracker.get_tracker_snapshot("peak")
    total = sum(stats.get("Total", 0) for stats in peak.values())
    return total, seconds
