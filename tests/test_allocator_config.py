"""PYTORCH_CUDA_ALLOC_CONF parsing: same keys, same syntax and checks as c10's AllocatorConfig."""

from __future__ import annotations

import pytest

from batchfit._allocator import AllocatorConfig, with_settings
from batchfit._errors import BatchfitError

MiB = 1024 * 1024


def test_defaults_match_pytorch() -> None:
    cfg = AllocatorConfig()
    assert cfg.max_split_size_bytes is None  # unlimited
    assert cfg.non_split_rounding_bytes == 20 * MiB  # kLargeBuffer
    assert cfg.large_segment_size_bytes == 20 * MiB
    assert cfg.roundup_power2_divisions == (0,) * 16
    assert not cfg.expandable_segments
    assert AllocatorConfig.parse("") == cfg


def test_parses_every_memory_setting() -> None:
    cfg = AllocatorConfig.parse(
        "max_split_size_mb:40, max_non_split_rounding_mb:30,garbage_collection_threshold:0.5,"
        "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1],expandable_segments:True,"
        "pinned_use_background_threads:True,release_lock_on_cudamalloc:False,backend:native"
    )
    assert cfg.max_split_size_bytes == 40 * MiB
    assert cfg.non_split_rounding_bytes == 30 * MiB
    assert cfg.garbage_collection_threshold == 0.5
    assert cfg.expandable_segments


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        # the expectations of PyTorch's own test (c10/test/core/AllocatorConfig_test.cpp)
        (
            "roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]",
            {32: 8, 64: 8, 128: 2, 256: 4, 512: 2, 1024: 4, 2048: 1, 4096: 1, 8192: 1},
        ),
        (
            "roundup_power2_divisions:[128:8,256:16,512:1,2048:8,>:2]",
            {64: 8, 128: 8, 256: 16, 512: 1, 1024: 0, 2048: 8, 4096: 2},
        ),
        ("roundup_power2_divisions:4", {64: 4, 256: 4, 2048: 4}),
    ],
)
def test_roundup_divisions_per_interval_as_pytorch_tests_them(conf: str, expected: dict[int, int]) -> None:
    cfg = AllocatorConfig.parse(conf)
    assert {mb: cfg.divisions_for(mb * MiB) for mb in expected} == expected


def test_large_segment_size_moves_the_floors() -> None:
    cfg = AllocatorConfig.parse("large_segment_size_mb:32,max_split_size_mb:40")
    assert cfg.large_segment_size_bytes == 32 * MiB
    assert cfg.non_split_rounding_bytes == 32 * MiB
    assert cfg.allocation_size(4 * MiB) == 32 * MiB  # 1..10 MiB requests now share 32 MiB segments
    with pytest.raises(BatchfitError, match="must be >= 25"):
        AllocatorConfig.parse("max_split_size_mb:20,large_segment_size_mb:25")


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ("max_split_size_mb:10", "too small, must be >= 20"),
        ("max_split_size_mb", "expected ':'"),
        ("max_split_size_mb:", "expected a value"),
        ("max_split_size_mb:abc", "non-negative integer"),
        ("garbage_collection_threshold:1.5", r"\(0.0, 1.0\)"),
        ("roundup_power2_divisions:3", "power of 2"),
        ("roundup_power2_divisions:[64:3]", "power of 2"),
        ("roundup_power2_divisions:[64:8", "closing"),
        ("roundup_power2_divisions:[100:8]", "powers of 2"),
        ("expandable_segments:true", "'True' or 'False'"),
        ("expandable_segment:True", "did you mean 'expandable_segments'"),
        ("max_split_size_mb:40 expandable_segments:True", "non-negative integer"),
        ("max_split_size_mb:40;expandable_segments:True", "non-negative integer"),
        ("backend:foo", "unknown allocator backend"),
        ("large_segment_size_mb:10", "must be > 10"),
    ],
)
def test_bad_settings_name_the_problem(conf: str, message: str) -> None:
    with pytest.raises(BatchfitError, match=message) as info:
        AllocatorConfig.parse(conf)
    assert info.value.hint and "max_split_size_mb:128" in info.value.hint


def test_from_env_prefers_pytorch_alloc_conf() -> None:
    env = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    cfg = AllocatorConfig.from_env(env)
    assert cfg.max_split_size_bytes == 64 * MiB
    assert not cfg.expandable_segments
    assert AllocatorConfig.from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}).expandable_segments
    assert AllocatorConfig.from_env({}) == AllocatorConfig()


@pytest.mark.parametrize(
    "conf",
    [
        "max_split_size_mb:128,expandable_segments:True",
        "roundup_power2_divisions:[64:8,128:2,>:1],garbage_collection_threshold:0.6",
        "large_segment_size_mb:32,max_split_size_mb:64,max_non_split_rounding_mb:40",
        "roundup_power2_divisions:8",
    ],
)
def test_to_string_parses_back_to_the_same_settings(conf: str) -> None:
    cfg = AllocatorConfig.parse(conf)
    assert AllocatorConfig.parse(cfg.to_string()) == cfg
    assert cfg.to_dict()["schema_version"] == 1


def test_with_settings_layers_options_over_the_environment() -> None:
    base = AllocatorConfig.parse("max_split_size_mb:64")
    both = with_settings(base, "expandable_segments:True")
    assert both.max_split_size_bytes == 64 * MiB and both.expandable_segments
    assert with_settings(base, None) is base
