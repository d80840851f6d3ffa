"""Without --loss, batchfit picks a loss only where the output says what it is, says which one
ran, and otherwise asks for --loss or --step (exit 3) instead of training on a guess."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate
from batchfit._measure import measure_step
from batchfit._models import InputSpec, Workload
from batchfit._step import make_spec
from batchfit.cli import app
from zoo import zoo_workload

runner = CliRunner()


class TwoHeads(nn.Module):
    """A dict output without a loss: which entry trains, and how, is the user's to say."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.conv1(x)
        return {"a": a, "b": self.conv2(torch.relu(a))}


class Segmenter(nn.Module):
    """Raw (N, C, H, W) logits, 5 classes per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass
class Output:
    """An object (not a dict) with a ``logits`` attribute, like transformers' ModelOutput."""

    logits: torch.Tensor
    hidden: torch.Tensor


class WithOutputObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> Output:
        h = self.fc(x)
        return Output(h, torch.relu(h))


class LossFirst(nn.Module):
    """transformers without return_dict: ``(loss, logits)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits.square().mean(), logits


def _w(model: nn.Module, *shape: int) -> Workload:
    return Workload(type(model).__name__, model, (InputSpec(shape),))


@pytest.mark.parametrize(
    ("model", "shape", "what"),
    [
        (TwoHeads(), (3, 8, 8), "a dict ('a', 'b') without a 'loss' or 'logits' entry"),
        (Segmenter(), (3, 8, 8), "a (N, 5, 8, 8) tensor"),
        (nn.Sequential(nn.Linear(6, 1), nn.Flatten(0)), (6,), "a (N,) tensor"),
    ],
)
def test_an_output_whose_loss_is_not_certain_asks_for_loss_or_step(model: nn.Module, shape, what) -> None:
    with pytest.raises(BatchfitError) as info:
        estimate(_w(model, *shape), batch_size=4, device="cpu")
    err = info.value
    assert err.exit_code == 3 and what in err.message
    assert "`loss='cross-entropy'`" in (err.hint or "") and "`step=" in (err.hint or "")


def test_the_cli_refuses_a_dict_without_loss(tmp_path) -> None:
    f = tmp_path / "heads.py"
    f.write_text(
        "import torch\nfrom torch import nn\n"
        "class TwoHeads(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.c = nn.Conv2d(3, 8, 3); self.d = nn.Conv2d(8, 8, 3)\n"
        "    def forward(self, x):\n        a = self.c(x)\n        return {'a': a, 'b': self.d(a)}\n"
    )
    out = runner.invoke(app, ["estimate", f"{f}:TwoHeads", "--input", "3,16,16", "--device", "cpu", "-b", "2"])
    assert out.exit_code == 3, out.output
    assert "cannot tell which loss" in out.output and "--loss" in out.output and "Traceback" not in out.output


def test_segmentation_logits_with_cross_entropy_take_classes_on_dim_1() -> None:
    """``--loss cross-entropy`` is F.cross_entropy's convention: labels (N, H, W), one per pixel,
    and the estimate equals a real CPU step of that loss."""
    w = _w(Segmenter(), 3, 8, 8)
    r = estimate(w, batch_size=4, device="cpu", loss="cross-entropy")
    assert r.breakdown["inputs"] == 4 * 3 * 8 * 8 * 4 + 4 * 8 * 8 * 8  # images (fp32) + int64 labels (N, H, W)
    assert r.loss == "cross-entropy (--loss) on the output, (N, 5, 8, 8)"
    real = measure_step(w, 4, make_spec("cpu", loss="cross-entropy"))
    assert abs(r.peak_allocated_bytes - real.peak_allocated_bytes) / real.peak_allocated_bytes < 0.01


def test_the_estimate_says_which_loss_ran() -> None:
    mlp = estimate("mlp", dataset="mnist", batch_size=8, device="cpu")
    assert mlp.loss == "cross-entropy over the last dimension of the output, (N, 10) class logits"
    lm = estimate(zoo_workload("tied_lm"), batch_size=2, device="cpu")
    assert lm.loss == "token-cross-entropy over the last dimension of the output, (N, 12, 50) token logits"
    assert lm.breakdown["inputs"] == 2 * 12 * 8 * 2  # int64 token ids and int64 labels, (N, 12) each
    llama = estimate(zoo_workload("llama_tiny"), batch_size=2, device="cpu")
    assert llama.loss == "token-cross-entropy over the last dimension of the output, (N, 16, 100) token logits"
    obj = estimate(_w(WithOutputObject(), 6), batch_size=4, device="cpu")
    assert obj.loss == "cross-entropy over the last dimension of the output's 'logits' entry, (N, 4) class logits"
    first = estimate(_w(LossFirst(), 6), batch_size=4, device="cpu")
    assert first.loss == "the model's own loss (the first element of its output)"
    assert first.breakdown["inputs"] == 4 * 6 * 4  # no labels were made
    dict_in = estimate(zoo_workload("dict_input"), batch_size=2, device="cpu")
    assert "'logits' entry" in (dict_in.loss or "")


def test_the_loss_is_in_the_cli_text_and_json() -> None:
    text = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--device", "cpu", "-b", "8"])
    assert text.exit_code == 0, text.output
    assert "loss: cross-entropy over the last dimension of the output, (N, 10) class logits" in text.output
    out = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "-b", "8", "--json", "--loss", "mse"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["results"][0]["loss"] == "mse (--loss) on the output, (N, 10)"


def test_a_users_loss_gets_the_whole_output(tmp_path) -> None:
    f = tmp_path / "losses.py"
    f.write_text("def both(output, labels):\n    return output['a'].mean() + output['b'].square().mean()\n")
    w = _w(TwoHeads(), 3, 8, 8)
    r = estimate(w, batch_size=2, device="cpu", loss=f"{f}:both")
    real = measure_step(w, 2, make_spec("cpu", loss=f"{f}:both"))
    assert abs(r.peak_allocated_bytes - real.peak_allocated_bytes) / real.peak_allocated_bytes < 0.01
    # a named loss needs to know which tensor: the dict has no 'logits' entry
    with pytest.raises(BatchfitError, match="`loss` needs the model's logits"):
        estimate(w, batch_size=2, device="cpu", loss="mse")
