"""The batch-size search: exact for the estimator's model, fast, and honest about its limits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batchfit import BatchfitError, ExitCode
from batchfit._estimate import Estimator, estimate
from batchfit._fit import AffineTimeline, DoesNotFit, fit, search_max, standard_batch_sizes
from batchfit._models import load_workload
from batchfit._step import make_spec
from batchfit.cli import app

runner = CliRunner()


def _first_failure(fits, top: int) -> int:
    return next(b for b in range(1, top + 2) if not fits(b))


@pytest.mark.parametrize("boundary", [1, 2, 3, 17, 1000, 123_457])
@pytest.mark.parametrize("start", [1, 5, 999, 10**6])
def test_search_finds_a_monotone_boundary(boundary: int, start: int) -> None:
    n, calls = search_max(lambda b: b <= boundary, start=start)
    assert n == boundary
    assert calls < 80


def test_search_handles_a_stepwise_curve() -> None:
    # memory that rises in 20 MiB segments: flat runs, then a jump
    budget = 1000

    def total(b: int) -> int:
        return 100 + 20 * ((b * 7 + 19) // 20)

    n, _ = search_max(lambda b: total(b) <= budget, start=10)
    assert n == _first_failure(lambda b: total(b) <= budget, 10_000) - 1


def test_search_is_not_fooled_by_a_dip_just_below_the_boundary() -> None:
    """b = 95 fails although 96..100 fit (allocator rounding): the max is 94, not 100."""

    def fits(b: int) -> bool:
        return b <= 100 and b != 95

    n, _ = search_max(fits, start=60)
    assert n == 94


def test_search_checks_powers_of_two_far_below() -> None:
    def fits(b: int) -> bool:
        return b <= 5000 and b != 64

    assert search_max(fits, start=4000)[0] == 63


@settings(max_examples=60, deadline=None)
@given(boundary=st.integers(1, 10**7), start=st.integers(1, 10**7), first=st.integers(1, 3))
def test_search_property(boundary: int, start: int, first: int) -> None:
    n, _ = search_max(lambda b: b <= boundary, start=start, first=first)
    assert n == (boundary if boundary >= first else first - 1)


@pytest.mark.parametrize("bad", [None, 95, 64, 7])
def test_search_with_sizes_checked_side_by_side_gives_the_same_answer(bad: int | None) -> None:
    """The window below the boundary checked in a forked child and here agrees with one by one."""
    from batchfit._fit import _side_by_side

    def fits(b: int) -> bool:
        return b <= 100 and b != bad

    many = _side_by_side(fits)
    assert many is not None  # Linux: fork is available
    seen: list[list[int]] = []

    def recording(sizes: list[int]) -> list[bool]:
        seen.append(sizes)
        return many(sizes)

    assert search_max(fits, start=60, fits_many=recording) == search_max(fits, start=60)
    assert seen and all(len(sizes) > 1 for sizes in seen)  # the window went through fits_many
    assert many([1, 95, 100, 101, 64, 7]) == [fits(b) for b in (1, 95, 100, 101, 64, 7)]


def test_search_limit_and_batch_one_failing() -> None:
    assert search_max(lambda b: True, start=3, limit=500)[0] == 500
    assert search_max(lambda b: False)[0] == 0


def test_affine_timeline_reproduces_a_trace_exactly() -> None:
    est = Estimator(load_workload("cnn", dataset="mnist"), make_spec("cuda", "adam"))
    timeline = AffineTimeline(est.trace(1), est.trace(2))
    assert timeline.ok
    real = est.trace(37)
    assert timeline.matches(real)
    assert timeline.events_at(37) == real.events


def test_fit_mlp_is_capped_by_the_dataset_and_int32_elements() -> None:
    r = fit("mlp", dataset="mnist", gpu="h100")
    assert r.recommended_batch_size == 60_000
    assert r.estimate_at_max is not None and r.estimate_at_max.fits
    # the input batch holds 784 x N float32: 2^31 elements are reached just above N = 2,739,137
    assert r.max_batch_size == (2**31 - 1) // 784
    assert any("2^31" in n for n in r.notes) and any("60,000" in n for n in r.notes)


def test_fit_boundary_is_exact_on_a_small_card() -> None:
    est = Estimator(load_workload("cnn", dataset="cifar10"), make_spec("cuda", "sgd"), memory="2GiB")
    r = fit("cnn", dataset="cifar10", memory="2GiB")
    assert est.at(r.max_batch_size).fits
    assert not est.at(r.max_batch_size + 1).fits  # a real trace, not the affine timeline
    assert r.recommended_batch_size == int(0.8 * r.max_batch_size)
    assert r.headroom_bytes is not None and r.headroom_bytes > 0
    assert r.estimate_at_recommended is not None and r.estimate_at_recommended.total_bytes <= r.budget_bytes


def test_fit_checks_a_training_runs_tail() -> None:
    """An evaluation pass at 4,096 after steps at the steady max leaves the training's blocks where
    the evaluation cannot reuse them: that run does not fit, so the max comes down until it does."""
    args = {"dataset": "cifar10", "memory": "2GiB", "optimizer": "adam"}
    steady = fit("cnn", **args)
    with_eval = fit("cnn", **args, eval_batch_size=4096)
    run = Estimator(
        load_workload("cnn", dataset="cifar10"), make_spec("cuda", "adam", eval_batch_size=4096), memory="2GiB"
    )
    assert not run.at(steady.max_batch_size).fits  # what fit would have answered without the tail
    assert with_eval.max_batch_size < steady.max_batch_size
    assert run.at(with_eval.max_batch_size).fits and run.at(with_eval.recommended_batch_size).fits
    assert with_eval.estimate_at_max is not None and with_eval.estimate_at_max.fits
    assert any("evaluation pass at batch 4,096 lowers the max" in n for n in with_eval.notes)


def test_fit_with_a_tail_that_changes_nothing_says_it_was_checked() -> None:
    steady = fit("mlp", dataset="mnist", memory="1GiB", optimizer="adam")
    run = fit("mlp", dataset="mnist", memory="1GiB", optimizer="adam", last_batch="auto")
    assert (run.max_batch_size, run.recommended_batch_size) == (steady.max_batch_size, steady.recommended_batch_size)
    assert any("last batch" in n and "checked" in n for n in run.notes)


def test_an_evaluation_batch_that_never_fits() -> None:
    with pytest.raises(DoesNotFit) as info:
        fit("mlp", dataset="mnist", memory="1GiB", eval_batch_size=400_000)
    assert "eval" in info.value.message and "`eval_batch_size`" in info.value.advice[0]


def test_batch_size_one_that_cannot_train_is_skipped() -> None:
    r = fit("resnet18", input_size=(3, 32, 32), memory="4GiB")  # BatchNorm on a 1x1 map at batch 1
    assert r.max_batch_size >= 2
    assert any("batch size 1 cannot train" in n for n in r.notes)


def test_does_not_fit_says_what_would_help() -> None:
    with pytest.raises(DoesNotFit) as info:
        fit("resnet50", memory="600MiB", optimizer="adam")
    err = info.value
    assert err.exit_code == ExitCode.DOES_NOT_FIT
    assert "optimizer state" in err.message and "CUDA context" in err.message
    assert any("SGD" in a for a in err.advice) and any("larger card" in a for a in err.advice)


def test_bad_safety() -> None:
    with pytest.raises(BatchfitError, match="safety"):
        fit("mlp", dataset="mnist", safety=1.5)


def test_standard_sizes() -> None:
    assert standard_batch_sizes(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_cli_json_and_exit_codes() -> None:
    out = runner.invoke(app, ["fit", "mlp", "--dataset", "cifar10", "--gpu", "t4", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    for key in ("schema_version", "max_batch_size", "recommended_batch_size", "budget_bytes", "card"):
        assert key in data
    assert data["estimate_at_max"]["batch_size"] == data["max_batch_size"]
    assert data["estimate_at_recommended"]["batch_size"] == data["recommended_batch_size"]
    assert data["recommended_batch_size"] <= 50_000
    small = runner.invoke(app, ["fit", "resnet50", "--memory", "600MiB", "--optimizer", "adam"])
    assert small.exit_code == 4 and "does not fit" in small.output
    bad = runner.invoke(app, ["fit", "mlp", "--memory", "lots"])
    assert bad.exit_code == 3 and "memory size" in bad.output


def test_batch_size_one_shaped_differently_still_uses_the_affine_timeline() -> None:
    """nn.TransformerEncoder's step at batch 1 skips copies that larger batches make: the
    timeline is built from batch 2 and 3, batch 1 keeps its own trace, and the answer is exact."""
    import torch

    from batchfit._models import InputSpec, Workload
    from zoo import ZOO

    with torch.device("meta"):
        model = ZOO["transformer_encoder"].build()
    w = Workload("encoder", model, (InputSpec((10, 32)),))
    est = Estimator(w, make_spec("cuda", "adam"), memory="1GiB")
    assert not AffineTimeline(est.trace(1), est.trace(2)).ok
    r = fit(w, memory="1GiB", optimizer="adam")
    assert r.method == "affine"
    assert est.at(r.max_batch_size).fits and not est.at(r.max_batch_size + 1).fits


def test_sweep_reuses_the_fits_estimates_and_replays_the_rest() -> None:
    r = fit("mlp", dataset="mnist", memory="2GiB")
    assert r.affine and r.method == "affine"
    sizes = [64, r.recommended_batch_size, r.max_batch_size, r.max_batch_size + 1]
    got = r.sweep(sizes)
    assert [e.batch_size for e in got] == sizes
    assert got[1] is r.estimate_at_recommended and got[2] is r.estimate_at_max
    for e in (got[0], got[3]):  # each equal to an estimate made from scratch at that size
        ref = estimate("mlp", dataset="mnist", batch_size=e.batch_size, memory="2GiB")
        assert (e.peak_allocated_bytes, e.peak_reserved_bytes, e.total_bytes) == (
            ref.peak_allocated_bytes,
            ref.peak_reserved_bytes,
            ref.total_bytes,
        )
    assert got[3].fits is False and got[2].fits is True
