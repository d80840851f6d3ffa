"""``batchfit.probe()``: the exact largest batch size on a real GPU, starting from the estimate.

A batch size *runs* when the reference step (two iterations, same loss, optimizer and precision as
the estimate) completes on the CUDA device. The search starts at the estimated max and ends with a
certificate: a size that runs and that size + 1 failing with out-of-memory. The search itself is a
pure function over ``runs(batch_size) -> Attempt``, so the same code drives the real GPU, a
stand-in device in the tests, and the seed's method (double from 16, then bisect).

>>> runs = lambda b: Attempt(b, "ok" if b <= 100 else "oom")
>>> outcome = search(runs, start=100)          # the estimate was exact: 2 attempts
>>> outcome.max_batch_size, outcome.first_failing_batch_size, len(outcome.attempts)
(100, 101, 2)
>>> len(search(runs, start=90).attempts)       # 10 too low: 2 + 2 * floor(log2(11)) = 8
8
>>> [a.batch_size for a in search(runs, start=16, method="doubling").attempts]  # the seed's way
[16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._child import ChildFailed, run_module, serve
from ._errors import BatchfitError, ExitCode
from ._fit import check_safety
from ._i18n import tr
from ._render import Rendered, Table
from ._units import format_bytes, mib_cell

if TYPE_CHECKING:
    from torch import nn

    from ._fit import FitResult
    from ._models import InputSize, Workload
    from ._step import StepSpec
    from ._training import LossLike, OptimizerLike, StepLike

SCHEMA_VERSION = 1
Status = Literal["ok", "oom", "error"]
Runner = Callable[[int], "Attempt"]
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# One attempt


@dataclass
class Attempt:
    """One try of the reference step at one batch size. Bytes are ints; ``None`` = not measured.

    ``status`` is ``"ok"`` (the step ran), ``"oom"`` (out of memory) or ``"error"`` (anything else,
    ``message`` says what). ``seconds`` is the whole attempt (setup, and the child process with
    ``isolate``); ``step_seconds`` the measured window of two iterations; ``steady_seconds`` its
    last iteration alone (the first also pays for cuBLAS handles, cuDNN's algorithm search, the
    optimizer's state), which the throughput uses when it was measured.
    """

    batch_size: int
    status: Status
    seconds: float = 0.0
    step_seconds: float | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    message: str | None = None
    iterations: int = 2
    estimated_peak_allocated_bytes: int | None = None
    estimated_peak_reserved_bytes: int | None = None
    estimated_total_bytes: int | None = None
    ranks: list[dict[str, Any]] | None = None  # a distributed probe: each rank's status and figures
    steady_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def samples_per_second(self) -> float | None:
        """Samples per second of the steady iteration when it was timed, else of the whole window."""
        if not self.ok:
            return None
        if self.steady_seconds:
            return self.batch_size / self.steady_seconds
        if not self.step_seconds:
            return None
        return self.batch_size * self.iterations / self.step_seconds

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["samples_per_second"] = self.samples_per_second
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Out-of-memory or something else: a registry of what out-of-memory looks like

# Exception type names that always mean out-of-memory (torch.OutOfMemoryError; torch.cuda's alias).
OOM_TYPES: tuple[str, ...] = ("OutOfMemoryError",)
# Messages of plain RuntimeErrors that mean the device ran out of memory (older torch, cuBLAS and
# cuDNN failing to get their workspace near the limit).
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN without room for any algorithm's workspace (accelerate treats it so)
)


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory (not any other CUDA error).

    >>> import torch
    >>> is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> is_oom(RuntimeError("CUDA error: device-side assert triggered"))
    False
    """
    if any(t.__name__ in OOM_TYPES for t in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def guarded(step: Callable[[int], Attempt], cleanup: Callable[[], None] = lambda: None) -> Runner:
    """Wrap ``step(batch_size) -> Attempt`` so an exception becomes an ``oom`` / ``error`` attempt.

    Only the message is kept, never the exception: its traceback holds the frames, and the frames
    hold the tensors of the failed step. Then garbage is collected and ``cleanup`` runs
    (``torch.cuda.empty_cache`` on CUDA), so the caller's device is as it was before the attempt.
    The collection walks only what the attempt made (the heap from before it is frozen): a full
    one walks the ~340k objects importing torch leaves, 0.2-0.4 s per failed attempt here.
    """
    from ._trace import frozen_heap

    def run(batch_size: int) -> Attempt:
        start = time.perf_counter()
        status: Status
        with frozen_heap():
            try:
                attempt = step(batch_size)
            except BatchfitError:
                raise  # a problem with the model or settings, not with this batch size
            except Exception as exc:
                status = "oom" if is_oom(exc) else "error"
                message = f"{type(exc).__name__}: {_first_line(str(exc))}"
                del exc
            else:
                attempt.seconds = time.perf_counter() - start
                return attempt
            gc.collect()
        cleanup()
        return Attempt(batch_size, status, seconds=time.perf_counter() - start, message=message)

    return run


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class Strategy:
    """How the search leaves its start: the next size to try above a size that ran (``up``) and
    below one that failed (``down``), given how many steps it has taken in that direction."""

    name: str
    up: Callable[[int, int], int]
    down: Callable[[int, int], int]
    description: str


STRATEGIES: dict[str, Strategy] = {
    "estimate": Strategy(
        "estimate",
        up=lambda lo, i: lo + 2**i,  # +1, +2, +4, ... from the last size that ran
        down=lambda hi, i: hi - 2**i,  # -1, -2, -4, ... from the last size that failed
        description="gallop from the estimate with a step that doubles (1, 2, 4, ...), then bisect",
    ),
    "doubling": Strategy(
        "doubling",
        up=lambda lo, i: 2 * lo,
        down=lambda hi, i: hi // 2,
        description="the lesson's way: double the batch size until it fails, then bisect",
    ),
}


@dataclass
class SearchOutcome:
    """What a search found: every attempt in order, and the boundary."""

    attempts: list[Attempt]
    max_batch_size: int | None  # the largest size that ran at the boundary; None: even batch 1 failed
    first_failing_batch_size: int | None  # None when the search stopped at ``max_batch_size`` cap
    method: str
    start: int
    capped: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether the boundary is certified: max runs and max + 1 fails."""
        return (
            self.max_batch_size is not None
            and self.first_failing_batch_size is not None
            and self.first_failing_batch_size == self.max_batch_size + 1
        )


def expected_attempts(start: int, true_max: int) -> int:
    """Attempts the ``estimate`` strategy takes on a monotone device (the formula in docs/probe.md).

    Exact estimate: 2. Estimate ``k`` too low: ``2 + 2 * floor(log2(k + 1))``.
    Estimate ``k`` too high: ``2 * ceil(log2(k + 1))`` (while the gallop stays above batch 1).

    >>> expected_attempts(100, 100), expected_attempts(100, 101), expected_attempts(100, 99)
    (2, 4, 2)
    """
    k = true_max - start
    if k >= 0:
        return 2 + 2 * ((k + 1).bit_length() - 1)  # floor(log2(k + 1)), exactly
    return 2 * (-k).bit_length()  # ceil(log2(-k + 1)), exactly


def search(
    runs: Runner,
    start: int,
    *,
    method: str = "estimate",
    max_batch_size: int | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    before_attempt: Callable[[int, int], None] | None = None,
) -> SearchOutcome:
    """Find the exact boundary: a size that runs and that size + 1 failing with out-of-memory.

    ``runs(b)`` tries batch size ``b``; an attempt with status ``"error"`` (not out-of-memory)
    stops the search with a :class:`ProbeError`. ``max_batch_size`` caps the search (the outcome
    is then ``capped`` if the cap runs). Each size is tried at most once; if the device is not
    monotone (a size runs although a smaller one failed) the answer is still a certified local
    boundary, and ``notes`` says what was seen.
    """
    if method not in STRATEGIES:
        raise BatchfitError(
            tr("unknown search method {method!r}", method=method),
            hint=tr("use one of {names}", names=", ".join(STRATEGIES)),
        )
    if start < 1:
        raise BatchfitError(tr("the search must start at a batch size >= 1, not {start}", start=start))
    strategy = STRATEGIES[method]
    cap = max_batch_size if max_batch_size is not None else 2**31 - 1
    start = min(start, cap)
    attempts: list[Attempt] = []
    tried: dict[int, Attempt] = {}

    def attempt(b: int) -> bool:
        if b in tried:
            return tried[b].ok
        if before_attempt is not None:
            before_attempt(b, len(attempts) + 1)
        a = runs(b)
        attempts.append(a)
        tried[b] = a
        if on_attempt is not None:
            on_attempt(a)
        if a.status == "error":
            raise ProbeError(
                tr(
                    "batch size {batch:,} failed with an error that is not out-of-memory: {error}",
                    batch=b,
                    error=a.message,
                ),
                hint=tr("fix that error first (it would fail at any batch size); rerun with --debug for details"),
                attempts=attempts,
            )
        return a.ok

    def done(lo: int | None, hi: int | None, capped: bool = False) -> SearchOutcome:
        outcome = SearchOutcome(attempts, lo, hi, method, start, capped)
        outcome.notes.extend(_monotonicity_notes(attempts))
        if capped:
            outcome.notes.append(f"batch size {cap:,} (the cap) runs: larger sizes were not tried")
        return outcome

    lo: int | None
    hi: int | None
    if attempt(start):
        lo, hi, i = start, None, 0
        while hi is None:
            if lo >= cap:
                return done(lo, None, capped=True)
            b = min(strategy.up(lo, i), cap)
            if attempt(b):
                lo = b
            else:
                hi = b
            i += 1
    else:
        lo, hi, i = None, start, 0
        while lo is None:
            if hi == 1:
                return done(None, 1)
            b = max(1, min(strategy.down(hi, i), hi - 1))
            if attempt(b):
                lo = b
            else:
                hi = b
            i += 1
    while hi - lo > 1:  # invariant: lo ran, hi failed
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return done(lo, hi)


def confirm_recommended(runs: Runner, outcome: SearchOutcome, safety: float) -> int:
    """Run the recommended size ``floor(safety x max)`` too; while it fails, recommend ``floor(safety x it)``.

    A monotone device never fails there (this costs one attempt); a device that is not monotone
    (fragmentation, a kernel that needs more memory at some sizes) is caught here, and the failure
    is noted. The attempts are appended to ``outcome``.
    """
    assert outcome.max_batch_size is not None
    tried = {a.batch_size: a for a in outcome.attempts}
    rec = max(1, math.floor(safety * outcome.max_batch_size))
    while True:
        a = tried.get(rec)
        if a is None:
            a = runs(rec)
            outcome.attempts.append(a)
            tried[rec] = a
            if a.status == "error":
                raise ProbeError(
                    tr(
                        "batch size {batch:,} failed with an error that is not out-of-memory: {error}",
                        batch=rec,
                        error=a.message,
                    ),
                    attempts=outcome.attempts,
                )
        if a.ok or rec == 1:
            break
        rec = max(1, math.floor(safety * rec))
    outcome.notes[:] = [
        *_monotonicity_notes(outcome.attempts),
        *(n for n in outcome.notes if not n.startswith("not monotone")),
    ]
    return rec if tried[rec].ok else 0


def _monotonicity_notes(attempts: list[Attempt]) -> list[str]:
    notes = []
    failed = [a.batch_size for a in attempts if a.status == "oom"]
    for a in attempts:
        smaller_failed = [f for f in failed if f < a.batch_size]
        if a.ok and smaller_failed:
            notes.append(
                f"not monotone: batch size {a.batch_size:,} ran although {max(smaller_failed):,} failed "
                "(allocator fragmentation or a different kernel choice near the limit); the boundary "
                "reported is certified locally (it runs and the next size fails)"
            )
    return notes


class ProbeError(BatchfitError):
    """A probe stopped by an error that is not out-of-memory; ``attempts`` are those made so far."""

    def __init__(self, message: str, *, hint: str | None = None, attempts: list[Attempt] | None = None):
        super().__init__(message, hint=hint, exit_code=ExitCode.INPUT)
        self.attempts = list(attempts or [])


# ---------------------------------------------------------------------------------------------
# Running attempts: in this process, or one child process per attempt


@dataclass(frozen=True)
class AttemptConfig:
    """Everything a child process needs to rebuild the workload and the step (plain data, JSON)."""

    model: str
    inputs: tuple[str, ...] | None = None
    dataset: str | None = None
    num_classes: int | None = None
    device: str = "cuda"
    optimizer: str = "sgd"
    precision: str = "fp32"
    loss: str | None = None
    step: str | None = None
    mode: str = "train"
    memory_fraction: float | None = None  # torch.cuda.set_per_process_memory_fraction in the child

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AttemptConfig:
        data = json.loads(text)
        if data.get("inputs") is not None:
            data["inputs"] = tuple(data["inputs"])
        return cls(**data)

    def workload(self) -> Workload:
        from ._models import load_workload

        return load_workload(
            self.model, list(self.inputs) if self.inputs else None, dataset=self.dataset, num_classes=self.num_classes
        )

    def spec(self) -> StepSpec:
        from ._step import make_spec

        return make_spec(self.device, self.optimizer, self.precision, self.loss, self.step, self.mode)


def measure_runner(workload: Workload, spec: StepSpec) -> Runner:
    """Attempts in this process: :func:`batchfit._measure.measure_step` on ``spec.device``, guarded."""
    import torch

    from ._measure import measure_step

    def step(batch_size: int) -> Attempt:
        m = measure_step(workload, batch_size, spec, explain_errors=False)  # the guard tells OOM apart
        return Attempt(
            batch_size,
            "ok",
            step_seconds=m.seconds,
            steady_seconds=m.steady_seconds,
            peak_allocated_bytes=m.peak_allocated_bytes,
            peak_reserved_bytes=m.peak_reserved_bytes,
            device_used_bytes=m.device_used_bytes,
            iterations=spec.iterations if spec.mode == "train" else 1,
        )

    def cleanup() -> None:
        if spec.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    return guarded(step, cleanup)


def isolated_runner(config: AttemptConfig, *, timeout_s: float = 600.0) -> Runner:
    """Attempts in a fresh child process each (``python -m batchfit._probe``): nothing an attempt
    leaves behind (a broken CUDA context, cached blocks, cuDNN's chosen algorithms) reaches the next."""

    def run(batch_size: int) -> Attempt:
        start = time.perf_counter()
        payload = {"config": dataclasses.asdict(config), "batch_size": batch_size}
        try:
            result = run_module("batchfit._probe", payload, timeout_s=timeout_s)
        except ChildFailed as exc:
            return Attempt(batch_size, "error", seconds=time.perf_counter() - start, message=str(exc))
        attempt = Attempt.from_dict(result)
        attempt.seconds = time.perf_counter() - start
        return attempt

    return run


def run_child(payload: dict[str, Any]) -> dict[str, Any]:
    """One attempt (or, with ``"task": "fit"``, the estimated max), in a child process: the JSON
    line :func:`isolated_runner` reads back (through :func:`batchfit._child.serve`)."""
    config = AttemptConfig.from_json(json.dumps(payload["config"]))
    if payload.get("task") == "fit":
        notes: list[str] = []
        best = _estimated_max(
            config.workload(),
            config.optimizer,
            config.precision,
            config.loss,
            config.step,
            payload["safety"],
            payload["free"],
            payload["alloc_conf"],
            notes,
        )
        return {"status": "fit", "max_batch_size": best, "notes": notes}
    if config.memory_fraction is not None:
        import torch

        torch.cuda.set_per_process_memory_fraction(config.memory_fraction)
    runner = measure_runner(config.workload(), config.spec())
    return runner(int(payload["batch_size"])).to_dict()


# ---------------------------------------------------------------------------------------------
# The probe


@dataclass
class ProbeResult(Rendered):
    """What a probe measured: the exact boundary, every attempt beside its estimate, and the time."""

    model: str
    device: str
    optimizer: str
    precision: str
    method: str
    start: int
    start_source: str  # "estimate" (fit's max), "given" (start=), "seed" (--from)
    estimated_max_batch_size: int | None
    max_batch_size: int
    first_failing_batch_size: int | None
    recommended_batch_size: int
    safety: float
    attempts: list[Attempt]
    wall_seconds: float
    isolate: bool
    capped: bool = False
    notes: list[str] = field(default_factory=list)
    torch_version: str | None = None
    world_size: int = 1  # ranks that ran each attempt (torchrun); peaks are then the largest rank's
    rank: int = 0  # this process's rank (each rank returns the same search; rank 0 reports it)

    @property
    def exact(self) -> bool:
        return self.first_failing_batch_size is not None and self.first_failing_batch_size == self.max_batch_size + 1

    @property
    def estimate_error(self) -> int | None:
        """Estimated max minus measured max, in samples (positive: the estimate was too high)."""
        if self.estimated_max_batch_size is None:
            return None
        return self.estimated_max_batch_size - self.max_batch_size

    @property
    def saturation_batch_size(self) -> int | None:
        """Among the sizes that ran, the smallest whose measured samples/s is within 5% of the best."""
        from ._roofline import smallest_within

        return smallest_within((a.batch_size, a.samples_per_second or 0.0) for a in self.attempts if a.ok)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "device": self.device,
            "optimizer": self.optimizer,
            "precision": self.precision,
            "method": self.method,
            "start": self.start,
            "start_source": self.start_source,
            "estimated_max_batch_size": self.estimated_max_batch_size,
            "max_batch_size": self.max_batch_size,
            "first_failing_batch_size": self.first_failing_batch_size,
            "exact": self.exact,
            "estimate_error": self.estimate_error,
            "recommended_batch_size": self.recommended_batch_size,
            "safety": self.safety,
            "throughput_saturation_batch_size": self.saturation_batch_size,
            "attempt_count": len(self.attempts),
            "attempts": [a.to_dict() for a in self.attempts],
            "wall_seconds": self.wall_seconds,
            "isolate": self.isolate,
            "capped": self.capped,
            "notes": list(self.notes),
            "torch": self.torch_version,
            "world_size": self.world_size,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def tables(self) -> list[Table]:
        rows: list[Sequence[str]] = []
        for i, a in enumerate(self.attempts, 1):
            sps = a.samples_per_second
            rows.append(
                [
                    str(i),
                    f"{a.batch_size:,}",
                    a.status if a.status != "error" else f"error: {a.message}",
                    mib_cell(a.peak_allocated_bytes),
                    mib_cell(a.estimated_peak_allocated_bytes),
                    mib_cell(a.peak_reserved_bytes),
                    mib_cell(a.estimated_peak_reserved_bytes),
                    mib_cell(a.device_used_bytes),
                    mib_cell(a.estimated_total_bytes),
                    f"{sps:,.0f}" if sps is not None else "-",
                    f"{a.seconds:.1f}",
                ]
            )
        how = STRATEGIES[self.method].description
        title = (
            f"{self.model}: probing the largest batch on {self.device} ({self.optimizer}, {self.precision}) - "
            f"MiB (1 MiB = 1024^2 bytes); meas. = measured, est. = estimated"
        )
        columns = [
            "#",
            "batch",
            "result",
            "alloc meas.",
            "alloc est.",
            "reserved meas.",
            "reserved est.",
            "in use meas.",
            "total est.",
            "samples/s",
            "seconds",
        ]
        boundary = (
            f"max batch size {self.max_batch_size:,} (runs); {self.first_failing_batch_size:,} fails"
            if self.first_failing_batch_size is not None
            else f"max batch size {self.max_batch_size:,} (the cap; larger sizes not tried)"
        )
        est = (
            f"; the estimate said {self.estimated_max_batch_size:,} ({self.estimate_error:+,} samples)"
            if self.estimated_max_batch_size is not None and self.estimate_error is not None
            else ""
        )
        footer = [
            f"{boundary}{est}",
            f"recommended batch size {self.recommended_batch_size:,} (floor({self.safety:g} x max))",
            *self._saturation_line(),
            f"{len(self.attempts)} attempts in {self.wall_seconds:.1f} s, starting at {self.start:,} "
            f"({self.start_source}); search: {how}" + ("; each attempt in its own process" if self.isolate else ""),
            *(
                [
                    f"each attempt ran on {self.world_size} ranks at once (DistributedDataParallel); the measured "
                    "peaks are the largest rank's (JSON: attempts[].ranks[] holds each rank's)"
                ]
                if self.world_size > 1
                else []
            ),
            *[f"note: {n}" for n in self.notes],
        ]
        return [Table(title, columns, rows, right=[True, True, False, *([True] * 8)], footer=footer)]

    def _saturation_line(self) -> list[str]:
        sat = self.saturation_batch_size
        if sat is None:
            return []
        from ._roofline import SATURATION

        return [
            f"throughput: among the sizes that ran, from {sat:,} on within {SATURATION:.0%} of the best samples/s "
            "measured (the steady iteration when timed)"
        ]

    def sections(self) -> list[Table]:
        return self.tables()


def cudnn_notes(attempts: list[Attempt], max_batch_size: int, workspace_bytes: int | None = None) -> list[str]:
    """What the measurements say about cuDNN picking smaller-workspace (slower) algorithms near the limit.

    Two signs: at the max, the measured allocated peak is notably (> 3%) below the estimate, which
    counts the convolution workspace; or throughput at the max drops below 60% of the best seen.

    >>> a = [Attempt(64, "ok", step_seconds=1.0), Attempt(128, "ok", step_seconds=4.0), Attempt(129, "oom")]
    >>> cudnn_notes(a, 128)  # doctest: +ELLIPSIS
    ['throughput at the max (64 samples/s) is 50% of the best seen (128 samples/s at batch 64): ...']
    """
    notes: list[str] = []
    at_max = next((a for a in attempts if a.batch_size == max_batch_size and a.ok), None)
    if at_max is None:
        return notes
    est, meas = at_max.estimated_peak_allocated_bytes, at_max.peak_allocated_bytes
    if est and meas is not None and meas < 0.97 * est:
        gap = est - meas
        what = (
            f" (the estimate counts {format_bytes(workspace_bytes)} of convolution workspace)"
            if workspace_bytes
            else ""
        )
        notes.append(
            f"at the max the measured allocated peak is {gap / est:.1%} ({format_bytes(gap)}) below the estimate{what}: "
            "near the limit cuDNN may pick algorithms with smaller workspaces, which run slower"
        )
    speeds = [(a.samples_per_second, a.batch_size) for a in attempts if a.samples_per_second]
    sps = at_max.samples_per_second
    if sps and speeds:
        best, best_b = max(speeds)
        if best_b != max_batch_size and sps < 0.6 * best:
            notes.append(
                f"throughput at the max ({sps:,.0f} samples/s) is {sps / best:.0%} of the best seen "
                f"({best:,.0f} samples/s at batch {best_b:,}): near the limit cuDNN may fall back to slower "
                "algorithms with smaller workspaces; the recommended size leaves room for the fast ones"
            )
    return notes


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def probe(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    dataset: str | None = None,
    num_classes: int | None = None,
    optimizer: OptimizerLike = "sgd",
    precision: str = "fp32",
    loss: LossLike = None,
    step: StepLike = None,
    mode: str = "train",
    safety: float = 0.8,
    start: int | None = None,
    from_batch: int | None = None,
    isolate: bool = False,
    max_batch_size: int | None = None,
    free: bool = False,
    alloc_conf: str | None = None,
    estimates: bool = True,
    confirm: bool = False,
    memory_fraction: float | None = None,
    attempt_timeout_s: float = 600.0,
    progress: Progress | None = None,
    runner: Runner | None = None,
    fit_with: Callable[..., FitResult] | None = None,
    device: str = "cuda",
    peer_timeout_s: float = 120.0,
) -> ProbeResult:
    """Find the exact largest batch size on this machine's CUDA GPU, starting from the estimate.

    ``start`` skips the estimate (default: :func:`batchfit._fit.fit`'s max for the local card);
    ``from_batch=16`` follows the seed's method instead (double from 16, then bisect).
    ``isolate`` runs each attempt in a fresh child process (the model must then be given by name or
    file); ``memory_fraction`` (isolated only) caps each child with
    ``torch.cuda.set_per_process_memory_fraction``, to probe a smaller card's worth of memory.
    ``confirm`` also runs the recommended size (one more attempt; on a device that is not
    monotone it lowers the recommendation until a size runs). ``runner`` replaces the device
    (tests: a stand-in); the CUDA check is then skipped. ``fit_with`` replaces :func:`batchfit.fit`
    for the start (tests: a stand-in; it runs in this process, also with ``isolate``).

    Under ``torchrun`` (or with ``torch.distributed`` initialised) every rank runs each attempt,
    the model wrapped in ``DistributedDataParallel``, and all ranks agree on its outcome before the
    next one (:mod:`batchfit._probe_dist`); every rank returns the same search, rank 0 reports it.
    ``peer_timeout_s`` bounds how long a rank waits in a collective for a rank that failed.
    ``device="cpu"`` runs the step on the host (gloo across ranks): nothing runs out of memory
    there short of the host's RAM, so it needs ``max_batch_size``.
    """
    import torch

    check_safety(safety)
    if device not in ("cuda", "cpu"):
        raise BatchfitError(tr("probe runs on 'cuda' or 'cpu', not {device!r}", device=device), hint=tr("use `device='cuda'`"))
    if device == "cpu" and runner is None and max_batch_size is None:
        raise BatchfitError(
            tr("a probe on the CPU needs a cap: host memory does not run out the way a GPU's does"),
            hint=tr("pass `max_batch_size=N`"),
        )
    if runner is None and device == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            tr("probe runs the training step on a CUDA GPU, and this machine has none"),
            hint=tr("use `batchfit fit` for the largest batch size without a GPU, or run probe on a GPU machine"),
            exit_code=ExitCode.NO_DEVICE,
        )
    if memory_fraction is not None and not (isolate and 0 < memory_fraction <= 1):
        raise BatchfitError(
            tr(
                "memory_fraction={memory_fraction} needs isolate=True and a value in (0, 1]",
                memory_fraction=memory_fraction,
            ),
            hint=tr("it changes a process-wide setting, so it is only applied inside the child processes"),
        )
    from ._probe_dist import launched

    distributed = runner is None and launched()
    if distributed and isolate:
        raise BatchfitError(
            tr("isolate does not combine with torchrun: every rank must run each attempt in its own process group"),
            hint=tr("drop `isolate` (each attempt already gets a fresh process group on every rank)"),
        )
    if isolate and not isinstance(model, str) and runner is None:
        raise BatchfitError(
            tr("isolate=True rebuilds the model in each child process, so it needs the model by name"),
            hint=tr("pass a registry name or 'path/to/file.py:NAME', or drop isolate"),
        )
    config = None
    if isolate and runner is None:
        config = AttemptConfig(
            model=str(model),
            inputs=_input_strings(input_size),
            dataset=dataset,
            num_classes=num_classes,
            optimizer=_plain(optimizer, "optimizer") or "sgd",
            precision=precision,
            loss=_plain(loss, "loss"),
            step=_plain(step, "step"),
            mode=mode,
            memory_fraction=memory_fraction,
            device=device,
        )
    ctx = None
    if distributed:
        from ._probe_dist import dist_context

        ctx = dist_context(device, peer_timeout_s)
    # a distributed probe holds its process groups until the search is over, whatever happens
    with contextlib.closing(ctx) if ctx is not None else contextlib.nullcontext():
        main = ctx is None or ctx.is_main
        say = (progress if main else None) or (lambda text: None)
        began = time.perf_counter()
        from ._models import load_workload
        from ._step import make_spec

        workload = load_workload(model, input_size, dataset=dataset, num_classes=num_classes)
        spec = make_spec(device, optimizer, precision, loss, step, mode)
        notes: list[str] = []

        estimated_max: int | None = None
        if from_batch is not None:
            method, start_at, source = "doubling", from_batch, "seed"
        elif start is not None:
            method, start_at, source = "estimate", start, "given"
        else:
            say("estimating the largest batch size (no GPU needed for this part)")
            if config is not None and fit_with is None:  # keep this process free of a CUDA context while children measure
                estimated_max = _child_fit(config, safety, free, alloc_conf, notes, attempt_timeout_s)
            elif ctx is not None:  # rank 0 estimates, every rank starts there

                world = ctx.world_size

                def on_main() -> tuple[int, list[str]]:
                    said: list[str] = []
                    best = _estimated_max(
                        workload, optimizer, precision, loss, step, safety, free, alloc_conf, said, fit_with, world_size=world
                    )
                    return best, said

                estimated_max, said = ctx.from_main(on_main)
                notes.extend(said)
            else:
                estimated_max = _estimated_max(
                    workload, optimizer, precision, loss, step, safety, free, alloc_conf, notes, fit_with
                )
            method, start_at, source = "estimate", max(1, estimated_max), "estimate"
        if start_at < 1:
            raise BatchfitError(tr("the probe must start at batch size >= 1, not {start_at}", start_at=start_at))

        where = "the given runner" if runner is not None else None
        if runner is None and ctx is not None:
            from ._probe_dist import distributed_runner

            runner = distributed_runner(workload, spec, ctx)
            where = f"{device} x {ctx.world_size} ranks (DDP over {ctx.backend})"
        elif runner is None:
            runner = isolated_runner(config, timeout_s=attempt_timeout_s) if config else measure_runner(workload, spec)

        outcome = search(
            runner,
            start_at,
            method=method,
            max_batch_size=max_batch_size,
            before_attempt=lambda b, n: say(f"attempt {n}: batch size {b:,}"),
        )
        if outcome.max_batch_size is None:
            raise BatchfitError(
                tr(
                    "{name} does not fit this GPU even at batch size 1 ({n_attempts} attempts, all out of memory)",
                    name=workload.name,
                    n_attempts=len(outcome.attempts),
                ),
                hint=tr(
                    "use a smaller model or sequence, bf16/amp-bf16, an optimizer with less state (sgd), or a larger GPU; `batchfit estimate` shows where the memory goes"
                ),
                exit_code=ExitCode.DOES_NOT_FIT,
            )
        best = outcome.max_batch_size
        recommended = max(1, math.floor(safety * best))
        if confirm:
            say(f"confirming the recommended batch size {recommended:,}")
            recommended = confirm_recommended(runner, outcome, safety)
            if recommended == 0:
                raise BatchfitError(
                    tr("{name}: batch size {best:,} ran but every smaller size tried down to 1 failed", name=workload.name, best=best),
                    hint=tr("the device is not behaving consistently (other processes on the GPU?); rerun with `isolate=True`"),
                    exit_code=ExitCode.DOES_NOT_FIT,
                )
        notes.extend(outcome.notes)
        if estimates and main:
            _attach_estimates(outcome.attempts, workload, spec, free, alloc_conf, notes, say)
        workspace = _conv_workspace_bytes(free)
        notes.extend(cudnn_notes(outcome.attempts, best, workspace))
        return ProbeResult(
            model=workload.name,
            device=where or (_device_name() if device == "cuda" else device),  # after the search: no CUDA context before
            optimizer=str(spec.optimizer),
            precision=spec.precision.name,
            method=method,
            start=start_at,
            start_source=source,
            estimated_max_batch_size=estimated_max,
            max_batch_size=best,
            first_failing_batch_size=outcome.first_failing_batch_size,
            recommended_batch_size=recommended,
            safety=safety,
            attempts=outcome.attempts,
            wall_seconds=time.perf_counter() - began,
            isolate=isolate,
            capped=outcome.capped,
            notes=notes,
            torch_version=_torch_version(),
            world_size=ctx.world_size if ctx is not None else 1,
            rank=ctx.rank if ctx is not None else 0,
        )


def _device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cuda"


def _plain(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BatchfitError(
        tr(
            "isolate=True sends the {what} to a child process, so it must be given as text, not {name}",
            what=what,
            name=type(value).__name__,
        ),
        hint=tr("name the {what} (e.g. 'adamw', or 'path/to/file.py:fn'), or drop isolate", what=what),
    )


def _input_strings(input_size: Any) -> tuple[str, ...] | None:
    from ._models import parse_inputs

    specs = parse_inputs(input_size)
    return tuple(str(s) for s in specs) if specs else None


def _estimated_max(
    workload: Workload,
    optimizer: Any,
    precision: str,
    loss: Any,
    step: Any,
    safety: float,
    free: bool,
    alloc_conf: str | None,
    notes: list[str],
    fit_with: Callable[..., FitResult] | None = None,
    world_size: int = 1,
) -> int:
    """fit's max for the local card; with ``world_size`` > 1, its per-GPU max under DDP on that many
    GPUs (what the distributed probe runs), else, where that cannot be estimated, one GPU's."""
    from ._distributed import make_dist
    from ._fit import fit

    dist = make_dist(world_size) if world_size > 1 else None
    try:
        result = (fit_with or fit)(
            workload,
            free=free,
            optimizer=optimizer,
            precision=precision,
            safety=safety,
            loss=loss,
            step=step,
            alloc_conf=alloc_conf,
            dist=dist,
        )
    except BatchfitError as exc:
        if exc.exit_code == ExitCode.DOES_NOT_FIT:
            notes.append("the estimate says even batch size 1 does not fit; the probe starts at 1")
            return 1
        if dist is None:
            raise
        notes.append(f"the start is one GPU's estimate: DDP on {world_size} GPUs could not be estimated ({exc.message})")
        return _estimated_max(workload, optimizer, precision, loss, step, safety, free, alloc_conf, notes)
    if dist is not None:
        notes.append(f"the start is fit's per-GPU max under DDP on {world_size} GPUs (the local card)")
    return int(result.max_batch_size)


def _child_fit(
    config: AttemptConfig, safety: float, free: bool, alloc_conf: str | None, notes: list[str], timeout_s: float
) -> int:
    payload = {
        "task": "fit",
        "config": dataclasses.asdict(config),
        "safety": safety,
        "free": free,
        "alloc_conf": alloc_conf,
    }
    try:
        result = run_module("batchfit._probe", payload, timeout_s=timeout_s)
    except ChildFailed as exc:
        raise BatchfitError(
            tr("estimating the start in a child process failed: {exc}", exc=exc),
            hint=tr("pass `start=N` or `from_batch=16`"),
        ) from None
    notes.extend(result["notes"])
    return int(result["max_batch_size"])


def _attach_estimates(
    attempts: list[Attempt],
    workload: Workload,
    spec: StepSpec,
    free: bool,
    alloc_conf: str | None,
    notes: list[str],
    say: Progress,
) -> None:
    """The estimate at each attempted size, beside the measurement (the local card's figures)."""
    from ._estimate import Estimator

    try:
        est = Estimator(workload, spec, free=free, alloc_conf=alloc_conf)
    except BatchfitError as exc:
        notes.append(f"no estimates beside the attempts: {exc.message}")
        return
    for a in attempts:
        say(f"estimating batch size {a.batch_size:,} for comparison")
        try:
            e = est.at(a.batch_size)
        except BatchfitError as exc:
            notes.append(f"no estimate at batch size {a.batch_size:,}: {exc.message}")
            continue
        a.estimated_peak_allocated_bytes = e.peak_allocated_bytes
        a.estimated_peak_reserved_bytes = e.peak_reserved_bytes
        a.estimated_total_bytes = e.total_bytes


def _conv_workspace_bytes(free: bool) -> int | None:
    try:
        from ._gpus import resolve_card

        return resolve_card(None, None, free).card.conv_workspace_bytes
    except Exception:  # informational only
        return None


if __name__ == "__main__":  # the child of isolated_runner and _child_fit: JSON payload on stdin, one JSON line out
    serve(run_child)


__all__ = [
    "OOM_MESSAGES",
    "STRATEGIES",
    "Attempt",
    "AttemptConfig",
    "ProbeError",
    "ProbeResult",
    "SearchOutcome",
    "Strategy",
    "confirm_recommended",
    "cudnn_notes",
    "expected_attempts",
    "guarded",
    "is_oom",
    "isolated_runner",
    "measure_runner",
    "probe",
    "search",
]
