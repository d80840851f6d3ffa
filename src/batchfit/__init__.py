"""batchfit: what a PyTorch model is, how much memory a training step takes, and which batch size to use.

The API mirrors the command line.

>>> import batchfit
>>> batchfit.load_workload("mlp", dataset="mnist").name
'mlp'
"""

from __future__ import annotations

from ._errors import BatchfitError, ExitCode
from ._units import format_bytes, parse_size
from .datasets import DatasetInfo, get_dataset

# The verbs share their names with the modules that define them (batchfit.estimate is both):
# they are imported here, so that importing a submodule later never rebinds the name to it.
from .estimate import EstimateReport, StepEstimate, estimate
from .fit import DoesNotFit, FitResult, fit
from .lora import LoraSpec
from .measure import Measurement, measure_step
from .models import InputSpec, Workload, load_workload
from .noise import NoiseScale, noise_scale
from .plan import Plan, plan
from .probe import ProbeError, ProbeResult, probe
from .summary import ModelSummary, summary
from .sweep import SweepResult, sweep

__all__ = [
    "BatchfitError",
    "DatasetInfo",
    "DoesNotFit",
    "EstimateReport",
    "ExitCode",
    "FitResult",
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
    "estimate",
    "fit",
    "format_bytes",
    "get_dataset",
    "load_workload",
    "measure_step",
    "noise_scale",
    "parse_size",
    "plan",
    "probe",
    "summary",
    "sweep",
]
__version__ = "0.1.0"
