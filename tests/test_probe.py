"""The probe's search, tested on CPU with a stand-in device that runs out of memory above a budget."""

from __future__ import annotations

import math
import types
from collections.abc import Iterable

import pytest
import torch

from batchfit import ExitCode
from batchfit._errors import BatchfitError
from batchfit._probe import (
    Attempt,
    AttemptConfig,
    ProbeError,
    confirm_recommended,
    cudnn_notes,
    expected_attempts,
    guarded,
    is_oom,
    isolated_runner,
    probe,
    search,
)

MiB = 1024**2


class Block:
    """Stands for one device allocation; the device counts the blocks still alive."""

    def __init__(self, device: StandInDevice, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        device.alive_bytes += nbytes
        device.alive_blocks += 1

    def __del__(self) -> None:
        self.device.alive_bytes -= self.nbytes
        self.device.alive_blocks -= 1


class StandInDevice:
    """A device with ``capacity_bytes``: a step at batch b needs ``fixed_bytes + per_sample_bytes * b``,
    allocated block by block (parameters first, then four activation blocks), and raises
    ``torch.OutOfMemoryError`` at the block that would cross the capacity, with the earlier blocks
    still referenced from the failing frame (as a real failed step's tensors are).

    ``holes``: sizes that fail although they are below the capacity (a device that is not monotone).
    ``error_at``: sizes that raise an error that is not out-of-memory.
    """

    def __init__(
        self,
        capacity_bytes: int,
        per_sample_bytes: int,
        fixed_bytes: int = 0,
        holes: Iterable[int] = (),
        error_at: Iterable[int] = (),
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.per_sample_bytes = per_sample_bytes
        self.fixed_bytes = fixed_bytes
        self.holes = set(holes)
        self.error_at = set(error_at)
        self.alive_bytes = 0
        self.alive_blocks = 0
        self.calls: list[int] = []
        self.alive_at_cleanup: list[int] = []

    @property
    def true_max(self) -> int:
        """The largest batch that fits, computed from the capacity (monotone part)."""
        return (self.capacity_bytes - self.fixed_bytes) // self.per_sample_bytes

    def step(self, batch_size: int) -> Attempt:
        self.calls.append(batch_size)
        if batch_size in self.error_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        held = [Block(self, self.fixed_bytes)]
        need = self.per_sample_bytes * batch_size
        for i in range(4):
            part = need // 4 + (need % 4 if i == 3 else 0)
            if self.alive_bytes + part > self.capacity_bytes or (batch_size in self.holes and i == 2):
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {part} bytes; {len(held)} blocks in use"
                )
            held.append(Block(self, part))
        peak = self.alive_bytes
        del held
        return Attempt(batch_size, "ok", step_seconds=batch_size / 1000, peak_allocated_bytes=peak)

    def cleanup(self) -> None:
        self.alive_at_cleanup.append(self.alive_blocks)

    def runner(self):  # type: ignore[no-untyped-def]
        return guarded(self.step, self.cleanup)


def device_with_max(true_max: int, per_sample: int = 1 * MiB, fixed: int = 100 * MiB, **kwargs) -> StandInDevice:  # type: ignore[no-untyped-def]
    dev = StandInDevice(fixed + per_sample * true_max + per_sample // 2, per_sample, fixed, **kwargs)
    assert dev.true_max == true_max
    return dev


# -- the search -----------------------------------------------------------------------------------


def test_exact_estimate_takes_two_attempts() -> None:
    dev = device_with_max(300)
    out = search(dev.runner(), start=300)
    assert [a.batch_size for a in out.attempts] == [300, 301]
    assert [a.status for a in out.attempts] == ["ok", "oom"]
    assert (out.max_batch_size, out.first_failing_batch_size, out.exact) == (300, 301, True)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 10, 100, 1000])
def test_estimate_too_low_by_k(k: int) -> None:
    dev = device_with_max(500 + k)
    out = search(dev.runner(), start=500)
    assert out.max_batch_size == dev.true_max and out.first_failing_batch_size == dev.true_max + 1
    n = len(out.attempts)
    assert n == 2 + 2 * math.floor(math.log2(k + 1)) == expected_attempts(500, 500 + k)
    assert n <= 2 + 2 * math.log2(k + 1)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 10, 100, 400])
def test_estimate_too_high_by_k(k: int) -> None:
    dev = device_with_max(500 - k)
    out = search(dev.runner(), start=500)
    assert out.max_batch_size == dev.true_max and out.first_failing_batch_size == dev.true_max + 1
    n = len(out.attempts)
    assert n == 2 * math.ceil(math.log2(k + 1)) == expected_attempts(500, 500 - k)
    assert n <= 2 + 2 * math.log2(k + 1)


def test_each_size_is_tried_once_and_the_bracket_holds() -> None:
    for true_max in (1, 999):
        for start in (1, 64, 5000):
            dev = device_with_max(true_max)
            out = search(dev.runner(), start=start)
            sizes = [a.batch_size for a in out.attempts]
            assert len(sizes) == len(set(sizes))
            assert out.max_batch_size == true_max and out.exact
            # every size that ran is below every size that failed
            assert max(a.batch_size for a in out.attempts if a.ok) < min(a.batch_size for a in out.attempts if not a.ok)


def test_seed_method_doubles_from_16_then_bisects() -> None:
    dev = device_with_max(100)
    out = search(dev.runner(), start=16, method="doubling")
    # 16, 32, 64 run, 128 fails; bisect (64, 128): 96 ok, 112 x, 104 x, 100 ok, 102 x, 101 x
    assert [a.batch_size for a in out.attempts] == [16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    assert out.max_batch_size == 100 and out.exact
    # from an estimate 3% off, the estimate's search needs fewer attempts for the same boundary
    assert len(search(device_with_max(100).runner(), start=97).attempts) < len(out.attempts)


def test_seed_method_halves_when_16_fails() -> None:
    dev = device_with_max(5)
    out = search(dev.runner(), start=16, method="doubling")
    assert [a.batch_size for a in out.attempts] == [16, 8, 4, 6, 5]
    assert out.max_batch_size == 5 and out.exact


def test_even_batch_one_failing_is_does_not_fit() -> None:
    dev = StandInDevice(capacity_bytes=50 * MiB, per_sample_bytes=MiB, fixed_bytes=100 * MiB)
    out = search(dev.runner(), start=1)
    assert out.max_batch_size is None and [a.batch_size for a in out.attempts] == [1]
    with pytest.raises(BatchfitError) as info:
        probe("mlp", dataset="mnist", start=1, runner=dev.runner(), estimates=False)
    assert info.value.exit_code == ExitCode.DOES_NOT_FIT
    assert "does not fit" in info.value.message and "batch size 1" in info.value.message


def test_down_gallop_reaching_one() -> None:
    dev = StandInDevice(capacity_bytes=50 * MiB, per_sample_bytes=MiB, fixed_bytes=100 * MiB)
    out = search(dev.runner(), start=40)
    assert out.max_batch_size is None and out.attempts[-1].batch_size == 1


def test_a_non_oom_error_stops_the_search_as_an_error() -> None:
    dev = device_with_max(300, error_at={301})
    with pytest.raises(ProbeError) as info:
        search(dev.runner(), start=300)
    assert "not out-of-memory" in info.value.message and "illegal memory access" in info.value.message
    assert info.value.exit_code == ExitCode.INPUT  # not DOES_NOT_FIT
    assert [a.status for a in info.value.attempts] == ["ok", "error"]


def test_an_exception_raised_by_the_runner_itself_propagates() -> None:
    def runs(b: int) -> Attempt:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        search(runs, start=8)


def test_batchfit_errors_pass_through_the_guard() -> None:
    def step(b: int) -> Attempt:
        raise BatchfitError("the model has no trainable parameters")

    with pytest.raises(BatchfitError, match="no trainable"):
        guarded(step)(4)


def test_not_monotone_device_gives_a_certified_local_boundary() -> None:
    # 102 fails although everything up to 120 fits: the search stops at the first hole it meets
    dev = device_with_max(120, holes={103})
    out = search(dev.runner(), start=100)
    assert [a.batch_size for a in out.attempts] == [100, 101, 103, 102]
    assert (out.max_batch_size, out.first_failing_batch_size) == (102, 103)
    # and one further attempt at the recommendation catches a hole there, and lowers it
    dev = device_with_max(120, holes={96})
    out = search(dev.runner(), start=120)
    rec = confirm_recommended(dev.runner(), out, 0.8)
    assert out.max_batch_size == 120 and out.attempts[-2].batch_size == 96 and out.attempts[-2].status == "oom"
    assert rec == math.floor(0.8 * 96) == 76 and out.attempts[-1].ok
    assert any("not monotone" in n and "120" in n for n in out.notes)


def test_cap_stops_the_gallop() -> None:
    dev = device_with_max(10_000)
    out = search(dev.runner(), start=1000, max_batch_size=1010)
    assert out.capped and out.max_batch_size == 1010 and out.first_failing_batch_size is None
    assert any("cap" in n for n in out.notes)


def test_unknown_method_and_bad_start() -> None:
    with pytest.raises(BatchfitError, match="unknown search method"):
        search(device_with_max(3).runner(), start=1, method="random")
    with pytest.raises(BatchfitError, match=">= 1"):
        search(device_with_max(3).runner(), start=0)


# -- the OOM path --------------------------------------------------------------------------------


def test_oom_path_frees_everything_the_failed_step_held() -> None:
    dev = device_with_max(64)
    runs = dev.runner()
    a = runs(200)
    assert a.status == "oom" and "out of memory" in (a.message or "")
    assert dev.alive_blocks == 0 and dev.alive_bytes == 0
    assert dev.alive_at_cleanup == [0]  # already free when the device's cache is emptied
    assert runs(64).ok and dev.alive_blocks == 0


def test_the_stand_in_sees_a_leak_when_the_exception_is_kept() -> None:
    # the negative control: keeping the exception keeps the failed step's blocks alive
    dev = device_with_max(64)
    kept = []
    try:
        dev.step(200)
    except torch.OutOfMemoryError as exc:
        kept.append(exc)
    assert dev.alive_blocks > 0
    kept.clear()
    assert dev.alive_blocks == 0


@pytest.mark.parametrize(
    ("exc", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc: BaseException, oom: bool) -> None:
    assert is_oom(exc) is oom


# -- probe() -------------------------------------------------------------------------------------


def test_probe_with_a_stand_in_reports_everything() -> None:
    dev = device_with_max(250)
    r = probe("mlp", dataset="mnist", start=240, runner=dev.runner(), estimates=False)
    assert r.max_batch_size == 250 and r.first_failing_batch_size == 251 and r.exact
    assert r.recommended_batch_size == math.floor(0.8 * 250) == 200
    assert len(r.attempts) == expected_attempts(240, 250) == 8
    assert r.start_source == "given" and r.method == "estimate"
    d = r.to_dict()
    assert d["schema_version"] == 1 and d["attempt_count"] == 8 and d["max_batch_size"] == 250
    assert d["attempts"][0]["samples_per_second"] == pytest.approx(240 * 2 / 0.24)
    text = str(r)
    assert "max batch size 250 (runs); 251 fails" in text and "recommended batch size 200" in text
    assert text.count("\n  ") == 0  # no blank-indented junk lines


def test_probe_records_samples_per_second_and_where_throughput_saturates() -> None:
    class Slower(StandInDevice):
        def step(self, batch_size: int) -> Attempt:  # a fixed 50 ms per step plus 1 ms per sample
            a = super().step(batch_size)
            a.step_seconds, a.steady_seconds = 2 * (0.05 + batch_size / 1000), 0.05 + batch_size / 1000
            return a

    base = device_with_max(100)
    dev = Slower(base.capacity_bytes, base.per_sample_bytes, base.fixed_bytes)
    r = probe("mlp", dataset="mnist", from_batch=16, runner=dev.runner(), estimates=False)
    ran = [a for a in r.attempts if a.ok]
    for a in ran:  # the steady iteration's time when it was measured
        assert a.samples_per_second == pytest.approx(a.batch_size / (0.05 + a.batch_size / 1000))
    best = max(a.samples_per_second or 0 for a in ran)  # 1000 b / (50 + b): 667 at 100
    expected = min(a.batch_size for a in ran if (a.samples_per_second or 0) >= 0.95 * best)
    assert r.saturation_batch_size == expected == 96
    assert r.to_dict()["throughput_saturation_batch_size"] == 96
    assert r.to_dict()["attempts"][0]["steady_seconds"] == pytest.approx(0.066)
    assert "throughput: among the sizes that ran, from 96 on within 5% of the best samples/s" in str(r)


def test_a_real_cpu_attempt_times_its_steady_iteration() -> None:
    from batchfit._models import load_workload
    from batchfit._probe import measure_runner
    from batchfit._step import make_spec

    a = measure_runner(load_workload("mlp", dataset="mnist"), make_spec("cpu"))(32)
    assert a.ok and a.step_seconds and a.steady_seconds
    assert 0 < a.steady_seconds < a.step_seconds
    assert a.samples_per_second == pytest.approx(32 / a.steady_seconds)
    from batchfit._measure import measure_step

    m = measure_step(load_workload("mlp", dataset="mnist"), 32, make_spec("cpu"))
    assert m.steady_seconds and m.samples_per_second == pytest.approx(32 / m.steady_seconds)


def test_probe_from_16_is_the_seed_method() -> None:
    r = probe("mlp", dataset="mnist", from_batch=16, runner=device_with_max(100).runner(), estimates=False)
    assert r.method == "doubling" and r.start_source == "seed" and r.start == 16
    assert [a.batch_size for a in r.attempts][:4] == [16, 32, 64, 128] and r.max_batch_size == 100


def test_probe_starts_at_fits_max() -> None:
    seen = {}

    def fake_fit(workload, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return types.SimpleNamespace(max_batch_size=123)

    r = probe(
        "mlp",
        dataset="mnist",
        optimizer="adam",
        runner=device_with_max(123).runner(),
        estimates=False,
        fit_with=fake_fit,
    )
    assert r.start == 123 and r.estimated_max_batch_size == 123 and r.start_source == "estimate"
    assert len(r.attempts) == 2 and r.estimate_error == 0
    assert seen["optimizer"] == "adam" and seen["safety"] == 0.8


def test_probe_puts_the_estimate_beside_each_attempt() -> None:
    from batchfit._estimate import Estimator
    from batchfit._models import load_workload
    from batchfit._step import make_spec

    r = probe("mlp", dataset="mnist", start=64, runner=device_with_max(64).runner())
    est = Estimator(load_workload("mlp", dataset="mnist"), make_spec("cuda"))
    for a in r.attempts:
        assert a.estimated_peak_allocated_bytes == est.at(a.batch_size).peak_allocated_bytes
        assert a.estimated_total_bytes == est.at(a.batch_size).total_bytes


def test_probe_without_cuda_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BatchfitError) as info:
        probe("mlp", dataset="mnist", start=4)
    assert info.value.exit_code == ExitCode.NO_DEVICE and "CUDA" in info.value.message


def test_probe_cli_without_cuda_exits_no_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from typer.testing import CliRunner

    from batchfit.cli import app

    result = CliRunner().invoke(app, ["probe", "mlp", "--start", "8"])
    assert result.exit_code == int(ExitCode.NO_DEVICE)
    assert "CUDA" in result.output


def test_bad_arguments() -> None:
    dev = device_with_max(10)
    with pytest.raises(BatchfitError, match="safety"):
        probe("mlp", start=4, safety=1.5, runner=dev.runner())
    with pytest.raises(BatchfitError, match="memory_fraction"):
        probe("mlp", start=4, memory_fraction=0.5, runner=dev.runner())


# -- notes ---------------------------------------------------------------------------------------


def test_cudnn_note_when_allocated_at_the_max_is_below_the_estimate() -> None:
    at_max = Attempt(
        100, "ok", step_seconds=1.0, peak_allocated_bytes=900 * MiB, estimated_peak_allocated_bytes=1000 * MiB
    )
    notes = cudnn_notes([Attempt(90, "ok", step_seconds=0.9), at_max, Attempt(101, "oom")], 100, 64 * MiB)
    assert len(notes) == 1 and "10.0%" in notes[0] and "cuDNN" in notes[0]
    at_max.peak_allocated_bytes = 990 * MiB  # 1% below: within the model's accuracy, no note
    assert cudnn_notes([at_max], 100) == []


# -- isolation: one child process per attempt -----------------------------------------------------


def test_isolated_attempt_in_a_child_process_measures_like_in_process() -> None:
    from batchfit._measure import measure_step
    from batchfit._models import load_workload
    from batchfit._step import make_spec

    config = AttemptConfig(model="mlp", dataset="mnist", device="cpu")
    a = isolated_runner(config, timeout_s=120)(64)
    assert a.ok, a.message
    m = measure_step(load_workload("mlp", dataset="mnist"), 64, make_spec("cpu"))
    assert a.peak_allocated_bytes == m.peak_allocated_bytes
    assert a.seconds > a.step_seconds > 0  # the child's start is part of the attempt


def test_isolated_child_reports_batchfit_errors_as_such() -> None:
    config = AttemptConfig(model="resnet17", device="cpu")
    with pytest.raises(BatchfitError, match="unknown model 'resnet17'"):
        isolated_runner(config, timeout_s=120)(1)


def test_isolate_needs_a_model_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # get past the device check
    with pytest.raises(BatchfitError, match="by name"):
        probe(torch.nn.Linear(3, 2), (3,), start=1, isolate=True)
    with pytest.raises(BatchfitError, match="optimizer"):
        probe("mlp", start=1, isolate=True, optimizer=torch.optim.SGD)
