"""The simulated step as a PyTorch memory snapshot (``torch.cuda.memory._snapshot()``'s format).

PyTorch's own answer to "where did my memory go" is ``_record_memory_history()`` followed by
``_snapshot()``/``_dump_snapshot()``, opened at https://pytorch.org/memory_viz or with
``python -m torch.cuda._memory_viz``. batchfit replays the same allocator, so it writes the same
file without a GPU: ``device_traces`` holds every action of the caching-allocator model (alloc,
free_requested, free_completed, segment_alloc/free, segment_map/unmap) with the model's addresses
and sizes; ``segments`` the segments and their blocks when the snapshot is taken. Each entry's
``frames`` name what PyTorch would show as a stack: the storage's category, the module and the
phase of the iteration it was born in (and, for a free, the phase it was freed in).

The schema follows ``torch/cuda/memory.py`` (``_snapshot``'s docstring) and what
``torch/cuda/_memory_viz.py`` and ``torch/utils/viz/MemoryViz.js`` read: trace entries'
``size`` is the request (CUDACachingAllocator.cpp records ``orig_size`` for ``TraceEntry::ALLOC``
and ``requested_size`` for the frees), segments' and blocks' sizes are the rounded ones.

>>> from batchfit import estimate
>>> snap = snapshot(estimate("mlp", dataset="mnist", batch_size=64, gpu="T4"))
>>> sorted(snap)[:2], snap["device_traces"][0][0]["action"]
(['batchfit', 'device_traces'], 'segment_alloc')
"""

from __future__ import annotations

import pickle
from bisect import bisect_right
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._errors import BatchfitError, ExitCode, check_suffix
from ._events import Event
from ._i18n import tr

if TYPE_CHECKING:
    from ._allocator import AllocatorHistory
    from ._estimate import StepEstimate

SCHEMA_VERSION = 1
At = Literal["end", "peak"]


def _frames(ev: Event, module_types: dict[str, str]) -> list[dict[str, Any]]:
    """A made-up stack, innermost first as PyTorch's are: category, module, phase of the iteration.

    ``_memory_viz`` prints a frame as ``filename:line:name`` (the flame graphs put the outermost
    first), so the memory flame graph groups by iteration and phase, then module, then category.
    """
    module = ev.module or "(top level)"
    return [
        {"filename": "category", "line": 0, "name": ev.category},
        {"filename": module_types.get(ev.module, "module"), "line": 0, "name": module},
        {"filename": f"iteration {ev.iteration}", "line": 0, "name": ev.phase},
    ]


def snapshot(estimate: StepEstimate, *, at: At = "end") -> dict[str, Any]:
    """The step of ``estimate`` (CUDA) as the dict ``torch.cuda.memory._snapshot()`` returns.

    ``at="end"``: taken when the step ends (two iterations done; the model and the optimizer's
    state still alive), as a user would call ``_snapshot()`` after a training step; the trace
    holds the whole step. ``at="peak"``: taken at the peak of allocated memory (the moment the
    estimate's breakdown describes); the trace stops there, and the segments' active blocks add
    up to ``peak_allocated_bytes``.
    """
    check_device(estimate.device)
    if not estimate.events:
        raise BatchfitError(
            tr(
                "the estimate at batch size {batch_size} has no event timeline ({method})",
                batch_size=estimate.batch_size,
                method=estimate.method,
            ),
            hint=tr("a snapshot needs a traced step; this model could only be extrapolated from real runs"),
            exit_code=ExitCode.UNSUPPORTED,
        )
    events = _window(estimate, at)
    from ._allocator import simulate

    alloc = estimate.allocator
    assert alloc is not None  # every traced CUDA estimate is replayed on its card
    result = simulate(events, alloc.config, alloc.device_limit_bytes, record_series=False, history=True)
    assert result.history is not None
    return _to_pytorch(estimate, events, result.history, at, result.peak_allocated_bytes, result.peak_reserved_bytes)


def check_device(device: str) -> None:
    """A snapshot is the CUDA caching allocator's picture: CPU steps have none."""
    if device != "cuda":
        raise BatchfitError(
            tr("a memory snapshot is the CUDA caching allocator's picture; this step is on {device!r}", device=device),
            hint=tr("estimate with `device='cuda'` (the default; no GPU needed)"),
            exit_code=ExitCode.USAGE,
        )


def _window(estimate: StepEstimate, at: At) -> list[Event]:
    events = estimate.events
    if at == "peak":
        seq = estimate.allocator.peak_allocated_seq if estimate.allocator else None
        return events[: (seq or 0) + 1]
    if at != "end":
        raise BatchfitError(tr("unknown snapshot moment {at!r}", at=at), hint=tr("use at='end' or at='peak'"))
    end = next((i for phase, _it, i in estimate.marks if phase == "end"), len(events))
    return events[:end]


def _to_pytorch(
    estimate: StepEstimate,
    events: list[Event],
    history: AllocatorHistory,
    at: At,
    peak_allocated: int,
    peak_reserved: int,
) -> dict[str, Any]:
    types = estimate.module_types
    frames = [_frames(ev, types) for ev in events]
    # a free's event carries its storage's birth; PyTorch's frames are where the free happened:
    # say at least in which phase of which iteration it was
    starts = sorted((i, phase, it) for phase, it, i in estimate.marks if phase != "end")
    for i, ev in enumerate(events):
        if ev.action == "free":
            k = bisect_right(starts, (i, "~", 0)) - 1
            _, phase, it = starts[k] if k >= 0 else (0, "setup", 0)
            frames[i] = [{"filename": "freed in", "line": 0, "name": f"iteration {it} {phase}"}, *frames[i]]
    born = {ev.storage: i for i, ev in enumerate(events) if ev.action == "alloc"}
    trace: list[dict[str, Any]] = []
    for a in history.actions:
        entry: dict[str, Any] = {"action": a.action, "addr": a.addr, "size": a.size, "stream": 0}
        if a.action == "oom":
            entry["device_free"] = a.device_free
        entry["frames"] = frames[a.event]
        trace.append(entry)
    segments = []
    for seg in history.segments:
        blocks: list[dict[str, Any]] = []
        for b in seg.blocks:
            if b.storage is None:
                blocks.append(
                    {"address": b.address, "size": b.size, "requested_size": 0, "state": "inactive", "frames": []}
                )
            else:
                i = born[b.storage]
                blocks.append(
                    {
                        "address": b.address,
                        "size": b.size,
                        "requested_size": events[i].nbytes,
                        "state": "active_allocated",
                        "frames": frames[i],
                    }
                )
        active = [b for b in blocks if b["state"] == "active_allocated"]
        segments.append(
            {
                "device": 0,
                "address": seg.address,
                "total_size": seg.size,
                "allocated_size": sum(b["size"] for b in active),
                "active_size": sum(b["size"] for b in active),
                "requested_size": sum(b["requested_size"] for b in active),
                "stream": 0,
                "segment_type": "small" if seg.small else "large",
                "segment_pool_id": (0, 0),
                "is_expandable": seg.expandable,
                "frames": [],
                "blocks": blocks,
            }
        )
    return {
        "segments": segments,
        "device_traces": [trace],
        # not read by PyTorch's viewers: says where the file came from and what batchfit found
        "batchfit": {
            "schema_version": SCHEMA_VERSION,
            "simulated": True,
            "model": estimate.model,
            "batch_size": estimate.batch_size,
            "card": estimate.card,
            "optimizer": estimate.optimizer,
            "precision": estimate.precision,
            "taken_at": at,
            "allocator_settings": str(estimate.allocator.config) if estimate.allocator else "default",
            "peak_allocated_bytes": peak_allocated,
            "peak_reserved_bytes": peak_reserved,
            # a step that does not fit is written as replayed without the card's limit, what it
            # would need (the estimate's numbers), not as PyTorch's OOM would cut it short
            "fits": estimate.fits,
        },
    }


def check_snapshot_path(path: str | Path) -> Path:
    """The path to write a snapshot to; the pickle suffix is what PyTorch's tools expect."""
    return check_suffix(
        path,
        (".pickle", ".pkl"),
        tr("cannot write a memory snapshot to {path}: it is a pickle (as torch.cuda.memory._dump_snapshot writes)"),
        tr("name the file FILE.pickle, e.g. step.pickle"),
    )


def write_snapshot(estimate: StepEstimate, path: str | Path, *, at: At = "end") -> Path:
    """Write :func:`snapshot` as a pickle, as ``torch.cuda.memory._dump_snapshot(path)`` does.

    Open it at https://pytorch.org/memory_viz, or offline with
    ``python -m torch.cuda._memory_viz trace_plot FILE.pickle -o FILE.html``.
    """
    out = check_snapshot_path(path)
    data = snapshot(estimate, at=at)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        pickle.dump(data, f)
    return out


__all__ = ["check_device", "check_snapshot_path", "snapshot", "write_snapshot"]
