"""``batchfit.fit()``: the largest batch that fits a GPU, and the one to use (the seed's 0.8 rule).

The max is the largest N such that every batch size from 1 to N fits: its step, replayed through
the caching-allocator model against the card's limit, does not run out of memory (so its
``total_bytes`` is within the budget). Tracing a step at every candidate would take a second
each; instead the whole step is traced at batch size 1, and only its first forward and backward
at 2 and at a first guess, completed from the full trace (:mod:`batchfit._compose`). When the
timelines at 1 and 2 have the same structure (same storages, same order) every storage's size
is an exact affine function of the batch size, checked against the trace at the guess. Any
batch size's timeline then follows without tracing, and each candidate costs one allocator
replay (milliseconds). The three traces run side by side in forked children where fork exists.
The code follows that order: :func:`_fit_from_traces` builds the timeline, searches it, confirms
it by the third trace and assembles the answer, each step handing the next one small record.

>>> r = fit("mlp", dataset="mnist", gpu="h100")
>>> r.recommended_batch_size == 60000   # capped at MNIST's 60,000 training images
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from ._child import Child, can_fork, fork_call
from ._compose import compose
from ._distributed import DistOptions
from ._errors import BatchfitError, ExitCode
from ._estimate import Estimator, StepEstimate, StepOptions, estimate_trace, raw_peak, replay_on_card
from ._events import Event
from ._i18n import tr
from ._models import load_workload
from ._render import Rendered, Table
from ._step import make_spec, tail_sizes
from ._trace import Trace, frozen_heap
from ._units import format_bytes, gib

if TYPE_CHECKING:
    from torch import nn

    from ._allocator import AllocatorConfig
    from ._distributed import DistSpec
    from ._gpus import Budget
    from ._models import InputSize, Workload
    from ._training import LossLike, OptimizerLike, StepLike

SCHEMA_VERSION = 1
INT32_ELEMENTS = 2**31
_SCAN_WINDOW = 16  # sizes just below the max, checked one by one (allocator rounding is not monotone)


class AffineTimeline:
    """A step's events at any batch size, from traces at two sizes (exact when the structure holds)."""

    def __init__(self, a: Trace, b: Trace) -> None:
        if a.batch_size == b.batch_size:
            raise ValueError("two different batch sizes are needed")
        self.first, self.second = a, b
        self.template = a.events
        self._static: list[tuple[Any, ...]] | None = None
        db = b.batch_size - a.batch_size
        self.slopes: list[int] = []
        self.intercepts: list[int] = []
        self.ok = len(a.events) == len(b.events)
        # CUDA kernels' own buffers are not lines in the batch size (thresholds, floors, minima):
        # their sizes are worked out per size by re-running the rule on the arguments' shapes
        # (which are), see _cuda_scratch
        self.kernel_calls = self._kernel_calls(a, b) if self.ok else []
        self.ok = self.ok and self.kernel_calls is not None
        ruled = {sid for call in self.kernel_calls or () for sid in call[1]}
        if self.ok:
            for ea, eb in zip(a.events, b.events):
                same = (ea.action, ea.storage, ea.category, ea.phase, ea.module, ea.iteration) == (
                    eb.action,
                    eb.storage,
                    eb.category,
                    eb.phase,
                    eb.module,
                    eb.iteration,
                )
                diff = 0 if ea.storage in ruled else eb.nbytes - ea.nbytes
                if not same or diff % db:
                    self.ok = False
                    break
                slope = diff // db
                self.slopes.append(slope)
                self.intercepts.append(ea.nbytes - slope * a.batch_size)

    @staticmethod
    def _kernel_calls(a: Trace, b: Trace) -> list[tuple[str, tuple[int, ...], Any, Any, dict[str, Any]]] | None:
        """Each kernel call's arguments at both sizes; ``None`` when the two steps' calls differ."""
        if len(a.kernel_calls) != len(b.kernel_calls):
            return None
        calls = []
        for ca, cb in zip(a.kernel_calls, b.kernel_calls):
            if ca[0] != cb[0] or ca[1] != cb[1] or ca[3] != cb[3]:
                return None
            calls.append((ca[0], ca[1], ca[2], cb[2], ca[3]))
        return calls

    def _kernel_sizes(self, batch_size: int) -> dict[int, int]:
        from ._cuda_scratch import at_batch, call_sizes

        a, b = self.first, self.second
        cc = a.compute_capability or (8, 0)
        sizes: dict[int, int] = {}
        for key, sids, da, db_, kwargs in self.kernel_calls or ():
            desc = at_batch(da, db_, a.batch_size, b.batch_size, batch_size)
            got = call_sizes(key, desc, kwargs, cc) if desc is not None else []
            if len(got) != len(sids):  # cannot happen for affine shapes; keep the traced size's then
                got = [e.nbytes for e in b.events if e.storage in sids and e.action == "alloc"]
            sizes.update(zip(sids, got))
        return sizes

    def trace_at(self, batch_size: int) -> Trace:
        """A trace at any batch size, without tracing (per-layer figures interpolated linearly)."""
        a, b = self.first, self.second

        def line(x: int, y: int) -> int:
            return x + (y - x) * (batch_size - a.batch_size) // (b.batch_size - a.batch_size)

        layers = {m: line(a.activation_bytes_by_module.get(m, 0), n) for m, n in b.activation_bytes_by_module.items()}
        numels = {sid: line(n, b.numels[sid]) for sid, n in a.numels.items() if sid in b.numels}
        events = self.events_at(batch_size)
        marks = list(a.marks)
        return Trace(batch_size, a.device, events, layers, list(a.notes), numels, a.module_types, marks, loss=a.loss)

    def events_at(self, batch_size: int) -> list[Event]:
        # the search calls this once per candidate: the fields that do not change are unpacked
        # once, and the events are built as plain tuples (half the time of Event(...) here)
        if self._static is None:
            self._static = [
                (e.seq, e.action, e.storage, e.category, e.module, e.phase, e.iteration) for e in self.template
            ]
        make = tuple.__new__
        events = [
            make(Event, (seq, action, storage, max(0, i + s * batch_size), category, module, phase, iteration))
            for (seq, action, storage, category, module, phase, iteration), s, i in zip(
                self._static, self.slopes, self.intercepts
            )
        ]
        if self.kernel_calls:
            sizes = self._kernel_sizes(batch_size)
            events = [e._replace(nbytes=sizes[e.storage]) if e.storage in sizes else e for e in events]
        return events

    def matches(self, trace: Trace) -> bool:
        return self.ok and trace.events == self.events_at(trace.batch_size)


@dataclass
class FitResult(Rendered):
    """The answer to the seed's question: how many images fit at once, and which batch size to use."""

    model: str
    card: str
    budget_bytes: int
    budget_description: str
    max_batch_size: int
    recommended_batch_size: int
    safety: float
    estimate_at_max: StepEstimate | None
    estimate_at_recommended: StepEstimate | None
    optimizer: str
    precision: str
    notes: list[str] = field(default_factory=list)
    method: str = "affine"  # or "traced" when the timeline is not affine in the batch size
    dataset_size: int | None = None
    searched_up_to: int | None = None
    grad_accum: int = 1  # micro-batches per optimizer step (the batch sizes above are micro-batches)
    dist: DistSpec | None = None  # several GPUs: the batch sizes are per GPU, the figures the peaking rank's
    # what fit() worked with, kept so that estimate_at() (batchfit plan) can sweep more sizes cheaply
    _estimator: Estimator | None = field(default=None, repr=False, compare=False)
    _timeline: AffineTimeline | None = field(default=None, repr=False, compare=False)

    @property
    def budget(self) -> Budget | None:
        """The budget (card, limit, how it was chosen) the fit was made against."""
        return self._estimator.budget if self._estimator is not None else None

    def estimate_at(self, batch_size: int) -> StepEstimate:
        """The step at any batch size on the same card, settings and allocator as the fit.

        One allocator replay of the affine timeline when it holds (milliseconds), else a trace.
        """
        if batch_size < 1:
            raise BatchfitError(
                tr("batch size must be at least 1, got {batch_size}", batch_size=batch_size), hint=tr("e.g. 64")
            )
        est = self._estimator
        if est is None:
            raise BatchfitError(
                tr("this FitResult does not carry its estimator"), hint=tr("use the FitResult that fit() returned")
            )
        if self._timeline is None or not self.affine:
            return est.at(batch_size)
        trace = self._timeline.trace_at(batch_size)
        return estimate_trace(trace, est.workload, est.spec, est.budget, est.alloc_config)

    @property
    def affine(self) -> bool:
        """Whether another batch size costs one allocator replay of the fit's timeline (else a trace)."""
        return self._timeline is not None and self._timeline.ok

    def sweep(self, sizes: Iterable[int]) -> list[StepEstimate]:
        """The step at each of ``sizes``, in order, on the fit's card and settings (what plan plots).

        The fit's own estimates at the max and at the recommended size are reused; any other size
        is :meth:`estimate_at` (one allocator replay when :attr:`affine`, else a trace).
        """
        known = {e.batch_size: e for e in (self.estimate_at_max, self.estimate_at_recommended) if e is not None}
        return [known.get(b) or self.estimate_at(b) for b in sizes]

    @property
    def world_size(self) -> int:
        """GPUs in all (``--gpus`` x ``--nodes``); 1 without ``--gpus``."""
        return self.dist.world_size if self.dist is not None else 1

    @property
    def global_max_batch_size(self) -> int:
        """The largest batch per optimizer step over all GPUs: the per-GPU max x GPUs x nodes x ``grad_accum``."""
        return self.max_batch_size * self.world_size * self.grad_accum

    @property
    def global_recommended_batch_size(self) -> int:
        """Samples per optimizer step over all GPUs at the recommended size: per-GPU batch x GPUs x
        nodes x ``grad_accum`` (the Trainer's effective batch)."""
        return self.recommended_batch_size * self.world_size * self.grad_accum

    @property
    def headroom_bytes(self) -> int | None:
        """Memory left on the card at the recommended batch size."""
        if self.estimate_at_recommended is None or self.estimate_at_recommended.total_bytes is None:
            return None
        return self.budget_bytes - self.estimate_at_recommended.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "card": self.card,
            "budget_bytes": self.budget_bytes,
            "budget": self.budget_description,
            "max_batch_size": self.max_batch_size,
            "recommended_batch_size": self.recommended_batch_size,
            "safety": self.safety,
            "headroom_bytes": self.headroom_bytes,
            "optimizer": self.optimizer,
            "precision": self.precision,
            "dataset_size": self.dataset_size,
            "grad_accum": self.grad_accum,
            "effective_recommended_batch_size": self.recommended_batch_size * self.grad_accum,
            "method": self.method,
            "notes": list(self.notes),
            "estimate_at_max": self.estimate_at_max.to_dict() if self.estimate_at_max else None,
            "estimate_at_recommended": self.estimate_at_recommended.to_dict() if self.estimate_at_recommended else None,
            **self._dist_dict(),
        }

    def _dist_dict(self) -> dict[str, Any]:
        """Several GPUs: the setting, and the global batch (per-GPU batch x GPUs x nodes)."""
        if self.dist is None:
            return {}
        return {
            "distributed": self.dist.to_dict(),
            "per_gpu": True,
            "world_size": self.world_size,
            "global_max_batch_size": self.global_max_batch_size,
            "global_recommended_batch_size": self.global_recommended_batch_size,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> Table:
        dist = self.dist is not None
        rows = [
            [tr("card"), self.budget_description],
            *([[tr("GPUs"), self.dist.describe()]] if self.dist is not None else []),
            [tr("largest batch per GPU that fits") if dist else tr("largest batch that fits"), f"{self.max_batch_size:,}"],
            [
                tr("recommended per GPU ({safety:g} x max)", safety=self.safety)
                if dist
                else tr("recommended ({safety:g} x max)", safety=self.safety),
                f"{self.recommended_batch_size:,}",
            ],
        ]
        if self.grad_accum > 1:
            rows.append(
                [
                    f"effective batch ({self.grad_accum} micro-batches)",
                    f"{self.recommended_batch_size * self.grad_accum:,} at the recommended size, "
                    f"{self.max_batch_size * self.grad_accum:,} at the max",
                ]
            )
        if self.dist is not None:
            # the Trainer's effective batch: per GPU x GPUs x nodes x gradient_accumulation_steps
            n = f"{self.world_size}" + (f" x {self.grad_accum}" if self.grad_accum > 1 else "")
            rows.append(
                [
                    tr("global batch (per GPU x GPUs x micro-batches)")
                    if self.grad_accum > 1
                    else tr("global batch (per GPU x GPUs)"),
                    f"{self.recommended_batch_size:,} x {n} = {self.global_recommended_batch_size:,} "
                    f"(max {self.max_batch_size:,} x {n} = {self.global_max_batch_size:,})",
                ]
            )
        rec = self.estimate_at_recommended
        if rec is not None and rec.total_bytes is not None:
            rows.append(
                [
                    tr("at the recommended size"),
                    tr(
                        "{size} of {budget} on the card",
                        size=format_bytes(rec.total_bytes, "GiB"),
                        budget=format_bytes(self.budget_bytes, "GiB"),
                    ),
                ]
            )
            rows.append([tr("headroom"), format_bytes(self.headroom_bytes or 0, "GiB")])
        top = self.estimate_at_max
        if top is not None and top.total_bytes is not None:
            size, where = format_bytes(top.total_bytes, "GiB"), top.peak_where
            if self.dist is not None and top.peak_rank is not None:
                peak = tr("{size} (peak: {where}; rank {rank} peaks)", size=size, where=where, rank=top.peak_rank)
            else:
                peak = tr("{size} (peak: {where})", size=size, where=where)
            rows.append([tr("at the max"), peak])
        return Table(
            tr(
                "{model}: batch size for {card} ({optimizer}, {precision}); GiB = 1024^3 bytes",
                model=self.model,
                card=self.card,
                optimizer=self.optimizer,
                precision=self.precision,
            ),
            ["", ""],
            rows,
            right=[False, False],
            footer=[tr("note: {note}", note=n) for n in self.notes],
        )

    def sections(self) -> list[Table]:
        return [self.table()]

    def save_report(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (FILE.html): the plan around this answer."""
        from ._html import write_report

        return write_report(self, path)


class DoesNotFit(BatchfitError):
    """Even batch size 1 does not fit; ``advice`` quantifies what would help."""

    def __init__(self, message: str, advice: list[str]) -> None:
        super().__init__(message, hint="; ".join(advice), exit_code=ExitCode.DOES_NOT_FIT)
        self.advice = advice


def search_max(
    fits: Callable[[int], bool],
    *,
    start: int = 1,
    limit: int = 2**31,
    first: int = 1,
    fits_many: Callable[[list[int]], list[bool]] | None = None,
) -> tuple[int, int]:
    """The largest N with ``fits(b)`` for every checked b <= N, and ``fits(N + 1)`` false.

    Gallops up from ``start`` (doubling), bisects the bracket, then checks the sizes just below
    the boundary one by one and a geometric sample below (memory is not monotone in the batch
    size: allocator rounding can make b fail while b + 1 fits); a failure found there restarts the
    search below it. Returns (N, calls); N is ``first - 1`` when ``first`` (the smallest size
    considered, normally 1) does not fit. ``limit`` caps the search (the answer is then ``limit``).
    ``fits_many`` (same answers as ``fits``, for a list of sizes) checks those below together,
    e.g. split across processes.
    """
    calls = 0
    memo: dict[int, bool] = {}

    def ok(b: int) -> bool:
        nonlocal calls
        if b not in memo:
            calls += 1
            memo[b] = fits(b)
        return memo[b]

    upper = limit + 1  # smallest size known (or assumed) to fail
    while True:
        if not ok(first):
            return first - 1, calls
        start = min(max(start, first), upper - 1)
        step = max(1, start // 64)  # gallop from the guess with a step that doubles
        if ok(start):
            lo, hi = start, upper
            while lo + step < upper:
                if not ok(lo + step):
                    hi = lo + step
                    break
                lo += step
                step *= 2
        else:
            lo, hi = first, start
            while hi - step > first:
                if ok(hi - step):
                    lo = hi - step
                    break
                hi -= step
                step *= 2
        while hi - lo > 1:  # ok(lo), and hi fails (or is past the limit)
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        candidate = lo
        below = list(range(max(first, candidate - _SCAN_WINDOW), candidate))
        below += [2**k for k in range(int(math.log2(candidate)) + 1) if first <= 2**k < candidate]
        below = sorted(set(below))
        todo = [b for b in below if b not in memo]
        if fits_many is not None and len(todo) > 1:
            memo.update(zip(todo, fits_many(todo)))
            calls += len(todo)
        failing = [b for b in below if not ok(b)]
        if not failing:
            return min(candidate, limit), calls
        upper = failing[0]
        start = max(first, upper // 2)


def check_safety(safety: float) -> None:
    """The fraction of the largest batch that fits to recommend (fit, plan, probe)."""
    if not 0 < safety <= 1:
        raise BatchfitError(tr("`safety` must be in (0, 1], got {safety}", safety=safety), hint=tr("the lesson's rule is `safety=0.8`"))


class FitOptions(StepOptions, total=False):
    """The keywords of :func:`fit` (the type of :func:`batchfit.plan`'s, which it forwards)."""

    safety: float
    progress: Callable[[str], None] | None
    dist: DistSpec | None


def fit(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    gpu: str | None = None,
    memory: str | int | None = None,
    free: bool = False,
    optimizer: OptimizerLike = "sgd",
    precision: str = "fp32",
    safety: float = 0.8,
    dataset: str | None = None,
    num_classes: int | None = None,
    loss: LossLike = None,
    step: StepLike = None,
    alloc_conf: str | None = None,
    progress: Callable[[str], None] | None = None,
    context_bytes: str | int | None = None,
    loop: str = "pytorch",
    last_batch: int | str | None = None,
    eval_batch_size: int | None = None,
    grad_accum: int = 1,
    dist: DistSpec | None = None,
    **distributed: Unpack[DistOptions],
) -> FitResult:
    """Find the largest batch size that fits the card and recommend ``floor(safety x max)``.

    Raises :class:`DoesNotFit` (exit code 4 on the command line) when even batch size 1 does not
    fit, with the fixed costs and what would help. ``context_bytes`` overrides the card's memory
    outside the allocator (``--context``). ``loop``, ``last_batch`` and ``eval_batch_size`` as in
    :func:`batchfit._estimate`: with a training run's tail, the max and the recommendation are
    checked by tracing the whole run there (and lowered until it fits). ``grad_accum``: micro-batches
    per optimizer step; the batch sizes are the micro-batch's (the Trainer's
    ``per_device_train_batch_size``), the effective batch is shown beside them.

    ``distributed``: ``gpus`` (per node), ``nodes``, ``strategy`` and their options
    (:class:`batchfit.DistOptions`, or a ready ``dist``): the largest batch *per GPU* whose step fits
    on every rank, ``safety`` x that, and the global batch (per-GPU batch x GPUs x nodes).
    """
    check_safety(safety)
    if dist is None:
        from ._distributed import make_dist

        dist = make_dist(**distributed)
    workload = load_workload(model, input_size, dataset=dataset, num_classes=num_classes)
    run_spec = make_spec(
        "cuda",
        optimizer,
        precision,
        loss,
        step,
        "train",
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
        grad_accum=grad_accum,
    )
    # the search runs on the steady step (its timeline is affine in the batch size); the tail's
    # batches are not (the last one is the dataset's size modulo the batch size): checked after
    spec = dataclasses.replace(run_spec, last_batch=None, eval_batch_size=None)
    est = Estimator(
        workload, spec, gpu=gpu, memory=memory, free=free, alloc_conf=alloc_conf, context_bytes=context_bytes, dist=dist
    )
    if dist is not None:
        if run_spec.has_tail:
            raise BatchfitError(
                tr("`last_batch` / `eval_batch_size` with `gpus` are not modelled yet"),
                hint=tr("drop them (the steady step per GPU), or fit one GPU"),
                exit_code=ExitCode.UNSUPPORTED,
            )
        return _fit_ranks(est, safety, progress or (lambda text: None))
    if run_spec.has_tail:
        run_est = Estimator(
            workload, run_spec, gpu=gpu, memory=memory, free=free, alloc_conf=alloc_conf, context_bytes=context_bytes
        )
        steady = _fit_steady(est, safety, progress)
        return _check_tail(run_est, steady, safety, progress or (lambda text: None))
    return _fit_steady(est, safety, progress)


def _fit_steady(est: Estimator, safety: float, progress: Callable[[str], None] | None = None) -> FitResult:
    """:func:`fit` for the steady step of ``est`` (no training-run tail)."""
    spec = est.spec
    budget = est.budget
    assert budget is not None
    say = progress or (lambda text: None)

    # Two traces give the affine timeline; a third, near the answer, checks it. All three start at
    # once (forked children beside this process), the third at a first guess made without tracing.
    say("tracing the step at batch sizes 1, 2 and a first guess")
    with frozen_heap():  # also spares the forked children a walk over the parent's heap
        # Only the forward and backward change with the batch size: at 2 and at the guess only the
        # first iteration's are traced, and composed onto the whole step traced at 1 (see _compose)
        window_only = spec.step is None
        first_try, t2, early_check = _trace_side_by_side(est, 1, 2, lambda: _early_guess(est), window_only)
        try:
            return _fit_from_traces(est, first_try, t2, early_check, safety, say)
        finally:
            if early_check is not None:
                early_check.cancel()  # not needed after all (or the search failed): stop and reap it


@dataclass
class _Timeline:
    """Step 1 (build): the affine timeline, and the traces the later steps need beside it."""

    timeline: AffineTimeline  # its ``first`` and ``second`` are the two full traces it is built from
    first_size: int  # the smallest size searched: 1, or 2 when batch size 1 cannot train
    at_first: Trace  # the whole step at ``first_size`` (batch 1 keeps its own trace: often shaped differently)
    at_first_estimate: StepEstimate
    template: Trace  # the whole step that window-only traces are composed onto
    window_only: bool  # whether traces other than the template cover only the first forward and backward
    notes: list[str]

    def complete(self, est: Estimator, trace: Trace) -> Trace:
        return _complete(est, self.template, trace)


@dataclass
class _Search:
    """Step 2 (search): the boundary on the timeline, and where the search started."""

    best: int
    start: int  # the search's first guess (the third trace is taken there when no early guess came)
    limit: int  # the search's cap: the 2^31-element size, or 2^16 when each size is traced
    numel_limit: int
    late: Child | None  # the trace at ``start`` running in a child, when there was no early guess


@dataclass
class _Confirmed:
    """Step 3 (confirm): the boundary after the third trace checked the timeline."""

    best: int
    limit: int
    numel_limit: int
    method: str  # "affine", or "traced" when the timeline did not hold
    at_max: StepEstimate


def _fit_from_traces(
    est: Estimator,
    first_try: Trace | BatchfitError,
    t2: Trace,
    early_check: Child | None,
    safety: float,
    say: Callable[[str], None],
) -> FitResult:
    """The fit from the first traces: build the timeline, search it, confirm by a trace, assemble."""
    built = _build_timeline(est, first_try, t2)
    found = _search(est, built, early_check, say)
    confirmed = _confirm(est, built, found, early_check, say)
    return _assemble(est, built, confirmed, safety)


def _build_timeline(est: Estimator, first_try: Trace | BatchfitError, t2: Trace) -> _Timeline:
    """The timeline from the traces at 1 and 2 (or at 2 and 3 when batch size 1 is shaped
    differently or cannot train); :class:`DoesNotFit` when the smallest size does not fit."""
    budget = est.budget
    assert budget is not None
    notes: list[str] = []
    b1 = 1
    short = t2.window_only
    t3_ahead: Trace | None = None  # batch size 3, when it is known early that it will be needed
    if isinstance(first_try, BatchfitError):
        if first_try.exit_code == ExitCode.UNSUPPORTED:
            raise first_try
        # a model that cannot train on one sample (BatchNorm on a single value per channel)
        notes.append(f"batch size 1 cannot train this model ({first_try.message}); sizes from 2 up were searched")
        b1 = 2
        template = t1 = est.trace(2) if short else t2
        t2 = _complete(est, template, est.trace(3, window_only=short))
    else:
        template = t1 = first_try
        composed = compose(t1, t2) if short else t2
        if composed is None:
            # batch size 1 is shaped differently: the whole step at 2 becomes the template, and the
            # timeline will need batch size 3 (traced meanwhile in a child)
            ahead = fork_call(lambda: est.trace(3, window_only=short)) if can_fork() else None
            try:
                composed = template = est.trace(2)
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise
            three = ahead.result() if ahead is not None else None
            t3_ahead = _complete(est, template, three) if three is not None else None
        t2 = composed
    first = estimate_trace(t1, est.workload, est.spec, budget, est.alloc_config)
    if not first.fits:
        raise _does_not_fit(est, first)
    timeline = AffineTimeline(t1, t2)
    if not timeline.ok:
        # batch size 1 is often shaped differently (a copy skipped when a dimension is 1): build
        # the timeline from the next two sizes, and keep batch 1's own trace for batch 1
        t3 = t3_ahead or _complete(est, template, est.trace(b1 + 2, window_only=short))
        timeline = AffineTimeline(t2, t3)
    return _Timeline(timeline, b1, t1, first, template, short, notes)


def _fits_at(est: Estimator, built: _Timeline) -> Callable[[int], bool]:
    """Whether a batch size fits the card: one replay of the timeline (a trace once it no longer holds)."""
    budget = est.budget
    assert budget is not None
    timeline = built.timeline

    def fits_at(b: int) -> bool:
        if b == built.first_size:
            return bool(built.at_first_estimate.fits)
        events = timeline.events_at(b) if timeline.ok else est.trace(b).events
        return replay_on_card(events, budget, est.alloc_config, numbers=False)[1]

    return fits_at


def _search(est: Estimator, built: _Timeline, early_check: Child | None, say: Callable[[str], None]) -> _Search:
    """The largest size that fits on the timeline, the search starting near the answer."""
    budget = est.budget
    assert budget is not None
    timeline, b1 = built.timeline, built.first_size
    t1, t2 = timeline.first, timeline.second
    fits_at = _fits_at(est, built)
    # Above this size some tensor holds 2^31 elements or more: CUDA kernels that index with 32-bit
    # integers split their work or fail there, so the step changes shape; the search stops at it.
    numel_limit = _numel_limit(t1, t2)
    limit = min(2**31, numel_limit) if timeline.ok else min(2**16, numel_limit)
    # a first guess from the per-sample cost of the live-bytes peak, so the search starts near the answer
    p1, p2 = raw_peak(t1.events)[0], raw_peak(t2.events)[0]
    per_sample = p2 - p1
    guess = t1.batch_size + (budget.device_limit_bytes - p1) // per_sample if per_sample > 0 else b1
    start = max(b1, min(guess, limit))
    if timeline.ok and start > t1.batch_size:
        start = _allocated_guess(timeline, t1.batch_size, start, budget, est.alloc_config, b1, limit)
    # A third trace checks the affine timeline near the answer: the one at the early guess (below
    # the 2^31-element limit), else one at this guess, in a forked child while the search runs
    # here; either is compared with the timeline once both are done (step 3).
    short = built.window_only
    late = (
        fork_call(lambda: est.trace(start, window_only=short))
        if timeline.ok and early_check is None and can_fork()
        else None
    )
    say("searching the boundary")
    best, _calls = search_max(fits_at, start=start, limit=limit, first=b1, fits_many=_side_by_side(fits_at))
    return _Search(best, start, limit, numel_limit, late)


def _confirm(
    est: Estimator, built: _Timeline, found: _Search, early_check: Child | None, say: Callable[[str], None]
) -> _Confirmed:
    """Check the timeline against a third trace (the early guess's, the search start's, or one at
    the max); where they differ, search again by tracing each size."""
    budget = est.budget
    assert budget is not None
    timeline, notes = built.timeline, built.notes
    best, limit = found.best, found.limit
    method = "affine" if timeline.ok else "traced"
    third: Trace | None = None
    checked_at = found.start
    if timeline.ok and early_check is not None:
        early = early_check.result()  # (the guess, its trace), or None when there was no guess
        if early is not None and early[0] <= limit:
            checked_at, third = early
    elif found.late is not None:
        third = found.late.result()
    if third is not None:
        third = built.complete(est, third)
    if third is None and timeline.ok:
        say(f"confirming with a trace at batch size {best:,}")
        checked_at = best
        try:
            third = est.trace(best)
        except BatchfitError:
            notes.append(f"could not trace at the max ({best:,}) to confirm it; the affine timeline was used")
    at_max_trace: Trace | None = None
    if third is not None and timeline.ok:
        if timeline.matches(third):
            at_max_trace = third if checked_at == best else None
        else:
            notes.append("the step's timeline is not affine in the batch size; the boundary was re-checked by tracing")
            method = "traced"
            timeline.ok = False  # from here every size is traced (fits_at reads this)
            limit = min(2**16, found.numel_limit)
            fits_at = _fits_at(est, built)
            best, _calls = search_max(
                fits_at, start=min(best, limit), limit=limit, first=built.first_size, fits_many=_side_by_side(fits_at)
            )
    if at_max_trace is None and best == built.first_size:
        at_max_trace = built.at_first
    if at_max_trace is None:
        at_max_trace = timeline.trace_at(best) if timeline.ok else est.trace(best)
    at_max = estimate_trace(at_max_trace, est.workload, est.spec, budget, est.alloc_config)
    return _Confirmed(best, limit, found.numel_limit, method, at_max)


def _assemble(est: Estimator, built: _Timeline, confirmed: _Confirmed, safety: float) -> FitResult:
    """The answer: the max, the recommendation (capped at the dataset's size), the estimates there, the notes."""
    workload, spec, budget = est.workload, est.spec, est.budget
    assert budget is not None
    timeline, b1, notes = built.timeline, built.first_size, built.notes
    best, limit, at_max = confirmed.best, confirmed.limit, confirmed.at_max
    if best >= limit:
        if limit == confirmed.numel_limit:
            notes.append(
                tr(
                    "memory would allow larger batches, but above {limit:,} a tensor would hold 2^31 elements or "
                    "more (many CUDA kernels index with 32-bit integers and fail or split their work there): "
                    "the max is capped at that size",
                    limit=limit,
                )
            )
        else:
            notes.append(tr("the search stopped at {limit:,}: larger batches were not examined", limit=limit))

    recommended = max(b1, math.floor(safety * best))
    size = workload.dataset.train_size if workload.dataset is not None else None
    if size is not None and best > size:
        notes.append(
            tr(
                "the max ({best:,}) exceeds the whole {dataset} training set ({size:,} samples): "
                "one batch can hold all of it; the recommendation is capped at {size:,}",
                best=best,
                dataset=workload.dataset.name,  # type: ignore[union-attr]
                size=size,
            )
        )
        recommended = min(recommended, size)
    if recommended == b1:
        at_rec = built.at_first_estimate
    else:
        rec_trace = timeline.trace_at(recommended) if timeline.ok else est.trace(recommended)
        at_rec = estimate_trace(rec_trace, workload, spec, budget, est.alloc_config)
    # bitsandbytes' notes change what the figure means (modelled; memory outside PyTorch's allocator)
    notes += [n for n in at_max.notes if "bitsandbytes" in n]
    return FitResult(
        model=workload.name,
        card=budget.card.name,
        budget_bytes=budget.budget_bytes,
        budget_description=str(budget),
        max_batch_size=best,
        recommended_batch_size=recommended,
        safety=safety,
        estimate_at_max=at_max,
        estimate_at_recommended=at_rec,
        optimizer=str(spec.optimizer),
        precision=spec.precision.name,
        notes=notes,
        method=confirmed.method,
        dataset_size=size,
        grad_accum=spec.grad_accum,
        _estimator=est,
        _timeline=timeline if timeline.ok else None,
    )


def _fit_ranks(est: Estimator, safety: float, say: Callable[[str], None]) -> FitResult:
    """:func:`fit` on several GPUs: the largest batch per GPU whose step fits on every rank.

    Each candidate size is one estimate of every distinct rank (:func:`batchfit._distributed.estimate_ranks`,
    traced on the fake process group: no affine timeline across ranks yet), searched with the same
    :func:`search_max` as one GPU, from a first guess made from batch sizes 1 and 2.
    """
    workload, budget, dist = est.workload, est.budget, est.dist
    assert budget is not None and dist is not None

    def fits_at(b: int) -> bool:
        e = est.at(b)
        return all(r.estimate.fits for r in e.ranks) if e.ranks else bool(e.fits)

    say(f"estimating every rank at batch sizes 1 and 2 ({dist.describe()})")
    first = est.at(1)
    if not fits_at(1):
        raise _does_not_fit(est, first)
    second = est.at(2)
    per_sample = (second.total_bytes or 0) - (first.total_bytes or 0)
    guess = 1 + (budget.budget_bytes - (first.total_bytes or 0)) // per_sample if per_sample > 0 else 1
    limit = 2**20  # each size is traced: the search does not look further
    say("searching the boundary (every distinct rank at each size)")
    best, calls = search_max(
        fits_at, start=max(1, min(guess, limit)), limit=limit, fits_many=_side_by_side(fits_at)
    )
    notes: list[str] = [f"{calls} batch sizes estimated on every distinct rank (no affine timeline across ranks yet)"]
    if best >= limit:
        notes.append(f"the search stopped at {limit:,} per GPU: larger batches were not examined")
    recommended = max(1, math.floor(safety * best))
    size = workload.dataset.train_size if workload.dataset is not None else None
    # the global batch (one optimizer step's samples) counts every micro-batch of gradient accumulation
    per_step = dist.world_size * est.spec.grad_accum
    if size is not None and recommended * per_step > size:
        recommended = max(1, min(recommended, size // per_step))
        accum = f" x {est.spec.grad_accum} micro-batches" if est.spec.grad_accum > 1 else ""
        notes.append(
            f"the global batch is capped at the {workload.dataset.name} training set ({size:,} samples): "  # type: ignore[union-attr]
            f"{recommended:,} per GPU x {dist.world_size} GPUs{accum}"
        )
    return FitResult(
        model=workload.name,
        card=budget.card.name,
        budget_bytes=budget.budget_bytes,
        budget_description=str(budget),
        max_batch_size=best,
        recommended_batch_size=recommended,
        safety=safety,
        estimate_at_max=est.at(best),
        estimate_at_recommended=est.at(recommended),
        optimizer=str(est.spec.optimizer),
        precision=est.spec.precision.name,
        notes=notes,
        method="traced",
        dataset_size=size,
        grad_accum=est.spec.grad_accum,
        dist=dist,
        _estimator=est,
    )


def _check_tail(run_est: Estimator, steady: FitResult, safety: float, say: Callable[[str], None]) -> FitResult:
    """Lower the steady step's max and recommendation until the whole run (the tail too) fits.

    Each size checked is one trace of the whole run, replayed on the card: the max and the
    recommendation, and, where one fails, a bisection below it (the sizes between are not each
    traced: the last batch, the dataset's size modulo the batch size, jumps from one size to the next).
    """
    budget = run_est.budget
    assert budget is not None
    traced: dict[int, StepEstimate] = {}

    def at(b: int) -> StepEstimate:
        if b not in traced:
            traced[b] = estimate_trace(run_est.trace(b), run_est.workload, run_est.spec, budget, run_est.alloc_config)
        return traced[b]

    lowest = 2 if any("batch size 1 cannot train" in n for n in steady.notes) else 1

    def largest_fitting(upper: int) -> int:
        """``upper`` when its run fits, else the largest size below found by bisection."""
        if at(upper).fits:
            return upper
        if not at(lowest).fits:
            plain = _does_not_fit(run_est, at(lowest))
            eval_size = run_est.spec.eval_batch_size
            advice = [tr("a smaller `eval_batch_size` than {size:,}", size=eval_size)] if eval_size else []
            raise DoesNotFit(
                tr(
                    "{message} (with the training run's tail: {where})",
                    message=plain.message,
                    where=at(lowest).peak_where,
                ),
                advice + plain.advice,
            )
        lo, hi = lowest, upper
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid).fits else (lo, mid)
        return lo

    say("tracing the whole run (with its tail) at the max and at the recommended size")
    # the recommended size is traced meanwhile in a forked child: it is usually still the answer
    ahead = fork_call(lambda: at(steady.recommended_batch_size)) if can_fork() else None
    try:
        best = largest_fitting(steady.max_batch_size)
        recommended = min(steady.recommended_batch_size, max(lowest, math.floor(safety * best)))
        if recommended == steady.recommended_batch_size and ahead is not None:
            early = ahead.result()
            if early is not None:
                traced[recommended] = early
        recommended = largest_fitting(recommended)
    finally:
        if ahead is not None:
            ahead.cancel()
    tail = tail_sizes(run_est.spec, best, steady.dataset_size)
    parts = [f"the epoch's last batch ({tail.last_batch:,} at the max)"] if tail.last_batch else []
    parts += [f"an evaluation pass at batch {tail.eval_batch_size:,}"] if tail.eval_batch_size else []
    notes = list(steady.notes)
    what = " and ".join(parts) or "the training run's tail"
    if best < steady.max_batch_size:
        notes.append(f"{what} lowers the max from {steady.max_batch_size:,} (one steady step) to {best:,}")
    else:
        notes.append(f"checked with {what} (traced at the max and at the recommended size)")
    return dataclasses.replace(
        steady,
        max_batch_size=best,
        recommended_batch_size=recommended,
        estimate_at_max=at(best),
        estimate_at_recommended=at(recommended),
        notes=notes,
    )


def _allocated_guess(
    timeline: AffineTimeline, a: int, far: int, budget: Budget, config: AllocatorConfig | None, first: int, limit: int
) -> int:
    """Where the allocated memory (live blocks, rounded as the allocator rounds them) reaches
    the limit, on the line through its peaks at ``far / 2`` and ``far``.

    Near the limit the allocator frees its cache and retries, so what decides is the allocated
    peak, not the unlimited reserved one; the live-bytes guess can be 2x off. Two replays put the
    search's start within a few sizes of the answer for most models.
    """
    from ._allocator import simulate

    a = max(a, far // 2)  # small batches carry the fixed costs' rounding: fit the line higher up
    if far - a < 2:
        return far
    low = simulate(timeline.events_at(a), config, record_series=False).peak_allocated_bytes
    high = simulate(timeline.events_at(far), config, record_series=False).peak_allocated_bytes
    if high <= low:
        return far
    guess = a + (budget.device_limit_bytes - low) * (far - a) // (high - low)
    return max(first, min(guess, limit))


def _trace_side_by_side(
    est: Estimator, a: int, b: int, c: Callable[[], int | None], window_only: bool
) -> tuple[Trace | BatchfitError, Trace, Child | None]:
    """Trace the whole step at ``a`` (its error returned, not raised) and at ``b`` (only the
    window when ``window_only``), side by side where possible; and start a child that works out
    the size ``c()`` and traces there like ``b``: it gives (size, trace), or None when ``c()`` is None.

    The traces are independent: on Linux ``b`` and ``c`` run in forked children (the imports and
    the model are already in memory), so a 2-core machine runs all three in about the time of the
    longest. Anything unusual in a child (an error, a crash) and the parent simply traces ``b`` itself.
    """
    forks = can_fork()
    child = fork_call(lambda: est.trace(b, window_only=window_only)) if forks else None
    later = fork_call(lambda: _trace_at_guess(est, c, window_only)) if forks else None
    try:
        first: Trace | BatchfitError
        try:
            first = est.trace(a)
        except BatchfitError as exc:
            first = exc
        second = child.result() if child is not None else None
        return first, second if second is not None else est.trace(b, window_only=window_only), later
    except BaseException:
        for running in (child, later):
            if running is not None:
                running.cancel()
        raise


def _trace_at_guess(est: Estimator, guess: Callable[[], int | None], window_only: bool) -> tuple[int, Trace] | None:
    size = guess()
    return None if size is None else (size, est.trace(size, window_only=window_only))


def _complete(est: Estimator, template: Trace, trace: Trace) -> Trace:
    """A full trace at ``trace``'s batch size: ``trace`` itself, or, when it is window-only,
    composed onto ``template`` (traced in full when the two do not line up)."""
    if not trace.window_only:
        return trace
    return compose(template, trace) or est.trace(trace.batch_size)


def _early_guess(est: Estimator) -> int | None:
    """A first guess at the max before any trace, from one forward pass on the ``meta`` device.

    Meta tensors carry shapes only, so the pass takes a fraction of a second even for large
    models. Every leaf module's output bytes per sample stand in for the activations kept for
    backward; parameters, gradients and optimizer state are counted as four copies of the
    parameters. It is only where the checking trace is taken, so being off by 2x is harmless;
    it is capped below the 2^31-element limit. None when the model cannot run on meta tensors
    (or was not built on them) or the guess would be 1 or 2 (those sizes are traced anyway).
    """
    import torch
    from torch import nn

    from ._models import unique_parameters
    from ._step import train_mode

    budget = est.budget
    workload = est.workload
    params = [p for _, p in unique_parameters(workload.model)]
    if budget is None or not params or not all(p.is_meta for p in params):
        return None
    per_sample = 0
    biggest = 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal per_sample, biggest
        if next(module.children(), None) is not None:
            return
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                per_sample += t.numel() * t.element_size()
                biggest = max(biggest, t.numel())

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad(), train_mode(workload.model, True):
            workload.make_inputs(1, "meta").call(workload.model)
    except Exception:
        return None
    finally:
        handle.remove()
    fixed = 4 * sum(p.numel() * p.element_size() for p in params)
    if per_sample <= 0:
        return None
    guess = (budget.device_limit_bytes - fixed) // per_sample
    if biggest:
        guess = min(guess, (INT32_ELEMENTS - 1) // biggest)
    return int(guess) if guess > 2 else None


def _side_by_side(fits: Callable[[int], bool]) -> Callable[[list[int]], list[bool]] | None:
    """``fits`` over a list of sizes, half of them in a forked child (None where fork is not available)."""
    if not can_fork():
        return None

    def many(sizes: list[int]) -> list[bool]:
        theirs, mine = sizes[1::2], sizes[0::2]
        child = fork_call(lambda: [fits(b) for b in theirs])
        try:
            here = [fits(b) for b in mine]
            there = child.result() if child is not None else None
        except BaseException:
            if child is not None:
                child.cancel()
            raise
        if there is None:
            there = [fits(b) for b in theirs]
        out = [False] * len(sizes)
        out[0::2], out[1::2] = here, there
        return out

    return many


def _numel_lines(a: Trace, b: Trace) -> list[tuple[int, float]]:
    """Each storage's element count as (count at a, growth per sample)."""
    db = b.batch_size - a.batch_size
    return [(n, (b.numels[sid] - n) / db) for sid, n in a.numels.items() if sid in b.numels]


def _numel_limit(a: Trace, b: Trace) -> int:
    """The largest batch size at which no tensor reaches 2^31 elements."""
    limits = [int((INT32_ELEMENTS - 1 - n) / slope) + a.batch_size for n, slope in _numel_lines(a, b) if slope > 0]
    return min(limits, default=2**31)


def _does_not_fit(est: Estimator, first: StepEstimate) -> DoesNotFit:
    """Say what the fixed costs are and, quantified, what would help."""
    from ._gpus import list_gpus

    budget = est.budget
    assert budget is not None
    card = budget.card
    bd = first.breakdown
    fixed = {k: bd.get(k, 0) for k in ("parameters", "gradients", "optimizer_state")}
    model_states = sum(fixed.values())
    need = first.total_bytes or 0
    advice = []
    if fixed["optimizer_state"]:
        advice.append(
            tr("SGD without momentum keeps no optimizer state: saves {size}", size=gib(fixed["optimizer_state"]))
        )
    if est.spec.precision.name in ("fp32", "amp-bf16", "amp-fp16"):
        advice.append(
            tr(
                "`precision='bf16'` stores parameters, gradients and optimizer state in 16 bits: saves about {size}",
                size=gib(model_states // 2),
            )
        )
    if est.spec.precision.name == "fp32":
        try:
            amp = Estimator(
                est.workload,
                make_spec("cuda", est.spec.optimizer, "amp-bf16", est.spec.loss),
                gpu=None,
                memory=budget.budget_bytes,
            ).at(1)
            advice.append(
                tr(
                    "`precision='amp-bf16'` needs {size} at batch size 1 (vs {need})",
                    size=gib(amp.total_bytes or 0),
                    need=gib(need),
                )
            )
        except BatchfitError:
            pass
    larger = sorted((c for c in list_gpus() if c.memory_bytes >= need + 1), key=lambda c: c.memory_bytes)
    if larger:
        advice.append(
            tr("a larger card: {name} ({size}) holds it", name=larger[0].name, size=gib(larger[0].memory_bytes))
        )
    per_gpu_room = budget.budget_bytes - card.non_allocator_bytes - (need - card.non_allocator_bytes - model_states)
    if per_gpu_room > 0 and model_states:
        k = math.ceil(model_states / per_gpu_room)
        if k > 1:
            advice.append(
                tr("sharding parameters, gradients and optimizer state (FSDP / ZeRO-3) across {k} such GPUs", k=k)
            )
    message = tr(
        "{model} does not fit {card} even at batch size 1: it needs {need} of {budget} (parameters {params}, "
        "gradients {grads}, optimizer state {state}, CUDA context {context})",
        model=est.workload.name,
        card=card.name,
        need=gib(need),
        budget=gib(budget.budget_bytes),
        params=gib(fixed["parameters"]),
        grads=gib(fixed["gradients"]),
        state=gib(fixed["optimizer_state"]),
        context=gib(card.non_allocator_bytes),
    )
    return DoesNotFit(message, advice)


def standard_batch_sizes(max_batch_size: int, extra: Sequence[int] = (64, 256, 1024, 4096)) -> list[int]:
    """The seed's sizes and the powers of two up to the max."""
    sizes = {2**k for k in range(max(0, int(math.log2(max(max_batch_size, 1)))) + 1)}
    sizes |= {s for s in extra if s <= max_batch_size}
    sizes.add(max_batch_size)
    return sorted(sizes)
