"""The GPU catalogue, and the one place that turns ``--gpu`` / ``--memory`` / ``--free`` into a budget.

The catalogue is data (``_resources/gpus.json``): per card, the memory torch reports, the compute
capability, the cuBLAS workspace PyTorch takes for it, the memory the allocator never sees (CUDA
context and friends) and the cuDNN convolution workspace; every figure says where it comes from.

>>> card = get_gpu("H100-80GB")
>>> card.key, card.compute_capability, card.cublas_workspace_bytes
('h100-sxm', (9, 0), 33554432)
>>> get_gpu("rtx4090").cublas_workspace_bytes
8519680
>>> resolve_card(None, "24GiB", False, local=None).budget_bytes
25769803776
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any, Literal

from ._errors import BatchfitError, ExitCode
from ._i18n import tr
from ._units import format_bytes, parse_size

SCHEMA_VERSION = 1

Status = Literal["measured", "reported", "nominal", "rule", "assumed"]
BudgetOrigin = Literal["gpu", "memory", "free", "local", "default"]

# PyTorch's default cuBLAS workspace (CublasHandlePool.cpp, parseChosenWorkspaceSize)
CUBLAS_WORKSPACE_DEFAULT_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8  # ":4096:2:16:8" = 8,519,680 B
CUBLAS_WORKSPACE_LARGE_BYTES = 4096 * 8 * 1024  # 32 MiB
_LARGE_WORKSPACE_MAJORS = (9, 10, 12)  # Hopper, Blackwell (data centre and consumer)
_CUBLAS_CONFIG_RE = re.compile(r":([0-9]+):([0-9]+)")


def cublas_workspace_bytes_for(compute_capability: tuple[int, int], environ: Mapping[str, str] | None = None) -> int:
    """PyTorch's cuBLAS workspace per handle and stream for a card (``parseChosenWorkspaceSize``).

    ``CUBLAS_WORKSPACE_CONFIG=":SIZE_KiB:COUNT..."`` overrides the default, as in PyTorch.

    >>> cublas_workspace_bytes_for((8, 0)), cublas_workspace_bytes_for((9, 0))
    (8519680, 33554432)
    >>> cublas_workspace_bytes_for((8, 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    33554432
    """
    default = (
        CUBLAS_WORKSPACE_LARGE_BYTES
        if compute_capability[0] in _LARGE_WORKSPACE_MAJORS
        else CUBLAS_WORKSPACE_DEFAULT_BYTES
    )
    config = (environ or {}).get("CUBLAS_WORKSPACE_CONFIG")
    if config is None:
        return default
    pairs = _CUBLAS_CONFIG_RE.findall(config)
    if not pairs:
        return default  # PyTorch warns and uses the default
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


@dataclass(frozen=True)
class Provenance:
    """Where a figure comes from: ``measured`` ones name the card, driver, torch version and date."""

    status: Status
    source: str
    card: str | None = None
    driver: str | None = None
    torch: str | None = None
    date: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        return cls(**{k: data[k] for k in ("status", "source", "card", "driver", "torch", "date") if k in data})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        if self.status == "measured":
            return f"measured on {self.card} (driver {self.driver}, torch {self.torch}, {self.date})"
        if self.source == "--context":
            return "given with --context"
        return self.status


PEAK_KINDS = ("fp32", "tf32", "fp16", "bf16")  # FP32 cores; TF32, FP16 and BF16 tensor cores


@dataclass(frozen=True)
class Peaks:
    """A card's peak dense FLOP/s per kind (no sparsity) and its memory bandwidth, as the vendor prints them.

    Kinds: ``fp32`` (CUDA cores), ``tf32``, ``fp16``, ``bf16`` (tensor cores, FP32 accumulate); a
    kind the card lacks (Turing and Volta have no TF32 or BF16 tensor cores) is absent.

    >>> p = get_gpu("a100-80gb").peaks
    >>> p.flops_per_second["bf16"], p.bandwidth_bytes_per_second
    (312000000000000, 2039000000000)
    """

    flops_per_second: dict[str, int]
    bandwidth_bytes_per_second: int
    provenance: Provenance

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Peaks:
        flops = {str(k): int(v) for k, v in data["flops_per_second"].items()}
        unknown = set(flops) - set(PEAK_KINDS)
        if unknown:
            raise ValueError(f"unknown peak kinds {sorted(unknown)} (known: {', '.join(PEAK_KINDS)})")
        return cls(flops, int(data["bandwidth_bytes_per_second"]), Provenance.from_dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops_per_second": dict(self.flops_per_second),
            "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
            **self.provenance.to_dict(),
        }

    def __str__(self) -> str:
        flops = ", ".join(f"{k} {v / 1e12:,.1f}" for k, v in self.flops_per_second.items())
        return f"{flops} TFLOP/s dense; {self.bandwidth_bytes_per_second / 1e9:,.0f} GB/s"


@dataclass(frozen=True)
class GpuCard:
    """One card of the catalogue. Bytes are ints; ``provenance`` says where each figure comes from."""

    key: str
    name: str
    compute_capability: tuple[int, int] | None
    memory_bytes: int
    cublas_workspace_bytes: int
    non_allocator_bytes: int
    conv_workspace_bytes: int
    aliases: tuple[str, ...] = ()
    torch_names: tuple[str, ...] = ()
    provenance: dict[str, Provenance] = field(default_factory=dict, compare=False)
    peaks: Peaks | None = field(default=None, compare=False)  # None: the catalogue has no peaks for it

    def total_bytes(self, peak_reserved_bytes: int) -> int:
        """What nvidia-smi would show for the process: reserved segments + memory the allocator never sees."""
        return peak_reserved_bytes + self.non_allocator_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "key": self.key,
            "name": self.name,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "memory_bytes": self.memory_bytes,
            "cublas_workspace_bytes": self.cublas_workspace_bytes,
            "non_allocator_bytes": self.non_allocator_bytes,
            "conv_workspace_bytes": self.conv_workspace_bytes,
            "aliases": list(self.aliases),
            "torch_names": list(self.torch_names),
            "provenance": {k: p.to_dict() for k, p in self.provenance.items()},
            "peaks": self.peaks.to_dict() if self.peaks is not None else None,
        }

    def __str__(self) -> str:
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
        prov = self.provenance
        lines = [
            f"{self.name} ({self.key}), compute capability {cc}",
            f"  memory            {format_bytes(self.memory_bytes)}  [{prov.get('memory', '?')}]",
            f"  cuBLAS workspace  {format_bytes(self.cublas_workspace_bytes)}  [{prov.get('cublas_workspace', '?')}]",
            f"  non-allocator     {format_bytes(self.non_allocator_bytes)}  [{prov.get('non_allocator', '?')}]",
            f"  conv workspace    {format_bytes(self.conv_workspace_bytes)}  [{prov.get('conv_workspace', '?')}]",
        ]
        if self.peaks is not None:
            lines.append(f"  peaks             {self.peaks}  [{self.peaks.provenance}]")
        if self.aliases:
            lines.append(f"  aliases           {', '.join(self.aliases)}")
        return "\n".join(lines)


def _norm(name: str) -> str:
    """Lookup key: case, vendor words and punctuation do not matter (``NVIDIA H100 80GB HBM3`` == ``h10080gbhbm3``)."""
    text = name.lower()
    for word in ("nvidia", "geforce", "tesla"):
        text = text.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", text)


def _figure(entry: Mapping[str, Any], defaults: Mapping[str, Any], name: str) -> tuple[int, Provenance]:
    data = entry.get(name) or defaults[name]
    return int(data["bytes"]), Provenance.from_dict(data)


def card_from_entry(entry: Mapping[str, Any], defaults: Mapping[str, Any]) -> GpuCard:
    """Build a card from a catalogue entry (the form ``calibrate()``'s ``catalogue_update`` has too)."""
    try:
        cc = entry.get("compute_capability")
        figures = {name: _figure(entry, defaults, name) for name in _FIGURES}
        return GpuCard(
            key=entry["key"],
            name=entry["name"],
            compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
            memory_bytes=figures["memory"][0],
            cublas_workspace_bytes=figures["cublas_workspace"][0],
            non_allocator_bytes=figures["non_allocator"][0],
            conv_workspace_bytes=figures["conv_workspace"][0],
            aliases=tuple(entry.get("aliases", ())),
            torch_names=tuple(entry.get("torch_names", ())),
            provenance={name: prov for name, (_, prov) in figures.items()},
            peaks=Peaks.from_dict(entry["peaks"]) if entry.get("peaks") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BatchfitError(
            tr(
                "GPU catalogue entry {key!r} is malformed ({error}: {exc})",
                key=entry.get("key", "?"),
                error=type(exc).__name__,
                exc=exc,
            ),
            hint=tr(
                "each card needs key, name, compute_capability and memory/cublas_workspace {bytes, status, source}"
            ),
        ) from None


# The per-card figures; non_allocator and conv_workspace fall back to the catalogue's defaults.
_FIGURES = ("memory", "cublas_workspace", "non_allocator", "conv_workspace")


@dataclass(frozen=True)
class Catalogue:
    """All cards, looked up by key, alias or the name torch reports (case-insensitive, with suggestions)."""

    cards: tuple[GpuCard, ...]
    default_key: str
    defaults: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalogue:
        defaults = dict(data["defaults"])
        cards = tuple(card_from_entry(entry, defaults) for entry in data["cards"])
        return cls(cards=cards, default_key=data["default_card"], defaults=defaults)

    @property
    def _index(self) -> dict[str, GpuCard]:
        index: dict[str, GpuCard] = {}
        for card in self.cards:
            for name in (card.key, card.name, *card.aliases, *card.torch_names):
                index.setdefault(_norm(name), card)
        return index

    def get(self, name: str) -> GpuCard:
        index = self._index
        card = index.get(_norm(name))
        if card is not None:
            return card
        close = difflib.get_close_matches(_norm(name), list(index), n=4, cutoff=0.5)
        keys = list(dict.fromkeys(index[c].key for c in close))
        raise BatchfitError(
            tr("unknown GPU {name!r}", name=name),
            hint=(tr("did you mean {names}?", names=", ".join(repr(k) for k in keys)) + " " if keys else "")
            + tr("see `batchfit gpus`, or give the card's memory as `memory` (e.g. `memory='24GiB'`)"),
        )

    def by_torch_name(self, name: str) -> GpuCard | None:
        key = _norm(name)
        return next((c for c in self.cards if key in {_norm(t) for t in (c.name, *c.torch_names)}), None)

    @property
    def default(self) -> GpuCard:
        return self.get(self.default_key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "default_card": self.default_key,
            "cards": [card.to_dict() for card in self.cards],
        }


@cache
def load_catalogue() -> Catalogue:
    """The catalogue shipped with batchfit (``_resources/gpus.json``)."""
    text = resources.files("batchfit").joinpath("_resources/gpus.json").read_text(encoding="utf-8")
    return Catalogue.from_dict(json.loads(text))


def get_gpu(name: str) -> GpuCard:
    """A card by key, alias or torch name: ``h100``, ``H100-80GB``, ``h100-sxm``, ``a100``, ``rtx4090``, ..."""
    return load_catalogue().get(name)


def list_gpus() -> tuple[GpuCard, ...]:
    return load_catalogue().cards


def conv_workspace_bytes(
    card: GpuCard | None = None,
    *,
    direction: Literal["forward", "backward_data", "backward_weight"] = "forward",
    input_bytes: int = 0,
    weight_bytes: int = 0,
    output_bytes: int = 0,
) -> int:
    """The cuDNN workspace one convolution call takes through the caching allocator.

    Today a per-card constant (an *assumed* placeholder unless calibrated, see docs/allocator.md);
    the shape arguments are accepted so callers need not change when a shape-aware model lands.

    >>> conv_workspace_bytes(get_gpu("a100"), direction="backward_weight", input_bytes=1 << 20) > 0
    True
    """
    del direction, input_bytes, weight_bytes, output_bytes  # not used by the constant model yet
    return (card or load_catalogue().default).conv_workspace_bytes


# --------------------------------------------------------------------------------------------
# Budgets: --gpu / --memory / --free
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalGpu:
    """What this machine's CUDA device 0 says about itself."""

    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]


def probe_local_gpu() -> LocalGpu | None:
    """Device 0 if CUDA is available (this creates the CUDA context), else ``None``."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return LocalGpu(props.name, int(total), int(free), (int(props.major), int(props.minor)))


def card_for_local(local: LocalGpu, catalogue: Catalogue | None = None) -> GpuCard:
    """The catalogue's card for the local device, with the memory it reports; an ad-hoc card if unknown."""
    cat = catalogue or load_catalogue()
    measured = Provenance(
        "measured", "torch.cuda.mem_get_info() on this machine", card=local.name, torch=_torch_version()
    )
    known = cat.by_torch_name(local.name)
    if known is not None:
        return replace(known, memory_bytes=local.total_bytes, provenance={**known.provenance, "memory": measured})
    rule = Provenance("rule", "PyTorch's cuBLAS workspace rule for this compute capability")
    entry = {"key": "local", "name": local.name, "compute_capability": list(local.compute_capability)}
    return card_from_entry(
        {
            **entry,
            "memory": {"bytes": local.total_bytes, **measured.to_dict()},
            "cublas_workspace": {"bytes": cublas_workspace_bytes_for(local.compute_capability), **rule.to_dict()},
        },
        cat.defaults,
    )


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


@dataclass(frozen=True)
class Budget:
    """The memory one training step may use, on which card, and a sentence saying where it came from.

    ``budget_bytes`` is the card's memory (or what is free now with ``--free``);
    ``device_limit_bytes`` is what the caching allocator can get out of it: the budget less the
    memory the allocator never sees (with ``--free`` this process's context is already counted).
    """

    card: GpuCard
    budget_bytes: int
    origin: BudgetOrigin
    description: str

    @property
    def device_limit_bytes(self) -> int:
        if self.origin == "free":
            return self.budget_bytes
        return max(0, self.budget_bytes - self.card.non_allocator_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "card": self.card.to_dict(),
            "budget_bytes": self.budget_bytes,
            "device_limit_bytes": self.device_limit_bytes,
            "origin": self.origin,
            "description": self.description,
        }

    def __str__(self) -> str:
        return self.description


# --------------------------------------------------------------------------------------------
# Memory outside the allocator: the CUDA context, the libraries' modules and handles
# --------------------------------------------------------------------------------------------

_MIB = 1 << 20


@dataclass(frozen=True)
class ContextFigure:
    """A published measurement of a process's GPU memory outside PyTorch's caching allocator."""

    nbytes: int
    lazy: bool  # CUDA_MODULE_LOADING=LAZY (kernels loaded when first used) or eager
    cuda: str  # the CUDA runtime
    card: str | None
    source: str


# Bare contexts (a CUDA context and PyTorch's first kernels, before a training step loads more).
PUBLISHED_CONTEXTS: tuple[ContextFigure, ...] = (
    ContextFigure(
        1343 * _MIB,
        False,
        "11.2",
        "Tesla V100",
        "a bare context of 1,343 MiB on a V100 with CUDA 11.2, before lazy loading (cited in batchfit issue 11)",
    ),
    ContextFigure(
        666_632_192,
        False,
        "11.7",
        None,
        "pytorch/pytorch PR #86509: CUDA_MODULE_LOADING=DEFAULT, total - free (cudaMemGetInfo) after "
        "torch.randn(20, 16, 50, 100).cuda()",
    ),
    ContextFigure(
        287_047_680,
        True,
        "11.7",
        None,
        "pytorch/pytorch PR #86509: the same with CUDA_MODULE_LOADING=LAZY (PyTorch's default since 1.13)",
    ),
    ContextFigure(
        426 * _MIB,
        True,
        "13.0",
        "NVIDIA RTX 6000 Ada Generation",
        "unslothai/unsloth-zoo PR #1053: nvidia-smi after torch.cuda.mem_get_info(0), torch 2.10.0+cu130",
    ),
)


def lazy_module_loading(cuda_version: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether CUDA loads kernels lazily: CUDA 11.7 or newer, and ``CUDA_MODULE_LOADING`` not set to
    anything but ``LAZY`` (PyTorch sets ``LAZY`` when it is unset, pytorch/pytorch PR #86509).

    >>> lazy_module_loading("12.4"), lazy_module_loading("11.2"), lazy_module_loading("12.4", {"CUDA_MODULE_LOADING": "EAGER"})
    (True, False, False)
    """
    mode = (environ or {}).get("CUDA_MODULE_LOADING", "LAZY").upper()
    if cuda_version is None:
        return mode == "LAZY"
    parts = tuple(int(x) for x in re.findall(r"[0-9]+", cuda_version)[:2])
    return mode == "LAZY" and parts >= (11, 7)


def context_bytes_for(
    card: GpuCard, cuda_version: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, Provenance]:
    """The card's memory outside the allocator under a CUDA runtime and module-loading mode.

    A figure measured on the card wins. Otherwise the larger of the catalogue's figure and the
    largest published bare context for the loading mode (an underestimate is an out-of-memory,
    so the larger one; published contexts were measured before a training step loaded its kernels).

    >>> card = get_gpu("v100")
    >>> context_bytes_for(card, "11.2")[0] // 2**20, context_bytes_for(card, "12.4")[0] // 2**20
    (1343, 512)
    """
    figure = card.non_allocator_bytes
    prov = card.provenance.get("non_allocator", Provenance("assumed", "catalogue"))
    if prov.status == "measured":
        return figure, prov
    lazy = lazy_module_loading(cuda_version, environ)
    same_mode = [f for f in PUBLISHED_CONTEXTS if f.lazy == lazy]
    names = {_norm(n) for n in (card.name, *card.torch_names)}
    same_card = [f for f in same_mode if f.card is not None and _norm(f.card) in names]
    best = max(same_card or same_mode, key=lambda f: f.nbytes)
    if best.nbytes <= figure:
        return figure, prov
    mode = "lazy" if lazy else "eager"
    return best.nbytes, Provenance(
        "reported", f"the largest published bare CUDA context with {mode} module loading: {best.source}"
    )


def _with_context(budget: Budget, context: str | int | None) -> Budget:
    """The budget's card with its memory outside the allocator: ``--context`` or the context model."""
    card = budget.card
    if context is not None:
        try:
            size = parse_size(context) if isinstance(context, str) else int(context)
        except (BatchfitError, ValueError):
            raise BatchfitError(
                tr("`context_bytes` must be a size, not {context!r}", context=context),
                hint=tr("e.g. `context_bytes='600MiB'` (2^20 B each), or bytes"),
            ) from None
        if size < 0:
            raise BatchfitError(
                tr("`context_bytes` must not be negative, not {context!r}", context=context),
                hint=tr("e.g. `context_bytes='600MiB'`"),
            )
        nbytes, prov = size, Provenance("nominal", "--context")
    else:
        import os

        nbytes, prov = context_bytes_for(card, _torch_cuda_version(), os.environ)
    if nbytes == card.non_allocator_bytes and context is None:
        return budget
    card = replace(card, non_allocator_bytes=nbytes, provenance={**card.provenance, "non_allocator": prov})
    return replace(budget, card=card)


def _torch_cuda_version() -> str | None:
    try:
        import torch

        return torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        return None


_PROBE: Any = object()  # sentinel: "probe the local GPU" (tests pass a LocalGpu or None instead)


def resolve_card(
    gpu: str | None,
    memory: str | int | None,
    free: bool,
    *,
    local: Any = _PROBE,  # a LocalGpu, or None for "no CUDA here"; default: probe the machine
    context: str | int | None = None,
) -> Budget:
    """Turn ``--gpu NAME`` / ``--memory SIZE`` / ``--free`` into a :class:`Budget` (the one place that does).

    Neither given: the local GPU if CUDA is available, else the catalogue's default card (H100 80GB
    SXM), and the description says so. ``local`` replaces probing the machine (for tests).
    ``context`` (``--context SIZE``) sets the memory outside the allocator; without it the context
    model (:func:`context_bytes_for`) gives it from the card, the CUDA runtime and module loading.

    >>> resolve_card("a100", None, False, local=None, context="1GiB").card.non_allocator_bytes
    1073741824
    """
    return _with_context(_resolve_card(gpu, memory, free, local=local), context)


def _resolve_card(
    gpu: str | None,
    memory: str | int | None,
    free: bool,
    *,
    local: Any = _PROBE,
) -> Budget:
    """Turn ``--gpu NAME`` / ``--memory SIZE`` / ``--free`` into a :class:`Budget` (the one place that does).

    Neither given: the local GPU if CUDA is available, else the catalogue's default card (H100 80GB
    SXM), and the description says so. ``local`` replaces probing the machine (for tests).

    >>> b = resolve_card("a100-40gb", None, False, local=None)
    >>> b.origin, b.card.key
    ('gpu', 'a100-40gb')
    >>> print(resolve_card(None, None, False, local=None))  # doctest: +ELLIPSIS
    no GPU here and neither --gpu nor --memory: assuming NVIDIA H100 80GB HBM3 (h100-sxm), 79.19 GiB...
    """
    catalogue = load_catalogue()
    if free:
        if gpu is not None or memory is not None:
            raise BatchfitError(
                tr("`free` measures the local GPU, so it cannot be combined with `gpu` or `memory`"),
                hint=tr("drop `free` to plan for another card, or drop `gpu`/`memory`"),
                exit_code=ExitCode.USAGE,
            )
        found = probe_local_gpu() if local is _PROBE else local
        if found is None:
            raise BatchfitError(
                tr("`free` needs a CUDA GPU on this machine, and torch.cuda.is_available() is False"),
                hint=tr("use `gpu=NAME` or `memory=SIZE` to plan for a card you do not have here"),
                exit_code=ExitCode.NO_DEVICE,
            )
        card = card_for_local(found, catalogue)
        return Budget(
            card,
            found.free_bytes,
            "free",
            f"the local {card.name}: {format_bytes(found.free_bytes)} free now (--free) "
            f"of {format_bytes(found.total_bytes)}",
        )
    size = _parse_memory(memory) if memory is not None else None
    if gpu is not None:
        card = catalogue.get(gpu)
        if size is None:
            return Budget(
                card,
                card.memory_bytes,
                "gpu",
                f"{card.name} ({card.key}, --gpu {gpu}): {format_bytes(card.memory_bytes)} "
                f"[{card.provenance.get('memory', '?')}]",
            )
        return Budget(
            replace(card, memory_bytes=size),
            size,
            "memory",
            f"{card.name} ({card.key}) with {format_bytes(size)} (--memory {memory})",
        )
    if size is not None:
        return Budget(
            _custom_card(size, catalogue),
            size,
            "memory",
            f"a card with {format_bytes(size)} (--memory {memory}); its CUDA context "
            f"({format_bytes(catalogue.defaults['non_allocator']['bytes'])}) and cuBLAS workspace "
            f"({format_bytes(CUBLAS_WORKSPACE_DEFAULT_BYTES)}, as before Hopper) are assumed",
        )
    found = probe_local_gpu() if local is _PROBE else local
    if found is not None:
        card = card_for_local(found, catalogue)
        return Budget(
            card,
            found.total_bytes,
            "local",
            tr("the local GPU, {name}: {size}", name=card.name, size=format_bytes(found.total_bytes)),
        )
    card = catalogue.default
    return Budget(
        card,
        card.memory_bytes,
        "default",
        tr(
            "no GPU here and neither --gpu nor --memory: assuming {name} ({key}), {size} (use --gpu NAME or --memory SIZE)",
            name=card.name,
            key=card.key,
            size=format_bytes(card.memory_bytes),
        ),
    )


def _parse_memory(memory: str | int) -> int:
    size = parse_size(memory) if isinstance(memory, str) else int(memory)
    if size <= 0:
        raise BatchfitError(
            tr("`memory` must be positive, not {memory!r}", memory=memory), hint=tr("e.g. `memory='24GiB'`")
        )
    return size


def _custom_card(size: int, catalogue: Catalogue) -> GpuCard:
    rule = {
        "bytes": CUBLAS_WORKSPACE_DEFAULT_BYTES,
        "status": "assumed",
        "source": "card unknown: PyTorch's default cuBLAS workspace for cards before Hopper",
    }
    return card_from_entry(
        {
            "key": "custom",
            "name": f"custom card ({format_bytes(size)})",
            "compute_capability": None,
            "memory": {"bytes": size, "status": "nominal", "source": "--memory"},
            "cublas_workspace": rule,
        },
        catalogue.defaults,
    )


__all__ = [
    "CUBLAS_WORKSPACE_DEFAULT_BYTES",
    "CUBLAS_WORKSPACE_LARGE_BYTES",
    "PEAK_KINDS",
    "PUBLISHED_CONTEXTS",
    "Budget",
    "Catalogue",
    "ContextFigure",
    "GpuCard",
    "LocalGpu",
    "Peaks",
    "Provenance",
    "card_for_local",
    "card_from_entry",
    "context_bytes_for",
    "conv_workspace_bytes",
    "cublas_workspace_bytes_for",
    "get_gpu",
    "lazy_module_loading",
    "list_gpus",
    "load_catalogue",
    "probe_local_gpu",
    "resolve_card",
]
