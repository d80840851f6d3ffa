"""The caching-allocator model against outcomes derived by hand from CUDACachingAllocator.cpp.

Every expected number is worked out in the comments from the source's rules (round_size,
get_pool, get_allocation_size, get_free_block, should_split, free_block, alloc_block,
release_available_cached_blocks, release_cached_blocks, the expandable-segment functions).
"""

from __future__ import annotations

import pytest

from batchfit._allocator import AllocatorConfig, AllocatorResult, simulate
from batchfit._errors import BatchfitError, ExitCode
from batchfit._events import Event

MiB = 1024 * 1024


class Trace:
    """Builds a timeline: ``a = t.alloc(nbytes)``, ``t.free(a)``."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._next = 0
        self._cat: dict[int, str] = {}

    def alloc(self, nbytes: int, category: str = "activations") -> int:
        self._next += 1
        self._cat[self._next] = category
        self.events.append(Event(len(self.events), "alloc", self._next, nbytes, category, "", "forward", 1))
        return self._next

    def free(self, storage: int) -> None:
        self.events.append(Event(len(self.events), "free", storage, 0, self._cat[storage], "", "backward", 1))

    def run(self, config: AllocatorConfig | None = None, **kwargs: object) -> AllocatorResult:
        return simulate(self.events, config, **kwargs)  # type: ignore[arg-type]


# -- rounding and pools ---------------------------------------------------------------------------


def test_requests_round_up_to_512_bytes_in_the_small_pool() -> None:
    t = Trace()
    t.alloc(1)  # < kMinBlockSize -> 512; <= 1 MiB -> small pool, new 2 MiB segment
    t.alloc(513)  # -> 1024, carved from the same segment (small blocks split at >= 512 B left)
    r = t.run()
    assert r.peak_allocated_bytes == 512 + 1024
    assert r.peak_reserved_bytes == 2 * MiB
    assert r.peak_segments == 1


def test_one_mib_is_small_and_one_byte_more_is_large() -> None:
    t = Trace()
    t.alloc(MiB)  # exactly kSmallSize: small pool, 2 MiB segment
    t.alloc(MiB + 1)  # 1 MiB + 512 after rounding: large pool, 1..10 MiB -> a 20 MiB segment
    r = t.run()
    assert r.peak_allocated_bytes == MiB + (MiB + 512)
    assert r.peak_reserved_bytes == 2 * MiB + 20 * MiB
    assert r.peak_segments == 2


def test_one_to_ten_mib_requests_share_20_mib_segments() -> None:
    t = Trace()
    for _ in range(5):
        t.alloc(4 * MiB)  # 20 MiB segment split 4 | 16, 4 | 12, ... the fifth takes the last 4 MiB whole
    first = t.run()
    assert first.peak_reserved_bytes == 20 * MiB
    t.alloc(4 * MiB)  # nothing cached fits: a second 20 MiB segment
    r = t.run()
    assert r.peak_reserved_bytes == 40 * MiB
    assert r.peak_allocated_bytes == 24 * MiB
    assert r.num_device_alloc == 2


def test_requests_of_ten_mib_and_more_round_to_2_mib_segments() -> None:
    t = Trace()
    t.alloc(10 * MiB)  # not < kMinLargeAlloc: segment = 10 MiB rounded to 2 MiB = 10 MiB
    t.alloc(11 * MiB + 1)  # 11 MiB + 512 -> 12 MiB segment; 1 MiB - 512 left is not > 1 MiB: no split
    r = t.run()
    assert r.peak_reserved_bytes == 10 * MiB + 12 * MiB
    # allocated counts the whole unsplit block (block->size), not the request
    assert r.peak_allocated_bytes == 10 * MiB + 12 * MiB


def test_large_blocks_split_only_when_more_than_1_mib_remains() -> None:
    t = Trace()
    t.alloc(19 * MiB)  # >= 10 MiB: a segment of 19 MiB rounded up to 2 MiB = 20 MiB
    r = t.run()
    # 1 MiB left is not > kSmallSize: no split, the whole 20 MiB block is the allocation
    assert r.peak_allocated_bytes == 20 * MiB
    t2 = Trace()
    t2.alloc(int(18.5 * MiB))  # 20 MiB segment, 1.5 MiB left > 1 MiB: split
    t2.alloc(MiB + 512 * 1024)  # 1.5 MiB: best fit is exactly the remainder
    r2 = t2.run()
    assert r2.peak_allocated_bytes == 20 * MiB
    assert r2.peak_reserved_bytes == 20 * MiB


# -- reuse, coalescing, fragmentation --------------------------------------------------------------


def test_freed_neighbours_coalesce() -> None:
    t = Trace()
    a, b, c, d, e = (t.alloc(4 * MiB) for _ in range(5))  # one 20 MiB segment, full
    t.free(b)
    t.free(c)  # b and c merge into one free 8 MiB block
    t.alloc(8 * MiB)  # fits the merged block exactly: no new segment
    r = t.run()
    assert r.peak_reserved_bytes == 20 * MiB
    assert r.num_device_alloc == 1
    assert r.final_allocated_bytes == 20 * MiB
    del a, d, e


def test_fragmentation_grows_reserved_while_allocated_does_not() -> None:
    t = Trace()
    blocks = [t.alloc(4 * MiB) for _ in range(5)]  # 20 MiB segment, full: allocated peak 20 MiB
    for i in (0, 2, 4):
        t.free(blocks[i])  # three separate 4 MiB holes: 12 MiB free, none of it contiguous
    t.alloc(6 * MiB)  # no hole fits 6 MiB: a new 20 MiB segment although only 14 MiB are in use
    r = t.run()
    assert r.peak_allocated_bytes == 20 * MiB
    assert r.final_allocated_bytes == 8 * MiB + 6 * MiB
    assert r.peak_reserved_bytes == 40 * MiB
    assert r.peak_reserved_seq == len(t.events) - 1


def test_best_fit_takes_the_smallest_block_that_fits() -> None:
    t = Trace()
    big = t.alloc(40 * MiB)  # its own 40 MiB segment
    small = t.alloc(12 * MiB)  # its own 12 MiB segment
    t.free(big)
    t.free(small)
    t.alloc(11 * MiB)  # 11 MiB: the 12 MiB block fits best (1 MiB left: no split)
    r = t.run()
    assert r.final_allocated_bytes == 12 * MiB
    assert r.peak_reserved_bytes == 52 * MiB


# -- settings --------------------------------------------------------------------------------------


def test_max_split_size_keeps_oversize_blocks_for_oversize_requests() -> None:
    def trace() -> Trace:
        t = Trace()
        t.free(t.alloc(50 * MiB))  # a cached 50 MiB segment
        t.alloc(30 * MiB)
        return t

    # unlimited: the 30 MiB request reuses the 50 MiB block (split: 20 MiB left > 1 MiB)
    assert trace().run().peak_reserved_bytes == 50 * MiB
    # max_split_size_mb:40: a request below 40 MiB may not take a block of 40 MiB or more
    limited = trace().run(AllocatorConfig.parse("max_split_size_mb:40"))
    assert limited.peak_reserved_bytes == 80 * MiB


def test_oversize_requests_take_oversize_blocks_only_within_the_rounding_limit() -> None:
    cfg = AllocatorConfig.parse("max_split_size_mb:40")
    t = Trace()
    t.free(t.alloc(50 * MiB))
    t.alloc(45 * MiB)  # 50 < 45 + 20 (max_non_split_rounding = 20 MiB): reused whole, not split
    r = t.run(cfg)
    assert r.peak_reserved_bytes == 50 * MiB
    assert r.final_allocated_bytes == 50 * MiB
    t2 = Trace()
    t2.free(t2.alloc(62 * MiB))
    t2.alloc(41 * MiB)  # 62 >= 41 + 20: refused, a new 42 MiB segment
    assert t2.run(cfg).peak_reserved_bytes == (62 + 42) * MiB


def test_roundup_power2_divisions_rounds_to_the_next_division() -> None:
    cfg = AllocatorConfig.parse("roundup_power2_divisions:4")
    t = Trace()
    t.alloc(1_200_000)
    # [1 MiB, 2 MiB) in 4 steps of 256 KiB: 1,200,000 -> 1,310,720 (large pool, 20 MiB segment)
    assert t.run(cfg).peak_allocated_bytes == 1_310_720
    # without divisions: 512 B multiples, 2,344 x 512
    assert t.run().peak_allocated_bytes == 1_200_128


def test_roundup_divisions_per_interval() -> None:
    cfg = AllocatorConfig.parse("roundup_power2_divisions:[1:2,>:8]")
    # 1 MiB interval: 2 divisions -> 1.2e6 rounds to 1.5 MiB; 2 MiB and up: 8 divisions of 2 MiB
    assert cfg.round_size(1_200_000) == 3 * MiB // 2
    assert cfg.round_size(2 * MiB + 1) == 2 * MiB + 256 * 1024
    assert cfg.round_size(1000) == 1024  # below 512 x divisions: plain 512 B rounding


def test_garbage_collection_frees_old_segments_above_the_threshold() -> None:
    def trace() -> Trace:
        t = Trace()
        a, b = t.alloc(30 * MiB), t.alloc(30 * MiB)
        t.free(a)
        t.free(b)
        t.alloc(40 * MiB)  # fits neither cached block
        return t

    # no fraction set: gc off, both 30 MiB segments stay cached
    assert trace().run(AllocatorConfig.parse("garbage_collection_threshold:0.5")).final_reserved_bytes == 100 * MiB
    # allowed 100 MiB, threshold 50 MiB: 60 MiB reserved > 50, both blocks (age 1 >= mean 1) go
    r = trace().run(AllocatorConfig.parse("garbage_collection_threshold:0.5"), allowed_bytes=100 * MiB)
    assert r.final_reserved_bytes == 40 * MiB
    assert r.num_device_free == 2


# -- expandable segments ---------------------------------------------------------------------------


def test_expandable_segments_grow_instead_of_adding_segments() -> None:
    t = Trace()
    t.free(t.alloc(30 * MiB))
    t.alloc(31 * MiB)
    # classic: 30 MiB segment cached, 31 MiB does not fit: a new 32 MiB segment
    assert t.run().peak_reserved_bytes == 62 * MiB
    # expandable: 30 MiB maps two 20 MiB pages (40 MiB); freed, the 40 MiB block serves 31 MiB
    r = t.run(AllocatorConfig.parse("expandable_segments:True"))
    assert r.peak_reserved_bytes == 40 * MiB
    assert r.final_allocated_bytes == 31 * MiB  # expandable blocks split at any 512 B remainder


def test_expandable_segments_map_small_pages_for_the_small_pool() -> None:
    t = Trace()
    t.alloc(100)
    t.alloc(3 * MiB // 4)
    r = t.run(AllocatorConfig(expandable_segments=True))
    assert r.peak_reserved_bytes == 2 * MiB  # one 2 MiB page holds both
    assert r.peak_allocated_bytes == 512 + 3 * MiB // 4


def test_expandable_segments_unmap_free_pages_before_failing() -> None:
    t = Trace()
    small = [t.alloc(MiB) for _ in range(10)]  # small pool pages: 10 MiB mapped
    for s in small:
        t.free(s)
    t.alloc(12 * MiB)  # large pool needs a 20 MiB page: 10 + 20 > 24 -> unmap the 10 MiB, retry
    r = t.run(AllocatorConfig(expandable_segments=True), device_limit_bytes=24 * MiB)
    assert not r.oom
    assert r.num_alloc_retries == 1
    assert r.final_reserved_bytes == 20 * MiB


# -- limits: free-and-retry, OOM ---------------------------------------------------------------------


def test_cached_segments_are_released_and_the_allocation_retried() -> None:
    t = Trace()
    t.free(t.alloc(20 * MiB))  # cached 20 MiB segment
    t.alloc(30 * MiB)  # 20 + 30 > 40: release the cached segment, retry: 30 fits
    r = t.run(device_limit_bytes=40 * MiB)
    assert not r.oom
    assert r.num_alloc_retries == 1
    assert r.num_device_free == 1
    assert r.final_reserved_bytes == 30 * MiB
    assert r.peak_reserved_bytes == 30 * MiB


def test_max_split_size_releases_oversize_blocks_first() -> None:
    t = Trace()
    t.free(t.alloc(50 * MiB))  # oversize cached block (>= 40 MiB)
    t.alloc(30 * MiB)  # may not use it; 50 + 30 > 70: release_available_cached_blocks frees it
    r = t.run(AllocatorConfig.parse("max_split_size_mb:40"), device_limit_bytes=70 * MiB)
    assert not r.oom
    assert r.num_alloc_retries == 0  # served before the release-everything retry
    assert r.num_device_free == 1
    assert r.final_reserved_bytes == 30 * MiB


def test_out_of_memory_stops_the_replay_and_says_where() -> None:
    t = Trace()
    t.alloc(30 * MiB)
    t.alloc(20 * MiB)  # 30 live + 20 > 40 and nothing cached to release
    t.alloc(MiB)
    r = t.run(device_limit_bytes=40 * MiB)
    assert r.oom
    assert r.oom_seq == 1
    assert r.oom_request_bytes == 20 * MiB
    assert r.num_events == 2  # the replay stopped at the failing request
    assert r.peak_allocated_bytes == 30 * MiB
    assert "OUT OF MEMORY" in str(r)


# -- bookkeeping -----------------------------------------------------------------------------------


def test_breakdown_at_the_peak_sums_to_the_peak_and_includes_workspaces() -> None:
    t = Trace()
    p = t.alloc(4000, "parameters")  # 4096
    w = t.alloc(8_519_680, "workspaces")  # cuBLAS workspace: 1..10 MiB -> 20 MiB segment, split
    x = t.alloc(100, "temporaries")  # 512
    t.free(x)
    t.alloc(1000, "activations")  # 1024: a new peak, 512 B above the one at event 2
    r = t.run()
    assert r.peak_allocated_bytes == 4096 + 8_519_680 + 1024
    assert r.peak_allocated_seq == 4
    cats = r.allocated_by_category_bytes
    assert cats["workspaces"] == 8_519_680
    assert cats["parameters"] == 4096
    assert cats["temporaries"] == 0
    assert sum(cats.values()) == r.peak_allocated_bytes
    del p, w


def test_zero_byte_storages_allocate_nothing() -> None:
    t = Trace()
    z = t.alloc(0)
    t.free(z)
    r = t.run()
    assert r.peak_allocated_bytes == 0
    assert r.peak_reserved_bytes == 0
    assert r.num_events == 2


def test_series_tracks_every_event() -> None:
    t = Trace()
    a = t.alloc(MiB)
    t.free(a)
    r = t.run()
    assert r.series is not None
    assert r.series.seq == [0, 1]
    assert r.series.allocated_bytes == [MiB, 0]
    assert r.series.reserved_bytes == [2 * MiB, 2 * MiB]  # freed memory stays cached
    assert t.run(record_series=False).series is None


def test_to_dict_has_a_schema_version_and_round_trips_numbers() -> None:
    t = Trace()
    t.alloc(MiB)
    d = t.run().to_dict()
    assert d["schema_version"] == 1
    assert d["peak_reserved_bytes"] == 2 * MiB
    assert d["config"]["conf"] == ""


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([Event(0, "free", 9, 0, "activations", "", "forward", 1)], "not alive"),
        (
            [Event(0, "alloc", 1, 8, "inputs", "", "setup", 0), Event(1, "alloc", 1, 8, "inputs", "", "setup", 0)],
            "already alive",
        ),
    ],
)
def test_malformed_timelines_are_user_errors(events: list[Event], message: str) -> None:
    with pytest.raises(BatchfitError, match=message):
        simulate(events)


def test_the_async_backend_is_not_modelled() -> None:
    with pytest.raises(BatchfitError) as info:
        simulate([], AllocatorConfig.parse("backend:cudaMallocAsync"))
    assert info.value.exit_code == ExitCode.UNSUPPORTED
