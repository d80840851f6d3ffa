"""``--snapshot``: the simulated step read back by PyTorch's own memory-snapshot tools.

Every check goes through ``torch.cuda._memory_viz`` (the code behind ``python -m
torch.cuda._memory_viz`` and the HTML viewer's loader) and compares what it sees with the estimate.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import subprocess
import sys
from typing import Any

import pytest
from torch.cuda import _memory_viz as mv

from batchfit import estimate
from batchfit._errors import BatchfitError, ExitCode
from batchfit._estimate import StepEstimate
from batchfit._snapshot import snapshot, write_snapshot


@pytest.fixture(scope="module", params=["default", "expandable_segments:True"])
def step(request: pytest.FixtureRequest) -> StepEstimate:
    conf = None if request.param == "default" else request.param
    e = estimate("mlp", dataset="mnist", batch_size=256, gpu="T4", alloc_conf=conf)
    assert isinstance(e, StepEstimate)
    return e


def folded(text: str) -> list[tuple[str, int]]:
    """The flame graph's input lines (``stack count``) that _memory_viz hands to flamegraph.pl."""
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in text.splitlines()]


def from_viewer_html(html: str) -> Any:
    """The snapshot embedded in trace_plot's page, decoded as MemoryViz.js decodes it."""
    payload = json.loads(re.search(r"const local_files = (\[.*\])", html).group(1))  # type: ignore[union-attr]
    return pickle.loads(base64.b64decode(payload[0]["base64"]))


def viewer_timelines(data: Any) -> tuple[int, int, int]:
    """Peaks of MemoryViz.js's two timelines and of its segment view, replayed as the JS does.

    Active Memory Timeline (process_alloc_data): an alloc adds its size, its free removes it.
    Reserved: segment_alloc/segment_map add, segment_free/segment_unmap remove (MemoryView).
    Returns (peak active bytes, peak reserved bytes, reserved at the end).
    """
    live: dict[int, int] = {}
    active = peak_active = reserved = peak_reserved = 0
    for e in data["device_traces"][0]:
        action = e["action"]
        if action == "alloc":
            live[e["addr"]] = e["size"]
            active += e["size"]
        elif action == "free_completed":
            active -= live.pop(e["addr"])
        elif action in ("segment_alloc", "segment_map"):
            reserved += e["size"]
        elif action in ("segment_free", "segment_unmap"):
            reserved -= e["size"]
        peak_active = max(peak_active, active)
        peak_reserved = max(peak_reserved, reserved)
    # what the trace leaves allocated is what the segments hold (the JS walks back from them)
    blocks = {
        b["address"]: b["requested_size"]
        for s in data["segments"]
        for b in s["blocks"]
        if b["state"] == "active_allocated"
    }
    assert blocks == live
    return peak_active, peak_reserved, reserved


def test_trace_plot_round_trip_and_peaks(step: StepEstimate) -> None:
    snap = snapshot(step)
    html = mv.trace_plot(snap)
    data = from_viewer_html(html)
    assert data == snap
    peak_active, peak_reserved, end_reserved = viewer_timelines(data)
    # the viewer counts requested bytes; independently, the running sum of the step's requests
    end = next(i for phase, _, i in step.marks if phase == "end")
    running = requested_peak = 0
    for e in step.events[:end]:
        running += e.nbytes if e.action == "alloc" else -e.nbytes
        requested_peak = max(requested_peak, running)
    assert peak_active == requested_peak
    assert peak_reserved == step.peak_reserved_bytes
    assert end_reserved == sum(s["total_size"] for s in data["segments"])
    # a gradient dies in the next iteration's optimizer phase (zero_grad(set_to_none=True))
    frees = [e["frames"] for e in data["device_traces"][0] if e["action"] == "free_requested"]
    assert any(f[0]["name"] == "iteration 1 optimizer" and f[1]["name"] == "gradients" for f in frees)


def test_memory_flamegraph_at_the_peak_is_peak_allocated(step: StepEstimate) -> None:
    snap = snapshot(step, at="peak")
    lines = folded(mv.memory(snap, format_flamegraph=lambda text: text))
    # block sizes (requests rounded to 512 B, the rest shown as <gaps>) of the live blocks
    assert sum(n for stack, n in lines if ";active_allocated;" in stack) == step.peak_allocated_bytes
    assert sum(n for _, n in lines) == sum(s["total_size"] for s in snap["segments"]) <= step.peak_reserved_bytes
    # the frames name iteration, phase, module and category (outermost first in a flame graph)
    stacks = [stack for stack, _ in lines]
    assert any("iteration 0:0:setup" in s and "category:0:parameters" in s for s in stacks)
    assert any(f"iteration {step.peak_iteration}:0:{step.peak_phase}" in s for s in stacks)
    per_segment = folded(mv.segments(snap, format_flamegraph=lambda text: text))
    assert sum(n for _, n in per_segment) == sum(n for _, n in lines)


def test_stats_at_the_end(step: StepEstimate) -> None:
    snap = snapshot(step)
    text = mv.segsum(snap)  # asserts its own accounting: allocated + free == reserved
    assert step.allocator is not None and step.allocator.num_device_free == 0
    assert f"total_reserved: {mv.Bytes(step.peak_reserved_bytes)}" in text
    assert f"segments: {len(snap['segments'])}" in text
    assert mv.trace(snap).count("cudaMalloc(") == sum(e["action"] == "segment_alloc" for e in snap["device_traces"][0])


def test_cli_writes_a_file_pytorch_reads(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from batchfit.cli import app

    out = tmp_path / "step.pickle"
    res = CliRunner().invoke(
        app, ["estimate", "mlp", "--dataset", "mnist", "-b", "256", "--gpu", "T4", "--snapshot", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    reported = json.loads(res.stdout)["results"][0]
    with out.open("rb") as f:
        data = pickle.load(f)
    assert data["batchfit"]["peak_reserved_bytes"] == reported["peak_reserved_bytes"]
    stats = subprocess.run(
        [sys.executable, "-m", "torch.cuda._memory_viz", "stats", str(out)], capture_output=True, text=True, check=True
    )
    assert f"total_reserved: {mv.Bytes(reported['peak_reserved_bytes'])}" in stats.stdout
    html = tmp_path / "step.html"
    subprocess.run(
        [sys.executable, "-m", "torch.cuda._memory_viz", "trace_plot", str(out), "-o", str(html)],
        capture_output=True,
        check=True,
    )
    assert from_viewer_html(html.read_text()) == data


def test_several_batch_sizes_write_one_file_each(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from batchfit.cli import app

    res = CliRunner().invoke(
        app,
        [
            "estimate",
            "mlp",
            "--dataset",
            "mnist",
            "-b",
            "64,128",
            "--gpu",
            "T4",
            "--snapshot",
            str(tmp_path / "s.pickle"),
        ],
    )
    assert res.exit_code == 0, res.output
    for b in (64, 128):
        with (tmp_path / f"s.b{b}.pickle").open("rb") as f:
            assert pickle.load(f)["batchfit"]["batch_size"] == b


def test_a_step_that_does_not_fit_is_written_as_it_would_need() -> None:
    # the T4's CUDA context (512 MiB, catalogue) leaves 18 MiB to the allocator: too little
    e = estimate("mlp", dataset="mnist", batch_size=256, gpu="T4", memory="530MiB")
    assert isinstance(e, StepEstimate) and e.fits is False
    snap = snapshot(e)
    assert snap["batchfit"]["fits"] is False
    assert not any(t["action"] == "oom" for t in snap["device_traces"][0])
    assert viewer_timelines(snap)[1] == e.peak_reserved_bytes


def test_errors(tmp_path: Any, step: StepEstimate) -> None:
    with pytest.raises(BatchfitError, match="pickle"):
        write_snapshot(step, tmp_path / "x.json")
    cpu = estimate("mlp", dataset="mnist", batch_size=8, device="cpu")
    assert isinstance(cpu, StepEstimate)
    with pytest.raises(BatchfitError, match="CUDA caching allocator") as info:
        snapshot(cpu)
    assert "`device='cuda'`" in (info.value.hint or "")
    from typer.testing import CliRunner

    from batchfit.cli import app

    args = [
        "estimate",
        "mlp",
        "--dataset",
        "mnist",
        "-b",
        "8",
        "--device",
        "cpu",
        "--snapshot",
        str(tmp_path / "s.pickle"),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == ExitCode.USAGE and "--device cuda" in res.output
    res = CliRunner().invoke(app, [*args[:-2], "--snapshot", str(tmp_path / "s.json")])
    assert res.exit_code == ExitCode.USAGE and "FILE.pickle" in res.output
