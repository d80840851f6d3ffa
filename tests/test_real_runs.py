"""Real runs (`measure`, and the estimate's fallback for models that read their inputs' values) run
the model on the user's own `example_inputs` values; an error the model raises there is exit 3
with the model's own message, never "internal error"."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate, load_workload
from batchfit._measure import measure_step
from batchfit._step import make_spec
from batchfit.cli import app

runner = CliRunner()

# A stand-in for torchvision's detection models in train mode (fasterrcnn takes minutes here):
# it reads its targets' boxes, refuses degenerate ones as GeneralizedRCNN.forward does, and
# returns its losses by name.
DETECTOR = """
import torch
from torch import nn


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)
        self.box_head = nn.Linear(4, 4)
        self.cls_head = nn.Linear(4, 3)

    def forward(self, images, targets):
        for t in targets:
            boxes = t["boxes"]
            if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                raise ValueError(f"All bounding boxes should have positive height and width, got {boxes.tolist()}")
        feats = self.backbone(images).mean((2, 3))
        boxes = torch.stack([t["boxes"][0] for t in targets])
        labels = torch.stack([t["labels"][0] for t in targets])
        return {
            "loss_box": nn.functional.l1_loss(self.box_head(feats), boxes),
            "loss_cls": nn.functional.cross_entropy(self.cls_head(feats), labels),
        }


def example_inputs(batch_size):
    images = torch.rand(batch_size, 3, 8, 8)
    targets = [{"boxes": torch.tensor([BOX]), "labels": torch.tensor([1])} for _ in range(batch_size)]
    return images, targets
"""

# An LSTM over pack_padded_sequence: the lengths are values the model reads (zeros are invalid).
PACKED = """
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.seen = []

    def forward(self, x, lengths):
        self.seen.append(lengths.tolist())
        _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.head(h[-1])


def example_inputs(batch_size):
    return torch.randn(batch_size, 5, 6), torch.full((batch_size,), 3)
"""


def _file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return str(path)


def test_the_fallback_runs_the_model_on_the_example_inputs_values(tmp_path) -> None:
    """Boxes from example_inputs reach the real runs at batch 1 and 2 (noise would be refused),
    and the estimate is the line through those two real steps."""
    w = load_workload(f"{_file(tmp_path, 'det', DETECTOR.replace('BOX', '[1.0, 1.0, 5.0, 6.0]'))}:Detector")
    r = estimate(w, batch_size=6, device="cpu")
    assert r.method == "extrapolated"
    spec = make_spec("cpu")
    p1, p2 = (measure_step(w, b, spec).peak_allocated_bytes for b in (1, 2))
    assert r.peak_allocated_bytes == p1 + 5 * (p2 - p1)
    assert r.loss == "the sum of the model's 2 losses (loss_box, loss_cls)"


def test_packed_sequence_lengths_come_from_example_inputs(tmp_path) -> None:
    w = load_workload(f"{_file(tmp_path, 'packed', PACKED)}:Packed")
    m = measure_step(w, 2, make_spec("cpu"))
    assert m.peak_allocated_bytes > 0
    # the labels' forward and two iterations, each on the user's lengths
    assert w.model.seen == [[3, 3]] * 3
    out = runner.invoke(app, ["estimate", f"{tmp_path / 'packed.py'}:Packed", "--device", "cpu", "-b", "2"])
    assert out.exit_code == 0, out.output
    assert "extrapolated from real runs" in out.output


def test_an_error_the_model_raises_in_a_real_run_is_exit_3_with_its_message(tmp_path) -> None:
    target = f"{_file(tmp_path, 'bad', DETECTOR.replace('BOX', '[5.0, 5.0, 1.0, 1.0]'))}:Detector"
    with pytest.raises(BatchfitError) as info:
        estimate(load_workload(target), batch_size=4, device="cpu")
    assert info.value.exit_code == 3
    assert "ValueError: All bounding boxes should have positive height and width" in info.value.message
    assert "[[5.0, 5.0, 1.0, 1.0]]" in info.value.message  # the user's own (invalid) values
    for command in (["estimate", target, "--device", "cpu", "-b", "4"], ["measure", target, "--device", "cpu"]):
        out = runner.invoke(app, command)
        assert out.exit_code == 3, out.output
        assert "positive height and width" in out.output and "internal error" not in out.output
