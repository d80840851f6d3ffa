"""``probe`` across ranks (``torchrun``): every rank runs each attempt, and all ranks agree on its outcome.

Each attempt is the reference step on every rank, the model wrapped in ``DistributedDataParallel``
over a process group made for that attempt (the *data* group: NCCL on CUDA, gloo on CPU). The
ranks agree over a second group (gloo, on the host) that never carries the step's own collectives:

- before the wrapper is made and as each phase of the loop begins (forward, backward, optimizer
  step, ..., end), every rank all-reduces a flag (MAX): 0 = fine so far;
- a rank whose attempt fails (out-of-memory or anything else) aborts its data group, so that a peer
  waiting inside one of that group's collectives fails at once instead of waiting for it (gloo), and
  joins the next agreement with flag 1; the others see 1 there and leave the step;
- then every rank sends its figures and status to all (``all_gather_object``): the attempt is
  out-of-memory when any rank ran out of memory, so all ranks take the same next size.

A rank that completes the step joins one last agreement (flag 0). So a rank that runs out of memory
alone never leaves the others waiting: it joins exactly one agreement more than it passed before it
stopped, whatever phase it stopped in, and that is the agreement the others reach next. A peer blocked in a
data collective that nothing aborts (NCCL kernels wait on the device, not the host) leaves at the
data group's timeout (``peer_timeout_s``); the data group is then aborted on every rank.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ._errors import BatchfitError, ExitCode
from ._i18n import tr
from ._probe import Attempt, Runner, guarded

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup

    from ._models import Workload
    from ._step import StepSpec


class PeerStopped(Exception):
    """Raised on a rank whose attempt another rank stopped (it ran out of memory or failed)."""


@dataclass
class DistContext:
    """This process's place among the ranks of a distributed probe."""

    rank: int
    world_size: int
    local_rank: int
    control: ProcessGroup  # gloo, on the host: the agreements
    backend: str  # the data groups' backend: nccl (cuda) or gloo (cpu)
    peer_timeout_s: float
    owns_default: bool = False  # this probe initialised the default group (and ends it in close())

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_default and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, flag: int) -> int:
        """The MAX of ``flag`` over all ranks (a gloo all-reduce on the host)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([flag], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def from_main(self, compute: Any) -> Any:
        """``compute()`` on rank 0, its value (or its :class:`BatchfitError`) on every rank."""
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", compute())
            except BatchfitError as exc:
                box[0] = ("error", (exc.message, exc.hint, int(exc.exit_code)))
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.control, 0), group=self.control)
        kind, value = box[0]
        if kind == "error":
            message, hint, code = value
            raise BatchfitError(message, hint=hint, exit_code=ExitCode(code))
        return value


def launched() -> bool:
    """Whether this process is one rank of several: ``torch.distributed`` is initialised, or
    ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``) is set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def dist_context(device: str, peer_timeout_s: float = 120.0) -> DistContext:
    """Join (or reuse) the default process group and make the control group; on CUDA each rank
    takes the GPU ``LOCAL_RANK``, as ``torchrun`` numbers them."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise BatchfitError(tr("this torch build has no torch.distributed"), hint=tr("run probe without torchrun"))
    cuda = device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise BatchfitError(
                tr(
                    "rank with LOCAL_RANK={local_rank} has no GPU of its own ({device_count} visible)",
                    local_rank=local_rank,
                    device_count=torch.cuda.device_count(),
                ),
                hint=tr("start at most one process per GPU (torchrun's nproc-per-node at most the GPU count)"),
                exit_code=ExitCode.NO_DEVICE,
            )
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    control = _new_group(backend="gloo")
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        control=control,
        backend="nccl" if cuda else "gloo",
        peer_timeout_s=peer_timeout_s,
        owns_default=owns,
    )


def _new_group(**kwargs: Any) -> ProcessGroup:
    """A group of all ranks (``new_group`` names non-members with a sentinel; every rank is one here)."""
    import torch.distributed as dist

    group = dist.new_group(**kwargs)
    assert isinstance(group, dist.ProcessGroup)
    return group


def _end(groups: list[ProcessGroup], failed: bool) -> None:
    """End the attempt's data group. After a failure: aborted (NCCL: ``ncclCommAbort``, which ends
    this rank's kernels still waiting for a peer), and its last reference dropped, which closes gloo's
    connections, so a peer waiting in one of its collectives fails now instead of at the timeout."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    group = groups.pop()
    with contextlib.suppress(Exception):  # already broken or gone: nothing left to end
        if failed:
            c10d._abort_process_group(group)
        else:
            dist.destroy_process_group(group)
    del group
    if failed:
        gc.collect()  # the failed step's wrapper (its reducer holds the group) goes now


def distributed_runner(workload: Workload, spec: StepSpec, ctx: DistContext) -> Runner:
    """Attempts run on every rank under DDP; each returns the agreed :class:`Attempt` (the same on
    every rank), with each rank's figures in ``ranks``."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from ._measure import measure_step

    def run(batch_size: int) -> Attempt:
        groups = [_new_group(backend=ctx.backend, timeout=timedelta(seconds=ctx.peer_timeout_s))]
        told = [False]  # an agreement already told every rank that this attempt stopped

        def on_phase(phase: str, iteration: int) -> None:
            if ctx.agree(0):
                told[0] = True
                raise PeerStopped(f"stopped by another rank before {phase}, iteration {iteration}")

        def wrap(model: nn.Module) -> nn.Module:
            ids = [torch.cuda.current_device()] if ctx.backend == "nccl" else None
            return DistributedDataParallel(model, device_ids=ids, process_group=groups[0])

        def step(b: int) -> Attempt:
            m = measure_step(workload, b, spec, explain_errors=False, wrap=wrap, on_phase=on_phase)
            return Attempt(
                b,
                "ok",
                step_seconds=m.seconds,
                peak_allocated_bytes=m.peak_allocated_bytes,
                peak_reserved_bytes=m.peak_reserved_bytes,
                device_used_bytes=m.device_used_bytes,
                iterations=spec.iterations if spec.mode == "train" else 1,
            )

        def cleanup() -> None:
            if ctx.backend == "nccl":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

        fatal: tuple[str, str | None, int] | None = None
        try:
            local = guarded(step, cleanup)(batch_size)
        except BatchfitError as exc:  # a problem with the model or settings: every rank must stop
            local = Attempt(batch_size, "error", message=exc.message)
            fatal = (exc.message, exc.hint, int(exc.exit_code))
        stopped = told[0]
        # the last agreement of a rank that completed the step: a rank that failed after its last
        # phase joins this one; a rank that failed joins one (unless one already told it to stop)
        failed = not local.ok or bool(ctx.agree(0))
        _end(groups, failed)  # before the agreement: a peer inside one of its collectives fails now
        if not local.ok and not stopped:
            ctx.agree(1)
        mine = {"rank": ctx.rank, "stopped_by_peer": stopped, "fatal": fatal, **local.to_dict()}
        return combine(batch_size, ctx.gather(mine))

    return run


def combine(batch_size: int, ranks: list[dict[str, Any]]) -> Attempt:
    """One attempt from every rank's: out-of-memory when any rank ran out of memory, an error when a
    rank failed otherwise (and none ran out of memory: a collective failing on a peer of a rank that
    ran out of memory is a consequence, not a cause), else ok. The peaks are the largest rank's.

    >>> ok = {"status": "ok", "peak_allocated_bytes": 5, "stopped_by_peer": False}
    >>> oom = {"status": "oom", "message": "OutOfMemoryError: CUDA out of memory", "stopped_by_peer": False}
    >>> a = combine(8, [{**ok, "rank": 0, "status": "error", "stopped_by_peer": True}, {**oom, "rank": 1}])
    >>> a.status, a.message
    ('oom', 'rank 1: OutOfMemoryError: CUDA out of memory')
    >>> combine(8, [{**ok, "rank": 0}, {**ok, "rank": 1, "peak_allocated_bytes": 7}]).peak_allocated_bytes
    7
    """
    for r in ranks:
        if r.get("fatal"):
            message, hint, code = r["fatal"]
            raise BatchfitError(
                tr("rank {r}: {message}", r=r["rank"], message=message), hint=hint, exit_code=ExitCode(code)
            )
    records = [
        {
            k: r.get(k)
            for k in (
                "rank",
                "status",
                "stopped_by_peer",
                "peak_allocated_bytes",
                "peak_reserved_bytes",
                "device_used_bytes",
                "step_seconds",
                "seconds",
                "message",
            )
        }
        for r in ranks
    ]
    oom = [r for r in ranks if r["status"] == "oom"]
    failed = [r for r in ranks if r["status"] == "error" and not r["stopped_by_peer"]]
    status: Any = "oom" if oom else "error" if failed else "ok"
    causes = oom or failed
    message = "; ".join(f"rank {r['rank']}: {r['message']}" for r in causes) if causes else None
    seconds = max((r.get("seconds") or 0.0) for r in ranks)
    if status == "ok":
        return Attempt(
            batch_size,
            "ok",
            seconds=seconds,
            step_seconds=max(r.get("step_seconds") or 0.0 for r in ranks) or None,
            peak_allocated_bytes=_largest(ranks, "peak_allocated_bytes"),
            peak_reserved_bytes=_largest(ranks, "peak_reserved_bytes"),
            device_used_bytes=_largest(ranks, "device_used_bytes"),
            iterations=ranks[0].get("iterations", 2),
            ranks=records,
        )
    return Attempt(batch_size, status, seconds=seconds, message=message, ranks=records)


def _largest(ranks: list[dict[str, Any]], key: str) -> int | None:
    values = [r[key] for r in ranks if r.get(key) is not None]
    return max(values) if values else None


__all__ = ["DistContext", "PeerStopped", "combine", "dist_context", "distributed_runner", "launched"]
