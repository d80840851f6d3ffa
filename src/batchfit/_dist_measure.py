"""Ground truth for the distributed estimate: the reference step run for real by N CPU processes
(gloo on 127.0.0.1), each rank's peak host memory measured with the profiler.

Counted like the single-process CPU truth (``_measure._CpuWindow``): bytes alive when the window
opens plus the highest running sum of allocations inside it, with two differences that gloo
forces (docs/distributed.md): allocations are counted on every thread, and what is allocated
inside a ``c10d::`` op (gloo's own scratch copies, which NCCL on a GPU does not make) is left out
together with its free.

>>> # measure_ranks("mlp", 8, make_spec("cpu", "adam"), DistSpec(2, strategy="fsdp"), dataset="mnist")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._distributed import DistSpec, wrap_model
from ._errors import BatchfitError
from ._i18n import tr
from ._step import Batch, StepSpec, batch_inputs, batch_maker, label_choice, run_step, unique_trainable


@dataclass
class RankMeasurement:
    rank: int
    peak_allocated_bytes: int
    before_window_bytes: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_ranks(
    model: str,
    batch_size: int,
    spec: StepSpec,
    dists: list[DistSpec],
    *,
    dataset: str | None = None,
    input_size: Any = None,
    timeout: float = 600.0,
    repeats: int = 2,
) -> list[list[RankMeasurement]]:
    """Run the step on ``world_size`` gloo processes for each setting in ``dists`` and return each
    setting's measurement per rank. The processes of one world size start once and run all its
    settings; several world sizes run at the same time. Each setting runs ``repeats`` times in the
    same processes and the lowest count is kept: gloo's worker threads drop the last reference to
    some buffers, and the profiler does not see frees on those threads, so a count can only be too
    high (docs/distributed.md).

    ``model`` is a registry name or ``file.py:NAME`` (each process builds its own copy)."""
    import torch.multiprocessing as mp

    if spec.device != "cpu":
        raise BatchfitError(
            tr("the distributed ground truth runs on CPU processes (gloo)"), hint=tr("use `device='cpu'`")
        )
    worlds = sorted({d.world_size for d in dists})
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[tuple[int, int, Any]] = []
        for world in worlds:
            group = [d for d in dists if d.world_size == world]
            port = _free_port()
            for rank in range(world):
                out = os.path.join(tmp, f"{world}-{rank}.json")
                args = (rank, port, model, dataset, input_size, batch_size, spec, group, out, repeats)
                p = ctx.Process(target=_child, args=args)
                p.start()
                procs.append((world, rank, p))
        for _, _, p in procs:
            p.join(timeout)
        failed = [f"world {w} rank {r}" for w, r, p in procs if p.exitcode != 0]
        for _, _, p in procs:
            if p.is_alive():
                p.kill()
        if failed:
            raise BatchfitError(
                tr("the gloo run failed ({names})", names=", ".join(failed)), hint=tr("rerun with --debug")
            )
        measured: dict[int, list[list[RankMeasurement]]] = {}
        for world in worlds:
            for rank in range(world):
                with open(os.path.join(tmp, f"{world}-{rank}.json")) as f:
                    measured.setdefault(world, []).append([RankMeasurement(**m) for m in json.load(f)])
    out_all = []
    seen: dict[int, int] = {}
    for d in dists:
        i = seen.get(d.world_size, 0)
        seen[d.world_size] = i + 1
        out_all.append([measured[d.world_size][r][i] for r in range(d.world_size)])
    return out_all


def _child(
    rank: int,
    port: int,
    model_name: str,
    dataset: str | None,
    input_size: Any,
    batch_size: int,
    spec: StepSpec,
    dists: list[DistSpec],
    out: str,
    repeats: int,
) -> None:
    import torch.distributed as tdist

    from ._models import load_workload

    torch.set_num_threads(spec.threads or 1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dists[0].world_size)
    try:
        workload = load_workload(model_name, input_size, dataset=dataset)
        results = []
        for dist in dists:
            runs = []
            for _ in range(repeats):
                tdist.barrier()
                gc.collect()
                runs.append(_measure_rank(workload, batch_size, spec, dist, rank))
            # a free the profiler cannot see only ever adds bytes: the lowest count is the true one
            results.append(dataclasses.asdict(min(runs, key=lambda m: m.peak_allocated_bytes)))
        with open(out, "w") as f:
            json.dump(results, f)
    finally:
        tdist.destroy_process_group()


def _init_values(model: nn.Module) -> None:
    """Small random parameters and valid buffers (values only matter for numerics)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name.rsplit(".", 1)[-1] == "running_var":
                b.fill_(1.0)
            else:
                b.zero_()


def _measure_rank(workload: Any, batch_size: int, spec: StepSpec, dist: DistSpec, rank: int) -> RankMeasurement:
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = copy.deepcopy(workload.model).to("meta")
        if dist.strategy.startswith("fsdp"):
            wrap_model(model, dist, "cpu")
            model.to_empty(device=device)
            _init_values(model)
            run_model: nn.Module = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            model.to_empty(device=device)
            _init_values(model)
            off_by_default: dict[str, Any] = {} if dist.broadcast_buffers else {"broadcast_buffers": False}
            run_model = DistributedDataParallel(
                model,
                bucket_cap_mb=dist.bucket_cap_mb,
                gradient_as_bucket_view=dist.gradient_as_bucket_view,
                static_graph=dist.static_graph,
                # only when off: torch 2.14 warns that the argument is deprecated (forward_sync_buffers)
                **off_by_default,
            )
        params = unique_trainable(model)
        if dist.strategy == "zero1":
            from ._distributed import _zero_optimizer

            optimizer = _zero_optimizer(params, spec, device)
        else:
            optimizer = spec.optimizer.build(params, device_type="cpu")
        inputs = batch_inputs(workload, batch_size, device, None, values=True)
        choice = label_choice(run_model, inputs, spec)
        labels = choice.labels()
        del choice, params
        batch = Batch(inputs, labels)
        del inputs, labels
        with _window():
            run_step(
                run_model,
                batch,
                spec,
                optimizer,
                backward=lambda loss: loss.backward(),
                new_batch=batch_maker(workload, device, None, values=True),
            )
            del batch
    peak, before = _peak(prof)
    if os.environ.get("BATCHFIT_DEBUG_GLOO"):
        print("DEBUG", rank, dist.describe(), peak, before, _peak(prof, "main"), flush=True)
    return RankMeasurement(rank, peak, before)


@contextlib.contextmanager
def _window() -> Iterator[None]:
    with torch.profiler.record_function("batchfit::window"):
        yield


def _peak(prof: Any, threads: str = "all") -> tuple[int, int]:
    """(peak, bytes alive at the window's start) from the profiler's allocation records on every
    thread, leaving out blocks allocated inside a ``c10d::`` op (and their frees, matched by address)."""
    from torch._C._profiler import _EventType

    tree = prof.profiler.kineto_results.experimental_event_tree()
    window: tuple[int, int] | None = None
    allocs: list[tuple[int, int, int, int, bool]] = []  # (time, bytes, address, thread, inside a collective)
    stack = [(node, False) for node in tree]
    while stack:
        node, inside = stack.pop()
        name = node.name
        if name == "batchfit::window":
            window = (node.start_time_ns, node.end_time_ns)
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            if fields.device.type == "cpu":
                allocs.append((node.start_time_ns, fields.alloc_size, fields.ptr, node.start_tid, inside))
        inside = inside or name.startswith("c10d::")
        stack.extend((child, inside) for child in node.children)
    assert window is not None
    begin, end = window
    allocs.sort(key=lambda a: a[0])
    main = allocs[0][3] if allocs else 0
    skipped: set[int] = set()
    live: dict[int, int] = {}  # address -> bytes of a counted block not yet seen freed
    running = before = peak = 0
    for t, n, ptr, tid, inside in allocs:
        if n > 0 and ptr in live:
            # the block there was freed on a thread the profiler does not record (a gloo worker
            # dropped the last reference): its free is inferred when its address is reused
            running -= live.pop(ptr)
        if n > 0 and (inside or (threads == "main" and tid != main)):
            skipped.add(ptr)
            continue
        if n < 0 and ptr in skipped:
            skipped.discard(ptr)
            continue
        if n > 0:
            live[ptr] = n
        elif live.pop(ptr, None) is None:
            continue  # a block allocated before the profiler started
        running += n
        if t < begin:
            before = running
        elif t <= end:
            peak = max(peak, running)
    return max(peak, before), before
