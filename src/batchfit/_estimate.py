"""``batchfit.estimate()``: the memory of one training step, per batch size, without a GPU.

>>> r = estimate("mlp", dataset="mnist", batch_size=64, device="cpu")
>>> r.peak_allocated_bytes   # the seed's MNIST MLP, SGD, one real CPU step measures the same
1050712
>>> r.breakdown["parameters"], r.peak_phase
(407080, 'backward')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn
from typing_extensions import Unpack

from ._distributed import DistOptions
from ._errors import BatchfitError, ExitCode
from ._events import CATEGORIES, Event
from ._i18n import phase_word, tr
from ._models import InputSize, Workload, load_workload
from ._render import Rendered, Table
from ._step import StepSpec, make_spec
from ._trace import Trace, trace_step
from ._training import LossLike, OptimizerLike, StepLike
from ._units import mib_cell

if TYPE_CHECKING:
    from ._allocator import AllocatorConfig, AllocatorResult
    from ._distributed import DistSpec, RankEstimate
    from ._gpus import Budget
    from ._summary import ModelSummary

SCHEMA_VERSION = 1
CUDA_CATEGORIES = (*CATEGORIES, "workspaces")


@dataclass
class StepEstimate(Rendered):
    """The memory of one reference step at one batch size. Bytes are ints.

    On CUDA, ``peak_allocated_bytes`` is what ``torch.cuda.max_memory_allocated()`` would report,
    ``peak_reserved_bytes`` what ``max_memory_reserved()`` would, and ``total_bytes`` what the
    process holds on the card (nvidia-smi): reserved + CUDA context and other memory the allocator
    never sees. On CPU, ``peak_allocated_bytes`` is the host memory the step's tensors take.
    """

    model: str
    batch_size: int
    device: str
    optimizer: str
    precision: str
    mode: str
    peak_allocated_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    peak_iteration: int
    peak_module: str
    activation_bytes_by_module: dict[str, int]
    events: list[Event] = field(repr=False)
    notes: list[str] = field(default_factory=list)
    card: str | None = None
    peak_reserved_bytes: int | None = None
    total_bytes: int | None = None
    budget_bytes: int | None = None
    allocator: AllocatorResult | None = field(default=None, repr=False)
    module_types: dict[str, str] = field(default_factory=dict, repr=False)
    method: str = "simulated"  # or "extrapolated" (fallback)
    oom: bool = False  # the replay on the card ran out of memory
    # where each phase of each iteration begins in ``events``, and the step's end (Trace.marks)
    marks: list[tuple[str, int, int]] = field(default_factory=list, repr=False)
    threads: int | None = None  # CPU: torch's intra-op threads simulated (kernel scratch depends on it)
    loss: str | None = None  # which loss the step trained on, in words (None: inference)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (gradient accumulation)
    # several GPUs (_distributed): the setting, and every distinct rank's estimate; the figures
    # above are the peaking rank's (``peak_rank``)
    dist: DistSpec | None = field(default=None, repr=False)
    ranks: list[RankEstimate] = field(default_factory=list, repr=False)
    peak_rank: int | None = None

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all GPUs: the batch per GPU x GPUs x nodes x ``grad_accum``
        (the Trainer's ``per_device_train_batch_size * world_size * gradient_accumulation_steps``)."""
        return self.effective_batch_size * (self.dist.world_size if self.dist is not None else 1)

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step on one GPU: the batch size times the micro-batches accumulated."""
        return self.batch_size * self.grad_accum

    @property
    def peak_where(self) -> str:
        """Where the peak happens, in words: phase, iteration and module (with its class)."""
        module = self.peak_module
        if module == "optimizer":
            where = tr("in optimizer.step()")
        elif module:
            kind = self.module_types.get(module)
            where = tr("in module {module!r}", module=module) + (f" ({kind})" if kind else "")
        else:
            where = tr("at the top level")
        return tr(
            "{phase}, iteration {iteration}, {where}",
            phase=phase_word(self.peak_phase),
            iteration=self.peak_iteration,
            where=where,
        )

    @property
    def fits(self) -> bool | None:
        """Whether the step fits the card (CUDA): no out-of-memory when replayed against its limit."""
        if self.total_bytes is None or self.budget_bytes is None:
            return None
        return not self.oom and self.total_bytes <= self.budget_bytes

    def to_dict(self, *, events: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_size": self.batch_size,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device": self.device,
            "peak_phase": self.peak_phase,
            "peak_iteration": self.peak_iteration,
            "peak_module": self.peak_module,
            "peak_module_type": self.module_types.get(self.peak_module),
            "breakdown": dict(self.breakdown),
            "activation_bytes_by_module": dict(self.activation_bytes_by_module),
            "method": self.method,
            "loss": self.loss,
            "grad_accum": self.grad_accum,
            "effective_batch_size": self.effective_batch_size,
            "notes": list(self.notes),
        }
        if self.device == "cpu":
            out["threads"] = self.threads
        if self.device == "cuda":
            out["card"] = self.card
            out["peak_reserved_bytes"] = self.peak_reserved_bytes
            out["total_bytes"] = self.total_bytes
            out["budget_bytes"] = self.budget_bytes
            out["fits"] = self.fits
        if self.dist is not None:
            out["distributed"] = self.dist.to_dict()
            out["global_batch_size"] = self.global_batch_size
            out["peak_rank"] = self.peak_rank
            out["ranks"] = [r.to_dict() for r in self.ranks]
        if events:
            out["events"] = [
                [e.seq, e.action, e.storage, e.nbytes, e.category, e.module, e.phase, e.iteration] for e in self.events
            ]
        return out

    def sections(self) -> list[Table]:
        return EstimateReport([self]).tables()

    def _repr_html_(self) -> str:
        """The table and the step's timeline (on CUDA allocated and reserved over the events)."""
        from ._html import figure_svg, fragment, table_html, timeline_figure

        parts = [table_html(t) for t in self.sections()]
        if self.events:
            parts.append(figure_svg(timeline_figure(self)))
        return fragment(*parts)

    def save_snapshot(self, path: str | Path, *, at: Literal["end", "peak"] = "end") -> Path:
        """Write the step as a PyTorch memory snapshot (FILE.pickle, CUDA): see docs/report.md.

        Open it at https://pytorch.org/memory_viz or with ``python -m torch.cuda._memory_viz``.
        """
        from ._snapshot import write_snapshot

        return write_snapshot(self, path, at=at)

    def save_report(self, path: str | Path) -> Path:
        """Write a self-contained HTML report of this step (FILE.html)."""
        return EstimateReport([self]).save_report(path)


@dataclass
class EstimateReport(Rendered, Sequence[StepEstimate]):
    """Estimates of one workload at several batch sizes (renders as the seed's table)."""

    results: list[StepEstimate]
    budget_description: str | None = None
    per_layer: bool = False
    # what the estimates were made with: the card's budget (CUDA) and the step's settings
    budget: Budget | None = field(default=None, repr=False, compare=False)
    spec: StepSpec | None = field(default=None, repr=False, compare=False)

    @overload
    def __getitem__(self, i: int) -> StepEstimate: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[StepEstimate]: ...
    def __getitem__(self, i: int | slice) -> StepEstimate | Sequence[StepEstimate]:
        return self.results[i]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[StepEstimate]:
        return iter(self.results)

    def to_dict(self, *, events: bool = False) -> dict[str, Any]:
        first = self.results[0] if self.results else None
        out = {
            "schema_version": SCHEMA_VERSION,
            "model": first.model if first else None,
            "device": first.device if first else None,
            "card": first.card if first else None,
            "optimizer": first.optimizer if first else None,
            "precision": first.precision if first else None,
            "mode": first.mode if first else None,
            "budget": self.budget_description,
            "results": [r.to_dict(events=events) for r in self.results],
        }
        if first is not None and first.device == "cpu":
            out["threads"] = first.threads
        return out

    def to_json(self, *, events: bool = False) -> str:
        return json.dumps(self.to_dict(events=events), indent=2)

    def tables(self) -> list[Table]:
        if not self.results:
            return []
        first = self.results[0]
        cuda = first.device == "cuda"
        from ._distributed import DIST_CATEGORIES

        known = (*(CUDA_CATEGORIES if cuda else CATEGORIES), *DIST_CATEGORIES)
        cats = [c for c in known if any(r.breakdown.get(c) for r in self.results)]
        columns = [tr("batch"), *[short_category(c) for c in cats], tr("peak alloc")]
        if cuda:
            columns += [tr("reserved"), tr("total"), tr("fits")]
        rows = []
        for r in self.results:
            row = [
                f"{r.batch_size:,}",
                *[mib_cell(r.breakdown.get(c, 0)) for c in cats],
                mib_cell(r.peak_allocated_bytes),
            ]
            if cuda:
                fits = r.fits
                row += [
                    mib_cell(r.peak_reserved_bytes or 0),
                    mib_cell(r.total_bytes or 0),
                    "-" if fits is None else tr("yes") if fits else tr("NO"),
                ]
            rows.append(row)
        where = "; ".join(tr("batch {batch:,}: {where}", batch=r.batch_size, where=r.peak_where) for r in self.results)
        device = (
            tr("CUDA, simulating {card}", card=first.card)
            if cuda
            else tr("CPU (host memory, {threads})", threads=threads_text(first.threads))
        )
        title = (
            tr(
                "{model}: one training step ({mode}), {optimizer}, {precision}, {device} "
                "- MiB (1 MiB = 1024^2 bytes), breakdown at the peak",
                model=first.model,
                mode=first.mode,
                optimizer=first.optimizer,
                precision=first.precision,
                device=device,
            )
            if first.mode == "train"
            else tr(
                "{model}: one forward under no_grad, {precision}, {device} - MiB (1024^2 bytes)",
                model=first.model,
                precision=first.precision,
                device=device,
            )
        )
        footer = [tr("peak: {where}", where=where)]
        footer += [tr("loss: {loss}", loss=text) for text in dict.fromkeys(r.loss for r in self.results) if text]
        if cuda and self.budget_description:
            footer.append(tr("card: {card}", card=self.budget_description))
        notes = sorted({n for r in self.results for n in r.notes})
        footer += [f"note: {n}" for n in notes]
        if first.dist is not None:
            title += f"; per GPU, {first.dist.describe()}, the peaking rank's figures"
        out = [Table(title, columns, rows, footer=footer)]
        if first.dist is not None:
            out.extend(rank_table(r, cats) for r in self.results)
        if self.per_layer:
            last = self.results[-1]
            layer_rows = [
                [name or tr("(top level)"), f"{nbytes:,}", mib_cell(nbytes)]
                for name, nbytes in sorted(last.activation_bytes_by_module.items(), key=lambda kv: -kv[1])
            ]
            out.append(
                Table(
                    tr(
                        "saved activations per module at batch {batch:,} (bytes saved for backward, one iteration)",
                        batch=last.batch_size,
                    ),
                    [tr("module"), tr("bytes"), "MiB"],
                    layer_rows,
                )
            )
        return out

    def sections(self) -> list[Table]:
        return self.tables()

    def save_report(
        self, path: str | Path, *, summary: ModelSummary | None = None, budget: Budget | None = None
    ) -> Path:
        """Write a self-contained HTML report (FILE.html); ``summary`` adds the model's layer tree."""
        from ._html import write_report

        return write_report(self, path, summary=summary, budget=budget or self.budget)


def rank_table(r: StepEstimate, cats: list[str]) -> Table:
    """Each distinct rank's figures at one batch size (``ranks``: the ranks it stands for)."""
    cuda = r.device == "cuda"
    columns = [tr("ranks"), *[short_category(c) for c in cats], tr("peak alloc")]
    columns += [tr("reserved"), tr("total")] if cuda else []
    rows = []
    for rank in r.ranks:
        e = rank.estimate
        row = [
            _rank_span(rank.same_as),
            *[mib_cell(e.breakdown.get(c, 0)) for c in cats],
            mib_cell(e.peak_allocated_bytes),
        ]
        if cuda:
            row += [mib_cell(e.peak_reserved_bytes), mib_cell(e.total_bytes)]
        rows.append(row)
    assert r.dist is not None
    title = f"per rank at batch {r.batch_size:,} per GPU (global batch {r.global_batch_size:,}) - MiB, breakdown at each rank's peak"
    footer = [f"peak: rank {r.peak_rank} ({r.peak_where})"]
    return Table(title, columns, rows, footer=footer)


def _rank_span(ranks: list[int]) -> str:
    """``0-6`` for a run of ranks, ``0, 2`` otherwise."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


_SHORT = {
    "parameters": "params",
    "buffers": "buffers",
    "gradients": "grads",
    "optimizer_state": "optim",
    "inputs": "inputs",
    "activations": "activ.",
    "temporaries": "temps",
    "workspaces": "wkspace",
    "gathered_parameters": "gathered",
    "communication": "comm",
}


def short_category(category: str) -> str:
    """A breakdown category's column heading, in the current language."""
    words = {
        "params": tr("params"),
        "buffers": tr("buffers"),
        "grads": tr("grads"),
        "optim": tr("optim"),
        "inputs": tr("inputs"),
        "activ.": tr("activ."),
        "temps": tr("temps"),
        "wkspace": tr("wkspace"),
    }
    short = _SHORT.get(category, category)
    return words.get(short, short)


def threads_text(n: int | None) -> str:
    """``2 threads`` (beside CPU results)."""
    if n is None:
        return tr("threads unknown")
    return tr("{n} threads", n=n) if n != 1 else tr("{n} thread", n=n)


# ---------------------------------------------------------------------------------------------


def accumulation_note(spec: StepSpec, batch_size: int) -> list[str]:
    """What gradient accumulation makes of the batch size, in words (nothing without it)."""
    k = spec.grad_accum
    if k == 1:
        return []
    return [
        f"gradient accumulation: {k} micro-batches of {batch_size:,} per optimizer step, "
        f"an effective batch of {batch_size * k:,} (batch size x {k})"
    ]


def estimate_trace(
    trace: Trace, workload: Workload, spec: StepSpec, budget: Budget | None, alloc_config: AllocatorConfig | None
) -> StepEstimate:
    """Turn a trace into a :class:`StepEstimate` (through the allocator model on CUDA)."""
    events = trace.events
    common = dict(
        model=workload.name,
        batch_size=trace.batch_size,
        device=spec.device,
        optimizer=str(spec.optimizer),
        precision=spec.precision.name,
        mode=spec.mode,
        activation_bytes_by_module=trace.activation_bytes_by_module,
        module_types=trace.module_types,
        events=events,
        notes=[*trace.notes, *accumulation_note(spec, trace.batch_size)],
        threads=spec.threads,
        loss=trace.loss,
        marks=list(trace.marks),
        grad_accum=spec.grad_accum,
    )
    if spec.device == "cpu":
        peak, at, breakdown = raw_peak(events)
        ev = events[at] if at is not None else None
        return StepEstimate(
            peak_allocated_bytes=peak,
            breakdown=breakdown,
            peak_phase=ev.phase if ev else "setup",
            peak_iteration=ev.iteration if ev else 0,
            peak_module=ev.module if ev else "",
            **common,  # type: ignore[arg-type]
        )
    assert budget is not None
    result, fits = replay_on_card(events, budget, alloc_config)
    at = result.peak_allocated_seq
    ev = events[at] if at is not None else None
    # every category the replay counted: a distributed step's (DIST_CATEGORIES) too, as raw_peak's on the CPU
    breakdown = dict.fromkeys(CUDA_CATEGORIES, 0) | result.allocated_by_category_bytes
    return StepEstimate(
        peak_allocated_bytes=result.peak_allocated_bytes,
        breakdown=breakdown,
        peak_phase=ev.phase if ev else "setup",
        peak_iteration=ev.iteration if ev else 0,
        peak_module=ev.module if ev else "",
        card=budget.card.name,
        peak_reserved_bytes=result.peak_reserved_bytes,
        total_bytes=budget.card.total_bytes(result.peak_reserved_bytes),
        budget_bytes=budget.budget_bytes,
        allocator=result,
        oom=not fits,
        **common,  # type: ignore[arg-type]
    )


def replay_on_card(
    events: Sequence[Event], budget: Budget, config: AllocatorConfig | None, *, numbers: bool = True
) -> tuple[AllocatorResult, bool]:
    """Replay the timeline on the card, as PyTorch would run it; returns (result, fits).

    The card's limit matters: near it the allocator frees its cache and retries instead of failing,
    so a step can fit although an unlimited replay reserves more than the card has. When the step
    does not fit, the numbers come from an unlimited replay (what it would need), unless
    ``numbers`` is false.
    """
    from ._allocator import simulate

    limited = simulate(events, config, budget.device_limit_bytes, record_series=False, breakdown=numbers)
    if not limited.oom or not numbers:  # numbers=False: only whether it fits matters
        return limited, not limited.oom
    return simulate(events, config, record_series=False), False


def raw_peak(events: list[Event]) -> tuple[int, int | None, dict[str, int]]:
    """Peak of live bytes, the event where it is first reached, and the categories then."""
    running = peak = 0
    at: int | None = None
    for i, e in enumerate(events):
        running += e.nbytes if e.action == "alloc" else -e.nbytes
        if running > peak:
            peak, at = running, i
    snap = dict.fromkeys(CATEGORIES, 0)
    for e in events[: (at + 1) if at is not None else 0]:
        snap[e.category] = snap.get(e.category, 0) + (e.nbytes if e.action == "alloc" else -e.nbytes)
    return peak, at, snap


def _resolve_budget(
    spec: StepSpec, gpu: str | None, memory: str | int | None, free: bool, context: str | int | None = None
) -> Budget | None:
    if spec.device != "cuda":
        if gpu or memory or free or context is not None:
            raise BatchfitError(
                tr("`gpu`, `memory`, `free` and `context_bytes` apply to `device='cuda'`"),
                hint=tr("drop them, or use `device='cuda'`"),
            )
        return None
    from ._gpus import resolve_card

    return resolve_card(gpu, memory, free, context=context)


def _alloc_config(alloc_conf: str | None) -> AllocatorConfig:
    from ._allocator import AllocatorConfig, with_settings

    return with_settings(AllocatorConfig.from_env(), alloc_conf)


class Estimator:
    """Traces one workload under one step spec on one card; shared by estimate, fit and plan."""

    def __init__(
        self,
        workload: Workload,
        spec: StepSpec,
        *,
        gpu: str | None = None,
        memory: str | int | None = None,
        free: bool = False,
        alloc_conf: str | None = None,
        context_bytes: str | int | None = None,
        dist: DistSpec | None = None,
    ) -> None:
        if spec.last_batch == "auto" and workload.dataset is None:
            raise BatchfitError(
                tr("`last_batch='auto'` needs the training set's size"),
                hint=tr("add `dataset=NAME`, or give `last_batch=N`"),
            )
        self.workload = workload
        self.spec = spec
        self.budget = _resolve_budget(spec, gpu, memory, free, context_bytes)
        self.alloc_config = _alloc_config(alloc_conf) if spec.device == "cuda" else None
        card = self.budget.card if self.budget is not None else None
        self.cuda_workspaces = (card.cublas_workspace_bytes, card.conv_workspace_bytes) if card is not None else None
        self.compute_capability = card.compute_capability if card is not None else None
        self.dist = dist  # several GPUs: each rank's step (_distributed); None: one GPU
        self._cache: dict[int, StepEstimate] = {}

    def trace(self, batch_size: int, *, window_only: bool = False) -> Trace:
        return trace_step(
            self.workload,
            batch_size,
            self.spec,
            cuda_workspaces=self.cuda_workspaces,
            window_only=window_only,
            compute_capability=self.compute_capability,
        )

    def at(self, batch_size: int) -> StepEstimate:
        if self.dist is not None:
            if batch_size not in self._cache:
                self._cache[batch_size] = self._ranks(batch_size)
            return self._cache[batch_size]
        if batch_size not in self._cache:
            try:
                trace = self.trace(batch_size)
            except BatchfitError as exc:
                if exc.exit_code != ExitCode.UNSUPPORTED:
                    raise
                return self._fallback(batch_size, exc)
            self._cache[batch_size] = estimate_trace(trace, self.workload, self.spec, self.budget, self.alloc_config)
        return self._cache[batch_size]

    def _ranks(self, batch_size: int) -> StepEstimate:
        """Every distinct rank's step; the peaking rank's estimate carries them all."""
        from ._distributed import estimate_ranks

        assert self.dist is not None
        ranks = estimate_ranks(
            self.workload,
            batch_size,
            self.spec,
            self.dist,
            budget=self.budget,
            alloc_config=self.alloc_config,
            cuda_workspaces=self.cuda_workspaces,
            compute_capability=self.compute_capability,
        )
        peak = ranks.peak
        out = peak.estimate
        out.dist, out.ranks, out.peak_rank = self.dist, ranks.ranks, peak.rank
        return out

    def _fallback(self, batch_size: int, exc: BatchfitError) -> StepEstimate:
        """Models that cannot run on fake tensors: real runs at batch 1 and 2, extrapolated."""
        from ._measure import measure_step

        device = self.spec.device
        if device == "cuda" and not torch.cuda.is_available():
            raise exc
        m1 = measure_step(self.workload, 1, self.spec)
        m2 = measure_step(self.workload, 2, self.spec)

        def line(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else a + (b - a) * (batch_size - 1)

        peak = line(m1.peak_allocated_bytes, m2.peak_allocated_bytes) or 0
        reserved = line(m1.peak_reserved_bytes, m2.peak_reserved_bytes)
        note = f"extrapolated from real runs at batch 1 and 2 ({exc.message})"
        card = self.budget.card if self.budget else None
        return StepEstimate(
            model=self.workload.name,
            batch_size=batch_size,
            device=device,
            optimizer=str(self.spec.optimizer),
            precision=self.spec.precision.name,
            mode=self.spec.mode,
            peak_allocated_bytes=peak,
            breakdown=dict.fromkeys(CATEGORIES, 0),
            peak_phase="unknown",
            peak_iteration=0,
            peak_module="",
            activation_bytes_by_module={},
            events=[],
            notes=[note],
            card=card.name if card else None,
            peak_reserved_bytes=reserved,
            total_bytes=card.total_bytes(reserved) if card and reserved is not None else None,
            budget_bytes=self.budget.budget_bytes if self.budget else None,
            method="extrapolated",
            threads=m1.threads,
            loss=m1.loss,
        )


class StepOptions(DistOptions, total=False):
    """The keywords :func:`estimate` and :func:`batchfit.fit` share (the step, the model's data, the
    card, the distributed run): a type for the verbs that forward them; each verb's signature
    has the defaults and the docs."""

    optimizer: OptimizerLike
    precision: str
    dataset: str | None
    num_classes: int | None
    loss: LossLike
    step: StepLike
    gpu: str | None
    memory: str | int | None
    free: bool
    alloc_conf: str | None
    context_bytes: str | int | None
    loop: str
    last_batch: int | str | None
    eval_batch_size: int | None
    grad_accum: int


class EstimateOptions(StepOptions, total=False):
    """The keywords of :func:`estimate` besides ``batch_size`` (the type of its overloads)."""

    device: str
    mode: str
    threads: int | None


@overload
def estimate(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    batch_size: int = 64,
    **options: Unpack[EstimateOptions],
) -> StepEstimate: ...
@overload
def estimate(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    batch_size: Sequence[int],
    **options: Unpack[EstimateOptions],
) -> EstimateReport: ...
def estimate(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    batch_size: int | Sequence[int] = 64,
    optimizer: OptimizerLike = "sgd",
    precision: str = "fp32",
    device: str = "cuda",
    dataset: str | None = None,
    num_classes: int | None = None,
    loss: LossLike = None,
    step: StepLike = None,
    mode: str = "train",
    gpu: str | None = None,
    memory: str | int | None = None,
    free: bool = False,
    alloc_conf: str | None = None,
    context_bytes: str | int | None = None,
    threads: int | None = None,
    loop: str = "pytorch",
    last_batch: int | str | None = None,
    eval_batch_size: int | None = None,
    grad_accum: int = 1,
    **distributed: Unpack[DistOptions],
) -> StepEstimate | EstimateReport:
    """Estimate the memory of one training step (two iterations of the reference step).

    ``model``: a registry name or an ``nn.Module`` (never modified); ``input_size``: one sample's
    shape without the batch dimension. ``batch_size`` an int gives a :class:`StepEstimate`, a list
    an :class:`EstimateReport`. ``device="cuda"`` simulates a CUDA GPU (the local one, ``gpu=``,
    ``memory=``, or an H100 80GB) on any machine; ``device="cpu"`` a CPU run with ``threads``
    intra-op threads (default ``torch.get_num_threads()``). ``context_bytes`` (bytes, or a size
    such as ``"600MiB"``) replaces the card's memory outside the allocator (CUDA context,
    libraries' modules and handles; ``--context`` on the command line). ``loop``: the training loop
    (pytorch, hf-trainer, lightning); ``last_batch`` (a size or ``"auto"``) and ``eval_batch_size``
    add a training run's tail (docs/estimate.md). ``grad_accum``: gradient accumulation, micro-batches
    of ``batch_size`` per optimizer step (the effective batch is their product).

    ``distributed``: ``gpus`` (per node) with ``nodes``, ``strategy`` (ddp, zero1, fsdp, fsdp-hybrid)
    and their options (:class:`batchfit.DistOptions`) estimates each GPU of a distributed run
    (docs/distributed.md): ``batch_size`` is per GPU, the figures are the peaking rank's, and
    ``.ranks`` holds every distinct rank's.
    """
    from ._distributed import make_dist

    dist = make_dist(**distributed)
    workload = load_workload(model, input_size, dataset=dataset, num_classes=num_classes)
    spec = make_spec(
        device,
        optimizer,
        precision,
        loss,
        step,
        mode,
        threads,
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
        grad_accum=grad_accum,
    )
    est = Estimator(
        workload,
        spec,
        gpu=gpu,
        memory=memory,
        free=free,
        alloc_conf=alloc_conf,
        context_bytes=context_bytes,
        dist=dist,
    )
    if isinstance(batch_size, int):
        return est.at(batch_size)
    sizes = list(batch_size)
    if not sizes:
        raise BatchfitError(tr("no batch size given"), hint=tr("e.g. batch_size=[64, 256]"))
    return EstimateReport(
        [est.at(b) for b in sizes], str(est.budget) if est.budget else None, budget=est.budget, spec=spec
    )
