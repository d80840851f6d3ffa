"""Invariants of the allocator model on random timelines (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from batchfit._allocator import AllocatorConfig, simulate
from batchfit._events import Event

CONFIGS = [
    AllocatorConfig(),
    AllocatorConfig(expandable_segments=True),
    AllocatorConfig.parse("max_split_size_mb:24"),
    AllocatorConfig.parse("roundup_power2_divisions:4"),
]

# sizes across every regime: tiny, small pool, 1-10 MiB, large, oversize
SIZES = st.one_of(
    st.integers(0, 4096),
    st.integers(4096, 1 << 20),
    st.integers(1 << 20, 10 << 20),
    st.integers(10 << 20, 80 << 20),
)


@st.composite
def timelines(draw: st.DrawFn) -> list[Event]:
    events: list[Event] = []
    live: list[int] = []
    next_id = 0
    for _ in range(draw(st.integers(1, 60))):
        if live and draw(st.booleans()):
            storage = live.pop(draw(st.integers(0, len(live) - 1)))
            events.append(Event(len(events), "free", storage, 0, "temporaries", "", "forward", 1))
        else:
            next_id += 1
            live.append(next_id)
            events.append(Event(len(events), "alloc", next_id, draw(SIZES), "temporaries", "", "forward", 1))
    return events


@settings(max_examples=150, deadline=None)
@given(timelines(), st.sampled_from(CONFIGS))
def test_allocated_never_exceeds_reserved_nor_falls_below_live_bytes(events: list[Event], cfg: AllocatorConfig) -> None:
    result = simulate(events, cfg)
    assert result.series is not None
    sizes = {ev.storage: ev.nbytes for ev in events if ev.action == "alloc"}
    live: set[int] = set()
    for ev, allocated, reserved in zip(
        events, result.series.allocated_bytes, result.series.reserved_bytes, strict=False
    ):
        if ev.action == "alloc":
            live.add(ev.storage)
        else:
            live.discard(ev.storage)
        live_rounded = sum(cfg.round_size(sizes[s]) for s in live if sizes[s] > 0)
        assert live_rounded <= allocated <= reserved
    assert result.peak_allocated_bytes <= result.peak_reserved_bytes
    assert result.peak_allocated_bytes == max(result.series.allocated_bytes, default=0)
    assert sum(result.allocated_by_category_bytes.values()) == result.peak_allocated_bytes


@settings(max_examples=60, deadline=None)
@given(timelines(), st.sampled_from(CONFIGS))
def test_replay_is_deterministic(events: list[Event], cfg: AllocatorConfig) -> None:
    assert simulate(events, cfg).to_dict() == simulate(events, cfg).to_dict()


@settings(max_examples=80, deadline=None)
@given(timelines(), st.sampled_from(CONFIGS), st.integers(40 << 20, 400 << 20))
def test_a_device_limit_is_never_exceeded(events: list[Event], cfg: AllocatorConfig, limit: int) -> None:
    result = simulate(events, cfg, device_limit_bytes=limit)
    assert result.peak_reserved_bytes <= limit
    unlimited = simulate(events, cfg)
    if unlimited.peak_reserved_bytes <= limit:
        assert not result.oom  # what fits without a limit fits under it


@settings(max_examples=60, deadline=None)
@given(timelines(), st.sampled_from(CONFIGS), st.integers(40 << 20, 400 << 20))
def test_the_replay_without_breakdown_answers_the_same(events: list[Event], cfg: AllocatorConfig, limit: int) -> None:
    full = simulate(events, cfg, device_limit_bytes=limit, record_series=False).to_dict()
    quick = simulate(events, cfg, device_limit_bytes=limit, record_series=False, breakdown=False).to_dict()
    assert quick.pop("allocated_by_category_bytes") == {}
    full.pop("allocated_by_category_bytes")
    assert quick == full
