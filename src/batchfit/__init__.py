"""batchfit: what a PyTorch model is, how much memory a training step takes, and which batch size to use.

The API mirrors the command line.

>>> import batchfit
>>> batchfit.load_workload("mlp", dataset="mnist").name
'mlp'
"""

from __future__ import annotations

# One public surface (httpx's pattern): the implementation modules are private (``_estimate``,
# ``_fit``, ...); what users may rely on is exported here and pinned by tests/test_quality.py.
from ._allocator import AllocatorConfig, AllocatorResult
from ._allocator import simulate as simulate_allocator
from ._calibrate import calibrate
from ._datasets import DatasetInfo, get_dataset
from ._distributed import DistOptions
from ._errors import BatchfitError, ExitCode
from ._estimate import EstimateReport, StepEstimate, estimate
from ._fit import DoesNotFit, FitResult, fit
from ._gpus import GpuCard, get_gpu, list_gpus
from ._lora import LoraSpec
from ._measure import Measurement, measure_step
from ._models import InputSpec, Workload, load_workload
from ._noise import NoiseScale, noise_scale
from ._plan import Plan, plan
from ._probe import ProbeError, ProbeResult, probe
from ._summary import ModelSummary, summary
from ._sweep import SweepResult, sweep
from ._units import format_bytes, parse_size

__all__ = [
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
__version__ = "0.1.0"
