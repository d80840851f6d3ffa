"""The estimate API and command: options, errors, and never touching the user's model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate, load_workload
from batchfit._estimate import EstimateReport, StepEstimate
from batchfit._models import count_parameters
from batchfit.cli import app

runner = CliRunner()


def test_single_and_many_batch_sizes() -> None:
    one = estimate("mlp", dataset="mnist", batch_size=64, device="cpu")
    many = estimate("mlp", dataset="mnist", batch_size=[64, 256], device="cpu")
    assert isinstance(one, StepEstimate) and isinstance(many, EstimateReport)
    assert many[0].peak_allocated_bytes == one.peak_allocated_bytes
    assert many[1].peak_allocated_bytes > one.peak_allocated_bytes
    # the breakdown at the peak adds up to the peak
    assert sum(one.breakdown.values()) == one.peak_allocated_bytes
    assert one.breakdown["parameters"] == 101_770 * 4
    assert one.breakdown["inputs"] == 64 * 784 * 4 + 64 * 8  # images and int64 labels
    assert "1" in one.activation_bytes_by_module and "3" in one.activation_bytes_by_module


def test_user_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 2))
    model.eval()
    hook_calls = []
    model[0].register_forward_hook(lambda *a: hook_calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    r = estimate(model, input_size=(8,), batch_size=16, device="cpu", optimizer="adam")
    assert r.peak_allocated_bytes > 0
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p for p in model.parameters()] == params and all(p.grad is None for p in params)
    assert all(not p.is_meta for p in model.parameters())
    assert len(model[0]._forward_hooks) == 1  # the user's hook, and no hook of ours
    assert len(hook_calls) == 2  # it fired in each of the two iterations


def test_wrong_input_shape_names_the_layer_and_shapes() -> None:
    from batchfit._models import MLP

    with pytest.raises(BatchfitError) as info:
        estimate(MLP(), input_size=(3, 32, 32), batch_size=4, device="cpu")  # an MNIST MLP given CIFAR images
    err = info.value
    assert "layer 1 (Linear)" in err.message and "784" in err.message and "(4, 3072)" in err.message
    assert err.hint is not None and "`dataset='mnist'`" in err.hint


def test_losses_steps_and_inference(tmp_path) -> None:
    f = tmp_path / "loop.py"
    f.write_text(
        "import torch\n"
        "def my_loss(output, labels):\n    return (output ** 2).mean()\n"
        "def clipped(model, inputs, labels, optimizer):\n"
        "    outputs = model(*inputs)\n"  # kept through backward, as the reference loop keeps them
        "    loss = torch.nn.functional.cross_entropy(outputs, labels)\n"
        "    loss.backward()\n"
        "    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)\n"
        "    optimizer.step()\n"
        "    optimizer.zero_grad(set_to_none=True)\n"
    )
    base = estimate("mlp", dataset="mnist", batch_size=64, device="cpu")
    mse = estimate("mlp", dataset="mnist", batch_size=64, device="cpu", loss="mse")
    own = estimate("mlp", dataset="mnist", batch_size=64, device="cpu", loss=f"{f}:my_loss")
    step = estimate("mlp", dataset="mnist", batch_size=64, device="cpu", step=f"{f}:clipped")
    inference = estimate("mlp", dataset="mnist", batch_size=64, device="cpu", mode="inference")
    # MSE labels are float outputs-shaped (64 x 10 x 4 B) instead of int64 class ids (64 x 8 B)
    assert mse.breakdown["inputs"] - base.breakdown["inputs"] == 64 * 10 * 4 - 64 * 8
    assert own.peak_allocated_bytes > 0
    assert step.peak_allocated_bytes >= base.peak_allocated_bytes  # clipping adds norms
    assert inference.peak_allocated_bytes < base.peak_allocated_bytes
    assert inference.breakdown["gradients"] == 0 and inference.breakdown["activations"] == 0


def test_model_that_returns_its_loss() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.fc(x).pow(2).mean()}

    r = estimate(WithLoss(), input_size=(4,), batch_size=8, device="cpu")
    assert r.breakdown["inputs"] == 8 * 4 * 4  # no labels were made


def test_bad_options() -> None:
    with pytest.raises(BatchfitError, match="unknown optimizer"):
        estimate("mlp", dataset="mnist", optimizer="adamm")
    with pytest.raises(BatchfitError, match="unknown precision"):
        estimate("mlp", dataset="mnist", precision="fp8")
    with pytest.raises(BatchfitError, match="device"):
        estimate("mlp", dataset="mnist", device="tpu")
    with pytest.raises(BatchfitError, match="no trainable"):
        frozen = nn.Linear(4, 2).requires_grad_(False)
        estimate(frozen, input_size=(4,), batch_size=2, device="cpu")


def test_optimizer_with_keyword_arguments() -> None:
    plain = estimate("mlp", dataset="mnist", batch_size=64, device="cpu", optimizer="sgd")
    momentum = estimate(
        "mlp", dataset="mnist", batch_size=64, device="cpu", optimizer="SGD(lr=0.1, momentum=0.9, nesterov=True)"
    )
    # SGD keeps no state; momentum keeps one fp32 buffer per parameter (torch/optim/sgd.py
    # `momentum_buffer_list`), alive at the peak of the second iteration
    assert plain.breakdown["optimizer_state"] == 0
    assert momentum.breakdown["optimizer_state"] == 4 * count_parameters(load_workload("mlp", dataset="mnist").model)
    # momentum buffers: one per parameter, alive from the first step on
    states = {e.storage for e in momentum.events if e.category == "optimizer_state"}
    assert len(states) == 4


def test_cli_json_and_table() -> None:
    out = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "-b", "64,256", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [r["batch_size"] for r in data["results"]] == [64, 256]
    assert data["results"][0]["card"] == "NVIDIA H100 80GB HBM3"
    table = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--device", "cpu", "-b", "64", "--per-layer"])
    assert table.exit_code == 0 and "saved activations per module" in table.output
    assert "1.00" in table.output  # 1,048,152 B = 1.00 MiB


def test_measure_json_is_the_measurements_to_dict() -> None:
    """``batchfit measure --json`` lists each :class:`Measurement` as its ``to_dict()``, and the
    dict carries the measurement's own figures (one real CPU step, so the peak equals the estimate)."""
    out = runner.invoke(app, ["measure", "mlp", "--dataset", "mnist", "--device", "cpu", "-b", "8", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    (row,) = data["results"]
    assert set(row) == {
        "batch_size",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_used_bytes",
        "device",
        "seconds",
        "steady_seconds",
        "samples_per_second",
    }
    assert row["batch_size"] == 8 and row["device"] == "cpu" and row["peak_reserved_bytes"] is None
    assert row["seconds"] > 0
    assert row["peak_allocated_bytes"] == estimate("mlp", dataset="mnist", batch_size=8, device="cpu").peak_allocated_bytes


def test_a_report_keeps_its_card_and_step_and_the_cli_compares_with_it() -> None:
    """``batchfit estimate`` is estimate() plus output: --compare measures the report's own step."""
    on_t4 = estimate("mlp", dataset="mnist", batch_size=[8], gpu="T4")
    assert on_t4.budget is not None and on_t4.budget.card.key == "t4"
    assert on_t4.budget_description == str(on_t4.budget)
    assert on_t4.spec is not None and on_t4.spec.device == "cuda" and str(on_t4.spec.optimizer) == "sgd"
    on_cpu = estimate("mlp", dataset="mnist", batch_size=[8], device="cpu", threads=1)
    assert on_cpu.budget is None and on_cpu.spec is not None and on_cpu.spec.threads == 1
    out = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--device", "cpu", "-b", "8", "--compare", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    # a CPU estimate equals the real step to the byte (README), so the comparison shows no error
    assert data["measured"] == [{"batch_size": 8, "measured_peak_allocated_bytes": data["results"][0]["peak_allocated_bytes"]}]


def test_cli_errors_are_messages_with_exit_codes(tmp_path) -> None:
    bad = runner.invoke(app, ["estimate", "resnet17"])
    assert bad.exit_code == 3 and "resnet18" in bad.output and "Traceback" not in bad.output
    size = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "-b", "0"])
    assert size.exit_code == 3
    no_gpu = runner.invoke(app, ["measure", "mlp", "--dataset", "mnist", "--device", "cuda"])
    if not torch.cuda.is_available():
        assert no_gpu.exit_code == 5 and "GPU" in no_gpu.output


def test_a_model_that_reads_values_falls_back_to_real_runs() -> None:
    """A value no fake run can know (here a parameter's: parameters never get real values, see
    _values.py) stops the trace; on a device this machine has, batch 1 and 2 run for real and the
    peak is extrapolated linearly, labelled as such. (Values of the batch's own tensors are
    computed for real instead: tests/test_values.py.)"""

    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc.weight.sum().item() > -1e9:  # control flow on a parameter's value
                x = x * 2
            return self.fc(x)

    from batchfit._measure import measure_step
    from batchfit._models import InputSpec, Workload
    from batchfit._step import make_spec

    r = estimate(ReadsValues(), input_size=(16,), batch_size=9, device="cpu")
    assert r.method == "extrapolated" and "extrapolated" in r.notes[0]
    w = Workload("reads", ReadsValues(), (InputSpec((16,)),))
    spec = make_spec("cpu")
    p1, p2 = (measure_step(w, b, spec).peak_allocated_bytes for b in (1, 2))
    assert r.peak_allocated_bytes == p1 + 8 * (p2 - p1)
    if not torch.cuda.is_available():
        with pytest.raises(BatchfitError) as info:
            estimate(ReadsValues(), input_size=(16,), batch_size=9, device="cuda")
        assert info.value.exit_code == 6 and "measure" in (info.value.hint or "")


def test_memtracker_peer_agrees_on_live_tensor_bytes() -> None:
    """PyTorch's MemTracker on the same step (fake CPU tensors) counts the same live tensors;
    batchfit also counts the oneDNN scratch a real CPU step allocates, so it is never below."""
    from batchfit._models import CNN
    from memtracker_peer import memtracker_peak

    peer, _ = memtracker_peak(lambda: CNN(1, 28, 10), (1, 28, 28), 32, "adam")
    ours = estimate("cnn", dataset="mnist", batch_size=32, optimizer="adam", device="cpu").peak_allocated_bytes
    assert ours >= peer
    assert (ours - peer) / ours < 0.10  # MemTracker's own tests accept +-10% of active bytes
