"""The GPU catalogue and the --gpu / --memory / --free resolution."""

from __future__ import annotations

import pytest

from batchfit._errors import BatchfitError, ExitCode
from batchfit._gpus import (
    Catalogue,
    LocalGpu,
    conv_workspace_bytes,
    cublas_workspace_bytes_for,
    get_gpu,
    list_gpus,
    load_catalogue,
    resolve_card,
)

MiB = 1024**2
GiB = 1024**3
# PyTorch's defaults, spelled as CublasHandlePool.cpp writes them
CUBLAS_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_HOPPER = 4096 * 8 * 1024

REQUIRED = {
    "t4", "l4", "a10", "a10g", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h100-nvl", "h200", "b200",
    "v100-16gb", "v100-32gb", "rtx3060", "rtx3090", "rtx4090", "rtx5090", "l40s",
}  # fmt: skip


def test_the_catalogue_has_every_card_the_issue_lists() -> None:
    assert {card.key for card in list_gpus()} >= REQUIRED


@pytest.mark.parametrize(
    ("key", "cc", "workspace"),
    [
        ("t4", (7, 5), CUBLAS_DEFAULT),
        ("v100-16gb", (7, 0), CUBLAS_DEFAULT),
        ("a100-80gb", (8, 0), CUBLAS_DEFAULT),
        ("rtx4090", (8, 9), CUBLAS_DEFAULT),
        ("h100-sxm", (9, 0), CUBLAS_HOPPER),
        ("h200", (9, 0), CUBLAS_HOPPER),
        ("b200", (10, 0), CUBLAS_HOPPER),
        ("rtx5090", (12, 0), CUBLAS_HOPPER),
    ],
)
def test_compute_capability_and_cublas_workspace(key: str, cc: tuple[int, int], workspace: int) -> None:
    card = get_gpu(key)
    assert card.compute_capability == cc
    assert card.cublas_workspace_bytes == workspace
    assert (8_519_680, 32 * MiB) == (CUBLAS_DEFAULT, CUBLAS_HOPPER)  # the figures the issue quotes


def test_every_catalogue_workspace_follows_pytorchs_rule() -> None:
    for card in list_gpus():
        assert card.compute_capability is not None
        assert card.cublas_workspace_bytes == cublas_workspace_bytes_for(card.compute_capability), card.key


def test_cublas_workspace_config_overrides_the_default() -> None:
    # ":SIZE_KiB:COUNT" pairs add up (the deterministic-mode setting :16:8 is 128 KiB)
    assert cublas_workspace_bytes_for((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 16 * 1024 * 8
    assert cublas_workspace_bytes_for((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"}) == CUBLAS_DEFAULT
    assert cublas_workspace_bytes_for((9, 0), {"CUBLAS_WORKSPACE_CONFIG": "junk"}) == CUBLAS_HOPPER


def test_every_figure_says_where_it_comes_from() -> None:
    for card in list_gpus():
        assert set(card.provenance) == {"memory", "cublas_workspace", "non_allocator", "conv_workspace"}
        for prov in card.provenance.values():
            assert prov.status in {"measured", "reported", "nominal", "rule", "assumed"}
            assert prov.source
            if prov.status == "measured":
                assert prov.card and prov.driver and prov.torch and prov.date
        # nothing is measured yet: the context and conv workspace are labelled assumed
        assert card.provenance["non_allocator"].status == "assumed"


def test_memory_is_what_torch_would_report_or_the_nominal_size() -> None:
    for card in list_gpus():
        assert card.memory_bytes % MiB == 0  # torch printouts are whole MiB; nominal sizes whole GiB
        assert 11 * GiB < card.memory_bytes <= 192 * GiB
        if card.provenance["memory"].status == "nominal":
            assert card.memory_bytes % GiB == 0
    assert get_gpu("a100-40gb").memory_bytes == 40536 * MiB
    assert get_gpu("h100-sxm").memory_bytes == 81089 * MiB


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("h100", "h100-sxm"),
        ("H100-80GB", "h100-sxm"),
        ("h100-sxm", "h100-sxm"),
        ("H100 SXM5", "h100-sxm"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("h100 pcie", "h100-pcie"),
        ("a100", "a100-80gb"),
        ("A100-40GB", "a100-40gb"),
        ("rtx4090", "rtx4090"),
        ("RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("a10", "a10"),
        ("A10G", "a10g"),
        ("Tesla T4", "t4"),
        ("v100", "v100-16gb"),
    ],
)
def test_lookup_by_alias_is_case_and_punctuation_insensitive(name: str, key: str) -> None:
    assert get_gpu(name).key == key


def test_unknown_cards_get_suggestions() -> None:
    with pytest.raises(BatchfitError, match="unknown GPU 'h1000'") as info:
        get_gpu("h1000")
    assert info.value.hint and "h100" in info.value.hint and "`memory`" in info.value.hint
    assert info.value.exit_code == ExitCode.INPUT


def test_no_two_cards_share_a_name() -> None:
    from batchfit._gpus import _norm

    seen: dict[str, str] = {}
    for card in list_gpus():
        for name in {_norm(n) for n in (card.key, card.name, *card.aliases, *card.torch_names)}:
            assert seen.setdefault(name, card.key) == card.key, f"{name!r} names {seen[name]} and {card.key}"


def test_conv_workspace_defaults_to_the_assumed_value() -> None:
    card = get_gpu("a100")
    assert conv_workspace_bytes(card) == load_catalogue().defaults["conv_workspace"]["bytes"]
    assert conv_workspace_bytes() == get_gpu("h100").conv_workspace_bytes
    assert card.provenance["conv_workspace"].status == "assumed"


def test_catalogue_to_dict_round_trips_through_from_dict() -> None:
    cat = load_catalogue()
    data = cat.to_dict()
    assert data["schema_version"] == 1
    entries = [
        {
            **{k: c[k] for k in ("key", "name", "aliases", "torch_names", "compute_capability")},
            **{
                fig: {"bytes": c[f"{fig}_bytes"], **c["provenance"][fig]}
                for fig in ("memory", "cublas_workspace", "non_allocator", "conv_workspace")
            },
        }
        for c in data["cards"]
    ]
    again = Catalogue.from_dict({"default_card": cat.default_key, "defaults": cat.defaults, "cards": entries})
    assert again.cards == cat.cards


def test_a_malformed_entry_is_a_clear_error() -> None:
    with pytest.raises(BatchfitError, match="malformed"):
        Catalogue.from_dict({"default_card": "x", "defaults": {}, "cards": [{"key": "x", "name": "X"}]})


# -- resolve_card ----------------------------------------------------------------------------------

H100_LOCAL = LocalGpu(
    "NVIDIA H100 80GB HBM3", total_bytes=85_000_000_000, free_bytes=60_000_000_000, compute_capability=(9, 0)
)


def test_gpu_gives_the_cards_memory() -> None:
    budget = resolve_card("rtx4090", None, False, local=None)
    assert budget.origin == "gpu"
    assert budget.budget_bytes == 24563 * MiB
    assert budget.device_limit_bytes == 24563 * MiB - budget.card.non_allocator_bytes
    assert "RTX 4090" in budget.description


@pytest.mark.parametrize(
    ("memory", "expected"),
    [("24GiB", 24 * GiB), ("24GB", 24 * 10**9), ("24G", 24 * GiB), ("1000000", 10**6), (123456789, 123456789)],
)
def test_memory_accepts_binary_decimal_and_bytes(memory: str | int, expected: int) -> None:
    budget = resolve_card(None, memory, False, local=None)
    assert budget.origin == "memory"
    assert budget.budget_bytes == expected
    assert budget.card.key == "custom"
    assert budget.card.cublas_workspace_bytes == CUBLAS_DEFAULT
    assert "assumed" in budget.description


def test_gpu_and_memory_together_keep_the_card_and_take_the_size() -> None:
    budget = resolve_card("h100", "40GiB", False, local=None)
    assert budget.card.key == "h100-sxm"
    assert budget.card.cublas_workspace_bytes == CUBLAS_HOPPER
    assert budget.budget_bytes == budget.card.memory_bytes == 40 * GiB


@pytest.mark.parametrize("memory", ["0", "lots", "-5G"])
def test_bad_memory_sizes_are_user_errors(memory: str) -> None:
    with pytest.raises(BatchfitError):
        resolve_card(None, memory, False, local=None)


def test_free_uses_what_the_local_gpu_has_free() -> None:
    budget = resolve_card(None, None, True, local=H100_LOCAL)
    assert budget.origin == "free"
    assert budget.budget_bytes == budget.device_limit_bytes == 60_000_000_000
    assert budget.card.key == "h100-sxm"
    assert budget.card.memory_bytes == 85_000_000_000
    assert budget.card.provenance["memory"].status == "measured"
    assert "free now" in budget.description


def test_free_without_a_gpu_says_so() -> None:
    with pytest.raises(BatchfitError, match="needs a CUDA GPU") as info:
        resolve_card(None, None, True, local=None)
    assert info.value.exit_code == ExitCode.NO_DEVICE


def test_free_cannot_be_combined_with_gpu_or_memory() -> None:
    with pytest.raises(BatchfitError, match="cannot be combined"):
        resolve_card("h100", None, True, local=H100_LOCAL)


def test_without_options_the_local_gpu_is_used() -> None:
    budget = resolve_card(None, None, False, local=H100_LOCAL)
    assert budget.origin == "local"
    assert budget.budget_bytes == 85_000_000_000
    unknown = LocalGpu("NVIDIA Future 9000", 50 * GiB, 49 * GiB, (11, 0))
    card = resolve_card(None, None, False, local=unknown).card
    assert card.name == "NVIDIA Future 9000"
    assert card.cublas_workspace_bytes == CUBLAS_DEFAULT  # major 11 is not in PyTorch's 32 MiB list
    assert card.non_allocator_bytes == load_catalogue().defaults["non_allocator"]["bytes"]


def test_without_a_gpu_the_default_card_is_assumed_and_said() -> None:
    budget = resolve_card(None, None, False, local=None)
    assert budget.origin == "default"
    assert budget.card.key == "h100-sxm"
    assert "assuming NVIDIA H100 80GB HBM3" in budget.description
    assert budget.to_dict()["schema_version"] == 1
