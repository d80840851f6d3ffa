"""The gloo ground truth's accounting (``_dist_measure._peak``) on hand-built allocation records:
which blocks with no recorded free are counted freed, and when (docs/distributed.md, ground truth)."""

from __future__ import annotations

import pytest
import torch

from batchfit._dist_measure import _Block, _peak, _Records

WINDOW = (100, 200)


def _records(*blocks: _Block) -> _Records:
    return _Records(WINDOW, list(blocks))


def test_recorded_frees_give_the_running_peak_and_the_bytes_alive_at_the_window() -> None:
    params = _Block(ptr=1, born=10, size=1000, inside=False)  # alive throughout
    setup = _Block(ptr=2, born=20, size=50, inside=False, freed=30)
    act = _Block(ptr=3, born=120, size=300, inside=False, freed=150)
    scratch = _Block(ptr=4, born=130, size=10_000, inside=True, freed=140)  # gloo's own, left out
    grad = _Block(ptr=5, born=140, size=200, inside=False)
    assert _peak(_records(params, setup, act, scratch, grad)) == (1500, 1000)


def test_a_collectives_block_freed_on_a_gloo_thread_is_freed_at_its_last_use() -> None:
    # the setup's broadcast copy: no recorded free, its address taken again inside the window
    flat = _Block(ptr=7, born=20, size=384, inside=False, reused=150, last_use=60, collective=True)
    again = _Block(ptr=7, born=150, size=16, inside=False, freed=160)
    assert _peak(_records(flat, again)) == (16, 0)
    # not reused: the run goes on through the teardown, so it was freed too, at its last use
    lost = _Block(ptr=8, born=120, size=4, inside=False, last_use=130, collective=True)
    act = _Block(ptr=9, born=140, size=100, inside=False, freed=180)
    assert _peak(_records(lost, act)) == (100, 0)


def test_gloos_own_scratch_of_the_same_size_does_not_keep_a_block_alive() -> None:
    """A block allocated inside a ``gloo:`` work item is left out, its free unrecorded too; a block
    of the step of the same size with no recorded free is still freed at its last use (an earlier
    rule matched unfreed blocks across runs by size, and gloo's 14,880-B all-gather scratch kept
    FSDP2's same-sized buffer alive: +14,880 B in two runs of three on the tail)."""
    scratch = _Block(ptr=1, born=110, size=14_880, inside=True, collective=True)
    buffer = _Block(ptr=2, born=120, size=14_880, inside=False, last_use=130, collective=True)
    act = _Block(ptr=3, born=140, size=100, inside=False, freed=180)
    assert _peak(_records(scratch, buffer, act)) == (14_880, 0)


def test_a_block_no_collective_took_is_freed_where_its_address_is_reused_or_never() -> None:
    # only a collective's tensor is known to be held by a gloo work item; any other missing free is
    # placed as late as the records allow, so a count can only be too high
    other = _Block(ptr=3, born=110, size=40, inside=False, reused=170, last_use=115)
    later = _Block(ptr=3, born=170, size=8, inside=False, freed=175)
    big = _Block(ptr=4, born=160, size=100, inside=False, freed=165)
    assert _peak(_records(other, later, big)) == (140, 0)
    never = _Block(ptr=5, born=120, size=40, inside=False, last_use=125)
    assert _peak(_records(never, big)) == (140, 0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 renames all_gather_into_tensor
def test_gloos_worker_scratch_is_left_out() -> None:
    """A real gloo all-gather (a group of one, in this process): the work item on gloo's worker
    thread allocates a flat output of the gathered size (ProcessGroupGloo.cpp
    ``AsyncAllgatherWork::allgather``: ``newLikeFlat(outputs[0])``) under its ``gloo:all_gather``
    record and frees it there; it is gloo's scratch, like the copies inside the ``c10d::`` op, and
    the step holds only its own output (on torch 2.15 it made FSDP2's inference truth 10,976 B high)."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from batchfit._dist_measure import _free_port, _window
    from batchfit._dist_measure import _records as records_of

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        shard = torch.zeros(1000)
        activities = [ProfilerActivity.CPU]
        with profile(activities=activities, profile_memory=True, record_shapes=True) as prof, _window():
            out = torch.empty(1000)
            dist.all_gather_into_tensor(out, shard)
            del out
    finally:
        dist.destroy_process_group()
    records = records_of(prof)
    worker = [b for b in records.blocks if b.size == 4000 and b.inside]
    assert worker, "gloo allocated no scratch of the gathered size: the test no longer sees what it checks"
    assert _peak(records) == (4000, 0)
