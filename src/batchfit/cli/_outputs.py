"""Files the answer can be written to besides the terminal: ``--snapshot`` and ``--report``.

Shared by ``estimate``, ``fit`` and ``plan``; the paths are checked before minutes of work.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .._i18n import tr
from ._app import err_console

if TYPE_CHECKING:
    from .._estimate import StepEstimate
    from .._gpus import Budget
    from .._models import Workload

SnapshotOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--snapshot",
        help="Also write the simulated step as a PyTorch memory snapshot (FILE.pickle, the format of "
        "torch.cuda.memory._dump_snapshot): open it at pytorch.org/memory_viz.",
        show_default=False,
    ),
]
ReportOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on Python 3.10
    typer.Option(
        "--report",
        help="Also write a self-contained HTML report (FILE.html: summary, breakdown, memory by batch size, "
        "the step's timeline, assumptions; no network needed to view it).",
        show_default=False,
    ),
]


def check_paths(snapshot: Path | None, report: Path | None, device: str = "cuda") -> None:
    """Fail on a bad file name (or a snapshot of a CPU step) now, not after the work."""
    if snapshot is not None:
        from .._snapshot import check_device, check_snapshot_path

        check_snapshot_path(snapshot)
        check_device(device)
    if report is not None:
        from .._html import check_report_path

        check_report_path(report)


def snapshot_paths(path: Path, batch_sizes: list[int]) -> list[Path]:
    """One file per batch size: ``FILE.pickle`` for one, ``FILE.b64.pickle``, ... for several."""
    if len(batch_sizes) == 1:
        return [path]
    return [path.with_name(f"{path.stem}.b{b}{path.suffix}") for b in batch_sizes]


def write_snapshots(path: Path | None, estimates: list[StepEstimate]) -> None:
    if path is None:
        return
    from .._snapshot import write_snapshot

    for out, e in zip(snapshot_paths(path, [e.batch_size for e in estimates]), estimates):
        written = write_snapshot(e, out)
        err_console.print(
            tr("memory snapshot at batch size {batch:,} written to {path}", batch=e.batch_size, path=written),
            soft_wrap=True,
        )


def write_report(
    path: Path | None, result: Any, *, workload: Workload | None = None, budget: Budget | None = None
) -> None:
    """The report of ``result``; ``workload`` and ``budget`` for an estimate (a plan or a fit carries its own)."""
    if path is None:
        return
    from .._html import write_report as write
    from .._summary import summary

    written = write(result, path, summary=summary(workload) if workload is not None else None, budget=budget)
    err_console.print(tr("report written to {path}", path=written), soft_wrap=True)
