"""The code stays clean: ruff and mypy pass, and the public API is pinned."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import batchfit

ROOT = Path(__file__).resolve().parents[1]


# The public surface, written out: a change to it is a change to this list, made on purpose.
PUBLIC = [
    "AllocatorConfig",
    "AllocatorResult",
    "BatchfitError",
    "DatasetInfo",
    "DistOptions",
    "DoesNotFit",
    "EstimateReport",
    "ExitCode",
    "FitResult",
    "GpuCard",
    "InputSpec",
    "LoraSpec",
    "Measurement",
    "ModelSummary",
    "NoiseScale",
    "Plan",
    "ProbeError",
    "ProbeResult",
    "StepEstimate",
    "SweepResult",
    "Workload",
    "calibrate",
    "estimate",
    "fit",
    "format_bytes",
    "get_dataset",
    "get_gpu",
    "list_gpus",
    "load_workload",
    "measure_step",
    "noise_scale",
    "parse_size",
    "plan",
    "probe",
    "simulate_allocator",
    "summary",
    "sweep",
]


def test_public_api_is_pinned() -> None:
    assert batchfit.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(batchfit, name) is not None
    # the whole error hierarchy is public: every error batchfit raises derives from one exported class
    for error in (batchfit.DoesNotFit, batchfit.ProbeError):
        assert issubclass(error, batchfit.BatchfitError)


def test_implementation_modules_are_private() -> None:
    """httpx's pattern: the modules are ``_private``; the package's names are the surface, so
    ``batchfit.fit`` is the function and ``batchfit.fit.DoesNotFit`` is not a thing to reach for."""
    import pkgutil

    public_modules = [m.name for m in pkgutil.iter_modules(batchfit.__path__) if not m.name.startswith("_")]
    assert public_modules == ["cli"]  # the command line's entry point (pyproject's [project.scripts])
    assert callable(batchfit.fit) and not hasattr(batchfit.fit, "DoesNotFit")


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
