"""batchfit: what a PyTorch model is, how much memory a training step takes, and which batch size to use.

The API mirrors the command line; heavy pieces are imported on first use.

>>> import batchfit
>>> batchfit.load_workload("mlp", dataset="mnist").name
'mlp'
"""

from __future__ import annotations

import importlib
from typing import Any

from ._errors import BatchfitError, ExitCode
from ._units import format_bytes, parse_size
from .datasets import DatasetInfo, get_dataset
from .models import InputSpec, Workload, load_workload

# name -> module that defines it, imported on first access (keeps `import batchfit` light and
# lets optional pieces fail only when used).
_LAZY: dict[str, str] = {
    "summary": ".summary",
    "ModelSummary": ".summary",
    "estimate": ".estimate",
    "EstimateReport": ".estimate",
    "StepEstimate": ".estimate",
    "measure_step": ".measure",
    "Measurement": ".measure",
    "fit": ".fit",
    "FitResult": ".fit",
    "plan": ".plan",
    "Plan": ".plan",
    "probe": ".probe",
    "ProbeResult": ".probe",
}

__all__ = [
    "BatchfitError",
    "DatasetInfo",
    "EstimateReport",
    "ExitCode",
    "FitResult",
    "InputSpec",
    "Measurement",
    "ModelSummary",
    "Plan",
    "ProbeResult",
    "StepEstimate",
    "Workload",
    "estimate",
    "fit",
    "format_bytes",
    "get_dataset",
    "load_workload",
    "measure_step",
    "parse_size",
    "plan",
    "probe",
    "summary",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
