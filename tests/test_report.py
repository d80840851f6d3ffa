"""``--report``: one self-contained HTML page; and every result object's Jupyter display.

The pages are parsed (tags balanced, no script, nothing fetched from the network) and checked for
the numbers the objects hold; where Chromium is installed the report is rendered in it and the
screenshot checked for charts (docs/report.md shows one).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchfit import EstimateReport, Plan, StepEstimate, estimate, format_bytes, measure_step, plan, probe, summary
from batchfit._errors import ExitCode
from batchfit._html import report_html, write_report
from batchfit._models import load_workload
from batchfit._probe import Attempt
from batchfit._step import make_spec
from batchfit.cli import app

VOID = {"meta", "br", "img", "input", "hr", "link", "col", "wbr", "source"}


class Checker(HTMLParser):
    """Collects the tags and text of a page; fails on a closing tag that closes nothing open."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: dict[str, int] = {}
        self.text: list[str] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data.strip())


def words(parts: list[str]) -> str:
    return re.sub(r"\s+", " ", " ".join(parts))


def parse(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    return checker


def assert_offline(page: str) -> None:
    """Nothing is loaded when the page is viewed: no script, no external src/href, no url()."""
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", page, re.I)
    assert "@import" not in page


@pytest.fixture(scope="module")
def mlp_plan() -> Plan:
    return plan("mlp", dataset="mnist", gpu="T4", curve_points=6)


def test_plan_report_holds_every_part(mlp_plan: Plan) -> None:
    page = report_html(mlp_plan)
    assert_offline(page)
    doc = parse(page)
    text = words(doc.text)
    headings = [
        "The model",
        "Where the memory goes",
        "Memory against the batch size",
        "The step's timeline",
        "Throughput by batch size: a roofline estimate, not measured",
        "Assumptions",
    ]
    for h in headings:
        assert h in text
    assert doc.tags["svg"] >= 2  # batch-size chart and timeline, inline
    f = mlp_plan.fit
    rec = f.estimate_at_recommended
    assert rec is not None and rec.total_bytes is not None
    assert f"Use batch size {f.recommended_batch_size:,}" in text
    assert f"{rec.total_bytes:,}" in text  # the breakdown's total, to the byte
    assert f"{mlp_plan.summary.total_params:,}" in text  # the summary's totals
    assert "Linear" in text and "1 (Linear)" in text  # the layer tree
    # the timeline names the phases of both iterations (matplotlib keeps texts as SVG comments)
    for label in ("1: forward", "1: backward", "2: optimizer", "peak allocated"):
        assert any(label in c for c in doc.comments), label
    # assumptions carry provenance from the catalogue
    card = f.budget.card if f.budget else None
    assert card is not None and card.provenance["memory"].source[:40] in text


def test_cli_reports(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "est.html"
    res = runner.invoke(
        app, ["estimate", "mlp", "--dataset", "mnist", "-b", "64,1024", "--gpu", "T4", "--report", str(out)]
    )
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert_offline(page)
    text = words(parse(page).text)
    e = estimate("mlp", dataset="mnist", batch_size=1024, gpu="T4")
    assert isinstance(e, StepEstimate) and e.total_bytes is not None
    assert f"{e.total_bytes:,}" in text and "1 (Linear)" in text and "Assumptions" in text
    fit_out = tmp_path / "fit.html"
    res = runner.invoke(app, ["fit", "mlp", "--dataset", "mnist", "--gpu", "T4", "--report", str(fit_out)])
    assert res.exit_code == 0, res.output
    assert "Use batch size" in words(parse(fit_out.read_text()).text)


def test_bad_report_path_fails_before_the_work(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["fit", "mlp", "--dataset", "mnist", "--report", str(tmp_path / "r.pdf")])
    assert res.exit_code == ExitCode.USAGE
    assert "FILE.html" in res.output


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_chromium(mlp_plan: Plan, tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = write_report(mlp_plan, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    browser = _chromium()
    assert browser is not None
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<svg") >= 2 and "Use batch size" in dom.stdout
    subprocess.run(
        [browser, *flags, "--window-size=1280,3000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (3000, 1280)
    ink = (pixels < 0.9).any(axis=-1).mean()
    assert ink > 0.03  # text, tables and charts, not a blank page
    # the charts are drawn: the stack's green (inputs) and the timeline's red line (allocated)
    r, g, b = (pixels[..., i] for i in range(3))
    assert ((g > 0.55) & (r < 0.4) & (b < 0.4)).sum() > 1000
    assert ((r > 0.7) & (g < 0.3) & (b < 0.3)).sum() > 300


# -- Jupyter ------------------------------------------------------------------------------------


def test_repr_html_of_every_result(mlp_plan: Plan) -> None:
    workload = load_workload("mlp", dataset="mnist")
    s = summary(workload)
    e = estimate("mlp", dataset="mnist", batch_size=64, gpu="T4")
    report = estimate("mlp", dataset="mnist", batch_size=[64, 128], gpu="T4")
    assert isinstance(e, StepEstimate) and isinstance(report, EstimateReport)
    m = measure_step(workload, 8, make_spec("cpu"))
    on_cpu = estimate("mlp", dataset="mnist", batch_size=8, device="cpu")
    assert isinstance(on_cpu, StepEstimate)
    # the CPU page: breakdown, bars and the live bytes' timeline, peaking at the estimate's peak
    cpu_page = parse(report_html(on_cpu))
    assert "The step's timeline" in words(cpu_page.text)
    assert any(f"peak allocated {format_bytes(on_cpu.peak_allocated_bytes)}" in c for c in cpu_page.comments)
    p = probe(
        "mlp",
        dataset="mnist",
        start=64,
        runner=lambda b: Attempt(b, "ok" if b <= 100 else "oom", 0.01, 0.01, b * 1000),
        estimates=False,
    )
    cases: list[tuple[Any, list[str]]] = [
        (s, [f"{s.total_params:,}", "1 (Linear)"]),
        (e, [f"{e.peak_allocated_bytes / 2**20:,.2f}", "1: backward"]),
        (report, ["64", "128", f"{report[1].peak_allocated_bytes / 2**20:,.2f}"]),
        (mlp_plan.fit, [f"{mlp_plan.fit.max_batch_size:,}", "Tesla T4"]),
        (mlp_plan, ["recommended"]),
        (m, [f"{m.peak_allocated_bytes:,}"]),
        (on_cpu, ["live tensors", "2: forward"]),
        (p, [f"{p.max_batch_size:,}", f"{p.first_failing_batch_size:,}"]),
    ]
    for obj, expected in cases:
        page = obj._repr_html_()
        doc = parse(page)
        assert_offline(page)
        seen = words([*doc.text, *doc.comments])
        for needle in expected:
            assert needle in seen, (type(obj).__name__, needle)


def test_answer_key_displays_itself() -> None:
    from batchfit._answer_key import answer_key

    key = answer_key(gpu="T4")
    page = key._repr_html_()
    assert_offline(page)
    doc = parse(page)
    text = words(doc.text)
    assert f"{key.total_params:,}" in text and doc.tags["table"] >= 2  # the lesson's tables
    assert "784" in text  # torchsummary's classic layout, as the lesson prints it


def test_a_long_timeline_stays_small_and_keeps_its_peak() -> None:
    from dataclasses import replace
    from itertools import pairwise

    from batchfit._events import Event
    from batchfit._html import figure_svg, timeline_figure

    e = estimate("mlp", dataset="mnist", batch_size=8, device="cpu")
    assert isinstance(e, StepEstimate)
    sizes = [1000 + (i * 7919) % 5000 for i in range(30_000)]
    events = []  # 60,000 events: each storage lives until the next one is born
    for i, size in enumerate(sizes):
        events.append(Event(len(events), "alloc", i, size, "temporaries", "", "forward", 1))
        if i:
            events.append(Event(len(events), "free", i - 1, sizes[i - 1], "temporaries", "", "forward", 1))
    peak = max(a + b for a, b in pairwise(sizes))
    svg = figure_svg(timeline_figure(replace(e, events=events, marks=[])))
    assert len(svg) < 250_000  # every event drawn: 535 KB here, enveloped: 137 KB
    assert f"peak allocated {format_bytes(peak)}" in svg
