"""Calibration: a dry run on CPU, and the catalogue entry it would produce."""

from __future__ import annotations

import pytest
import torch

from batchfit._calibrate import DEFAULT_CONV_SHAPES, calibrate, make_catalogue_update
from batchfit._errors import BatchfitError, ExitCode
from batchfit._gpus import card_from_entry, load_catalogue

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@needs_no_cuda
def test_without_cuda_it_is_a_dry_run_listing_the_plan() -> None:
    plan = calibrate()
    assert plan["dry_run"] is True
    assert plan["schema_version"] == 1
    assert "is_available() is False" in plan["reason"]
    assert [m["name"] for m in plan["planned"]] == [
        "cublas_workspace_forward",
        "cublas_workspace_backward",
        "conv_workspace",
        "non_allocator",
    ]
    assert plan["planned"][2]["shapes"] == [s.label for s in DEFAULT_CONV_SHAPES]
    assert "measurements" not in plan and plan["torch"] == torch.__version__


@needs_no_cuda
def test_asking_for_a_real_run_without_cuda_is_a_device_error() -> None:
    with pytest.raises(BatchfitError) as info:
        calibrate(dry_run=False)
    assert info.value.exit_code == ExitCode.NO_DEVICE


def test_only_cuda_devices_can_be_calibrated() -> None:
    with pytest.raises(BatchfitError, match="CUDA device"):
        calibrate("cpu")


def test_the_update_is_a_catalogue_entry_with_measured_provenance() -> None:
    provenance = {"card": "NVIDIA H100 80GB HBM3", "driver": "570.86", "torch": "2.14.1", "date": "2026-01-01"}
    entry = make_catalogue_update(
        name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        memory_bytes=85_031_714_816,
        cublas_workspace_bytes=33_554_432,
        non_allocator_bytes=500 * 1024 * 1024,
        conv_workspace_bytes=3 * 1024 * 1024,
        provenance=provenance,
    )
    assert entry["key"] == "h100-sxm"  # matched to the catalogue by the name torch reports
    card = card_from_entry(entry, load_catalogue().defaults)
    assert card.non_allocator_bytes == 500 * 1024 * 1024
    assert card.conv_workspace_bytes == 3 * 1024 * 1024
    for prov in card.provenance.values():
        assert prov.status == "measured"
        assert (prov.card, prov.driver, prov.torch, prov.date) == tuple(provenance.values())
    assert "measured on NVIDIA H100 80GB HBM3" in str(card)


def test_an_unknown_card_gets_a_key_from_its_name() -> None:
    entry = make_catalogue_update(
        name="NVIDIA RTX PRO 6000",
        compute_capability=(12, 0),
        memory_bytes=96 * 1024**3,
        cublas_workspace_bytes=33_554_432,
        non_allocator_bytes=1,
        conv_workspace_bytes=0,
        provenance={"card": "NVIDIA RTX PRO 6000", "driver": "x", "torch": "y", "date": "z"},
    )
    assert entry["key"] == "rtx-pro-6000"
    assert card_from_entry(entry, load_catalogue().defaults).compute_capability == (12, 0)
