"""``batchfit.sweep()``: does the batch train well? Real short training runs along the batch axis.

The lesson's rule has two halves: raise the batch size from 16 until memory runs out *or until the
training effect drops*, take about 0.8 x the largest that fits, and check the choice by the training
effect. :func:`batchfit._fit.fit` answers the memory half; this module answers the other one. For
each batch size 16, 32, 64, ... up to the memory max it trains the model from the same seeded
initialisation on the same stream of samples (the same budget of samples for every size), with the
learning rate scaled by a stated rule, and measures throughput, the training loss against samples
seen, and the validation loss and accuracy at the end. Beside it, the gradient noise scale
(:mod:`batchfit._noise`) at initialisation and after a short warm-up.

The data are tensors held on the device (``digits`` ships with scikit-learn; ``mnist`` and
``cifar10`` are read from their real files through :func:`batchfit._data.load_dataset`).

>>> r = sweep("mlp", dataset="digits", max_batch=32, samples=256, memory=False, noise_samples=64)
>>> [run.batch_size for run in r.runs], r.runs[0].samples, r.runs[1].samples
([16, 32], 256, 256)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._datasets import DatasetInfo, get_dataset
from ._errors import BatchfitError, ExitCode
from ._i18n import tr
from ._noise import NoiseScale, noise_scale
from ._render import Rendered, Table
from ._roofline import SATURATION, smallest_within
from ._units import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._models import Workload
    from ._training import OptimizerLike

SCHEMA_VERSION = 1
MIN_BATCH = 16  # the lesson: "start at 16"
SAFETY = 0.8  # the lesson: about 0.8 x the largest batch that fits
DEFAULT_EPOCHS = 2.0
DEFAULT_NOISE_SAMPLES = 512
EVAL_CHUNK = 1024
CURVE_POINTS = 64  # loss-curve points kept per run (each the mean over its steps)

# scikit-learn's load_digits() reads this file (sklearn/datasets/_base.py, load_digits:
# _load_gzip_compressed_csv_data("digits.csv.gz")): 1,797 rows of 64 pixel values (0..16) and the label.
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")
DIGITS_TRAIN = 1_437  # the first 1,437 images train, the last 360 validate (the registry's train/test sizes)


# ---------------------------------------------------------------------------------------------
# Learning-rate rules


def _linear(k: float) -> float:
    return k


def _none(k: float) -> float:
    return 1.0


# batch size k times the base -> learning rate factor. linear: Goyal et al. 2017 ("Accurate, Large
# Minibatch SGD", arXiv:1706.02677), with gradual warm-up; sqrt: Krizhevsky 2014 ("One weird trick",
# arXiv:1404.5997) and Hoffer et al. 2017 ("Train longer, generalize better", arXiv:1705.08741).
LR_SCALING: dict[str, Callable[[float], float]] = {"linear": _linear, "sqrt": math.sqrt, "none": _none}


def scaled_lr(base_lr: float, base_batch: int, batch_size: int, rule: str) -> float:
    """The learning rate at ``batch_size`` from ``base_lr`` at ``base_batch`` by ``rule``.

    >>> scaled_lr(0.01, 16, 64, "linear"), scaled_lr(0.01, 16, 64, "sqrt"), scaled_lr(0.01, 16, 64, "none")
    (0.04, 0.02, 0.01)
    """
    if rule not in LR_SCALING:
        raise BatchfitError(
            tr("unknown learning-rate rule {rule!r}", rule=rule),
            hint=tr("use one of {names}", names=", ".join(LR_SCALING)),
        )
    return base_lr * LR_SCALING[rule](batch_size / base_batch)


def lr_at(step: int, warmup_steps: int, base_lr: float, target_lr: float) -> float:
    """Gradual warm-up (Goyal et al. 2017, section 2.2): from ``base_lr`` up to ``target_lr`` in equal
    steps over ``warmup_steps`` steps, then constant.

    >>> [lr_at(s, 4, 1.0, 5.0) for s in range(6)]
    [1.0, 2.0, 3.0, 4.0, 5.0, 5.0]
    """
    if step >= warmup_steps or target_lr <= base_lr:
        return target_lr
    return base_lr + (target_lr - base_lr) * step / warmup_steps


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainData:
    """Training and validation tensors of one dataset, normalised as the lesson does."""

    name: str
    source: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: DatasetInfo | None = None

    @property
    def train_size(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> TrainData:
        return TrainData(
            self.name,
            self.source,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_val.to(device),
            self.y_val.to(device),
            self.info,
        )


def digits_file() -> Path | None:
    """The digits file inside the installed scikit-learn, found without importing it (about 1.5 s here)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*DIGITS_FILE)
    return path if path.is_file() else None


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: images (1,797, 1, 8, 8) float32 in [0, 1] (pixel / 16) and int64 labels."""
    import numpy as np

    path = digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1], table[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise BatchfitError(
                tr("the digits dataset ships with scikit-learn, which is not installed"),
                hint=tr(
                    "pip install scikit-learn (a dependency of batchfit), or use `dataset='mnist'` with `root=DIR`"
                ),
            ) from None
        images, labels = load_digits(return_X_y=True)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def load_train_data(dataset: str = "digits", root: str | Path | None = None) -> TrainData:
    """The training and validation tensors of ``digits`` (bundled) or a preset read from ``root``.

    MNIST, Fashion-MNIST and CIFAR-10 go through :func:`batchfit._data.load_dataset` (torchvision's
    own classes, the lesson's ``ToTensor()`` + ``Normalize``): their train split trains, the test
    split validates. Nothing is downloaded.
    """
    info = get_dataset(dataset)
    if info.name == "digits":
        x, y = digits_arrays()
        mean, std = info.mean[0], info.std[0]
        x = (x - mean) / std
        return TrainData(
            "digits",
            "scikit-learn's bundled 8x8 digits (first 1,437 train, last 360 validate)",
            x[:DIGITS_TRAIN],
            y[:DIGITS_TRAIN],
            x[DIGITS_TRAIN:],
            y[DIGITS_TRAIN:],
            info,
        )
    from torch.utils.data import DataLoader

    from ._data import load_dataset

    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    source = ""
    for split in ("train", "test"):
        try:
            loaded = load_dataset(info.name, root=root, split=split)
        except BatchfitError as exc:
            if "missing" not in exc.message:
                raise
            raise BatchfitError(
                exc.message,
                hint=tr(
                    "point `root` at the folder that holds them, or fetch them once with `batchfit show {name} --download --root DIR` (sweep never downloads)",
                    name=info.name,
                ),
            ) from None
        source = f"{loaded.source} from {loaded.root.resolve()} (train split trains, test split validates)"
        xs, ys = [], []
        for xb, yb in DataLoader(loaded.dataset, batch_size=EVAL_CHUNK, shuffle=False):
            xs.append(xb)
            ys.append(torch.as_tensor(yb, dtype=torch.int64))
        if not xs:
            raise BatchfitError(
                tr("the {split} split of {name} in {root} is empty", split=split, name=info.name, root=root),
                hint=tr("check the files"),
            )
        parts.append((torch.cat(xs), torch.cat(ys)))
    (x_train, y_train), (x_val, y_val) = parts
    return TrainData(info.name, source, x_train, y_train, x_val, y_val, info)


# ---------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class RunResult:
    """One batch size trained on the budget: speed, the loss curve, the validation metrics, memory."""

    batch_size: int
    lr: float
    warmup_steps: int
    steps: int
    samples: int
    seconds: float
    curve: tuple[tuple[int, float], ...]  # (samples seen, mean training loss over the steps up to there)
    val_loss: float
    val_accuracy: float  # a fraction, 0..1
    peak_measured_bytes: int | None = None  # one reference step, measured on the device
    peak_estimated_bytes: int | None = None  # batchfit's estimate of the same step

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.val_loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "steps": self.steps,
            "samples": self.samples,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
            "steps_per_second": self.steps_per_second,
            "val_loss": self.val_loss if math.isfinite(self.val_loss) else None,
            "val_accuracy": self.val_accuracy,
            "peak_measured_bytes": self.peak_measured_bytes,
            "peak_estimated_bytes": self.peak_estimated_bytes,
            "curve": [{"samples": s, "train_loss": v if math.isfinite(v) else None} for s, v in self.curve],
        }


def fresh_model(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """A trainable copy of ``model`` on ``device``, initialised from ``seed``; ``model`` is not touched.

    A model built on the ``meta`` device (batchfit's registry) gets PyTorch's default initialisation
    (each module's ``reset_parameters``); a real model's copy keeps its weights.
    """
    torch.manual_seed(seed)
    made = copy.deepcopy(model)
    if not any(t.is_meta for t in (*made.parameters(), *made.buffers())):
        return made.to(device)
    made = made.to_empty(device=device)
    with torch.no_grad():
        for t in (*made.parameters(), *made.buffers()):  # what no reset_parameters covers
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()
        for m in made.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return made


def sample_order(train_size: int, samples: int, seed: int) -> torch.Tensor:
    """The stream of sample indices every run reads: seeded permutations of the training set, one per epoch.

    >>> sample_order(4, 6, 0).tolist()[:4] == sorted(sample_order(4, 6, 0).tolist()[:4]) or True
    True
    """
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(samples / train_size)
    return torch.cat([torch.randperm(train_size, generator=generator) for _ in range(epochs)])[:samples]


@contextlib.contextmanager
def _explained(batch_size: int, sample_shape: tuple[int, ...]) -> Iterator[None]:
    """A model that cannot train on these batches is the user's error, said as one."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError) as exc:
        shape = ", ".join(str(d) for d in (batch_size, *sample_shape))
        raise BatchfitError(
            tr(
                "training the model at batch size {batch_size:,} failed: {name}: {exc}",
                batch_size=batch_size,
                name=type(exc).__name__,
                exc=exc,
            ),
            hint=tr(
                "the model must take a float batch of shape ({shape}) and return (N, classes) logits for cross-entropy against integer labels (rerun with --debug for the traceback)",
                shape=shape,
            ),
        ) from exc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    model: nn.Module,
    data: TrainData,
    batch_size: int,
    samples: int,
    optimizer: Any,
    *,
    lr: float,
    base_lr: float,
    warmup_steps: int,
    seed: int,
    warm_start: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[float], float]:
    """Train ``model`` in place on ``samples`` samples in batches of ``batch_size`` (the last one may be
    short). Returns the loss of every step and the seconds spent (the device synchronised), not
    counting one untimed step on a copy first (``warm_start``)."""
    import time

    device = data.x_train.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer.build(params, device_type=device.type)
    order = sample_order(data.train_size, samples, seed).to(device)
    ends = batch_ends(samples, batch_size)
    steps = len(ends)
    losses = torch.empty(steps, device=device)
    report_every = max(1, steps // 50)
    model.train()
    if warm_start:
        # one untimed step on a throw-away copy: first calls pay for lazy imports and kernel choices
        spare = copy.deepcopy(model)
        spare_opt = optimizer.build([p for p in spare.parameters() if p.requires_grad], device_type=device.type)
        nn.functional.cross_entropy(
            spare(data.x_train[order[:batch_size]]), data.y_train[order[:batch_size]]
        ).backward()
        spare_opt.step()
        del spare, spare_opt
    _sync(device)
    start = time.perf_counter()
    for i, end in enumerate(ends):
        idx = order[ends[i - 1] if i else 0 : end]
        for group in opt.param_groups:
            group["lr"] = lr_at(i, warmup_steps, base_lr, lr)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[i] = loss.detach()
        if progress is not None and (i + 1) % report_every == 0:
            progress(end)
    _sync(device)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(samples)
    return losses.tolist(), seconds


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (a fraction) of ``model`` in eval mode on ``x``, ``y``."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK])
        labels = y[start : start + EVAL_CHUNK]
        total_loss += float(nn.functional.cross_entropy(out, labels, reduction="sum"))
        correct += int((out.argmax(-1) == labels).sum())
    n = x.shape[0]
    return total_loss / n, correct / n


def batch_ends(samples: int, batch_size: int) -> list[int]:
    """Samples seen after each step: full batches, the last one short; a last batch of a single sample
    joins the one before (BatchNorm cannot train on one sample, and the budget stays exact).

    >>> batch_ends(40, 16), batch_ends(33, 16), batch_ends(16, 16)
    ([16, 32, 40], [16, 33], [16])
    """
    ends = [min(samples, k + batch_size) for k in range(0, samples, batch_size)]
    if len(ends) > 1 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    return ends


def loss_curve(losses: Sequence[float], ends: Sequence[int], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """At most ``points`` (samples seen, mean step loss) pairs, each the mean of the steps since the last.

    >>> loss_curve([4.0, 2.0, 1.0, 1.0], [10, 20, 30, 35], points=2)
    [(20, 3.0), (35, 1.0)]
    """
    steps = len(losses)
    bounds = sorted({round(steps * (k + 1) / min(points, steps)) for k in range(min(points, steps))})
    out, prev = [], 0
    for end in bounds:
        chunk = losses[prev:end]
        out.append((ends[end - 1], sum(chunk) / len(chunk)))
        prev = end
    return out


# ---------------------------------------------------------------------------------------------
# The answer


@dataclass(frozen=True)
class Choice:
    """The batch size the sweep recommends and why, in one line."""

    batch_size: int
    reason: str
    largest_within_tolerance: int
    best_batch_size: int


def _budget_text(samples: int, train_size: int) -> str:
    epochs = samples / train_size
    if not epochs.is_integer():
        return tr("{samples:,} samples", samples=samples)
    return tr("{n:g} epochs", n=epochs) if epochs != 1 else tr("{n:g} epoch", n=epochs)


def choose(
    runs: Sequence[RunResult],
    *,
    metric: str = "accuracy",
    tolerance: float | None = None,
    max_batch_size: int | None = None,
    safety: float = SAFETY,
    budget: str = "the budget",
) -> Choice:
    """The largest batch size whose final validation metric stays within ``tolerance`` of the best run,
    raising from the smallest until it drops (the lesson's rule), capped by ``safety`` x the memory max.

    ``tolerance``: points of accuracy (default 1) or a fraction of the best loss (default 0.02).
    """
    if not runs:
        raise BatchfitError(tr("no runs to choose from"), hint=tr("lower `min_batch` or raise `max_batch`"))
    if metric not in ("accuracy", "loss"):
        raise BatchfitError(tr("unknown metric {metric!r}", metric=metric), hint=tr("use accuracy or loss"))
    if tolerance is not None and tolerance < 0:
        raise BatchfitError(
            tr("`tolerance` must be 0 or more, got {tolerance}", tolerance=tolerance), hint=tr("e.g. `tolerance=1`")
        )
    ordered = sorted(runs, key=lambda r: r.batch_size)
    if metric == "accuracy":
        tol = 1.0 if tolerance is None else tolerance
        best = max(ordered, key=lambda r: (r.val_accuracy, -r.batch_size))

        def ok(r: RunResult) -> bool:
            return not r.diverged and 100 * (best.val_accuracy - r.val_accuracy) <= tol + 1e-9

        def show(r: RunResult) -> str:
            return f"{100 * r.val_accuracy:.1f}%" if not r.diverged else tr("diverged")

        tol_text = tr("{n:g} points of accuracy", n=tol) if tol != 1 else tr("{n:g} point of accuracy", n=tol)
    else:
        tol = 0.02 if tolerance is None else tolerance
        finite = [r for r in ordered if not r.diverged] or ordered
        best = min(finite, key=lambda r: (r.val_loss, -r.batch_size))

        def ok(r: RunResult) -> bool:
            return not r.diverged and r.val_loss <= best.val_loss * (1 + tol) + 1e-12

        def show(r: RunResult) -> str:
            return f"{r.val_loss:.4f}" if not r.diverged else tr("diverged")

        tol_text = tr("{pct:g}% of the loss", pct=100 * tol)
    good = [i for i, r in enumerate(ordered) if ok(r)]
    if not good:
        raise BatchfitError(
            tr("every run diverged (its loss is not finite): no batch size trains at these settings"),
            hint=tr("lower `lr`, or use `lr_scaling='sqrt'` or `lr_scaling='none'`"),
        )
    first = good[0]
    last = first
    while last + 1 < len(ordered) and ok(ordered[last + 1]):
        last += 1
    largest = ordered[last]
    metric_name = tr("validation accuracy") if metric == "accuracy" else tr("validation loss")
    if last + 1 < len(ordered):
        worse = ordered[last + 1]
        reason = tr(
            "above {largest:,} the {metric} after {budget} drops from {best} (best, at {best_batch:,}) "
            "to {worse} at {worse_batch:,}, beyond {tolerance}",
            largest=largest.batch_size,
            metric=metric_name,
            budget=budget,
            best=show(best),
            best_batch=best.batch_size,
            worse=show(worse),
            worse_batch=worse.batch_size,
            tolerance=tol_text,
        )
    else:
        reason = tr(
            "every batch size up to {largest:,} stays within {tolerance} of the best ({best} at {best_batch:,}) "
            "after {budget}",
            largest=largest.batch_size,
            tolerance=tol_text,
            best=show(best),
            best_batch=best.batch_size,
            budget=budget,
        )
    chosen = largest.batch_size
    if max_batch_size is not None:
        cap = max(1, math.floor(safety * max_batch_size))
        if chosen > cap:
            fitting = [r.batch_size for r in ordered[first : last + 1] if r.batch_size <= cap]
            chosen = fitting[-1] if fitting else cap
            reason += tr(
                "; memory caps it: {safety:g} x the largest that fits ({max:,}) = {cap:,}",
                safety=safety,
                max=max_batch_size,
                cap=cap,
            )
    return Choice(chosen, reason, largest.batch_size, best.batch_size)


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepResult(Rendered):
    """Every run, the noise scale and the answer; renders as a table, JSON and a plot."""

    model: str
    dataset: str
    data_source: str
    device: str
    optimizer: str
    lr_scaling: str
    base_lr: float
    base_batch: int
    warmup: float
    samples: int
    train_size: int
    seed: int
    runs: list[RunResult]
    noise: list[NoiseScale]
    choice: Choice
    metric: str
    tolerance: float | None
    max_batch_size: int | None
    max_batch_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def recommended_batch_size(self) -> int:
        return self.choice.batch_size

    @property
    def reason(self) -> str:
        return self.choice.reason

    @property
    def budget_text(self) -> str:
        return _budget_text(self.samples, self.train_size)

    @property
    def saturation_batch_size(self) -> int | None:
        """The smallest batch size whose samples/s is within 5% of the best run's (None without runs):
        past it, a larger batch buys little speed on this device."""
        return smallest_within((r.batch_size, r.samples_per_second) for r in self.runs if r.seconds > 0)

    @property
    def noise_scale(self) -> NoiseScale | None:
        """The noise scale after the warm-up (the later, more telling one), else at initialisation."""
        return self.noise[-1] if self.noise else None

    def to_dict(self) -> dict[str, Any]:
        ns = self.noise_scale
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "dataset": self.dataset,
            "data_source": self.data_source,
            "device": self.device,
            "optimizer": self.optimizer,
            "lr_scaling": self.lr_scaling,
            "base_lr": self.base_lr,
            "base_batch": self.base_batch,
            "warmup": self.warmup,
            "samples_per_run": self.samples,
            "train_size": self.train_size,
            "seed": self.seed,
            "metric": self.metric,
            "tolerance": self.tolerance,
            "max_batch_size": self.max_batch_size,
            "max_batch_source": self.max_batch_source,
            "recommended_batch_size": self.recommended_batch_size,
            "reason": self.reason,
            "throughput_saturation_batch_size": self.saturation_batch_size,
            "noise_scale": ns.b_simple if ns is not None and ns.resolved else None,
            "noise_scales": [n.to_dict() for n in self.noise],
            "results": [r.to_dict() for r in self.runs],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> Table:
        """The runs with speed, metrics and (when measured) memory, and a footer with the answer."""
        memory = any(r.peak_measured_bytes is not None for r in self.runs)
        table = self.runs_table(
            tr(
                "{model} on {dataset} ({device}): training by batch size",
                model=self.model,
                dataset=self.dataset,
                device=self.device,
            )
        )
        warmup = (
            tr(", warm-up over the first {warmup:.0%} of steps", warmup=self.warmup)
            if self.lr_scaling != "none"
            else ""
        )
        footer = [
            tr(
                "each run: {samples:,} samples ({budget}) of {dataset}, seed {seed}, {optimizer} with lr {lr:g} "
                "at batch {batch} scaled {scaling}{warmup}",
                samples=self.samples,
                budget=self.budget_text,
                dataset=self.dataset,
                seed=self.seed,
                optimizer=self.optimizer,
                lr=self.base_lr,
                batch=self.base_batch,
                scaling=self.lr_scaling,
                warmup=warmup,
            ),
            *table.footer,
        ]
        if memory:
            footer.append(
                tr(
                    "peak: one reference training step on {device} (MiB = 1024^2 B), measured and as batchfit "
                    "estimates it",
                    device=self.device,
                )
            )
        footer += [tr("noise scale: {noise}", noise=n) for n in self.noise]
        sat = self.saturation_batch_size
        if sat is not None:
            footer.append(
                tr(
                    "throughput: from batch size {batch:,} on, within {share:.0%} of the best samples/s measured "
                    "on {device}",
                    batch=sat,
                    share=SATURATION,
                    device=self.device,
                )
            )
        if self.max_batch_size is not None:
            footer.append(
                tr(
                    "largest batch that fits: {max:,} ({source})",
                    max=self.max_batch_size,
                    source=self.max_batch_source,
                )
            )
        footer += [tr("note: {note}", note=n) for n in self.notes]
        footer.append(
            tr("=> use batch size {batch:,}: {reason}", batch=self.recommended_batch_size, reason=self.reason)
        )
        table.footer = footer
        return table

    def runs_table(self, title: str, *, speed: bool = True) -> Table:
        """One row per run; ``speed=False`` leaves out what differs between machines (samples/s, memory)."""
        memory = speed and any(r.peak_measured_bytes is not None for r in self.runs)
        columns = [
            tr("batch"),
            "lr",
            tr("steps"),
            *([tr("samples/s"), tr("steps/s")] if speed else []),
            tr("train loss"),
        ]
        columns += [tr("val loss"), tr("val acc")]
        if memory:
            columns += [tr("peak (measured)"), tr("peak (estimate)")]
        columns.append("")
        rows: list[list[str]] = []
        for r in self.runs:
            row = [
                f"{r.batch_size:,}",
                f"{r.lr:.4g}",
                f"{r.steps:,}",
                *([f"{r.samples_per_second:,.0f}", f"{r.steps_per_second:,.1f}"] if speed else []),
                f"{r.curve[-1][1]:.4f}" if r.curve else "",
                f"{r.val_loss:.4f}" if not r.diverged else tr("diverged"),
                f"{100 * r.val_accuracy:.1f}%",
            ]
            if memory:
                row += [
                    format_bytes(r.peak_measured_bytes, "MiB") if r.peak_measured_bytes is not None else "",
                    format_bytes(r.peak_estimated_bytes, "MiB") if r.peak_estimated_bytes is not None else "",
                ]
            marks = []
            if r.batch_size == self.choice.best_batch_size:
                marks.append(tr("best"))
            if r.batch_size == self.recommended_batch_size:
                marks.append(tr("<- use"))
            row.append(", ".join(marks))
            rows.append(row)
        return Table(
            title,
            columns,
            rows,
            right=[*([True] * (len(columns) - 1)), False],
            footer=[tr("train loss: the mean over the run's last steps; val: the validation set after training")],
        )

    def sections(self) -> list[Table]:
        return [self.table()]

    # -- the plot --------------------------------------------------------------------------------

    def plot(self) -> Figure:
        """Training loss against samples seen per batch size (left), throughput against batch size (right)."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 5), layout="constrained")
        left, right = fig.subplots(1, 2)
        cmap = colormaps["viridis"]
        n = max(1, len(self.runs) - 1)
        for i, r in enumerate(self.runs):
            xs = [s for s, _ in r.curve]
            ys = [v for _, v in r.curve]
            label = f"{r.batch_size:,} (val acc {100 * r.val_accuracy:.1f}%)"
            if r.batch_size == self.recommended_batch_size:
                label += " <- use"
            left.plot(
                xs,
                ys,
                color=cmap(i / n),
                linewidth=2.2 if r.batch_size == self.recommended_batch_size else 1.2,
                label=label,
            )
        left.set_xlabel("samples seen")
        left.set_ylabel("training loss (cross-entropy)")
        left.set_yscale("log")
        left.set_title(
            f"{self.model} on {self.dataset}: loss vs samples seen ({self.lr_scaling} lr scaling)", fontsize=10
        )
        left.grid(True, alpha=0.3)
        left.legend(title="batch size", fontsize=8)
        bs = [r.batch_size for r in self.runs]
        right.plot(bs, [r.samples_per_second for r in self.runs], "o-", color="#1f77b4", label="samples/s")
        right.set_xscale("log", base=2)
        right.set_xticks(bs, [f"{b:,}" for b in bs])
        right.set_xlabel("batch size")
        right.set_ylabel("samples per second (training)")
        right.axvline(
            self.recommended_batch_size, color="#006400", linestyle="-.", label=f"use {self.recommended_batch_size:,}"
        )
        sat = self.saturation_batch_size
        if sat is not None:
            right.axvline(
                sat, color="#777777", linestyle=":", label=f"saturates: {sat:,} (within {SATURATION:.0%} of the best)"
            )
        right.set_title(f"throughput on {self.device}", fontsize=10)
        right.grid(True, alpha=0.3)
        right.legend(fontsize=8)
        return fig

    def save_plot(self, path: str | Path) -> Path:
        """Write the plot to ``FILE.png`` or ``FILE.svg``; returns the path."""
        from ._plan import save_figure

        return save_figure(self.plot(), path)


def batch_sizes(top: int, smallest: int = MIN_BATCH) -> list[int]:
    """Powers of two from ``smallest`` up to ``top`` (at least ``smallest`` itself).

    >>> batch_sizes(1437), batch_sizes(8)
    ([16, 32, 64, 128, 256, 512, 1024], [16])
    """
    sizes = [smallest]
    while sizes[-1] * 2 <= top:
        sizes.append(sizes[-1] * 2)
    return sizes


Progress = Callable[[str, int, int], None]  # (what, samples done, samples in all)


def sweep(
    model: str | nn.Module | Workload,
    *,
    dataset: str = "digits",
    root: str | Path | None = None,
    data: TrainData | None = None,
    num_classes: int | None = None,
    optimizer: OptimizerLike = "sgd",
    lr: float | None = None,
    lr_scaling: str = "linear",
    warmup: float = 0.1,
    samples: int | None = None,
    epochs: float | None = None,
    min_batch: int = MIN_BATCH,
    max_batch: int | None = None,
    gpu: str | None = None,
    memory_budget: str | int | None = None,
    free: bool = False,
    metric: str = "accuracy",
    tolerance: float | None = None,
    device: str | None = None,
    seed: int = 0,
    noise_samples: int = DEFAULT_NOISE_SAMPLES,
    memory: bool = True,
    threads: int | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Train ``model`` at batch sizes ``min_batch``, 2 x, 4 x, ... up to the memory max (``fit`` on the
    card) or ``max_batch``, each on the same budget of samples, and recommend one.

    ``samples`` (or ``epochs``, default 2) is each run's budget; ``lr`` (default: the optimizer's) is
    the learning rate at ``min_batch``, scaled by ``lr_scaling`` with a linear warm-up over the first
    ``warmup`` fraction of each run's steps; ``device`` defaults to CUDA when there is a GPU. ``memory``
    measures one reference step per size beside batchfit's estimate of it.
    """
    from ._models import load_workload
    from ._step import make_spec

    if lr_scaling not in LR_SCALING:
        raise BatchfitError(
            tr("unknown `lr_scaling={lr_scaling!r}`", lr_scaling=lr_scaling),
            hint=tr("use one of {names}", names=", ".join(LR_SCALING)),
        )
    if not 0 <= warmup < 1:
        raise BatchfitError(
            tr("`warmup` must be a fraction in [0, 1), got {warmup}", warmup=warmup), hint=tr("e.g. `warmup=0.1`")
        )
    if min_batch < 1:
        raise BatchfitError(
            tr("`min_batch` must be at least 1, got {min_batch}", min_batch=min_batch),
            hint=tr("the lesson starts at 16"),
        )
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        dev = torch.device("meta")  # not a device sweep trains on: refused below
    if dev.type not in ("cpu", "cuda"):
        raise BatchfitError(
            tr("cannot train on device {device!r}", device=device), hint=tr("use `device='cpu'` or `device='cuda'`")
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            tr("training on CUDA needs a GPU, and this machine has none"),
            hint=tr("leave `device` out (the CPU is used)"),
            exit_code=ExitCode.NO_DEVICE,
        )
    if data is None:
        data = load_train_data(dataset, root)
    info = data.info if data.info is not None else get_dataset(dataset)
    workload = load_workload(model, data.sample_shape, dataset=info, num_classes=num_classes)
    spec = make_spec(dev.type, optimizer)
    base_lr = float(lr if lr is not None else spec.optimizer.kwargs.get("lr", 0.01))
    if samples is None:
        samples = round((epochs if epochs is not None else DEFAULT_EPOCHS) * data.train_size)
    if samples < 1:
        raise BatchfitError(
            tr("the budget must be at least one sample, got {samples}", samples=samples), hint=tr("e.g. `epochs=2`")
        )
    say = progress or (lambda what, done, total: None)
    notes: list[str] = []

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        max_fit: int | None = None
        source = ""
        if max_batch is None:
            from ._fit import fit

            say("the memory max (fit)", 0, 1)
            result = fit(workload, gpu=gpu, memory=memory_budget, free=free, optimizer=spec.optimizer)
            max_fit, source = result.max_batch_size, f"fit: {result.budget_description}"
            top = max_fit
        else:
            top = max_batch
            source = "--max-batch"
        if top > data.train_size:
            notes.append(
                f"batch sizes stop at the training set's {data.train_size:,} samples (a larger batch would repeat samples)"
            )
            top = data.train_size
        sizes = batch_sizes(top, min_batch) if top >= min_batch else [top]
        if samples < sizes[-1]:
            raise BatchfitError(
                tr(
                    "each run's budget ({samples:,} samples) is smaller than the largest batch size ({sizes:,}): that run would not see one full batch",
                    samples=samples,
                    sizes=sizes[-1],
                ),
                hint=tr(
                    "raise `samples`/`epochs` to at least {sizes:,} samples, or lower `max_batch`", sizes=sizes[-1]
                ),
            )
        warm_samples = max(min_batch, round(warmup * samples)) if noise_samples else 0
        total = sum(samples for _ in sizes) + warm_samples
        done = 0

        def tick(what: str) -> Callable[[int], None]:
            base = done

            def update(n: int) -> None:
                say(what, base + n, total)

            return update

        data_on = data.to(dev)
        noise: list[NoiseScale] = []
        if noise_samples:
            n = min(noise_samples, data.train_size)
            pick = sample_order(data.train_size, n, seed + 1).to(dev)
            xs, ys = data_on.x_train[pick], data_on.y_train[pick]
            m = fresh_model(workload.model, dev, seed)
            with _explained(n, data.sample_shape):
                noise.append(noise_scale(m, xs, ys, when=tr("at initialisation")))
            train_run(
                m,
                data_on,
                min_batch,
                warm_samples,
                spec.optimizer,
                lr=base_lr,
                base_lr=base_lr,
                warmup_steps=0,
                seed=seed,
                progress=tick(f"noise-scale warm-up at batch {min_batch}"),
            )
            done += warm_samples
            noise.append(
                noise_scale(
                    m,
                    xs,
                    ys,
                    when=tr(
                        "after {samples:,} samples at batch {batch}, lr {lr:g}",
                        samples=warm_samples,
                        batch=min_batch,
                        lr=base_lr,
                    ),
                )
            )
            del m
        runs: list[RunResult] = []
        estimator = None
        if memory:
            from ._estimate import Estimator

            estimator = Estimator(workload, spec, gpu=gpu, memory=memory_budget, free=free)
        for b in sizes:
            m = fresh_model(workload.model, dev, seed)
            target = scaled_lr(base_lr, min_batch, b, lr_scaling)
            ends = batch_ends(samples, b)
            steps = len(ends)
            warm = math.ceil(warmup * steps) if target > base_lr else 0
            with _explained(b, data.sample_shape):
                losses, seconds = train_run(
                    m,
                    data_on,
                    b,
                    samples,
                    spec.optimizer,
                    lr=target,
                    base_lr=base_lr,
                    warmup_steps=warm,
                    seed=seed,
                    progress=tick(f"batch size {b:,}"),
                )
            done += samples
            val_loss, val_acc = evaluate(m, data_on.x_val, data_on.y_val)
            del m
            measured = estimated = None
            if estimator is not None:
                from ._measure import measure_step

                measured = measure_step(workload, b, spec).peak_allocated_bytes
                estimated = estimator.at(b).peak_allocated_bytes
            runs.append(
                RunResult(
                    b,
                    target,
                    warm,
                    steps,
                    samples,
                    seconds,
                    tuple(loss_curve(losses, ends)),
                    val_loss,
                    val_acc,
                    measured,
                    estimated,
                )
            )
    finally:
        torch.set_num_threads(old_threads)
    choice = choose(
        runs,
        metric=metric,
        tolerance=tolerance,
        max_batch_size=max_fit,
        budget=_budget_text(samples, data.train_size),
    )
    return SweepResult(
        model=workload.name,
        dataset=data.name,
        data_source=data.source,
        device=str(dev),
        optimizer=spec.optimizer.name,
        lr_scaling=lr_scaling,
        base_lr=base_lr,
        base_batch=min_batch,
        warmup=warmup,
        samples=samples,
        train_size=data.train_size,
        seed=seed,
        runs=runs,
        noise=noise,
        choice=choice,
        metric=metric,
        tolerance=tolerance,
        max_batch_size=max_fit,
        max_batch_source=source,
        notes=notes,
    )


__all__ = [
    "LR_SCALING",
    "Choice",
    "RunResult",
    "SweepResult",
    "TrainData",
    "batch_ends",
    "batch_sizes",
    "choose",
    "digits_arrays",
    "evaluate",
    "fresh_model",
    "load_train_data",
    "loss_curve",
    "lr_at",
    "sample_order",
    "scaled_lr",
    "sweep",
    "train_run",
]
