"""HTML: how result objects show themselves in Jupyter, and the self-contained ``--report`` page.

Everything is plain HTML with inline SVG charts (matplotlib renders them to a string, glyphs as
paths): no script, no font, no stylesheet or image is fetched when the page is viewed.

>>> from batchfit._render import Table
>>> print(table_html(Table("t", ["a", "b"], [["x", "1"]])))
<table class="bf"><caption>t</caption><thead><tr><th style="text-align:left">a</th><th style="text-align:right">b</th></tr></thead><tbody><tr><td style="text-align:left">x</td><td style="text-align:right">1</td></tr></tbody></table>
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._errors import BatchfitError, check_suffix
from ._i18n import tr
from ._render import Table
from ._units import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._estimate import EstimateReport, StepEstimate
    from ._gpus import Budget
    from ._measure import Measurement
    from ._plan import Plan, PlanPoint
    from ._summary import ModelSummary

# Scoped to .bf so that a notebook's own styles are left alone.
CSS = """
.bf { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px; color: #222; }
.bf table.bf, table.bf { border-collapse: collapse; margin: 0.4em 0 1em 0; font-size: 12px; }
table.bf caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
table.bf th, table.bf td { padding: 2px 8px; border-bottom: 1px solid #ddd; white-space: pre; }
table.bf th { background: #f3f3f3; }
table.bf tfoot td, table.bf.wrap td { border: none; color: #555; white-space: normal; }
table.bf.wrap td { border-bottom: 1px solid #ddd; color: #222; vertical-align: top; }
.bf h1 { font-size: 20px; margin: 0.2em 0; } .bf h2 { font-size: 16px; margin: 1.2em 0 0.3em 0; }
.bf .answer { font-size: 15px; background: #eef6ee; border-left: 4px solid #2c7a2c; padding: 0.5em 0.8em; }
.bf .muted { color: #666; } .bf svg { max-width: 100%; height: auto; }
""".strip()


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def table_html(table: Table, *, wrap: bool = False) -> str:
    """A :class:`~batchfit._render.Table` as an HTML table (title as caption, footer lines below).

    Cells keep their spaces (the summary's tree is drawn with them) unless ``wrap``.
    """
    align = ["right" if r else "left" for r in table._right()]

    def cells(tag: str, values: Sequence[object]) -> str:
        return "".join(f'<{tag} style="text-align:{a}">{esc(v)}</{tag}>' for v, a in zip(values, align))

    parts = [f'<table class="{"bf wrap" if wrap else "bf"}">']
    if table.title:
        parts.append(f"<caption>{esc(table.title)}</caption>")
    parts.append(f"<thead><tr>{cells('th', table.columns)}</tr></thead><tbody>")
    parts.extend(f"<tr>{cells('td', row)}</tr>" for row in table.rows)
    parts.append("</tbody>")
    if table.footer:
        span = len(table.columns)
        parts.append("<tfoot>" + "".join(f'<tr><td colspan="{span}">{esc(f)}</td></tr>' for f in table.footer))
        parts.append("</tfoot>")
    parts.append("</table>")
    return "".join(parts)


def fragment(*parts: str) -> str:
    """What ``_repr_html_`` returns: the parts in a styled block."""
    return f'<div class="bf"><style>{CSS}</style>{"".join(parts)}</div>'


def tables_fragment(tables: Iterable[Table]) -> str:
    return fragment(*(table_html(t) for t in tables))


def summary_html(s: ModelSummary) -> str:
    """The layer tree of :class:`~batchfit._summary.ModelSummary` and its totals."""
    if s.style == "classic" and s.classic is not None:
        return f"<pre>{esc(s.classic)}</pre>"
    table = s.table()
    totals = "".join(f"<li>{esc(line)}</li>" for line in table.footer)
    return table_html(dataclasses.replace(table, footer=[])) + f'<ul class="muted">{totals}</ul>'


def measurement_html(m: Measurement) -> str:
    rows = [
        ["batch size", f"{m.batch_size:,}"],
        ["device", m.device],
        ["peak allocated", _bytes(m.peak_allocated_bytes)],
    ]
    if m.peak_reserved_bytes is not None:
        rows.append(["peak reserved", _bytes(m.peak_reserved_bytes)])
    if m.device_used_bytes is not None:
        rows.append(["process on the card", _bytes(m.device_used_bytes)])
    rows += [["alive before the step", _bytes(m.before_window_bytes)], ["time (two iterations)", f"{m.seconds:.3f} s"]]
    return table_html(Table("a real reference step, measured", ["", ""], rows, right=[False, True]))


def _bytes(n: int) -> str:
    return f"{format_bytes(n)} ({n:,} B)"


# -- charts -----------------------------------------------------------------------------------


def figure_svg(fig: Figure) -> str:
    """An inline ``<svg>`` element (no XML prolog, no date: the same figure gives the same text)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _scale(max_bytes: int) -> tuple[float, Literal["GiB", "MiB"]]:
    return (1024**3, "GiB") if max_bytes >= 4 * 1024**3 else (1024**2, "MiB")


_PHASE_COLORS = {"setup": "#f0f0f0", "forward": "#e3eefb", "backward": "#fbe9e3", "optimizer": "#ececfb"}


_MAX_POINTS = 2000


def _envelope(values: Sequence[int], unit: float) -> tuple[list[int], list[float]]:
    """The series to draw: every value, or above ``2 x _MAX_POINTS`` events the highest of each
    run of events (peaks survive, the page stays small: 60,000 events drawn one by one made a
    535 KB SVG here, 137 KB enveloped)."""
    n = len(values)
    if n <= 2 * _MAX_POINTS:
        return list(range(n)), [v / unit for v in values]
    step = -(-n // _MAX_POINTS)
    starts = list(range(0, n, step))
    return starts, [max(values[i : i + step]) / unit for i in starts]


def timeline_figure(e: StepEstimate) -> Figure:
    """Bytes after each event of the step, phases shaded and named: on CUDA allocated and reserved
    (the allocator model's replay), on the CPU the live tensors' bytes."""
    from matplotlib.figure import Figure

    from ._allocator import simulate

    end = next((i for phase, _it, i in e.marks if phase == "end"), len(e.events))
    events = e.events[:end]
    reserved: list[int] | None = None
    if e.device == "cuda":
        alloc = e.allocator
        replay = simulate(
            events,
            alloc.config if alloc else None,
            alloc.device_limit_bytes if alloc else None,
            record_series=True,
            breakdown=False,
        )
        assert replay.series is not None
        allocated, reserved = replay.series.allocated_bytes, replay.series.reserved_bytes
    else:
        allocated, running = [], 0
        for ev in events:
            running += ev.nbytes if ev.action == "alloc" else -ev.nbytes
            allocated.append(running)
    peak = max(allocated, default=0)
    top_bytes = max(reserved, default=0) if reserved is not None else peak
    unit, name = _scale(top_bytes)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(allocated)))
    if reserved is not None:
        ax.step(*_envelope(reserved, unit), where="post", color="#7f7f7f", label="reserved (segments)")
        ax.step(*_envelope(allocated, unit), where="post", color="#d62728", label="allocated (blocks)")
    else:
        ax.step(*_envelope(allocated, unit), where="post", color="#d62728", label="live tensors")
    bounds = sorted((i, p, it) for p, it, i in e.marks if p != "end" and i < end)
    if not bounds or bounds[0][0] > 0:
        bounds.insert(0, (0, "setup", 0))
    top = top_bytes / unit
    for k, (start, phase, it) in enumerate(bounds):
        stop = bounds[k + 1][0] if k + 1 < len(bounds) else len(xs)
        ax.axvspan(start, stop, color=_PHASE_COLORS.get(phase, "#f7f7f7"), linewidth=0, zorder=0)
        label = phase if phase == "setup" else f"{it}: {phase}"
        ax.text((start + stop) / 2, top * 1.02, label, ha="center", va="bottom", fontsize=7, color="#444")
    if peak:
        at = allocated.index(peak)
        ax.plot([at], [peak / unit], "o", color="#d62728", markersize=4)
        ax.annotate(
            f"peak allocated {format_bytes(peak)}",
            (at, peak / unit),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xlim(0, max(1, len(xs)))
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.set_xlabel("event (each storage's birth or death, in order)")
    ax.set_ylabel(f"{name} (1 {name} = 1024^{3 if name == 'GiB' else 2} bytes)")
    where = e.card if e.device == "cuda" else "the CPU"
    ax.set_title(f"{e.model} at batch size {e.batch_size:,}: one step, two iterations, on {where}", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


def breakdown_table(e: StepEstimate) -> Table:
    """What stacks up to the card's total at the step's peak, category by category."""
    from ._plan import _LABELS, STACK_CATEGORIES, PlanPoint

    point = PlanPoint.from_estimate(e)
    total = point.total_bytes or 1
    rows = [
        [
            _LABELS[c],
            format_bytes(point.stack_bytes[c]),
            f"{point.stack_bytes[c]:,}",
            f"{100 * point.stack_bytes[c] / total:.1f}%",
        ]
        for c in STACK_CATEGORIES
        if point.stack_bytes.get(c)
    ]
    rows.append(["total (nvidia-smi)", format_bytes(point.total_bytes), f"{point.total_bytes:,}", "100%"])
    return Table(
        f"at batch size {e.batch_size:,}: the peak ({e.peak_where})",
        ["", "size", "bytes", "share"],
        rows,
        footer=["allocated categories at the peak of allocated memory; reserve and context on top"],
    )


def breakdown_figure(points: Sequence[PlanPoint], budget_bytes: int | None, title: str) -> Figure:
    """Stacked bars, one per batch size, with the card's memory as a line (estimate's sizes)."""
    from matplotlib.figure import Figure

    from ._plan import _COLORS, _LABELS, STACK_CATEGORIES

    unit, name = _scale(max([p.total_bytes for p in points] + [budget_bytes or 0]))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{p.batch_size:,}" for p in points]
    bottom = [0.0] * len(points)
    for c in STACK_CATEGORIES:
        heights = [p.stack_bytes.get(c, 0) / unit for p in points]
        if any(heights):
            ax.bar(labels, heights, bottom=bottom, color=_COLORS[c], label=_LABELS[c], width=0.6)
            bottom = [b + h for b, h in zip(bottom, heights)]
    if budget_bytes:
        ax.axhline(
            budget_bytes / unit, color="black", linewidth=1.5, label=f"the card: {format_bytes(budget_bytes, name)}"
        )
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"{name}")
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


# -- assumptions ------------------------------------------------------------------------------


def assumptions_table(
    *, budget: Budget | None, estimate: StepEstimate | None, method: str | None, notes: Sequence[str]
) -> Table:
    """What the answer rests on, each with where it comes from."""
    import torch

    from . import __version__

    rows: list[list[str]] = []
    if budget is not None:
        card = budget.card
        rows.append(["budget", format_bytes(budget.budget_bytes), budget.description])
        for key, label, value in (
            ("memory", f"{card.name}: memory", card.memory_bytes),
            ("non_allocator", "CUDA context and memory the allocator never sees", card.non_allocator_bytes),
            ("cublas_workspace", "cuBLAS workspace per handle", card.cublas_workspace_bytes),
            ("conv_workspace", "cuDNN convolution workspace per call", card.conv_workspace_bytes),
        ):
            prov = card.provenance.get(key)
            source = f"{prov}: {prov.source}" if prov is not None else "?"
            rows.append([label, format_bytes(value), source])
    if estimate is not None:
        alloc = estimate.allocator
        rows.append(
            [
                "caching allocator",
                str(alloc.config) if alloc else "-",
                "model of c10/cuda/CUDACachingAllocator.cpp (docs/allocator.md); settings from "
                "PYTORCH_CUDA_ALLOC_CONF / --alloc-conf",
            ]
        )
        rows.append(
            [
                "the step",
                f"{estimate.mode}, {estimate.optimizer}, {estimate.precision}",
                "two iterations of forward, loss, backward, optimizer.step(), zero_grad(set_to_none=True); "
                "model, optimizer and one batch on the device before (docs/architecture.md)",
            ]
        )
        rows.append(
            [
                "how",
                estimate.method if method is None else method,
                "the step run on fake tensors (FakeTensorMode), every storage's birth and death replayed "
                "through the allocator model; no GPU used",
            ]
        )
    rows.append(
        ["versions", f"batchfit {__version__}, torch {torch.__version__}", f"Python {platform.python_version()}"]
    )
    return Table(
        "assumptions and where they come from",
        ["", "value", "provenance"],
        rows,
        right=[False, True, False],
        footer=[f"note: {n}" for n in notes],
    )


# -- the report -------------------------------------------------------------------------------


def check_report_path(path: str | Path) -> Path:
    return check_suffix(
        path,
        (".html", ".htm"),
        tr("cannot write the report to {path}: it is one HTML page"),
        tr("name the file FILE.html, e.g. report.html"),
    )


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}\nbody {{ margin: 1.5em 2em; max-width: 1200px; }}</style>"
        f'</head><body class="bf">\n' + "\n".join(body) + "\n</body></html>\n"
    )


def _section(title: str, *content: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(content)}</section>"


def plan_report(p: Plan) -> str:
    f = p.fit
    rec = f.estimate_at_recommended
    title = f"{p.model} on {f.card}: batch size {f.recommended_batch_size:,}"
    capped = f.recommended_batch_size != math.floor(f.safety * f.max_batch_size)  # as Plan.plot says it
    rule = "capped, see the notes" if capped else f"{f.safety:g} x the largest that fits"
    answer = (
        f'<p class="answer">Use batch size <b>{f.recommended_batch_size:,}</b> ({rule}); the largest that fits '
        f"is <b>{f.max_batch_size:,}</b> on {esc(f.budget_description)}.</p>"
    )
    body = [f"<h1>{esc(title)}</h1>", answer, table_html(f.table())]
    body.append(_section("The model", summary_html(p.summary)))
    if rec is not None:
        body.append(_section("Where the memory goes", table_html(breakdown_table(rec))))
    body.append(_section("Memory against the batch size", figure_svg(p.plot()), table_html(p.sizes_table())))
    if rec is not None and rec.events:
        body.append(_section("The step's timeline", figure_svg(timeline_figure(rec))))
    if p.throughput is not None:
        body.append(
            _section("Throughput by batch size: a roofline estimate, not measured", table_html(p.throughput.table()))
        )
    notes = [*f.notes, *p.notes]
    body.append(
        _section(
            "Assumptions",
            table_html(assumptions_table(budget=f.budget, estimate=rec, method=f.method, notes=notes), wrap=True),
        )
    )
    return _page(title, body)


def estimate_report(r: EstimateReport, summary: ModelSummary | None, budget: Budget | None) -> str:
    from ._plan import PlanPoint

    first = r.results[0]
    title = f"{first.model}: memory of one training step"
    body = [f"<h1>{esc(title)}</h1>", *(table_html(t) for t in r.tables())]
    if summary is not None:
        body.append(_section("The model", summary_html(summary)))
    last = r.results[-1]
    body.append(_section("Where the memory goes", table_html(breakdown_table(last))))
    points = [PlanPoint.from_estimate(e) for e in r.results]
    where = first.card if first.device == "cuda" else "the CPU"
    chart = breakdown_figure(points, first.budget_bytes, f"{first.model} on {where}: what stacks up at each batch size")
    body.append(_section("Memory against the batch size", figure_svg(chart)))
    if last.events:
        body.append(_section("The step's timeline", figure_svg(timeline_figure(last))))
    notes = sorted({n for e in r.results for n in e.notes})
    body.append(
        _section(
            "Assumptions",
            table_html(assumptions_table(budget=budget, estimate=last, method=None, notes=notes), wrap=True),
        )
    )
    return _page(title, body)


def report_html(result: Any, *, summary: ModelSummary | None = None, budget: Budget | None = None) -> str:
    """The self-contained report page of a :class:`Plan`, :class:`FitResult` or estimate."""
    from ._estimate import EstimateReport, StepEstimate
    from ._fit import FitResult
    from ._plan import Plan, plan_from_fit

    if isinstance(result, Plan):
        return plan_report(result)
    if isinstance(result, FitResult):
        est = result._estimator
        if summary is None and est is not None:
            from ._summary import summary as summarise

            summary = summarise(est.workload)
        if summary is None:
            raise BatchfitError(
                tr("this FitResult does not carry its model"), hint=tr("use the FitResult that fit() returned")
            )
        return plan_report(plan_from_fit(summary, result))
    if isinstance(result, StepEstimate):
        result = EstimateReport([result])
    if isinstance(result, EstimateReport) and result.results:
        return estimate_report(result, summary, budget)
    raise BatchfitError(
        tr("no report for {name}", name=type(result).__name__), hint=tr("report a plan, a fit or an estimate")
    )


def write_report(result: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`report_html` to ``path`` (FILE.html); returns the path."""
    out = check_report_path(path)
    page = report_html(result, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


__all__ = ["check_report_path", "report_html", "write_report"]
