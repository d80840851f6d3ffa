"""A small CNN's training peak, WSShiro/vramexp (GitHub), vramexp1.ipynb, section "Convolutional Neural Network".

    PYTHONPATH=src:bench/published python3 bench/published/vramexp_cnn.py [--json out.json]

Source: https://github.com/WSShiro/vramexp, notebook vramexp1.ipynb (read at commit 322d1b87),
run on an NVIDIA GeForce RTX 4090 (its TensorFlow cell prints the card) with torch 2.0.1, CUDA
11.8, cuDNN 8.9 (the notebook's environment list). The cell's printed output, after three epochs:
"Train: allocated = 114.0 MiB, reserved = 604.0MiB, max allocated = 547.2 MiB" (MiB = 2^20 B,
``torch.cuda.max_memory_allocated() / 1024**2``), and before the model: "Initial: allocated = 31.9
MiB" right after ``reset_peak_memory_stats()``: 31.9 MiB of earlier cells' tensors stay alive
through the cell and are in the peak, so the cell's own peak is 547.2 - 31.9 = 515.3 MiB (to the
0.1 MiB the notebook prints; the notebook's prose quotes 531 MiB, from another run).

The workload, from the cell's source: ``CNN`` = Conv2d(3, 8, 3) -> AvgPool2d(2, 2) -> flatten ->
Linear(8 x 111 x 111, 10), float32; batches of 128 random 3 x 224 x 224 images with float targets
``torch.randn(128, 10)`` (``F.cross_entropy`` with class probabilities), moved to the GPU in the
loop; ``optim.SGD(model.parameters(), lr=0.01)``; the loop body ``x = x.to(dev); y = y.to(dev);
opt.zero_grad(); y_pred = model(x); loss = criterion(y_pred, y); loss.backward(); opt.step()``,
run here as a ``--step`` function whose ``y_pred`` and ``loss`` live until rebound, as the loop's
variables do.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchfit import estimate
from batchfit._models import InputSpec, Workload

PUBLISHED_MIB = 547.2 - 31.9  # max allocated minus what was allocated before the cell began


class CNN(nn.Module):
    def __init__(self, dim_h: int = 224, dim_w: int = 224) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels=3, out_channels=8, kernel_size=3)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.fc = nn.Linear(8 * ((dim_h - 2) // 2) * ((dim_w - 2) // 2), 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)  # type: ignore[no-any-return]


class NotebookLoop:
    """The cell's loop body; ``y_pred`` and ``loss`` stay alive until the next iteration rebinds them."""

    def __init__(self) -> None:
        self.y_pred: Any = None
        self.loss: Any = None

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any, optimizer: Any) -> None:
        x, y = inputs
        optimizer.zero_grad()
        self.y_pred = model(x)
        self.loss = F.cross_entropy(self.y_pred, y)
        self.loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the row here")
    args = parser.parse_args()
    with torch.device("meta"):
        model = CNN()
    workload = Workload(
        "vramexp-cnn", model, inputs=(InputSpec((3, 224, 224), torch.float32), InputSpec((10,), torch.float32))
    )
    est = estimate(
        workload,
        batch_size=128,
        optimizer="SGD(lr=0.01)",
        device="cuda",
        gpu="NVIDIA GeForce RTX 4090",
        step=NotebookLoop(),
    )
    ours = est.peak_allocated_bytes / 2**20
    row = {
        "model": "vramexp CNN",
        "transformers": "-",
        "torch": torch.__version__,
        "batch": 128,
        "seq": 224,
        "attention": "-",
        "published_mb": round(PUBLISHED_MIB, 1),
        "batchfit_mb": round(ours, 1),
        "error": round((ours - PUBLISHED_MIB) / PUBLISHED_MIB, 4),
        "unit": "MiB",
        "peak_phase": est.peak_phase,
        "breakdown_mib": {k: round(v / 2**20, 1) for k, v in est.breakdown.items() if v},
        "notes": est.notes,
    }
    print(f"vramexp CNN b128: published {PUBLISHED_MIB:.1f} MiB, batchfit {ours:.1f} MiB, error {row['error']:+.2%}")
    print(row["breakdown_mib"], est.peak_where, est.notes)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([row], fh, indent=1)


if __name__ == "__main__":
    main()
