"""Per-rank memory of one training step under DDP, ZeRO-1 and FSDP2, in one process.

Each rank's step is traced like a single-process one (``_trace.trace_step``, then the same
allocator replay), with PyTorch's fake process group (``init_process_group("fake")``, the backend
PyTorch's own tests use) standing for the other ranks: FSDP2 (``fully_shard``) and
``ZeroRedundancyOptimizer`` run their own code on fake tensors; collectives on the fake group move
no data, and their buffers are the tensors that code allocates. DDP's C++ reducer cannot see a
replayed backward (its hooks sit on C++ AccumulateGrad nodes), so its buckets and copies are
modelled from ``torch/csrc/distributed/c10d/reducer.cpp`` (docs/distributed.md).

API (stable; ``_fit``, ``_plan`` and the distributed probe use it)::

    DistSpec(world_size, nodes=1, strategy="ddp"|"zero1"|"fsdp"|"fsdp-hybrid", **options)
    make_dist(**options: DistOptions) -> DistSpec | None  # the verbs' keywords (gpus per node)
    estimate_ranks(workload, batch_size, spec: StepSpec, dist: DistSpec, *, budget=None,
                   alloc_config=None, cuda_workspaces=None, compute_capability=None) -> RankEstimates
    RankEstimates.ranks: list[RankEstimate]   # one per distinct rank: .rank, .same_as, .estimate
    RankEstimates.peak: RankEstimate           # the rank whose peak allocated bytes are highest
    distinct_ranks(model, dist) -> list[list[int]]  # ranks grouped by identical local shapes
    wrap_model(model, dist, device_type)       # fully_shard per block then the root (FSDP2)

``batch_size`` is per rank; the global batch is ``batch_size * dist.world_size * grad_accum``.

>>> d = DistSpec(2, strategy="fsdp")
>>> d.ranks_per_node, d.strategy
(2, 'fsdp')
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import nn
from typing_extensions import Unpack

from ._errors import BatchfitError
from ._i18n import tr

if TYPE_CHECKING:
    from ._allocator import AllocatorConfig
    from ._estimate import StepEstimate
    from ._gpus import Budget
    from ._models import Workload
    from ._step import StepSpec
    from ._trace import Placed

STRATEGIES = ("ddp", "zero1", "fsdp", "fsdp-hybrid")
# categories a distributed step adds to the single-process ones (_events.CATEGORIES)
DIST_CATEGORIES = ("gathered_parameters", "communication")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(value: str | torch.dtype | None, option: str) -> torch.dtype | None:
    """``bf16`` / ``fp16`` / ``fp32`` (or a torch dtype) for FSDP2's MixedPrecisionPolicy."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = value.strip().lower().replace("float", "fp").replace("bfloat16", "bf16").replace("fp32", "fp32")
    key = {"fp16": "fp16", "half": "fp16", "bf16": "bf16", "bfp16": "bf16", "fp32": "fp32", "single": "fp32"}.get(
        key, key
    )
    if key not in _DTYPES:
        raise BatchfitError(
            tr("unknown {option} {value!r}", option=option, value=value), hint=tr("use bf16, fp16 or fp32")
        )
    return _DTYPES[key]


class DistOptions(TypedDict, total=False):
    """The distributed options of :func:`batchfit.estimate`, :func:`batchfit.fit` and
    :func:`batchfit.plan` (keywords, all optional; docs/distributed.md). Without ``gpus`` the step
    is one GPU's, and any other option is refused.

    ``gpus``: GPUs per node (with ``device="cpu"``: gloo processes); ``nodes``: machines (the world
    size is ``gpus * nodes``); ``strategy``: ``ddp`` (default), ``zero1``, ``fsdp`` or
    ``fsdp-hybrid``. FSDP2: ``reshard_after_forward`` (default True), ``param_dtype`` /
    ``reduce_dtype`` (``MixedPrecisionPolicy``: bf16, fp16, fp32), ``cpu_offload``
    (``CPUOffloadPolicy``), ``wrap`` (the block class to shard). DDP and ZeRO-1: ``bucket_cap_mb``
    (default 25 with a 1 MiB first bucket), ``gradient_as_bucket_view``, ``static_graph``,
    ``broadcast_buffers`` (default True, as DDP's: the buffers are broadcast at each forward).

    >>> options: DistOptions = {"gpus": 8, "strategy": "fsdp"}
    >>> make_dist(**options).describe()
    'fsdp on 8 GPUs (1 node), reshard after forward'
    """

    gpus: int | None
    nodes: int
    strategy: str | None
    reshard_after_forward: bool
    param_dtype: str | torch.dtype | None
    reduce_dtype: str | torch.dtype | None
    cpu_offload: bool
    bucket_cap_mb: float | None
    gradient_as_bucket_view: bool
    static_graph: bool
    broadcast_buffers: bool
    wrap: str | None


# each option's value when not given (DistSpec's fields have the same names, ``gpus`` aside)
DIST_DEFAULTS: DistOptions = {
    "gpus": None,
    "nodes": 1,
    "strategy": None,
    "reshard_after_forward": True,
    "param_dtype": None,
    "reduce_dtype": None,
    "cpu_offload": False,
    "bucket_cap_mb": None,
    "gradient_as_bucket_view": False,
    "static_graph": False,
    "broadcast_buffers": True,
    "wrap": None,
}


@dataclass(frozen=True)
class DistSpec:
    """How the step is spread over ranks (``world_size`` = all GPUs, ``nodes`` machines).

    ``strategy``: ``ddp`` (DistributedDataParallel), ``zero1`` (ZeroRedundancyOptimizer inside
    DDP), ``fsdp`` (FSDP2 ``fully_shard`` per block, then the root), ``fsdp-hybrid`` (FSDP2 on a 2-D
    mesh: sharded within a node, replicated across nodes). FSDP2's options: ``reshard_after_forward``,
    ``param_dtype`` / ``reduce_dtype`` (MixedPrecisionPolicy), ``cpu_offload`` (CPUOffloadPolicy),
    ``wrap`` (the block class to shard; default: the model's repeated blocks). DDP's options:
    ``bucket_cap_mb`` (None: DDP's default 25 MiB with a 1 MiB first bucket),
    ``gradient_as_bucket_view``, ``static_graph``, ``broadcast_buffers``.
    """

    world_size: int
    nodes: int = 1
    strategy: str = "ddp"
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False
    bucket_cap_mb: float | None = None
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    broadcast_buffers: bool = True
    wrap: str | None = None

    def options(self) -> DistOptions:
        """The keyword options (:class:`DistOptions`) of :func:`batchfit.estimate` that make this spec."""
        out = self.to_dict()
        out["gpus"] = out.pop("world_size") // self.nodes
        return cast(DistOptions, out)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise BatchfitError(
                tr("unknown strategy {strategy!r}", strategy=self.strategy),
                hint=tr("use one of {names}", names=", ".join(STRATEGIES)),
            )
        if self.world_size < 1:
            raise BatchfitError(
                tr("`gpus` must be at least 1, got {world_size}", world_size=self.world_size), hint=tr("e.g. `gpus=8`")
            )
        if self.nodes < 1 or self.world_size % self.nodes:
            raise BatchfitError(
                tr(
                    "{world_size} GPUs cannot be spread evenly over {nodes} nodes",
                    world_size=self.world_size,
                    nodes=self.nodes,
                ),
                hint=tr("`gpus` is per node: the world size is `gpus` times `nodes`"),
            )
        fsdp = self.strategy.startswith("fsdp")
        fsdp_options = (
            ("`reshard_after_forward=False`", not self.reshard_after_forward),
            ("`param_dtype`", self.param_dtype is not None),
            ("`reduce_dtype`", self.reduce_dtype is not None),
            ("`cpu_offload`", self.cpu_offload),
            ("`wrap`", self.wrap is not None),
        )
        ddp_options = (
            ("`bucket_cap_mb`", self.bucket_cap_mb is not None),
            ("`gradient_as_bucket_view`", self.gradient_as_bucket_view),
            ("`static_graph`", self.static_graph),
            ("`broadcast_buffers=False`", not self.broadcast_buffers),
        )
        for name, given in fsdp_options if not fsdp else ddp_options:
            if given:
                applies = "`strategy='fsdp'` or 'fsdp-hybrid'" if not fsdp else "`strategy='ddp'` or 'zero1'"
                raise BatchfitError(
                    tr("{name} applies to {applies}", name=name, applies=applies),
                    hint=tr("drop it, or use {applies}", applies=applies),
                )
        if self.bucket_cap_mb is not None and self.bucket_cap_mb <= 0:
            raise BatchfitError(
                tr("`bucket_cap_mb` must be positive, got {bucket_cap_mb}", bucket_cap_mb=self.bucket_cap_mb),
                hint=tr("e.g. 25"),
            )
        if self.strategy == "fsdp-hybrid" and self.nodes < 2:
            raise BatchfitError(
                tr("fsdp-hybrid shards within a node and replicates across nodes: it needs `nodes=2` or more"),
                hint=tr("add `nodes=M`, or use `strategy='fsdp'`"),
            )

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def shard_size(self) -> int:
        """How many ranks one parameter is split over (FSDP2), or one optimizer's state (ZeRO-1)."""
        if self.strategy == "fsdp-hybrid":
            return self.ranks_per_node
        return 1 if self.strategy == "ddp" else self.world_size

    def describe(self) -> str:
        """``fsdp on 8 GPUs (1 node), reshard after forward`` (for tables and notes)."""
        gpus = f"{self.world_size} GPU{'s' if self.world_size != 1 else ''}"
        nodes = f"{self.nodes} node{'s' if self.nodes != 1 else ''}"
        opts = []
        if self.strategy.startswith("fsdp"):
            opts.append("reshard after forward" if self.reshard_after_forward else "no reshard after forward")
            if self.param_dtype is not None or self.reduce_dtype is not None:
                reduce = _name(self.reduce_dtype) if self.reduce_dtype else _default_reduce(self.param_dtype)
                opts.append(f"params {_name(self.param_dtype)}, reduce {reduce}")
            if self.cpu_offload:
                opts.append("CPU offload")
        else:
            cap = "25 MiB (first 1 MiB)" if self.bucket_cap_mb is None else f"{self.bucket_cap_mb:g} MiB"
            opts.append(f"buckets {cap}")
            if self.gradient_as_bucket_view:
                opts.append("gradients as bucket views")
            if self.static_graph:
                opts.append("static graph")
            if not self.broadcast_buffers:
                opts.append("no buffer broadcast")
        return f"{self.strategy} on {gpus} ({nodes}), " + ", ".join(opts)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["param_dtype"] = _name(self.param_dtype) if self.param_dtype else None
        out["reduce_dtype"] = _name(self.reduce_dtype) if self.reduce_dtype else None
        return out


def _default_reduce(param_dtype: torch.dtype | None) -> str:
    """The dtype FSDP2 reduce-scatters in when ``MixedPrecisionPolicy`` names no ``reduce_dtype``: up to
    torch 2.14 the gradients' (``foreach_reduce``: ``reduce_dtype or grad_dtype``, so ``param_dtype``);
    from 2.15 each parameter's own dtype (``FSDPParamGroup._get_reduce_dtype`` over
    ``FSDPParam.unsharded_grad_dtype``, the original dtype), read from the installed FSDP2."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    return "in the parameters' dtype" if hasattr(FSDPParam, "unsharded_grad_dtype") else _name(param_dtype)


def _name(dtype: torch.dtype | None) -> str:
    return (
        {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype)) if dtype else "-"
    )


@dataclass
class RankEstimate:
    """One rank's step (``same_as``: the ranks whose memory is the same, this one included)."""

    rank: int
    same_as: list[int]
    estimate: StepEstimate

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        out: dict[str, Any] = {
            "rank": self.rank,
            "ranks": list(self.same_as),
            "peak_allocated_bytes": e.peak_allocated_bytes,
            "peak_phase": e.peak_phase,
            "peak_iteration": e.peak_iteration,
            "peak_module": e.peak_module,
            "breakdown": dict(e.breakdown),
        }
        if e.device == "cuda":
            out.update(peak_reserved_bytes=e.peak_reserved_bytes, total_bytes=e.total_bytes, fits=e.fits)
        return out


@dataclass
class RankEstimates:
    """Every distinct rank's estimate, and the one that peaks."""

    dist: DistSpec
    ranks: list[RankEstimate] = field(default_factory=list)

    @property
    def peak(self) -> RankEstimate:
        return max(self.ranks, key=lambda r: (r.estimate.peak_reserved_bytes or 0, r.estimate.peak_allocated_bytes))


# -- which ranks differ ------------------------------------------------------------------------


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of ``torch.chunk(t, parts, dim=0)[index]`` (FSDP2 shards dim 0 this way,
    _fsdp_param.py ``_init_sharded_param``; a rank past the last chunk gets none)."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def distinct_ranks(model: nn.Module, dist: DistSpec) -> list[list[int]]:
    """Ranks grouped by what they hold: under FSDP2 a rank's shard of each parameter (uneven when
    dim 0 does not divide), under ZeRO-1 its partition of the parameters; DDP ranks are alike."""
    world = dist.world_size
    if dist.strategy == "ddp" or world == 1:
        return [list(range(world))]
    params = [p for p in _unique_params(model) if p.requires_grad] if dist.strategy == "zero1" else []
    if dist.strategy == "zero1":
        owners = _zero_partition(params, world)
        keys = [tuple(sorted(i for i, o in enumerate(owners) if o == r)) for r in range(world)]
        key_of: Callable[[int], Any] = lambda r: tuple(params[i].numel() for i in keys[r])  # noqa: E731
    else:
        shard = dist.shard_size
        dims = [p.shape[0] if p.dim() else 1 for p in _unique_params(model)]
        key_of = lambda r: tuple(_chunk_rows(d, shard, r % shard) for d in dims)  # noqa: E731
    groups: dict[Any, list[int]] = {}
    for r in range(world):
        groups.setdefault(key_of(r), []).append(r)
    return list(groups.values())


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(dict.fromkeys(model.parameters()))


def _zero_partition(params: Sequence[torch.Tensor], world: int) -> list[int]:
    """The rank owning each parameter: ZeroRedundancyOptimizer._partition_parameters (one param
    group): parameters by decreasing size, each to the rank with the fewest elements so far."""
    sizes = [0] * world
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        rank = min(range(world), key=lambda r: sizes[r])
        owners[i] = rank
        sizes[rank] += params[i].numel()
    return owners


# -- the fake process group --------------------------------------------------------------------


@contextlib.contextmanager
def fake_group(rank: int, world_size: int) -> Iterator[None]:
    """PyTorch's fake process group as rank ``rank`` of ``world_size`` for the block (collectives
    return at once and move no data; torch/testing/_internal/distributed/fake_pg.py)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise BatchfitError(
            tr("a process group is already initialized in this process"),
            hint=tr("estimate outside torchrun (the estimate simulates every rank in one process)"),
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mesh(dist: DistSpec, device_type: str) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if dist.strategy == "fsdp-hybrid":
        return init_device_mesh(device_type, (dist.nodes, dist.ranks_per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (dist.world_size,))


# -- FSDP2 -------------------------------------------------------------------------------------


class _Stream:
    """A CUDA stream for a machine without one: FSDP2 orders its copies and collectives with
    streams and events; on fake tensors nothing runs, so ordering is all there is."""

    # torch 2.15's FSDP2 passes these to torch.ops.fsdp.record_grad_output_stream (_fsdp_collectives.py),
    # whose CUDA implementation is a no-op (the caching allocator's free is host bookkeeping there)
    stream_id = 0
    device_index = 0
    device_type = 1  # c10::DeviceType::CUDA (c10/core/DeviceType.h)

    def wait_stream(self, stream: Any) -> None: ...
    def wait_event(self, event: Any) -> None: ...
    def synchronize(self) -> None: ...

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _Event()


class _Event:
    def record(self, stream: Any = None) -> None: ...  # torch.cuda.Event.record returns None
    def wait(self, stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...

    def query(self) -> bool:
        return True


class _CudaHandle:
    """What FSDP2 asks ``torch.cuda`` through ``_get_device_handle("cuda")`` (streams, events,
    the current device), answered without a driver. One stream in effect: see docs/distributed.md."""

    def __init__(self) -> None:
        self._stream = _Stream()

    def Stream(self, *args: Any, **kwargs: Any) -> _Stream:
        return _Stream()

    def Event(self, *args: Any, **kwargs: Any) -> _Event:
        return _Event()

    def current_stream(self, device: Any = None) -> _Stream:
        return self._stream

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return True

    def set_device(self, device: Any) -> None: ...


def _fake_outside_trace(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """CUDA: ``fully_shard`` makes a tensor on the mesh's device at construction
    (``FSDPParamGroup._all_gather_output``, a placeholder); without a driver it must be a fake one."""
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


_FSDP_MODULES = ("_fsdp_collectives", "_fsdp_init", "_fsdp_param_group", "_fsdp_state")


@contextlib.contextmanager
def _cuda_without_driver(device_type: str, compute_capability: tuple[int, int] | None = None) -> Iterator[None]:
    """The distributed code on fake CUDA tensors, without a driver: FSDP2's device handle answered
    by :class:`_CudaHandle`, and ``torch.cuda.get_device_capability`` by the simulated card's
    capability (the trace's, ``_trace.DEFAULT_CAPABILITY`` unless named): ``dist.broadcast`` asks it
    of every CUDA tensor (distributed_c10d.py ``broadcast``, torch 2.14: NCCL's FP8 workaround before
    sm_90), and ZeroRedundancyOptimizer's step broadcasts each rank's parameters with it
    (``_sync_params`` -> ``_broadcast_params_from_rank``)."""
    if device_type != "cuda":
        yield
        return
    import importlib

    from ._trace import DEFAULT_CAPABILITY

    modules = [importlib.import_module(f"torch.distributed.fsdp._fully_shard.{m}") for m in _FSDP_MODULES]
    handle = _CudaHandle()
    saved = [m._get_device_handle for m in modules]  # type: ignore[attr-defined]
    capability = compute_capability or DEFAULT_CAPABILITY
    real_capability = torch.cuda.get_device_capability
    for m, real in zip(modules, saved):
        m._get_device_handle = lambda t, real=real: handle if t == "cuda" else real(t)  # type: ignore[attr-defined]
    torch.cuda.get_device_capability = lambda device=None: capability  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real_capability
        for m, real in zip(modules, saved):
            m._get_device_handle = real  # type: ignore[attr-defined]


def block_class(model: nn.Module, wrap: str | None) -> str | None:
    """The class sharded per block: ``wrap``, or the class of the largest run of like children
    in a ModuleList/Sequential (a transformer's layers); None when the model has no such run."""
    classes = {type(m).__name__ for m in model.modules()}
    if wrap is not None:
        if wrap not in classes:
            raise BatchfitError(
                tr("the model has no module of class {wrap!r} to wrap", wrap=wrap),
                hint=tr("use one of {names}", names=", ".join(sorted(classes)[:12])),
            )
        return wrap
    best: tuple[int, str] | None = None
    for m in model.modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        kinds = {type(c).__name__ for c in m}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if size and (best is None or size > best[0]):
            best = (size, kinds.pop())
    return best[1] if best else None


def wrap_model(
    model: nn.Module, dist: DistSpec, device_type: str, mesh: Any = None, *, pin_memory: bool = True
) -> nn.Module:
    """``fully_shard`` on every block (see :func:`block_class`), then on the root; in place
    (give it a copy). The process group must be initialized; ``mesh``: the device mesh (made here
    when not given)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kind = block_class(model, dist.wrap)
    kwargs: dict[str, Any] = {
        "mesh": mesh if mesh is not None else _mesh(dist, device_type),
        "mp_policy": MixedPrecisionPolicy(param_dtype=dist.param_dtype, reduce_dtype=dist.reduce_dtype),
        # pin_memory: CPUOffloadPolicy's default; a trace passes False (fake tensors cannot be pinned,
        # and pinned host memory is not on the card either way)
        "offload_policy": CPUOffloadPolicy(pin_memory=pin_memory) if dist.cpu_offload else OffloadPolicy(),
    }
    if not dist.reshard_after_forward:
        kwargs["reshard_after_forward"] = False
    blocks = [m for m in model.modules() if kind is not None and type(m).__name__ == kind and m is not model]
    for block in reversed(blocks):  # innermost first, as users do
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp_placement(
    dist: DistSpec, spec: StepSpec, mesh: Any
) -> Callable[..., contextlib.AbstractContextManager[Placed]]:
    from ._trace import Placed

    @contextlib.contextmanager
    def place(m: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[Placed]:
        # built and sharded on meta outside the fake mode (fully_shard reads the group), made fake here
        # CPUOffloadPolicy keeps the shards (and so gradients and optimizer state) in host memory:
        # the tracer counts the card's tensors only
        m.to_empty(device="cpu" if dist.cpu_offload else device)
        # the device mesh's rank map, held by every FSDP2 state for the run: init_device_mesh makes it
        # with torch.arange(world, dtype=torch.int) on the CPU "regardless of" the mesh's device
        # (device_mesh.py, init_device_mesh -> DeviceMesh._rank_map), so it is host memory: counted by
        # a CPU (gloo) trace, never on the card (the tracer counts the trace's device only)
        rank_map = torch.empty_like(_rank_map(mesh), device="cpu")
        build = None
        if dist.cpu_offload:
            # the optimizer steps on the host's shards: torch.optim picks its implementation there
            build = functools.partial(spec.optimizer.build, device_type="cpu")

        def label(mark: Callable[[torch.Tensor, str], None]) -> None:
            mark(rank_map, "communication")
            _label_fsdp(m, mark)

        yield Placed(labeller=label, build_optimizer=build)

    return place


def _rank_map(mesh: Any) -> torch.Tensor:
    """The one tensor a DeviceMesh holds (``_rank_map`` on torch 2.11 and 2.14; ``mesh`` on older ones)."""
    held = getattr(mesh, "_rank_map", None)
    return held if isinstance(held, torch.Tensor) else mesh.mesh


def _label_fsdp(model: nn.Module, mark: Callable[[torch.Tensor, str], None]) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    for module in model.modules():
        state = _get_module_fsdp_state(module)
        group = state._fsdp_param_group if state is not None else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            # the shard itself (padded when dim 0 does not divide: _fsdp_param.py _init_sharded_param)
            mark(fsdp_param._sharded_param_data, "parameters")
            for t in fsdp_param.all_gather_outputs:
                mark(t, "gathered_parameters")
            grad = fsdp_param.sharded_param.grad
            if grad is not None:
                mark(grad, "gradients")


# -- DDP and ZeRO-1 ----------------------------------------------------------------------------


class _Reducer:
    """DDP's C++ Reducer as far as memory goes (torch/csrc/distributed/c10d/reducer.cpp).

    - ``initialize_buckets``: one flat gradient buffer per bucket (``at::empty({offset})``), made in
      the constructor; the first assignment puts every parameter in one bucket
      (``_BucketCapacityConfig.compute_bucket_size_limits``: ``sys.maxsize`` unless
      ``find_unused_parameters``), and ``rebuild_buckets`` (called from ``_pre_forward`` before the
      second forward) reassigns them in the order their gradients became ready, with limits
      ``[first_bucket_bytes_cap, bucket_bytes_cap]``: the old buffers are cleared first.
    - ``mark_variable_ready_dense`` -> ``copy_grad_to_bucket``: ``at::mul_out(bucket_view, grad,
      wrapped_scalar_tensor(1 / world_size))`` (the wrapped scalar is an 8-byte CPU tensor, which
      TensorIterator casts to the gradient's dtype on the CPU, a 0-dim copy); with
      ``gradient_as_bucket_view`` the parameter's ``.grad`` becomes the bucket's view (the gradient
      AccumulateGrad made dies); otherwise ``finalize_bucket_dense`` copies the reduced bucket back
      into ``.grad`` (``grad.copy_(bucket_view)``, no new memory).
    - The all-reduce runs on the bucket in place (NCCL and gloo; gloo's own scratch is not counted,
      docs/distributed.md).
    - ``static_graph`` (``set_static_graph``): ``initialize_local_used_map`` makes two int32 tensors
      of one element per parameter (``local_used_map_`` on the host, ``local_used_map_dev_`` on the
      parameters' device). In the first backward (``static_graph_first_iteration``)
      ``autograd_hook`` only counts the hooks: nothing is copied into the buckets and no ready order
      is recorded; ``delay_all_reduce``, queued by ``_DDPSink.backward``, then copies every gradient
      into its bucket in parameter order after the pass. So the buckets are rebuilt at the third
      forward at the earliest (from the second backward's order), not the second.
    """

    def __init__(self, params: list[torch.Tensor], dist: DistSpec, device: torch.device) -> None:
        self.params = params
        self.dist = dist
        self.device = device
        self.ready: list[int] = []
        self.rebuilt = False
        self.buckets: list[torch.Tensor] = []
        self.views: dict[int, torch.Tensor] = {}
        self._assign([list(range(len(params)))])
        self.local_used: list[torch.Tensor] = []
        # static_graph_first_iteration(): the first backward's hooks only count (reducer.cpp autograd_hook)
        self.delaying = dist.static_graph
        if dist.static_graph:
            n = len(params)
            self.local_used = [
                torch.zeros(n, dtype=torch.int32, device="cpu"),
                torch.empty(n, dtype=torch.int32, device=device),
            ]

    def _assign(self, buckets: list[list[int]]) -> None:
        self.buckets, self.views = [], {}  # rebuild: buckets_.clear() before the new ones are made
        for indices in buckets:
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i in indices:
                by_dtype.setdefault(self.params[i].dtype, []).append(i)
            for dtype, members in by_dtype.items():
                flat = torch.empty(sum(self.params[i].numel() for i in members), dtype=dtype, device=self.device)
                self.buckets.append(flat)
                offset = 0
                for i in members:
                    n = self.params[i].numel()
                    self.views[i] = flat[offset : offset + n].view(self.params[i].shape)
                    offset += n

    def rebuild(self) -> None:
        if self.rebuilt or not self.ready:
            return
        import torch.distributed as tdist

        self.rebuilt = True
        # DistributedDataParallel.__init__ (torch 2.11) / _BucketCapacityConfig.create (newer): the
        # cap is bucket_cap_mb MiB (25 by default), the first bucket dist._DEFAULT_FIRST_BUCKET_BYTES
        # when the cap is the default, else the cap
        cap = self.dist.bucket_cap_mb
        bucket_bytes_cap = int((25 if cap is None else cap) * 1024 * 1024)
        first_bucket_bytes_cap = tdist._DEFAULT_FIRST_BUCKET_BYTES if cap is None else bucket_bytes_cap  # type: ignore[attr-defined]
        order = list(dict.fromkeys(self.ready)) + [i for i in range(len(self.params)) if i not in self.ready]
        indices, _ = tdist._compute_bucket_assignment_by_size(  # type: ignore[attr-defined]  # private, not in the stubs
            [self.params[i] for i in order],
            [first_bucket_bytes_cap, bucket_bytes_cap],
            [False] * len(order),
        )
        self._assign([[order[i] for i in bucket] for bucket in indices])

    def grad_ready(self, index: int, param: torch.Tensor) -> None:
        if self.delaying:
            return
        self.ready.append(index)
        self._copy(index, param)

    def _delay_all_reduce(self) -> None:
        """``Reducer::delay_all_reduce`` (the name ``_DDPSink.backward`` queues): every gradient into
        its bucket, in parameter order, after the first backward of a static graph."""
        self.delaying = False
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self._copy(index, param)

    def _copy(self, index: int, param: torch.Tensor) -> None:
        """``mark_variable_ready_dense``."""
        view = self.views[index]
        grad = param.grad
        assert grad is not None
        if grad.untyped_storage()._cdata == view.untyped_storage()._cdata:
            return  # already the bucket's view (gradient_as_bucket_view, after the first step)
        # copy_grad_to_bucket: at::mul_out(bucket_view, grad, wrapped_scalar_tensor(1 / div_factor)),
        # in both modes. A Python number reaches aten.mul.out as the same wrapped 0-dim double, so
        # the tracer counts it as it counts every wrapped number on the CPU (_cpu_scalars: 8 bytes
        # through the op, and TensorIterator's 0-dim cast of it to the gradient's dtype, 4 bytes for
        # fp32); on CUDA the scalar is a kernel argument and neither is device memory
        torch.mul(grad, 1.0 / self.dist.world_size, out=view)
        if self.dist.gradient_as_bucket_view:
            param.grad = view


# DistributedDataParallel.__init__: self.broadcast_bucket_size = 250 * 1024 * 1024
_BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024


class _Ddp:
    """What ``DistributedDataParallel.forward`` does around the module's forward, as far as memory
    goes (torch/nn/parallel/distributed.py), for a module traced on the fake group:

    - ``_pre_forward``: ``reducer._rebuild_buckets()`` (grad enabled), then ``_sync_buffers`` when
      ``will_sync_module_buffers()`` (``require_forward_param_sync`` and ``broadcast_buffers`` and the
      module has buffers): ``dist._broadcast_coalesced(group, buffers, broadcast_bucket_size, 0)``,
      PyTorch's own C++ (torch/csrc/distributed/c10d/comm.cpp ``broadcast_coalesced``), run here on the
      fake tensors: one flat copy (``flatten_dense_tensors``, a ``cat``) per bucket of buffers of one
      dtype, broadcast, copied back;
    - ``_post_forward``: ``require_forward_param_sync`` becomes ``torch.is_grad_enabled()``; with
      ``static_graph`` until the first backward, the outputs go through PyTorch's own ``_DDPSink``,
      which clones each tensor (``_ddp_sink_clone``, True by default) and, in its backward, queues
      ``reducer._delay_all_reduce`` on the engine. ``_DDPSink`` reads these attributes of its DDP.
    """

    _ddp_sink_clone = True

    def __init__(self, reducer: _Reducer, dist: DistSpec) -> None:
        self.reducer = reducer
        self.dist = dist
        self.static_graph = dist.static_graph
        self._static_graph_delay_allreduce_enqueued = False
        self.require_forward_param_sync = True  # DistributedDataParallel.__init__

    def pre_forward(self, model: nn.Module, args: Any) -> None:
        import torch.distributed as tdist

        if torch.is_grad_enabled():
            self.reducer.rebuild()
        buffers = list(model.buffers())
        if self.require_forward_param_sync and self.dist.broadcast_buffers and buffers:
            with torch.no_grad():
                group = tdist.distributed_c10d._get_default_group()  # DDP's process group by default
                tdist._broadcast_coalesced(group, buffers, _BROADCAST_BUCKET_BYTES, 0)  # type: ignore[attr-defined]

    def post_forward(self, model: nn.Module, args: Any, output: Any) -> Any:
        import weakref

        from torch.nn.parallel.distributed import _DDPSink
        from torch.utils._pytree import tree_flatten, tree_unflatten

        self.require_forward_param_sync = torch.is_grad_enabled()
        if not self.static_graph or self._static_graph_delay_allreduce_enqueued:
            return output
        leaves, spec = tree_flatten(output)
        passed = _DDPSink.apply(weakref.ref(self), *leaves)
        # tensors without a grad_fn are kept as they are (pytorch/pytorch#60733)
        kept = [o if torch.is_tensor(o) and o.grad_fn is None else p for o, p in zip(leaves, passed)]
        return tree_unflatten(kept, spec)


def _ddp_placement(dist: DistSpec, spec: StepSpec) -> Callable[..., contextlib.AbstractContextManager[Placed]]:
    from ._models import fake_state, state_in_place
    from ._step import unique_trainable
    from ._trace import Placed

    @contextlib.contextmanager
    def place(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[Placed]:
        state = fake_state(model, device, dtype=dtype)
        with state_in_place(model, state):
            del state
            params = unique_trainable(model)
            reducer = _Reducer(params, dist, device)
            ddp = _Ddp(reducer, dist)
            handles = [
                p.register_post_accumulate_grad_hook(lambda p, i=i: reducer.grad_ready(i, p))
                for i, p in enumerate(params)
            ]
            handles += [model.register_forward_pre_hook(ddp.pre_forward), model.register_forward_hook(ddp.post_forward)]

            def label(mark: Callable[[torch.Tensor, str], None]) -> None:
                for t in [*reducer.buckets, *reducer.local_used]:
                    mark(t, "communication")

            def build(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
                if dist.strategy != "zero1":
                    return spec.optimizer.build(ps, device_type=device.type)
                return _zero_optimizer(ps, spec, device)

            try:
                yield Placed(labeller=label, build_optimizer=build)
            finally:
                for h in handles:
                    h.remove()

    return place


def _zero_optimizer(params: list[torch.Tensor], spec: StepSpec, device: torch.device) -> torch.optim.Optimizer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = spec.optimizer
    if opt.cls is None:
        raise BatchfitError(
            tr("ZeRO-1 wraps a torch.optim class; {name} is built by a factory", name=opt.name),
            hint=tr("use a torch.optim optimizer (sgd, adam, adamw, ...), or `strategy='ddp'`"),
        )
    kwargs = dict(opt.kwargs)
    return ZeroRedundancyOptimizer(params, optimizer_class=opt.cls, **kwargs)


# -- the estimate ------------------------------------------------------------------------------


def estimate_ranks(
    workload: Workload,
    batch_size: int,
    spec: StepSpec,
    dist: DistSpec,
    *,
    budget: Budget | None = None,
    alloc_config: AllocatorConfig | None = None,
    cuda_workspaces: tuple[int, int] | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> RankEstimates:
    """Trace the step once per distinct rank (:func:`distinct_ranks`) on the fake group and replay
    each rank's timeline like a single-process one; ``batch_size`` is per rank. ``spec`` is any step
    one GPU takes: the reference loop or a user's ``step``, a training run's tail (the epoch's last
    batch from the rank's share of the dataset, :func:`rank_workload`), or inference (a forward under
    ``no_grad`` through the wrapped model: FSDP2 still gathers each block, DDP still holds its buckets)."""
    from ._estimate import estimate_trace
    from ._trace import trace_step

    if dist.cpu_offload and spec.device != "cuda":
        raise BatchfitError(
            tr("`cpu_offload` moves FSDP2's parameters off the GPU to the host: it applies to `device='cuda'`"),
            hint=tr("drop `cpu_offload`, or use `device='cuda'`"),
        )
    out = RankEstimates(dist)
    for group in distinct_ranks(workload.model, dist):
        rank = group[0]
        with fake_group(rank, dist.world_size), _cuda_without_driver(spec.device, compute_capability):
            model = copy.deepcopy(workload.model).to("meta")
            if dist.strategy.startswith("fsdp"):
                if spec.precision.param_dtype not in (None, torch.float32):
                    model.to(spec.precision.param_dtype)
                mesh = _mesh(dist, spec.device)
                with _fake_outside_trace(spec.device):
                    wrap_model(model, dist, spec.device, mesh, pin_memory=False)
                placement = _fsdp_placement(dist, spec, mesh)
            else:
                placement = _ddp_placement(dist, spec)
            local = rank_workload(dataclasses.replace(workload, model=model), dist)
            trace = trace_step(
                local,
                batch_size,
                spec,
                cuda_workspaces=cuda_workspaces,
                compute_capability=compute_capability,
                placement=placement,
            )
        est = estimate_trace(trace, local, spec, budget, alloc_config)
        est.model = workload.name
        for cat in DIST_CATEGORIES:
            est.breakdown.setdefault(cat, 0)
        out.ranks.append(RankEstimate(rank, group, est))
    return out


def rank_dataset_size(train_size: int, world_size: int) -> int:
    """Samples one rank sees per epoch: ``DistributedSampler`` (torch/utils/data/distributed.py, the
    default ``drop_last=False``) pads the dataset to a multiple of the world size and gives each rank
    ``ceil(len(dataset) / num_replicas)``; the epoch's last batch on a rank is that modulo the batch size.

    >>> rank_dataset_size(60000, 7)
    8572
    """
    return -(-train_size // world_size)


def rank_workload(workload: Workload, dist: DistSpec) -> Workload:
    """``workload`` as one rank sees it: its training set is the rank's share (:func:`rank_dataset_size`),
    which sets ``last_batch='auto'`` per rank."""
    if workload.dataset is None or dist.world_size == 1:
        return workload
    share = rank_dataset_size(workload.dataset.train_size, dist.world_size)
    return dataclasses.replace(workload, dataset=dataclasses.replace(workload.dataset, train_size=share))


def make_dist(world: int | None = None, /, **options: Unpack[DistOptions]) -> DistSpec | None:
    """The :class:`DistSpec` the verbs' options ask for (:class:`DistOptions`; ``gpus`` per node,
    or given first), or None for one GPU without distributed options (the single-process
    estimate). One place for API and CLI.

    >>> make_dist(4, strategy="fsdp").world_size
    4
    >>> make_dist() is None
    True
    """
    unknown = sorted(set(options) - set(DIST_DEFAULTS))
    if unknown:
        raise BatchfitError(
            tr("unknown distributed option {name!r}", name=unknown[0]),
            hint=tr("use one of {names}", names=", ".join(DIST_DEFAULTS)),
        )
    defaults: dict[str, Any] = dict(DIST_DEFAULTS)
    values = {**defaults, **options}
    if world is not None:
        values["gpus"] = world
    gpus = values.pop("gpus")
    if gpus is None:
        if any(values[name] != defaults[name] for name in values):
            raise BatchfitError(
                tr("distributed options need `gpus=N` (GPUs per node)"), hint=tr("add `gpus=2` (or more), or drop them")
            )
        return None
    values["strategy"] = (values["strategy"] or "ddp").strip().lower()
    for name in ("param_dtype", "reduce_dtype"):
        values[name] = parse_dtype(values[name], f"`{name}`")
    return DistSpec(gpus * values["nodes"], **values)
