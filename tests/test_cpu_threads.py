"""CPU results are for a thread count (`--threads`, default torch.get_num_threads()): oneDNN's
convolution backward keeps a weights buffer per thread beyond the first, so the same step takes
more memory at 2 threads than at 1. The estimate is simulated at the count asked for, equals a
real step at that count, and says which count it is."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate
from batchfit._measure import measure_step
from batchfit._models import InputSpec, Workload
from batchfit._step import make_spec
from batchfit.cli import app

runner = CliRunner()


def _small_conv() -> Workload:
    # 4 input channels at 8x8: its oneDNN convolution backward's scratch is per thread (measured
    # here: 17,536 B at 1 thread, 32,128 B at 2 for the first layer's weight gradient)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 4)
    )
    return Workload("small_conv", model, (InputSpec((4, 8, 8)),))


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_the_estimate_equals_a_real_step_at_each_thread_count(order: tuple[int, int]) -> None:
    w = _small_conv()
    before = torch.get_num_threads()
    peaks = {}
    for n in order:
        est = estimate(w, batch_size=4, device="cpu", threads=n)
        real = measure_step(w, 4, make_spec("cpu", threads=n))
        assert torch.get_num_threads() == before  # given back after each
        assert est.threads == real.threads == n
        assert est.peak_allocated_bytes == real.peak_allocated_bytes, (n, est.peak_allocated_bytes)
        peaks[n] = real.peak_allocated_bytes
    assert peaks[2] > peaks[1]  # the thread count matters for this model (else the test proves nothing)


def test_by_default_the_process_thread_count_is_simulated() -> None:
    """Without ``threads``, torch's current count: kernel scratch measured at another count (and
    remembered) is not reused."""
    w = _small_conv()
    before = torch.get_num_threads()
    runs = {}
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            runs[n] = estimate(w, batch_size=4, device="cpu"), measure_step(w, 4, make_spec("cpu"))
    finally:
        torch.set_num_threads(before)
    assert {n: est.peak_allocated_bytes for n, (est, _) in runs.items()} == {
        n: real.peak_allocated_bytes for n, (_, real) in runs.items()
    }
    assert [est.threads for est, _ in runs.values()] == [2, 1]


def test_the_thread_count_is_printed_beside_cpu_results() -> None:
    base = ["mlp", "--dataset", "mnist", "--device", "cpu", "-b", "8", "--threads", "1"]
    text = runner.invoke(app, ["estimate", *base])
    assert text.exit_code == 0, text.output
    assert "CPU (host memory, 1 thread)" in text.output
    data = json.loads(runner.invoke(app, ["estimate", *base, "--json"]).output)
    assert data["threads"] == 1 and data["results"][0]["threads"] == 1
    measured = runner.invoke(app, ["measure", *base])
    assert measured.exit_code == 0 and "cpu, 1 thread" in measured.output
    default = json.loads(runner.invoke(app, ["estimate", *base[:-2], "--json"]).output)
    assert default["threads"] == torch.get_num_threads()


def test_threads_are_for_cpu_runs() -> None:
    # the library names its parameters; the command line shows the same message in its flags
    with pytest.raises(BatchfitError, match="`threads` applies to `device='cpu'`") as info:
        make_spec("cuda", threads=2)
    assert info.value.hint == "drop it, or use `device='cpu'`"
    with pytest.raises(BatchfitError, match="at least 1"):
        make_spec("cpu", threads=0)
    out = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--threads", "2"])
    assert out.exit_code == 3
    assert "error: --threads applies to --device cpu" in out.stderr
    assert "hint: drop it, or use --device cpu" in out.stderr
