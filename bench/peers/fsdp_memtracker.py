"""PyTorch's FSDPMemTracker (``torch.distributed._tools.fsdp2_mem_tracker``) on the fake process group:
the per-rank peak of an FSDP2 training step it reports, with no GPU and one process.

The set-up PyTorch's own tests use (``torch.testing._internal.distributed.fake_pg``): the fake backend
with world size N (this process is rank 0), a CPU device mesh, the model built on the meta device
and ``fully_shard`` applied per block and then to the root outside ``FakeTensorMode``; then, inside
``FakeTensorMode(allow_non_fake_inputs=True)``, ``to_empty`` and the step. FSDPMemTracker counts the
live bytes of every tensor (sharded and gathered parameters, gradients, optimizer state, activations,
temporaries): no caching allocator, no batch axis, no answer to "which batch fits".

One throwaway step runs first (untracked): the first optimizer step of a fresh process otherwise
over-counts (seen on this machine, torch 2.14.1). Then ``iterations`` steps are tracked, as in the
reference loop (forward, loss, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``).

>>> # fsdp_peak(lambda: MyModel(), (512,), 8, world_size=4, block="Block")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[Any]:
    """The fake process group of ``world_size`` ranks (this process is rank 0) and its CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def shard(model: nn.Module, mesh: Any, block: str | None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` on every module whose class is named ``block``, then on the root."""
    from torch.distributed.fsdp import fully_shard

    if block is not None:
        for m in model.modules():
            if type(m).__name__ == block:
                fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def fsdp_peak(
    build: Callable[[], nn.Module],
    inputs: Callable[[int], tuple[torch.Tensor, ...]],
    batch_size: int,
    *,
    world_size: int,
    block: str | None,
    loss: Callable[[Any], torch.Tensor],
    optimizer: str = "adamw",
    reshard_after_forward: bool = True,
    iterations: int = 2,
) -> dict[str, Any]:
    """FSDPMemTracker's peak bytes of rank 0 and its breakdown, and the seconds it took."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    start = time.perf_counter()
    with fake_world(world_size) as mesh:
        with torch.device("meta"):
            model = build()
        shard(model, mesh, block, reshard_after_forward)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            params = [p for p in model.parameters() if p.requires_grad]
            opt: torch.optim.Optimizer = (
                torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-2)
            )

            def step() -> None:
                out = model(*inputs(batch_size))
                loss(out).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()  # the throwaway warm-up (see the module's docstring)
            tracker = FSDPMemTracker(model, opt)
            with tracker:
                for i in range(iterations):
                    if i:
                        tracker.reset_mod_stats()  # it refuses a module's second call otherwise (keeps the peak)
                    step()
            snap = tracker.get_tracker_snapshot("peak")
    device = next(iter(snap))
    by_kind = {str(k).split(".")[-1]: int(v) for k, v in snap[device].items()}
    return {
        "peak_bytes": by_kind.pop("Total"),
        "breakdown": by_kind,
        "seconds": time.perf_counter() - start,
    }
