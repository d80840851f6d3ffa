"""``batchfit.plan()``: the one-screen answer (model, memory, batch size, plot), and the seed's answer key.

:func:`plan` puts together what the other verbs find: the model's totals (:func:`~batchfit._summary`),
the largest batch that fits the card and the one to use (:func:`~batchfit._fit.fit`), the memory
breakdown at the recommended size, a table at standard batch sizes and a plot of every category
against the batch size. The sweep costs one allocator replay per batch size (fit's affine
timeline), not one trace.

:func:`answer_key` is what ``batchfit`` prints with no arguments: the lesson's MNIST MLP,
its hand-made memory table beside batchfit's exact figures, what the hand count misses, and the
batch size to use by the lesson's 0.8 rule.

>>> p = plan("mlp", dataset="mnist", gpu="h100", curve_points=8)
>>> p.recommended_batch_size   # capped at MNIST's 60,000 training images
60000
>>> p.at_recommended.total_bytes == sum(p.at_recommended.stack_bytes.values())
True
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._datasets import get_dataset
from ._errors import BatchfitError, ExitCode
from ._estimate import CUDA_CATEGORIES, Estimator, StepEstimate, make_spec, short_category
from ._fit import FitResult, fit, standard_batch_sizes
from ._i18n import tr
from ._models import load_workload
from ._render import Table, cell_len
from ._roofline import Roofline, roofline
from ._summary import ModelSummary, summary
from ._units import format_bytes, mib_cell

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._sweep import SweepResult

SCHEMA_VERSION = 1
GIB = 1024**3

# What stacks up to the nvidia-smi figure, bottom to top: the allocated categories at the step's
# peak, then what the caching allocator holds beyond them, then what it never sees.
STACK_CATEGORIES: tuple[str, ...] = (*CUDA_CATEGORIES, "allocator_reserve", "cuda_context")

_LABELS: dict[str, str] = {
    "parameters": "parameters",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "inputs": "inputs (batch + labels)",
    "activations": "activations (saved for backward)",
    "temporaries": "temporaries",
    "workspaces": "workspaces (cuBLAS, cuDNN)",
    "allocator_reserve": "allocator reserve (reserved - allocated)",
    "cuda_context": "CUDA context (outside the allocator)",
}
_COLORS: dict[str, str] = {
    "parameters": "#1f77b4",
    "buffers": "#aec7e8",
    "gradients": "#ff7f0e",
    "optimizer_state": "#ffbb78",
    "inputs": "#2ca02c",
    "activations": "#d62728",
    "temporaries": "#ff9896",
    "workspaces": "#9467bd",
    "allocator_reserve": "#c7c7c7",
    "cuda_context": "#7f7f7f",
}
_SHORT_EXTRA = {"allocator_reserve": "reserve", "cuda_context": "context"}


def _table_label(category: str) -> str:
    """:data:`_LABELS` in the current language, for tables (the plot keeps English: its fonts may lack CJK;
    the msgids are the labels, spelled out so that the catalogue test sees them)."""
    words = {
        "parameters": tr("parameters"),
        "buffers": tr("buffers"),
        "gradients": tr("gradients"),
        "optimizer_state": tr("optimizer state"),
        "inputs": tr("inputs (batch + labels)"),
        "activations": tr("activations (saved for backward)"),
        "temporaries": tr("temporaries"),
        "workspaces": tr("workspaces (cuBLAS, cuDNN)"),
        "allocator_reserve": tr("allocator reserve (reserved - allocated)"),
        "cuda_context": tr("CUDA context (outside the allocator)"),
    }
    return words.get(category, _LABELS[category])


def _short_extra(category: str) -> str | None:
    """:data:`_SHORT_EXTRA` in the current language."""
    short = _SHORT_EXTRA.get(category)
    return {"reserve": tr("reserve"), "context": tr("context")}.get(short, short) if short else None


# --plot FILE.<ext>: the formats matplotlib writes that we promise (and test)
PLOT_FORMATS: dict[str, str] = {".png": "png", ".svg": "svg"}


def check_plot_path(path: str | Path) -> Path:
    """The plot file's path, or a :class:`BatchfitError` when its extension is not one we write.

    >>> check_plot_path("memory.svg").suffix
    '.svg'
    """
    out = Path(path)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise BatchfitError(
            tr(
                "cannot write the plot to {out!r}: unknown image type {value!r}",
                out=str(out),
                value=out.suffix or "(no extension)",
            ),
            hint=tr(
                "name the file {names}, e.g. --plot memory.png", names=" or ".join("FILE" + e for e in PLOT_FORMATS)
            ),
            exit_code=ExitCode.USAGE,
        )
    return out


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``FILE.png`` or ``FILE.svg`` (the folder is created); returns the path."""
    out = check_plot_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = PLOT_FORMATS[out.suffix.lower()]
    # no date in SVG files, so that the same input writes the same file
    metadata = {"Date": None} if fmt == "svg" else None
    fig.savefig(out, format=fmt, dpi=dpi, metadata=metadata)
    return out


@dataclass(frozen=True)
class PlanPoint:
    """One batch size: what stacks up to the card's total, in bytes.

    ``stack_bytes`` holds the allocated categories at the peak of allocated memory, the allocator's
    reserve (reserved - allocated) and the CUDA context; they sum to ``total_bytes``.
    """

    batch_size: int
    stack_bytes: dict[str, int]
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    total_bytes: int
    fits: bool
    peak_where: str

    @classmethod
    def from_estimate(cls, e: StepEstimate) -> PlanPoint:
        reserved = e.peak_reserved_bytes if e.peak_reserved_bytes is not None else e.peak_allocated_bytes
        total = e.total_bytes if e.total_bytes is not None else reserved
        stack = {c: e.breakdown.get(c, 0) for c in CUDA_CATEGORIES}
        # the categories of an extrapolated estimate are unknown: show its peak as temporaries
        stack["temporaries"] += e.peak_allocated_bytes - sum(stack.values())
        stack["allocator_reserve"] = reserved - e.peak_allocated_bytes
        stack["cuda_context"] = total - reserved
        return cls(e.batch_size, stack, e.peak_allocated_bytes, reserved, total, bool(e.fits), e.peak_where)

    @property
    def allocator_reserve_bytes(self) -> int:
        return self.stack_bytes["allocator_reserve"]

    @property
    def cuda_context_bytes(self) -> int:
        return self.stack_bytes["cuda_context"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "stack_bytes": dict(self.stack_bytes),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "peak_where": self.peak_where,
        }


@dataclass
class Plan:
    """The one-screen answer for a model on a card; renders as tables and plots itself.

    ``rows`` are the standard batch sizes (the seed's 64/256/1024/4096 and powers of two up to the
    max, plus the recommended size and the max); ``curve`` is a denser sweep for the plot, a
    little past the max so that the plot shows the stack crossing the card's line.
    """

    summary: ModelSummary
    fit: FitResult
    rows: list[PlanPoint]
    curve: list[PlanPoint]
    notes: list[str] = field(default_factory=list)
    throughput: Roofline | None = None  # the roofline estimate of samples/s (not measured)

    # -- the answer ------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.fit.model

    @property
    def max_batch_size(self) -> int:
        return self.fit.max_batch_size

    @property
    def recommended_batch_size(self) -> int:
        return self.fit.recommended_batch_size

    @property
    def budget_bytes(self) -> int:
        return self.fit.budget_bytes

    def point(self, batch_size: int) -> PlanPoint:
        """The row or curve point at a batch size (KeyError when neither has it)."""
        for p in (*self.rows, *self.curve):
            if p.batch_size == batch_size:
                return p
        raise KeyError(batch_size)

    @property
    def at_recommended(self) -> PlanPoint:
        return self.point(self.recommended_batch_size)

    @property
    def at_max(self) -> PlanPoint:
        return self.point(self.max_batch_size)

    def categories(self) -> list[str]:
        """The stack's categories that are not zero everywhere, bottom to top."""
        return [c for c in STACK_CATEGORIES if any(p.stack_bytes.get(c) for p in (*self.rows, *self.curve))]

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        f = self.fit
        return {
            "schema_version": SCHEMA_VERSION,
            "model": f.model,
            "card": f.card,
            "budget": f.budget_description,
            "budget_bytes": f.budget_bytes,
            "optimizer": f.optimizer,
            "precision": f.precision,
            "safety": f.safety,
            "max_batch_size": f.max_batch_size,
            "recommended_batch_size": f.recommended_batch_size,
            "headroom_bytes": f.headroom_bytes,
            "dataset_size": f.dataset_size,
            "method": f.method,
            "notes": [*f.notes, *self.notes],
            "summary": {
                "total_params": s.total_params,
                "trainable_params": s.trainable_params,
                "param_bytes": s.param_bytes,
                "buffer_bytes": s.buffer_bytes,
                "total_mult_adds_per_sample": s.total_mult_adds,
                "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in s.inputs],
            },
            "categories": list(STACK_CATEGORIES),
            "at_recommended": self.at_recommended.to_dict(),
            "at_max": self.at_max.to_dict(),
            "table": [p.to_dict() for p in self.rows],
            "curve": [p.to_dict() for p in self.curve],
            "throughput_estimate": self.throughput.to_dict() if self.throughput is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # -- tables ----------------------------------------------------------------------------------

    def model_table(self) -> Table:
        s = self.summary
        shapes = "; ".join(f"[{', '.join(str(d) for d in shape[1:])}] {dtype}" for shape, dtype in s.inputs)
        rows: list[Sequence[str]] = [
            [tr("parameters"), tr("{n:,} ({trainable:,} trainable)", n=s.total_params, trainable=s.trainable_params)],
            [tr("parameter bytes"), f"{format_bytes(s.param_bytes)} ({s.param_bytes:,} B)"],
            [tr("buffer bytes"), f"{format_bytes(s.buffer_bytes)} ({s.buffer_bytes:,} B)"],
            [tr("one sample"), shapes],
            [tr("mult-adds per sample"), f"{s.total_mult_adds:,}"],
        ]
        if s.num_classes is not None:
            rows.append([tr("output classes"), tr("{n:,} (--num-classes to change)", n=s.num_classes)])
        return Table(tr("{model}: the model", model=s.model), ["", ""], rows, right=[False, False])

    def breakdown_table(self) -> Table:
        p = self.at_recommended
        total = p.total_bytes or 1
        rows: list[Sequence[str]] = [
            [_table_label(c), f"{n:,}", format_bytes(n, "MiB"), f"{100 * n / total:.1f}%"]
            for c in self.categories()
            if (n := p.stack_bytes.get(c, 0))
        ]
        rows += [
            [
                tr("peak allocated (max_memory_allocated)"),
                f"{p.peak_allocated_bytes:,}",
                format_bytes(p.peak_allocated_bytes, "MiB"),
                "",
            ],
            [
                tr("peak reserved (max_memory_reserved)"),
                f"{p.peak_reserved_bytes:,}",
                format_bytes(p.peak_reserved_bytes, "MiB"),
                "",
            ],
            [tr("total on the card (nvidia-smi)"), f"{p.total_bytes:,}", format_bytes(p.total_bytes, "MiB"), "100.0%"],
        ]
        return Table(
            tr(
                "memory at the recommended batch size {batch:,}, at the step's peak ({where})",
                batch=p.batch_size,
                where=p.peak_where,
            ),
            ["", tr("bytes"), "MiB", tr("share")],
            rows,
            footer=[tr("MiB = 1024^2 bytes")],
        )

    def sizes_table(self) -> Table:
        cats = self.categories()
        columns = [
            tr("batch"),
            *[_short_extra(c) or short_category(c) for c in cats],
            tr("alloc"),
            tr("reserved"),
            tr("total"),
            tr("fits"),
            "",
        ]
        marks = {self.max_batch_size: tr("<- max"), self.recommended_batch_size: tr("<- use")}
        if self.max_batch_size == self.recommended_batch_size:
            marks[self.max_batch_size] = tr("<- max, use")
        rows: list[Sequence[str]] = [
            [
                f"{p.batch_size:,}",
                *[mib_cell(p.stack_bytes.get(c, 0)) for c in cats],
                mib_cell(p.peak_allocated_bytes),
                mib_cell(p.peak_reserved_bytes),
                mib_cell(p.total_bytes),
                tr("yes") if p.fits else tr("NO"),
                marks.get(p.batch_size, ""),
            ]
            for p in self.rows
        ]
        return Table(
            tr(
                "{model} on {card}: one training step by batch size ({optimizer}, {precision}) "
                "- MiB (1 MiB = 1024^2 bytes), breakdown at the peak",
                model=self.model,
                card=self.fit.card,
                optimizer=self.fit.optimizer,
                precision=self.fit.precision,
            ),
            columns,
            rows,
            right=[*([True] * (len(columns) - 1)), False],
            footer=[
                tr("<- use: the recommended batch size; <- max: the largest that fits ({card})", card=self.fit.card),
                *[tr("note: {note}", note=n) for n in self.notes],
            ],
        )

    def tables(self) -> list[Table]:
        tables = [self.model_table(), self.fit.table(), self.breakdown_table(), self.sizes_table()]
        return tables + ([self.throughput.table()] if self.throughput is not None else [])

    def __str__(self) -> str:
        return "\n\n".join(str(t) for t in self.tables())

    def __rich__(self) -> Any:
        from rich.console import Group

        return Group(*(t.__rich__() for t in self.tables()))

    # -- the plot --------------------------------------------------------------------------------

    def plot(self, *, interactive: bool = False) -> Figure:
        """Stacked areas of each category against the batch size, the card's memory as a line.

        A plain ``matplotlib.figure.Figure`` (no pyplot state, no window) unless
        ``interactive=True``; Jupyter shows a :class:`Plan` with its plot by itself.
        """
        if interactive:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(11, 5.5), layout="constrained")
        else:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(11, 5.5), layout="constrained")
        from matplotlib.ticker import FuncFormatter

        ax = fig.add_subplot()
        curve = self.curve or self.rows
        xs = [p.batch_size for p in curve]
        cats = self.categories()
        ax.stackplot(
            xs,
            [[p.stack_bytes.get(c, 0) / GIB for p in curve] for c in cats],
            labels=[_LABELS[c] for c in cats],
            colors=[_COLORS[c] for c in cats],
            alpha=0.9,
            linewidth=0,
        )
        budget = self.budget_bytes / GIB
        ax.axhline(budget, color="black", linewidth=1.8, label=f"the card: {format_bytes(self.budget_bytes, 'GiB')}")
        f = self.fit
        gib = lambda n: format_bytes(n, "GiB")  # noqa: E731
        capped = f.recommended_batch_size != math.floor(f.safety * f.max_batch_size)
        rec_label = (
            f"recommended: {f.recommended_batch_size:,} "
            f"({'capped, see notes' if capped else f'{f.safety:g} x max'}), {gib(self.at_recommended.total_bytes)}"
        )
        ax.axvline(
            f.max_batch_size,
            color="#b00000",
            linestyle="--",
            linewidth=1.5,
            label=f"largest that fits: {f.max_batch_size:,}, {gib(self.at_max.total_bytes)}",
        )
        ax.axvline(f.recommended_batch_size, color="#006400", linestyle="-.", linewidth=1.5, label=rec_label)
        if xs[-1] > f.max_batch_size:
            ax.axvspan(f.max_batch_size, xs[-1], color="#b00000", alpha=0.08, linewidth=0, label="does not fit")
        if xs[-1] / max(xs[0], 1) > 64:  # a wide range: equal room for each doubling
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _compact(x)))
        ax.set_xlim(xs[0], xs[-1])
        top = max(budget, max(p.total_bytes for p in curve) / GIB)
        ax.set_ylim(0, top * 1.06)
        ax.set_xlabel("batch size")
        ax.set_ylabel("GiB (1 GiB = 1024^3 bytes)")
        ax.set_title(
            f"{self.model}: memory of one training step on {f.card} ({f.optimizer}, {f.precision})", fontsize=11
        )
        ax.grid(True, which="major", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if self.throughput is not None and self.throughput.points:
            right = ax.twinx()
            pts = self.throughput.points
            right.plot(
                [p.batch_size for p in pts],
                [p.samples_per_second for p in pts],
                "o:",
                color="#444444",
                markersize=3,
                label="samples/s, roofline estimate (right axis; a ceiling, not measured)",
            )
            right.set_ylim(bottom=0)
            right.set_ylabel("samples/s (roofline estimate)")
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # stack legend top to bottom, as drawn; the lines after it
        n = len(cats)
        order = [*reversed(range(n)), *range(n, len(handles))]
        fig.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="outside right upper",
            fontsize=8,
            frameon=False,
        )
        return fig

    def save_plot(self, path: str | Path) -> Path:
        """Write the plot to ``FILE.png`` or ``FILE.svg`` (the folder is created); returns the path."""
        return save_figure(self.plot(), path)

    def save_report(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (FILE.html): tables, inline SVG charts, assumptions."""
        from ._html import write_report

        return write_report(self, path)

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.plot().savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    def _repr_html_(self) -> str:
        png = base64.b64encode(self._repr_png_()).decode("ascii")
        return (
            f'<pre>{html.escape(str(self))}</pre>\n<img alt="memory by batch size" src="data:image/png;base64,{png}"/>'
        )


def _compact(x: float) -> str:
    """Batch sizes on an axis: 1, 10, 100, 1k, 10k, 1M."""
    for factor, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if x >= factor:
            return f"{x / factor:g}{suffix}"
    return f"{x:g}"


def sweep_sizes(max_batch_size: int, points: int, *, past: float = 1.25) -> list[int]:
    """Batch sizes for the plot: ``points`` sizes evenly spaced in log from 1 to ``past`` x the max.

    >>> sweep_sizes(1000, 4)
    [1, 11, 116, 1250]
    """
    top = max(2, math.ceil(past * max_batch_size))
    if points < 2:
        return [1, top]
    return sorted({max(1, round(top ** (i / (points - 1)))) for i in range(points)})


def plan(
    model: str | Any,
    input_size: Any = None,
    *,
    gpu: str | None = None,
    memory: str | int | None = None,
    free: bool = False,
    optimizer: Any = "sgd",
    precision: str = "fp32",
    safety: float = 0.8,
    dataset: str | None = None,
    num_classes: int | None = None,
    loss: Any = None,
    step: Any = None,
    alloc_conf: str | None = None,
    curve_points: int = 48,
    progress: Callable[[str], None] | None = None,
    context_bytes: str | int | None = None,
    throughput: bool = True,
) -> Plan:
    """The one-screen answer: the model, the largest and recommended batch size, memory by batch size.

    Options as :func:`batchfit._fit.fit`; ``curve_points`` is the number of batch sizes the plot
    sweeps (each one allocator replay when the step's timeline is affine in the batch size);
    ``context_bytes`` overrides the card's memory outside the allocator (``--context``);
    ``throughput`` adds the roofline estimate of samples/s by batch size (:mod:`batchfit._roofline`).
    Raises :class:`~batchfit._fit.DoesNotFit` when even batch size 1 does not fit.
    """
    say = progress or (lambda text: None)
    workload = load_workload(model, input_size, dataset=dataset, num_classes=num_classes)
    say("summarising the model")
    model_summary = summary(workload)
    result = fit(
        workload,
        gpu=gpu,
        memory=memory,
        free=free,
        optimizer=optimizer,
        precision=precision,
        safety=safety,
        loss=loss,
        step=step,
        alloc_conf=alloc_conf,
        progress=progress,
        context_bytes=context_bytes,
    )
    return plan_from_fit(model_summary, result, curve_points=curve_points, progress=progress, throughput=throughput)


def plan_from_fit(
    model_summary: ModelSummary,
    result: FitResult,
    *,
    curve_points: int = 48,
    progress: Callable[[str], None] | None = None,
    throughput: bool = False,
) -> Plan:
    """The plan around an answer :func:`~batchfit._fit.fit` already found (``fit --report`` uses it);
    ``throughput`` adds the roofline estimate of samples/s at the table's batch sizes."""
    say = progress or (lambda text: None)
    known: dict[int, StepEstimate] = {}
    for e in (result.estimate_at_max, result.estimate_at_recommended):
        if e is not None:
            known[e.batch_size] = e
    notes: list[str] = []
    row_sizes = sorted({*standard_batch_sizes(result.max_batch_size), result.recommended_batch_size})
    if result._timeline is not None:
        curve_sizes = sorted({*sweep_sizes(result.max_batch_size, curve_points), *row_sizes, result.max_batch_size + 1})
    else:
        # each size would need its own trace: the plot uses the table's sizes only
        top = sweep_sizes(result.max_batch_size, 2)[-1]
        curve_sizes = sorted({*row_sizes, result.max_batch_size + 1, top})
        notes.append("the step's timeline is not affine in the batch size: each size was traced, the plot is coarse")
    say(f"replaying the step at {len(curve_sizes)} batch sizes")
    points: dict[int, PlanPoint] = {}
    for b in curve_sizes:
        e = known.get(b) or result.estimate_at(b)
        points[b] = PlanPoint.from_estimate(e)
    est, budget = result._estimator, result.budget
    estimate = None
    if throughput and est is not None and budget is not None and est.spec.device == "cuda":
        sizes = [b for b in row_sizes if b <= result.max_batch_size]
        estimate = roofline(est.workload, est.spec, budget.card, sizes, model=result.model, progress=progress)
    return Plan(
        summary=model_summary,
        fit=result,
        rows=[points[b] for b in row_sizes],
        curve=[points[b] for b in curve_sizes],
        notes=notes,
        throughput=estimate,
    )


# ---------------------------------------------------------------------------------------------
# The seed lesson's answer key (``batchfit`` with no arguments)


@dataclass(frozen=True)
class SeedRow:
    """One row of the lesson's hand-made table, as the lesson states it (text, not bytes)."""

    batch_size: int
    data: str
    intermediates: str
    total: str


# The lesson's figures, quoted: they are its approximations, shown beside the exact values.
SEED_TABLE: tuple[SeedRow, ...] = (
    SeedRow(64, "192 KB", "32 KB", "~1 MB"),
    SeedRow(256, "768 KB", "128 KB", "~1.7 MB"),
    SeedRow(1024, "3 MB", "512 KB", "~4.5 MB"),
    SeedRow(4096, "12 MB", "2 MB", "~15 MB"),
)
SEED_PARAM_BYTES = "~403 KB"  # "101,770 x 4 B ~ 403 KB" (parameters; the same again for gradients)
SEED_MODEL_STATES = "~806 KB"  # parameters + gradients (and Adam's two states)
SEED_MODEL, SEED_DATASET, SEED_OPTIMIZER, SEED_SAFETY = "mlp", "mnist", "sgd", 0.8
# The training-effect half, run on data that ships (scikit-learn's 8x8 digits: no MNIST file ships with
# batchfit, and the no-argument run downloads nothing). SGD as in the lesson; lr 0.05 at batch 16 is a
# plain choice, not tuned; one thread, so that the numbers are the same on every run of this machine.
SEED_SWEEP: dict[str, Any] = {
    "dataset": "digits",
    "optimizer": "sgd",
    "lr": 0.05,
    "lr_scaling": "linear",
    "epochs": 10,
    "max_batch": 1024,
    "seed": 0,
    "threads": 1,
    "memory": False,
    "device": "cpu",
}


@dataclass(frozen=True)
class LinearCount:
    """A Linear layer's parameters, spelled out as the lesson does: in x out + out."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def label(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"

    @property
    def expression(self) -> str:
        bias = f" + {self.out_features}" if self.bias else ""
        return f"{self.in_features} x {self.out_features}{bias}"

    def __str__(self) -> str:
        return f"{self.label}: {self.expression} = {self.params:,}"


@dataclass
class AnswerKey:
    """The seed's scenario end to end: summary, parameter arithmetic, its table beside batchfit, the batch size."""

    summary: ModelSummary
    linears: list[LinearCount]
    param_bytes: int
    param_tensors: int
    element_size: int
    sample_numel: int
    cpu: list[StepEstimate]
    cuda: list[StepEstimate]
    fit: FitResult
    training: SweepResult | None = None  # the training-effect half (digits); None: memory only

    @property
    def total_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def recommended_batch_size(self) -> int:
        """The batch size to use: the memory rule's, lowered to where training stops keeping up."""
        rec = self.fit.recommended_batch_size
        return min(rec, self.training.recommended_batch_size) if self.training is not None else rec

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": SEED_MODEL,
            "dataset": SEED_DATASET,
            "optimizer": SEED_OPTIMIZER,
            "total_params": self.total_params,
            "param_bytes": self.param_bytes,
            "seed_table": [
                {"batch_size": r.batch_size, "data": r.data, "intermediates": r.intermediates, "total": r.total}
                for r in SEED_TABLE
            ],
            "cpu": [e.to_dict() for e in self.cpu],
            "cuda": [e.to_dict() for e in self.cuda],
            "fit": self.fit.to_dict(),
            "training": self.training.to_dict() if self.training is not None else None,
            "recommended_batch_size": self.recommended_batch_size,
        }

    # -- sections --------------------------------------------------------------------------------

    def _arithmetic(self) -> str:
        n, size = self.total_params, self.element_size
        label_w = max(len(lin.label) for lin in self.linears)
        expr_w = max(len(lin.expression) for lin in self.linears)
        num_w = len(f"{n:,}")
        total = tr("total")
        label_w = max(label_w, cell_len(total))
        lines = [tr("The parameters, counted by hand as the lesson does:")]
        lines += [
            f"  {lin.label.ljust(label_w)}  {lin.expression.rjust(expr_w)} = {lin.params:>{num_w},}"
            for lin in self.linears
        ]
        lines.append(
            f"  {total}{' ' * (label_w - cell_len(total))}  {''.rjust(expr_w)}   {n:,}  "
            + tr("(the summary counts {n:,})", n=self.summary.total_params)
        )
        b = self.param_bytes
        exact = f"{b:,} B = {format_bytes(b, 'KiB', 1)} = {format_bytes(b, 'KB', 1)}"
        lines += [
            tr(
                "  bytes: {n:,} x {size} B = {exact}   (the lesson: {lesson})",
                n=n,
                size=size,
                exact=exact,
                lesson=SEED_PARAM_BYTES,
            ),
            tr(
                "  gradients: the same count and dtype, {b:,} B; parameters + gradients = {b2:,} B = {kib} = {kb}"
                "   (the lesson: {lesson})",
                b=b,
                b2=2 * b,
                kib=format_bytes(2 * b, "KiB", 1),
                kb=format_bytes(2 * b, "KB", 1),
                lesson=SEED_MODEL_STATES,
            ),
            tr("  optimizer state: SGD keeps none; Adam keeps two values per parameter, {b2:,} B", b2=2 * b),
            tr(
                "  one image: {n:,} B as uint8, {n4:,} B as float32",
                n=self.sample_numel,
                n4=self.sample_numel * 4,
            ),
        ]
        return "\n".join(lines)

    def seed_table(self) -> Table:
        rows: list[Sequence[str]] = []
        for seed, cpu in zip(SEED_TABLE, self.cpu):
            inter = cpu.breakdown.get("activations", 0) + cpu.breakdown.get("temporaries", 0)
            rows.append(
                [
                    f"{seed.batch_size:,}",
                    seed.data,
                    format_bytes(cpu.breakdown.get("inputs", 0)),
                    seed.intermediates,
                    format_bytes(inter),
                    seed.total,
                    f"{cpu.peak_allocated_bytes:,} B",
                    format_bytes(cpu.peak_allocated_bytes, "MB"),
                ]
            )
        return Table(
            tr("The lesson's table (SGD) as the lesson states it, beside batchfit's CPU step (exact; its peak)"),
            [
                tr("batch"),
                tr("data (lesson)"),
                tr("inputs"),
                tr("intermediates (lesson)"),
                tr("activ. + temps"),
                tr("total (lesson)"),
                tr("one CPU step"),
                tr("in MB"),
            ],
            rows,
            footer=[
                tr(
                    "inputs: the images and their int64 labels; activ. + temps: saved for backward + everything else "
                    "alive at the peak (parameters and gradients make up the rest)"
                ),
                tr(
                    "KiB = 1024 B, MiB = 1024^2 B; MB = 10^6 B. A real CPU training step measures the same, to the byte."
                ),
            ],
        )

    def cuda_table(self) -> Table:
        rows: list[Sequence[str]] = []
        for e in self.cuda:
            reserved = e.peak_reserved_bytes or 0
            total = e.total_bytes or 0
            rows.append(
                [
                    f"{e.batch_size:,}",
                    format_bytes(e.peak_allocated_bytes, "MiB"),
                    format_bytes(e.breakdown.get("workspaces", 0), "MiB"),
                    format_bytes(reserved, "MiB"),
                    format_bytes(total - reserved, "MiB"),
                    format_bytes(total, "MiB"),
                ]
            )
        return Table(
            tr("The same steps on a GPU: {card} (simulated)", card=self.fit.card),
            [
                tr("batch"),
                tr("allocated (max_memory_allocated)"),
                tr("of which cuBLAS"),
                tr("reserved (max_memory_reserved)"),
                tr("CUDA context"),
                tr("total (nvidia-smi)"),
            ],
            rows,
            footer=[tr("card: {card}", card=self.fit.budget_description)],
        )

    def _misses(self) -> str:
        first_cpu, last_cpu = self.cpu[0], self.cpu[-1]
        first_cuda, last_cuda = self.cuda[0], self.cuda[-1]
        budget = self.fit.budget
        card = budget.card if budget is not None else None
        params_cpu = first_cpu.breakdown["parameters"]
        params_cuda = first_cuda.breakdown["parameters"]
        lines = [tr("What the hand count misses:")]

        def temps(e: StepEstimate) -> str:
            return format_bytes(e.breakdown.get("temporaries", 0))

        lines.append(
            tr(
                "  1. The backward pass's temporaries. The step's peak is in the backward pass, where the gradients "
                "of the activations and the weight gradient being computed are alive while the saved activations "
                "still are: at batch {b1:,} the peak is {where1} ({temps1} of temporaries, {grads1} of gradients); "
                "at batch {b2:,} it is {where2} ({temps2} of temporaries beside {acts2} of saved activations).",
                b1=first_cpu.batch_size,
                where1=first_cpu.peak_where,
                temps1=temps(first_cpu),
                grads1=format_bytes(first_cpu.breakdown["gradients"]),
                b2=last_cpu.batch_size,
                where2=last_cpu.peak_where,
                temps2=temps(last_cpu),
                acts2=format_bytes(last_cpu.breakdown["activations"]),
            )
        )
        reserve = (last_cuda.peak_reserved_bytes or 0) - last_cuda.peak_allocated_bytes
        lines.append(
            tr(
                "  2. The caching allocator (CUDA). Every block is rounded up to 512 B (the {tensors} parameter "
                "tensors take {cuda:,} B instead of {cpu:,} B) and blocks come from cached segments (2 MiB for "
                "requests up to 1 MiB, 20 MiB for 1-10 MiB): at batch {batch:,} the allocator reserves {reserve} "
                "more than the tensors need.",
                tensors=self.param_tensors,
                cuda=params_cuda,
                cpu=params_cpu,
                batch=last_cuda.batch_size,
                reserve=format_bytes(reserve, "MiB"),
            )
        )
        if card is not None:
            workspaces = first_cuda.breakdown.get("workspaces", 0)
            lines.append(
                tr(
                    "  3. The cuBLAS workspaces: {each} per cuBLAS handle on this card, taken through the allocator "
                    "({total} in this step, the forward runs on the calling thread and the backward on autograd's, "
                    "each with its own handle), at every batch size.",
                    each=format_bytes(card.cublas_workspace_bytes, "MiB"),
                    total=format_bytes(workspaces, "MiB"),
                )
            )
            lines.append(
                tr(
                    "  4. The CUDA context: {size} that PyTorch's allocator never sees (kernels, driver state) but "
                    "nvidia-smi shows: torch.cuda.max_memory_allocated() leaves it out [the catalogue's figure: "
                    "{status}].",
                    size=format_bytes(card.non_allocator_bytes, "MiB"),
                    status=card.provenance.get("non_allocator", "?"),
                )
            )
        return "\n".join(lines)

    def _batch_size(self) -> str:
        f = self.fit
        raw = math.floor(f.safety * f.max_batch_size)
        lines = [
            tr(
                "The batch size to use (the lesson's rule: about {safety:g} x the largest batch that fits):",
                safety=f.safety,
            ),
            "  " + tr("card: {card}", card=f.budget_description),
            tr(
                "  largest batch that fits: {max:,}; {safety:g} x {max:,} = {raw:,}",
                max=f.max_batch_size,
                safety=f.safety,
                raw=raw,
            ),
        ]
        rec = f.estimate_at_recommended
        at = (
            tr(" ({size} on the card, GiB = 1024^3 B)", size=format_bytes(rec.total_bytes, "GiB"))
            if rec and rec.total_bytes
            else ""
        )
        lines += [tr("  note: {note}", note=n) for n in f.notes]
        if self.training is None:
            lines.append(tr("  => use batch size {batch:,}{at}", batch=f.recommended_batch_size, at=at))
        else:
            lines.append(tr("  => memory allows batch size {batch:,}{at}", batch=f.recommended_batch_size, at=at))
        return "\n".join(lines)

    def training_table(self) -> Table:
        t = self.training
        assert t is not None
        return t.runs_table(
            tr(
                "Training by batch size: {samples:,} samples ({budget}) each, {optimizer}, lr {lr:g} at batch {batch} "
                "scaled {scaling} with warm-up, seed {seed}, on this machine's {device}",
                samples=t.samples,
                budget=t.budget_text,
                optimizer=t.optimizer,
                lr=t.base_lr,
                batch=t.base_batch,
                scaling=t.lr_scaling,
                seed=t.seed,
                device=t.device,
            ),
            speed=False,
        )

    def _training_intro(self) -> str:
        t = self.training
        assert t is not None
        f = self.fit
        return "\n".join(
            [
                tr(
                    "The other half of the lesson's rule: raise the batch size until memory runs out OR until the "
                    "training effect drops, and check the choice by the training effect."
                ),
                (
                    tr(
                        "  The memory rule alone gives {batch:,} - the whole MNIST training set in one step, one "
                        "update per epoch.",
                        batch=f.recommended_batch_size,
                    )
                    if f.dataset_size and f.recommended_batch_size >= f.dataset_size
                    else tr("  The memory rule alone gives {batch:,}.", batch=f.recommended_batch_size)
                ),
                tr(
                    "  What was computed, and on what: real training runs on scikit-learn's bundled 8x8 digits "
                    "({train:,} training and 360 validation images; no MNIST files ship with batchfit and "
                    "nothing is downloaded), with the lesson's MLP adapted to 8x8 inputs: Flatten -> Linear(64, 128) "
                    "-> ReLU -> Linear(128, 10), {params:,} parameters. Each batch size trains from the same "
                    "initialisation on the same samples; the learning rate grows with the batch "
                    "(linear rule, Goyal et al. 2017).",
                    train=t.train_size,
                    params=64 * 128 + 128 + 128 * 10 + 10,
                ),
            ]
        )

    def _training_answer(self) -> str:
        t = self.training
        assert t is not None
        f = self.fit
        lines = [
            tr("  gradient noise scale (McCandlish et al. 2018), {n:,} examples:", n=t.noise[0].samples)
            if t.noise
            else ""
        ]
        for n in t.noise:
            value = f"{n.b_simple:,.0f}" if n.resolved else tr("not resolved")
            lines.append(f"    B_simple = {value} {n.when}")
        if t.noise:
            lines.append(
                tr(
                    "    (batches much larger than B_simple mostly average away noise that is already small: "
                    "more samples per step, little more progress per step)"
                )
            )
        lines.append(tr("  the sweep: {reason}", reason=t.reason))
        final = self.recommended_batch_size
        if final < f.recommended_batch_size:
            why = tr(
                "memory allows {memory:,}, but with a fixed budget of samples a larger batch means fewer updates, "
                "and on the digits the validation accuracy holds up to {final:,} only",
                memory=f.recommended_batch_size,
                final=final,
            )
        else:
            why = tr("memory, not the training effect, sets the limit here")
        lines.append(tr("  => use batch size {batch:,}: {why}.", batch=final, why=why))
        mnist, digits = get_dataset(SEED_DATASET), get_dataset(t.dataset)
        pixels = math.prod(mnist.shape) / math.prod(digits.shape)
        lines.append(
            tr(
                "  Limits: the digits stand in for MNIST (handwritten digits too, with {pixels:.0f} times fewer "
                "pixels and {images:.0f} times fewer training images); MNIST's own answer may differ - check it "
                "with `batchfit sweep mlp --dataset mnist --root DIR`. The best size also moves with the learning "
                "rate and the budget (see docs/sweep.md).",
                pixels=pixels,
                images=mnist.train_size / t.train_size,
            )
        )
        return "\n".join(line for line in lines if line)

    def _title(self) -> str:
        return tr(
            "batchfit: the lesson's answer key - the MNIST MLP (Flatten -> Linear(784, 128) -> ReLU -> "
            "Linear(128, 10)), one training step with SGD, fp32"
        )

    def sections(self) -> list[Any]:
        """The parts in order: text blocks and :class:`Table` objects."""
        return [
            self._title(),
            str(self.summary.classic),
            self._arithmetic(),
            self.seed_table(),
            self.cuda_table(),
            self._misses(),
            self._batch_size(),
            *(
                [self._training_intro(), self.training_table(), self._training_answer()]
                if self.training is not None
                else []
            ),
        ]

    def __str__(self) -> str:
        return "\n\n".join(str(s) for s in self.sections())

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = []
        for s in self.sections():
            parts.append(s.__rich__() if isinstance(s, Table) else Text(s))
            parts.append(Text(""))
        return Group(*parts)

    def _repr_html_(self) -> str:
        from ._html import esc, fragment, table_html

        return fragment(*(table_html(s) if isinstance(s, Table) else f"<pre>{esc(s)}</pre>" for s in self.sections()))


def answer_key(
    *, gpu: str | None = None, memory: str | int | None = None, free: bool = False, training: bool = True
) -> AnswerKey:
    """The seed lesson's scenario, computed: what ``batchfit`` with no arguments prints.

    The card is the local GPU, else the catalogue's default (``gpu``/``memory``/``free`` as in fit).
    ``training``: also the training-effect half (a short sweep and the noise scale on the bundled
    digits, :data:`SEED_SWEEP`; about a second of CPU here).

    >>> key = answer_key(gpu="h100", training=False)
    >>> [e.peak_allocated_bytes for e in key.cpu]
    [1050712, 1760344, 5245528, 19745368]
    """
    from torch import nn

    workload = load_workload(SEED_MODEL, dataset=SEED_DATASET)
    classic = summary(workload, style="classic")
    linears = [
        LinearCount(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in workload.model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    params = list(workload.model.parameters())
    sizes = [r.batch_size for r in SEED_TABLE]
    on_cpu = Estimator(workload, make_spec("cpu", SEED_OPTIMIZER))
    result = fit(workload, gpu=gpu, memory=memory, free=free, optimizer=SEED_OPTIMIZER, safety=SEED_SAFETY)
    effect = None
    if training:
        from ._sweep import sweep

        effect = sweep(SEED_MODEL, **SEED_SWEEP)
    return AnswerKey(
        summary=classic,
        linears=linears,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        param_tensors=len(params),
        element_size=params[0].element_size(),
        sample_numel=workload.inputs[0].numel,
        cpu=[on_cpu.at(b) for b in sizes],
        cuda=[result.estimate_at(b) for b in sizes],
        fit=result,
        training=effect,
    )


__all__ = [
    "PLOT_FORMATS",
    "SEED_SWEEP",
    "SEED_TABLE",
    "STACK_CATEGORIES",
    "AnswerKey",
    "LinearCount",
    "Plan",
    "PlanPoint",
    "SeedRow",
    "answer_key",
    "check_plot_path",
    "plan",
    "save_figure",
    "sweep_sizes",
]
