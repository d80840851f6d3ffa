"""Gradient accumulation (``--grad-accum K``): K micro-batches of the batch size, the loss divided
by K, one optimizer step (PyTorch's AMP examples, "Gradient accumulation"; the Trainer's
``gradient_accumulation_steps``). The estimate equals a real CPU run of the same loop to the byte,
and fit's composed trace equals the full one."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate
from batchfit._compose import compose
from batchfit._estimate import Estimator
from batchfit._measure import measure_step
from batchfit._models import Workload, load_workload
from batchfit._step import make_spec
from batchfit.cli import app
from zoo import ZOO, zoo_workload


def _workload(name: str) -> Workload:
    return zoo_workload(name) if name in ZOO else load_workload(name, dataset="mnist")


@pytest.mark.parametrize(("name", "optimizer", "precision", "k"), [
    ("mlp", "adamw", "fp32", 2),
    ("mlp", "sgd", "amp-bf16", 3),  # the division under autocast
    ("llama_tiny", "adamw", "fp32", 2),
])  # fmt: skip
def test_accumulated_step_equals_a_real_cpu_run(name: str, optimizer: str, precision: str, k: int) -> None:
    workload = _workload(name)
    spec = make_spec("cpu", optimizer, precision, grad_accum=k)
    est = Estimator(workload, spec).at(4)
    real = measure_step(workload, 4, spec)
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
    assert est.grad_accum == k and est.effective_batch_size == 4 * k
    # the gradients live through the later micro-batches' forwards: more than one micro-batch alone
    single = Estimator(workload, make_spec("cpu", optimizer, precision)).at(4)
    assert est.peak_allocated_bytes >= single.peak_allocated_bytes
    forwards = [m for m in est.marks if m[0] == "forward" and m[1] == 1]
    assert len(forwards) == k  # K micro-batches in iteration 1


def test_accumulation_keeps_gradients_alive_in_the_next_forward() -> None:
    # a model whose peak is its forward: the second micro-batch's forward runs with every gradient alive
    workload = _workload("mlp")
    one = Estimator(workload, make_spec("cpu", "sgd")).at(64)
    two = Estimator(workload, make_spec("cpu", "sgd", grad_accum=2)).at(64)
    grads = sum(p.numel() * 4 for p in workload.model.parameters())
    assert two.breakdown["gradients"] == grads
    assert two.peak_allocated_bytes > one.peak_allocated_bytes


@pytest.mark.parametrize("name", ["mlp", "llama_tiny"])
def test_accumulated_trace_composes(name: str) -> None:
    est = Estimator(_workload(name), make_spec("cuda", "adamw", "amp-bf16", grad_accum=3), gpu="a100-80gb")
    template = est.trace(2)
    short = est.trace(5, window_only=True)
    composed = compose(template, short)
    assert composed is not None
    assert composed.events == est.trace(5).events


def test_grad_accum_errors() -> None:
    with pytest.raises(BatchfitError, match="at least 1"):
        make_spec("cpu", grad_accum=0)
    with pytest.raises(BatchfitError, match="loop='pytorch'"):
        make_spec("cpu", loop="lightning", grad_accum=2)
    with pytest.raises(BatchfitError, match="loop='pytorch'"):
        make_spec("cpu", mode="inference", grad_accum=2)


def test_effective_batch_is_shown() -> None:
    est = estimate("mlp", dataset="mnist", batch_size=8, device="cpu", grad_accum=4)
    assert any("effective batch of 32" in n for n in est.notes)
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "mlp", "--dataset", "mnist", "--gpu", "rtx4090", "--grad-accum", "4", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["grad_accum"] == 4
    assert out["effective_recommended_batch_size"] == 4 * out["recommended_batch_size"]
    result = runner.invoke(app, ["fit", "mlp", "--dataset", "mnist", "--gpu", "rtx4090", "--grad-accum", "4"])
    assert result.exit_code == 0, result.output
    assert "effective batch (4 micro-batches)" in result.output
