"""The roofline estimate of training throughput: a step's FLOPs and bytes against a card's peaks.

Without the GPU, how fast would each batch size train? Every aten op of the reference step's
steady iteration (forward, backward and the optimizer step, traced on fake tensors:
``_trace.trace_step(observe=)``) is charged the roofline model's least time (Williams, Waterman
and Patterson, "Roofline", CACM 2009): ``max(FLOPs / peak FLOP/s, bytes / memory bandwidth)``
at the catalogue's peaks (``GpuCard.peaks``). The step's time is the sum over its ops, and the
throughput ``batch / time`` rises with the batch size and saturates.

Per op, not per step: a step mixes compute-bound ops (matmuls, convolutions) with memory-bound
ones (activations, normalisations, the optimizer's elementwise updates), and one stream runs
them one after another; a single ``max`` over the whole step's totals would let the matmuls'
time hide every other op's traffic. The sum of per-op maxima is never below the whole-step
``max``, and still optimistic: every op at its own roof, no kernel-launch, Python or input time,
no cache reuse counted. It is an estimate, labelled so wherever it appears; ``sweep`` and
``probe`` measure.

FLOPs: ``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention; the ones
``summary`` counts mult-adds with, :func:`batchfit._summary._extra_flop_formulas`); other ops
count by their bytes only. Bytes: each op reads its tensor arguments and writes its outputs
once (views, ``empty`` and ``detach`` move nothing; CPU-side ops of a CUDA step, such as the
optimizer's step counters, are not device time).

>>> from batchfit._gpus import get_gpu
>>> op = OpCost("aten.mm", "fp32", flops=2 * 64 * 784 * 512, nbytes=4 * (64 * 784 + 784 * 512 + 64 * 512))
>>> round(op.seconds(get_gpu("a100-80gb").peaks) * 1e9)  # ns: compute-bound at the FP32 peak, 19.5 TFLOP/s
2635
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from ._errors import BatchfitError
from ._render import Rendered, Table
from ._units import format_bytes

if TYPE_CHECKING:
    from ._gpus import GpuCard, Peaks
    from ._models import Workload
    from ._step import StepSpec

SCHEMA_VERSION = 1
SATURATION = 0.05  # throughput within 5% of the best counts as saturated (issue 16's definition)
LABEL = "roofline estimate"
PROBE_SIZES = (2, 4, 8)  # traced to get each op's costs as lines in the batch size, and to check them
STEADY_PHASES = ("forward", "backward", "optimizer")

_aten = torch.ops.aten
# ops that move no data: they allocate, alias or change metadata only
_NO_TRAFFIC = frozenset(
    getattr(_aten, name)
    for name in ("empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh")
    if hasattr(_aten, name)
)
_MATMULS = frozenset(("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "_addmm_activation"))


def smallest_within(points: Iterable[tuple[int, float]], tolerance: float = SATURATION) -> int | None:
    """The smallest batch size whose throughput is within ``tolerance`` of the best (None without points).

    >>> smallest_within([(16, 500.0), (32, 900.0), (64, 960.0), (128, 1000.0)])
    64
    """
    pairs = [(b, v) for b, v in points if v > 0]
    if not pairs:
        return None
    best = max(v for _, v in pairs)
    return min(b for b, v in pairs if v >= (1 - tolerance) * best)


# ---------------------------------------------------------------------------------------------
# One op, one step


def _flop_registry() -> dict[Any, Any]:
    """torch's FLOP formulas by overload packet, with the ones ``summary`` adds (the same registry)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ._summary import _extra_flop_formulas

    return dict(FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()).flop_registry)


def peak_kind(op: str, dtype: torch.dtype) -> str:
    """Which peak an op's FLOPs run at, by its dtype and PyTorch's TF32 switches as set in this process.

    FP16/BF16 run on tensor cores. FP32 matmuls use TF32 tensor cores only when
    ``torch.get_float32_matmul_precision()`` is not ``"highest"`` (its default); FP32
    convolutions use them when ``torch.backends.cudnn.allow_tf32`` (default True).

    >>> peak_kind("aten.mm", torch.bfloat16), peak_kind("aten.mm", torch.float32)
    ('bf16', 'fp32')
    >>> peak_kind("aten.convolution", torch.float32)
    'tf32'
    """
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype != torch.float32:
        return str(dtype).removeprefix("torch.")
    name = op.removeprefix("aten.")
    if "conv" in name and torch.backends.cudnn.allow_tf32:
        return "tf32"
    if name in _MATMULS and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


@dataclass(frozen=True)
class OpCost:
    """One aten op of the step: its FLOPs (0 when torch has no formula), the bytes it reads and writes."""

    op: str
    kind: str | None  # the peak its FLOPs run at (fp32, tf32, fp16, bf16); None without FLOPs
    flops: int
    nbytes: int

    def seconds(self, peaks: Peaks) -> float:
        """The roofline's least time for this op on a card with these peaks."""
        memory = self.nbytes / peaks.bandwidth_bytes_per_second
        if not self.flops:
            return memory
        return max(self.flops / _peak(peaks, self.kind), memory)

    def memory_bound(self, peaks: Peaks) -> bool:
        return not self.flops or self.nbytes / peaks.bandwidth_bytes_per_second >= self.flops / _peak(peaks, self.kind)


class MissingPeak(ValueError):
    """The card's catalogue entry has no peak for the kind an op needs."""


def _peak(peaks: Peaks, kind: str | None) -> int:
    table = peaks.flops_per_second
    if kind == "tf32" and "tf32" not in table:
        kind = "fp32"  # before Ampere there are no TF32 tensor cores: PyTorch's TF32 switches change nothing
    if kind not in table:
        raise MissingPeak(kind)
    return table[kind]


@dataclass(frozen=True)
class StepCost:
    """The ops of one step's steady iteration at one batch size."""

    batch_size: int
    ops: tuple[OpCost, ...]

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def seconds(self, peaks: Peaks) -> float:
        return sum(op.seconds(peaks) for op in self.ops)

    def memory_bound_seconds(self, peaks: Peaks) -> float:
        return sum(op.seconds(peaks) for op in self.ops if op.memory_bound(peaks))


def _tensors(tree: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen.setdefault(id(t), t)
    return list(seen.values())


def _mutated(func: Any, args: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The arguments an op writes to, by its schema (``Tensor(a!)``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if value is not None:
                out.append(value)
    return out


class _Counter:
    """The observer ``trace_step`` calls after each op: costs of the steady iteration's ops."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.registry = _flop_registry()
        self.ops: dict[int, list[OpCost]] = {}  # by iteration

    def __call__(self, func: Any, args: Any, kwargs: Any, out: Any, phase: str, iteration: int) -> None:
        if phase not in STEADY_PHASES or not isinstance(func, torch._ops.OpOverload):
            return
        inputs = _tensors((args, kwargs))
        if not any(t.device.type == self.device_type for t in inputs + _tensors(out)):
            return  # host-side work of a device step (the optimizer's step counters on the CPU)
        packet = func.overloadpacket
        nbytes = 0
        if not func.is_view and func not in _NO_TRAFFIC:
            # reads: every tensor argument; writes: new outputs, and the arguments the op mutates
            # (an in-place op's, a foreach update's lists: the schema marks them as written)
            ids = {id(t) for t in inputs}
            written = {id(t): t for t in _tensors(out) if id(t) not in ids}
            for t in _tensors(_mutated(func, args, kwargs or {})):
                written.setdefault(id(t), t)
            nbytes = sum(t.numel() * t.element_size() for t in (*inputs, *written.values()))
        flops = 0
        kind = None
        formula = self.registry.get(packet)
        if formula is not None:
            flops = int(formula(*args, **(kwargs or {}), out_val=out))
            floating = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
            kind = peak_kind(str(packet), floating) if flops else None
        self.ops.setdefault(iteration, []).append(OpCost(str(packet), kind, flops, nbytes))

    def steady(self, batch_size: int) -> StepCost:
        """The last iteration that ran: the steady step (optimizer state exists from the first on)."""
        if not self.ops:
            return StepCost(batch_size, ())
        return StepCost(batch_size, tuple(self.ops[max(self.ops)]))


def step_cost(
    workload: Workload,
    spec: StepSpec,
    batch_size: int,
    *,
    compute_capability: tuple[int, int] | None = None,
) -> StepCost:
    """Trace the step at one batch size and cost its steady iteration op by op.

    >>> from batchfit._step import make_spec
    >>> from batchfit._models import load_workload
    >>> c = step_cost(load_workload("mlp", dataset="mnist"), make_spec("cuda"), 64)
    >>> c.flops == 2 * 64 * 784 * 128 * 2 + 2 * 64 * 128 * 10 * 3  # 784-128-10: the input needs no gradient
    True
    """
    from ._trace import trace_step

    counter = _Counter(torch.device(spec.device).type)
    trace_step(workload, batch_size, spec, compute_capability=compute_capability, observe=counter)
    return counter.steady(batch_size)


# ---------------------------------------------------------------------------------------------
# Along the batch axis


class AffineCost:
    """Each op's FLOPs and bytes as lines in the batch size, from steps costed at three sizes.

    ``ok`` when the three steps ran the same ops and every op's FLOPs and bytes at the third size
    are exactly what the line through the first two says (checked, not assumed).
    """

    def __init__(self, costs: Sequence[StepCost]) -> None:
        if len(costs) < 3 or len({c.batch_size for c in costs}) != len(costs):
            raise ValueError("three steps at different batch sizes are needed")
        self.costs = list(costs)
        a, b = costs[0], costs[1]
        self.lines: list[tuple[str, str | None, Fraction, Fraction, Fraction, Fraction]] = []
        self.ok = all(len(c.ops) == len(a.ops) for c in costs)
        if not self.ok:
            return
        db = b.batch_size - a.batch_size
        for oa, ob in zip(a.ops, b.ops):
            if (oa.op, oa.kind) != (ob.op, ob.kind):
                self.ok = False
                return
            fs, bs = Fraction(ob.flops - oa.flops, db), Fraction(ob.nbytes - oa.nbytes, db)
            self.lines.append((oa.op, oa.kind, oa.flops - fs * a.batch_size, fs, oa.nbytes - bs * a.batch_size, bs))
        self.ok = all(self.at(c.batch_size) == c for c in costs[2:])

    def at(self, batch_size: int) -> StepCost:
        ops = []
        for op, kind, f0, fs, b0, bs in self.lines:
            flops, nbytes = f0 + fs * batch_size, b0 + bs * batch_size
            ops.append(OpCost(op, kind if flops else None, int(flops), int(nbytes)))
        return StepCost(batch_size, tuple(ops))


@dataclass(frozen=True)
class RooflinePoint:
    """The estimate at one batch size (seconds per step of the steady iteration)."""

    batch_size: int
    flops: int
    nbytes: int
    seconds: float
    memory_bound_seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "flops_per_step": self.flops,
            "bytes_per_step": self.nbytes,
            "seconds_per_step": self.seconds,
            "memory_bound_seconds": self.memory_bound_seconds,
            "samples_per_second": self.samples_per_second,
        }


@dataclass
class Roofline(Rendered):
    """Roofline-estimated throughput by batch size on one card (an optimistic ceiling, not a measurement)."""

    model: str
    card: str
    precision: str
    points: list[RooflinePoint]
    method: str  # "affine" (three traces, lines checked) or "traced" (every size traced)
    peaks: Peaks | None = None
    card_key: str = ""
    unavailable: str | None = None  # why there is no estimate (no peaks for the card, for a dtype)
    notes: list[str] = field(default_factory=list)

    @property
    def saturation_batch_size(self) -> int | None:
        """The smallest batch size whose estimated samples/s is within 5% of the best estimate."""
        return smallest_within((p.batch_size, p.samples_per_second) for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": LABEL,
            "about": "least time per op max(FLOPs / peak FLOP/s, bytes / bandwidth) at the card's catalogue "
            "peaks, summed over the steady step's ops: an optimistic ceiling, not a measurement",
            "model": self.model,
            "card": self.card,
            "precision": self.precision,
            "method": self.method,
            "peaks": self.peaks.to_dict() if self.peaks is not None else None,
            "unavailable": self.unavailable,
            "saturation_batch_size": self.saturation_batch_size,
            "points": [p.to_dict() for p in self.points],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> Table:
        title = f"{self.model} on {self.card}: throughput by batch size, {LABEL.upper()} (not measured)"
        if self.unavailable:
            return Table(title, ["batch"], [], footer=[f"no {LABEL}: {self.unavailable}"])
        best = max((p.samples_per_second for p in self.points), default=0.0)
        sat = self.saturation_batch_size
        rows = [
            [
                f"{p.batch_size:,}" + ("  <- saturates" if p.batch_size == sat else ""),
                f"{p.flops / 1e9:,.3f}",
                format_bytes(p.nbytes, "MB"),
                _duration(p.seconds),
                f"{p.samples_per_second:,.0f}",
                f"{p.samples_per_second / best:.0%}" if best else "-",
                f"{p.memory_bound_seconds / p.seconds:.0%}" if p.seconds else "-",
            ]
            for p in self.points
        ]
        footer = [
            f"{LABEL}: each op of the steady step (forward, backward, optimizer) takes at least max(FLOPs / peak "
            "FLOP/s, bytes / memory bandwidth) at the card's catalogue peaks; no kernel-launch, Python or "
            "data time: an optimistic ceiling, not a measurement (batchfit sweep / probe measure on the card)",
            f"peaks: {self.peaks} [{self.peaks.provenance.status}; `batchfit gpus {self.card_key} --json` cites the datasheet]"
            if self.peaks is not None
            else "peaks: -",
            "GFLOP = 10^9 floating-point operations (matmuls, convolutions, attention: torch.utils.flop_counter); "
            "MB = 10^6 bytes read and written by the step's ops",
        ]
        if sat is not None:
            footer.append(
                f"=> throughput saturates from batch size {sat:,}: the smallest within {SATURATION:.0%} of the best "
                f"{LABEL} ({best:,.0f} samples/s)"
            )
        footer += [f"note: {n}" for n in self.notes]
        columns = ["batch", "GFLOP/step", "moved/step", "time/step", "samples/s (est.)", "of best", "memory-bound"]
        return Table(title, columns, rows, footer=footer)

    def sections(self) -> list[Table]:
        return [self.table()]


def _duration(seconds: float) -> str:
    """A step's time in the unit that keeps three digits visible.

    >>> _duration(8.1e-6), _duration(0.0123), _duration(2.5)
    ('8.10 us', '12.30 ms', '2.50 s')
    """
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds:,.2f} s"


def _tf32_notes(points: Sequence[StepCost]) -> list[str]:
    kinds = {op.kind for c in points for op in c.ops if op.kind}
    notes = []
    if "fp32" in kinds:
        notes.append(
            "FP32 matmuls at the FP32 peak: torch.get_float32_matmul_precision() is "
            f"{torch.get_float32_matmul_precision()!r} in this process ('high' would use TF32 tensor cores)"
        )
    if "tf32" in kinds:
        notes.append("TF32 tensor cores for FP32 convolutions (torch.backends.cudnn.allow_tf32, True by default)")
    return notes


def roofline(
    workload: Workload,
    spec: StepSpec,
    card: GpuCard,
    batch_sizes: Sequence[int],
    *,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Roofline:
    """The roofline estimate of samples/s at each batch size on ``card`` (three traces when the costs are lines).

    >>> from batchfit._step import make_spec
    >>> from batchfit._gpus import get_gpu
    >>> from batchfit._models import load_workload
    >>> r = roofline(load_workload("mlp", dataset="mnist"), make_spec("cuda"), get_gpu("h100"), [64, 1024, 16384])
    >>> r.method, [p.samples_per_second < q.samples_per_second for p, q in zip(r.points, r.points[1:])]
    ('affine', [True, True])
    """
    say = progress or (lambda text: None)
    name = model or workload.name
    precision = spec.precision.name
    if card.peaks is None:
        return Roofline(
            name, card.name, precision, [], "none", unavailable=f"the GPU catalogue has no peak FLOP/s for {card.name}"
        )
    peaks = card.peaks
    say(f"counting the step's FLOPs and bytes at batch sizes {', '.join(map(str, PROBE_SIZES))} ({LABEL})")
    cc = card.compute_capability
    notes: list[str] = []
    method = "affine"
    try:
        affine = AffineCost([step_cost(workload, spec, b, compute_capability=cc) for b in PROBE_SIZES])
        if affine.ok:
            costs = [affine.at(b) for b in batch_sizes]
        else:
            say(f"the step's costs are not lines in the batch size: tracing {len(batch_sizes)} sizes")
            costs = [step_cost(workload, spec, b, compute_capability=cc) for b in batch_sizes]
            method = "traced"
            notes.append("the step's FLOPs or bytes are not lines in the batch size: each size was traced")
    except Exception as exc:  # an optional estimate: say why it is missing, never fail the plan for it
        reason = exc.message if isinstance(exc, BatchfitError) else f"{type(exc).__name__}: {exc}"
        return Roofline(name, card.name, precision, [], method, unavailable=f"the step could not be costed ({reason})")
    try:
        points = [
            RooflinePoint(c.batch_size, c.flops, c.nbytes, c.seconds(peaks), c.memory_bound_seconds(peaks))
            for c in costs
        ]
    except MissingPeak as exc:
        return Roofline(
            name,
            card.name,
            precision,
            [],
            method,
            peaks=peaks,
            card_key=card.key,
            unavailable=f"the GPU catalogue has no {exc.args[0]} peak for {card.name}",
        )
    notes += _tf32_notes(costs)
    kernels = max((sum(1 for op in c.ops if op.nbytes or op.flops) for c in costs), default=0)
    notes.append(
        f"{kernels} ops move data in each step; their launch overhead (not modelled) keeps small batches "
        "further below this ceiling"
    )
    return Roofline(name, card.name, precision, points, method, peaks=peaks, card_key=card.key, notes=notes)


__all__ = [
    "LABEL",
    "SATURATION",
    "AffineCost",
    "MissingPeak",
    "OpCost",
    "Roofline",
    "RooflinePoint",
    "StepCost",
    "peak_kind",
    "roofline",
    "smallest_within",
    "step_cost",
]
