"""The gloo ground truth's accounting (``_dist_measure._peak``) on hand-built allocation records:
which blocks with no recorded free are counted freed, and when (docs/distributed.md, ground truth)."""

from __future__ import annotations

from collections import Counter

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
    assert _peak(_records(params, setup, act, scratch, grad), Counter()) == (1500, 1000)


def test_a_collectives_block_freed_on_a_gloo_thread_is_freed_at_its_last_use() -> None:
    # the setup's broadcast copy: no recorded free, its address taken again inside the window
    flat = _Block(ptr=7, born=20, size=384, inside=False, reused=150, last_use=60, collective=True)
    again = _Block(ptr=7, born=150, size=16, inside=False, freed=160)
    assert _peak(_records(flat, again), Counter()) == (16, 0)
    # not reused, and not alive after the teardown in every run (kept): freed at its last use too
    lost = _Block(ptr=8, born=120, size=4, inside=False, last_use=130, collective=True)
    act = _Block(ptr=9, born=140, size=100, inside=False, freed=180)
    assert _peak(_records(lost, act), Counter()) == (100, 0)
    # the same block when every run keeps one of its size: alive to the end
    assert _peak(_records(lost, act), Counter({4: 1})) == (104, 0)


def test_kept_blocks_are_the_latest_used_of_their_size() -> None:
    old = _Block(ptr=1, born=10, size=64, inside=False, last_use=50, collective=True)
    new = _Block(ptr=2, born=150, size=64, inside=False, last_use=190, collective=True)
    # one block of 64 bytes outlives the teardown in every run: the later one; the older was freed
    assert _peak(_records(old, new), Counter({64: 1})) == (64, 0)
    assert _peak(_records(old, new), Counter({64: 2})) == (128, 64)


def test_a_block_no_collective_took_is_freed_where_its_address_is_reused_or_never() -> None:
    # only a collective's tensor is known to be held by a gloo work item; any other missing free is
    # placed as late as the records allow, so a count can only be too high
    other = _Block(ptr=3, born=110, size=40, inside=False, reused=170, last_use=115)
    later = _Block(ptr=3, born=170, size=8, inside=False, freed=175)
    big = _Block(ptr=4, born=160, size=100, inside=False, freed=165)
    assert _peak(_records(other, later, big), Counter()) == (140, 0)
    never = _Block(ptr=5, born=120, size=40, inside=False, last_use=125)
    assert _peak(_records(never, big), Counter()) == (140, 0)
