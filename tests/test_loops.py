"""The loops users run (``--loop``) and what a training run adds to a step, against real CPU runs.

Each loop is written once (``batchfit._step.LOOPS``) and run twice: on fake tensors for the
estimate, and for real by ``measure_step``; the CPU estimate equals the real run to the byte.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from batchfit import load_workload
from batchfit._estimate import Estimator
from batchfit._measure import measure_step
from batchfit._models import Workload
from batchfit._step import LOOPS, make_spec, tail_sizes
from batchfit._trace import Trace
from batchfit.cli import app
from zoo import zoo_workload


def _both(workload: Workload, batch_size: int, **spec_args: object) -> tuple[int, int]:
    spec = make_spec("cpu", **spec_args)  # type: ignore[arg-type]
    est = Estimator(workload, spec).at(batch_size).peak_allocated_bytes
    return est, measure_step(workload, batch_size, spec).peak_allocated_bytes


def _workload(name: str) -> Workload:
    return zoo_workload(name) if name in ("tied_lm", "dict_input") else load_workload(name, dataset="mnist")


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    ("name", "optimizer", "precision"),
    [
        ("mlp", "sgd", "fp32"),
        ("cnn", "sgd-momentum", "fp32"),
        ("tied_lm", "adamw", "fp32"),
        ("dict_input", "adam", "fp32"),
    ],
)
def test_each_loop_equals_a_real_run_of_that_loop(loop: str, name: str, optimizer: str, precision: str) -> None:
    est, real = _both(_workload(name), 5, optimizer=optimizer, precision=precision, loop=loop)
    assert est == real or (optimizer == "adam" and abs(est - real) <= 16)  # Adam: see test_estimate_cpu


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    ("name", "last_batch", "eval_batch_size"), [("mlp", "auto", 96), ("tied_lm", 2, None), ("cnn", 3, 11)]
)
def test_a_training_runs_tail_equals_a_real_run(
    loop: str, name: str, last_batch: object, eval_batch_size: int | None
) -> None:
    est, real = _both(
        _workload(name), 7, optimizer="adam", loop=loop, last_batch=last_batch, eval_batch_size=eval_batch_size
    )
    assert abs(est - real) <= 16  # Adam's 0-dim CPU scalars inside kernels (test_estimate_cpu)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(("last_batch", "eval_batch_size"), [(2, None), (None, 11)])
def test_a_tail_batch_from_example_inputs_is_made_once(
    loop: str, last_batch: int | None, eval_batch_size: int | None
) -> None:
    """A tail's new batch made mid-run from ``example_inputs`` (the dict-input model): the real run
    used to copy the example tensors while holding them (two batches alive at once), which set a
    CPU peak 112 B (last batch 2) and 176 B (eval batch 11) above the estimate under Lightning's
    loop, where the last step's gradients are alive when the batch is made. Exact now."""
    est, real = _both(
        zoo_workload("dict_input"),
        7,
        optimizer="sgd",
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
    )
    assert est == real


def test_the_loop_keeps_the_outputs_through_backward() -> None:
    """Real runs: the default loop against the old reference step (the output dropped once the
    loss exists, run as a user's step) differ by the logits' bytes exactly; the estimate of the
    loop equals its real run."""

    def output_dropped(model: nn.Module, inputs: tuple, labels: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    w = load_workload("mlp", dataset="mnist")
    kept, kept_real = _both(w, 64)
    dropped_real = measure_step(w, 64, make_spec("cpu", step=output_dropped)).peak_allocated_bytes
    assert kept == kept_real
    assert kept_real - dropped_real == 64 * 10 * 4  # batch x classes x float32: the logits, alive at the peak


def _when(trace: Trace, index: int) -> tuple[str, int]:
    """(phase, iteration) running at event ``index`` (an event's own fields say when its storage was born)."""
    return max(((i, (p, it)) for p, it, i in trace.marks if i <= index), default=(0, ("setup", 0)))[1]


def test_the_previous_outputs_live_until_the_next_forward_returns() -> None:
    w = load_workload("mlp", dataset="mnist")
    trace = Estimator(w, make_spec("cpu")).trace(8)
    events = trace.events
    # the logits: the last Linear's output ("3" in the seed's Sequential), 8 x 10 float32
    first, second = (
        e for e in events if e.is_alloc and e.module == "3" and e.nbytes == 8 * 10 * 4 and e.phase == "forward"
    )
    death = next(e for e in events if not e.is_alloc and e.storage == first.storage)
    # iteration 1's logits die in iteration 2's forward, after iteration 2's logits are born
    assert _when(trace, death.seq) == ("forward", 2) and death.seq > second.seq


@pytest.mark.parametrize(
    ("loop", "phase"), [("pytorch", "optimizer"), ("hf-trainer", "optimizer"), ("lightning", "forward")]
)
def test_where_gradients_die(loop: str, phase: str) -> None:
    """zero_grad after the step (PyTorch's tutorial, the Trainer), or inside the closure before
    backward (Lightning): then the last step's gradients are alive through the next forward."""
    w = load_workload("mlp", dataset="mnist")
    trace = Estimator(w, make_spec("cpu", loop=loop)).trace(8)
    born_1 = {e.storage for e in trace.events if e.is_alloc and e.category == "gradients" and e.iteration == 1}
    deaths = {_when(trace, e.seq) for e in trace.events if not e.is_alloc and e.storage in born_1}
    assert deaths == {(phase, 1 if phase == "optimizer" else 2)}


def test_zero_grad_sets_to_none_by_default() -> None:
    """The loops call zero_grad() as users do; since torch 2.0 that frees the gradients."""
    assert inspect.signature(torch.optim.Optimizer.zero_grad).parameters["set_to_none"].default is True
    assert inspect.signature(nn.Module.zero_grad).parameters["set_to_none"].default is True


def test_an_evaluation_pass_can_set_the_peak() -> None:
    w = load_workload("mlp", dataset="mnist")
    spec = make_spec("cpu", eval_batch_size=2048)
    est = Estimator(w, spec).at(16)
    assert est.peak_phase == "eval"
    assert est.peak_allocated_bytes == measure_step(w, 16, spec).peak_allocated_bytes
    assert est.peak_allocated_bytes > Estimator(w, make_spec("cpu")).at(16).peak_allocated_bytes


def test_tail_sizes() -> None:
    spec = make_spec("cpu", last_batch="auto", eval_batch_size=100)
    assert tail_sizes(spec, 64, 60_000) == (64, 32, 100)
    assert tail_sizes(spec, 100, 60_000).last_batch is None  # the epoch divides evenly
    assert tail_sizes(make_spec("cpu", last_batch=80), 64, None).last_batch is None  # not smaller
    assert not tail_sizes(make_spec("cpu"), 64, 60_000)


def test_cli_loop_options() -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["estimate", "mlp", "--dataset", "mnist", "--device", "cpu", "-b", "8", "--loop", "lightning", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--device", "cpu", "--loop", "keras"])
    assert bad.exit_code == 3 and "unknown loop 'keras'" in bad.output
    both = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--loop", "lightning", "--step", "x.py:f"])
    assert both.exit_code == 3 and "--step" in both.output
    auto = runner.invoke(app, ["estimate", "mlp", "--input", "784", "--device", "cpu", "--last-batch", "auto"])
    assert auto.exit_code == 3 and "--dataset" in auto.output
