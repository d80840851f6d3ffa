"""``batchfit.plan()``: the one-screen answer (model, memory, batch size, plot).

:func:`plan` puts together what the other verbs find: the model's totals (:func:`~batchfit._summary`),
the largest batch that fits the card and the one to use (:func:`~batchfit._fit.fit`), the memory
breakdown at the recommended size, a table at standard batch sizes and a plot of every category
against the batch size. The sweep costs one allocator replay per batch size (fit's affine
timeline), not one trace.

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

from typing_extensions import Unpack

from ._distributed import DIST_CATEGORIES
from ._errors import check_suffix
from ._estimate import CUDA_CATEGORIES, StepEstimate, short_category
from ._fit import FitOptions, FitResult, fit, standard_batch_sizes
from ._i18n import tr
from ._models import load_workload
from ._render import Rendered, Table
from ._roofline import Roofline, roofline
from ._summary import ModelSummary, summary
from ._units import format_bytes, gib, mib_cell

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

    from ._models import InputSize, Workload

SCHEMA_VERSION = 1
GIB = 1024**3

# What stacks up to the nvidia-smi figure, bottom to top: the allocated categories at the step's
# peak, then what the caching allocator holds beyond them, then what it never sees.
# Several GPUs add what FSDP2 / DDP hold (parameters gathered for a block, collectives' buffers).
STACK_CATEGORIES: tuple[str, ...] = (*CUDA_CATEGORIES, *DIST_CATEGORIES, "allocator_reserve", "cuda_context")

_LABELS: dict[str, str] = {
    "parameters": "parameters",
    "buffers": "buffers",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "inputs": "inputs (batch + labels)",
    "activations": "activations (saved for backward)",
    "temporaries": "temporaries",
    "workspaces": "workspaces (cuBLAS, cuDNN)",
    "gathered_parameters": "gathered parameters (FSDP)",
    "communication": "communication buffers (DDP buckets, all-gather, reduce-scatter)",
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
    "gathered_parameters": "#8c564b",
    "communication": "#e377c2",
    "allocator_reserve": "#c7c7c7",
    "cuda_context": "#7f7f7f",
}
_SHORT_EXTRA = {
    "allocator_reserve": "reserve",
    "cuda_context": "context",
    "gathered_parameters": "gathered",
    "communication": "comm",
}


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
    return check_suffix(
        path,
        PLOT_FORMATS,
        tr("cannot write the plot to {path}: unknown image type {suffix}"),
        tr("name the file {names}, e.g. memory.png", names=" or ".join("FILE" + e for e in PLOT_FORMATS)),
    )


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
        stack = {c: e.breakdown.get(c, 0) for c in (*CUDA_CATEGORIES, *DIST_CATEGORIES)}
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
class Plan(Rendered):
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
            **f._dist_dict(),
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
        per = (
            tr(", per GPU ({gpus}; the peaking rank)", gpus=self.fit.dist.describe())
            if self.fit.dist is not None
            else ""
        )
        return Table(
            tr(
                "{model} on {card}: one training step by batch size{per} ({optimizer}, {precision}) "
                "- MiB (1 MiB = 1024^2 bytes), breakdown at the peak",
                model=self.model,
                card=self.fit.card,
                per=per,
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

    def sections(self) -> list[Table]:
        return self.tables()

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
        capped = f.recommended_batch_size != math.floor(f.safety * f.max_batch_size)
        rec_label = (
            f"recommended: {f.recommended_batch_size:,} "
            f"({'capped, see notes' if capped else f'{f.safety:g} x max'}), {gib(self.at_recommended.total_bytes or 0)}"
        )
        ax.axvline(
            f.max_batch_size,
            color="#b00000",
            linestyle="--",
            linewidth=1.5,
            label=f"largest that fits: {f.max_batch_size:,}, {gib(self.at_max.total_bytes or 0)}",
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
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    curve_points: int = 48,
    throughput: bool = True,
    **options: Unpack[FitOptions],
) -> Plan:
    """The one-screen answer: the model, the largest and recommended batch size, memory by batch size.

    ``options``: :func:`batchfit.fit`'s keywords (the card, the step, ``safety``, ``progress``, the
    distributed options: sizes per GPU, and the global batch); ``curve_points`` is the number of
    batch sizes the plot sweeps (each one allocator replay when the step's timeline is affine in
    the batch size); ``throughput`` adds the roofline estimate of samples/s by batch size
    (:mod:`batchfit._roofline`). Raises :class:`~batchfit._fit.DoesNotFit` when even batch size 1
    does not fit.
    """
    progress = options.get("progress")
    say = progress or (lambda text: None)
    workload = load_workload(
        model, input_size, dataset=options.pop("dataset", None), num_classes=options.pop("num_classes", None)
    )
    say("summarising the model")
    model_summary = summary(workload)
    result = fit(workload, **options)
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
    notes: list[str] = []
    row_sizes = sorted({*standard_batch_sizes(result.max_batch_size), result.recommended_batch_size})
    if result.affine:
        curve_sizes = sorted({*sweep_sizes(result.max_batch_size, curve_points), *row_sizes, result.max_batch_size + 1})
    else:
        # each size would need its own trace: the plot uses the table's sizes only
        top = sweep_sizes(result.max_batch_size, 2)[-1]
        curve_sizes = sorted({*row_sizes, result.max_batch_size + 1, top})
        notes.append("the step's timeline is not affine in the batch size: each size was traced, the plot is coarse")
    say(f"replaying the step at {len(curve_sizes)} batch sizes")
    points = {e.batch_size: PlanPoint.from_estimate(e) for e in result.sweep(curve_sizes)}
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


__all__ = [
    "PLOT_FORMATS",
    "STACK_CATEGORIES",
    "Plan",
    "PlanPoint",
    "check_plot_path",
    "plan",
    "save_figure",
    "sweep_sizes",
]
