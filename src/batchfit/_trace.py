"""Run the reference step on fake tensors and record every storage's birth and death.

Nothing here allocates real memory: the model's parameters, the batch and everything the step
creates are ``FakeTensor``s (shape, dtype, device; no data). A ``TorchDispatchMode`` sees every
aten op below autograd and registers each new storage; a weak reference on the storage reports
its death. The backward pass is replayed here, node by node, the way PyTorch's C++ engine runs it
(ready nodes by sequence number, highest first; gradients summed in input buffers, in place when
the engine would; leaves' gradients stolen or cloned by AccumulateGrad's rules; each node's saved
tensors released once it has run). The engine itself cannot run on fake CUDA tensors without a
device, and one replay for every device keeps CPU and CUDA results comparable.

See docs/architecture.md for the reference step and the event format.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import heapq
import itertools
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._cpu_scalars import cast_bytes, saved_for_backward, wrapped_numbers
from ._cpu_scratch import ScratchMeter, is_scratch_op
from ._cuda_kernels import cuda_kernel_choices
from ._cuda_scratch import KernelCall, describe, kernel_scratch
from ._errors import BatchfitError, ExitCode
from ._events import Event
from ._explain import layer_failure, quiet_fake_tensor_logs
from ._fake_memo import fake_dispatch
from ._fast_kernels import run_fast
from ._i18n import tr
from ._loss_kernels import unreduced_loss
from ._models import Workload, fake_state, state_in_place
from ._quantize import quantized_note
from ._step import (
    Batch,
    LabelsLike,
    StepSpec,
    batch_inputs,
    batch_maker,
    cpu_threads,
    label_choice,
    run_step,
    state_tensors,
    tail_sizes,
    train_mode,
    unique_trainable,
)
from ._training import LossChoice
from ._values import Values, real_tensor_paths

_SETUP_CATEGORIES = ("parameters", "buffers", "inputs")
# the card a CUDA trace simulates when none is named (an A100's sm_80): kernel choices (_cuda_scratch)
DEFAULT_CAPABILITY: tuple[int, int] = (8, 0)
# (func, args, kwargs, out, phase, iteration) of every aten op the traced step ran
Observer = Callable[[Any, Any, Any, Any, str, int], None]
_CUBLAS_OPS = frozenset(
    f"aten.{op}"
    for op in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "_addmm_activation", "addr")
)
_PRIM_DEVICE = torch.ops.prim.device.default
_ITEM = torch.ops.aten._local_scalar_dense.default
_ANSWERED_HERE = frozenset((_PRIM_DEVICE, _ITEM))
_RESIZE_OPS = frozenset((torch.ops.aten.resize_.default, torch.ops.aten.resize_as_.default))
_COLLECTIVE_NAMESPACES = frozenset(("c10d", "_c10d_functional", "_dtensor"))
_CUDNN_CONV_OPS = frozenset(("aten.convolution", "aten.convolution_backward", "aten.cudnn_convolution"))


# In-place foreach ops (a foreach optimizer's bulk) allocate nothing and change no metadata: on
# fake tensors they have no effect either, so the tracer skips them instead of letting the fake
# mode run them tensor by tensor.
@functools.cache
def _is_foreach_inplace(packet: Any) -> bool:
    name = packet.__name__.rsplit(".", 1)[-1]
    return name.startswith("_foreach_") and name.endswith("_") and not name.endswith("__")


@functools.cache
def _op_family(func: Any) -> str:
    """``aten.mm`` for ``aten.mm.default``: the name without the overload (ops are asked once, then
    remembered: ``str`` of an op costs a Python call per traced op)."""
    return str(func).rsplit(".", 1)[0]


@dataclass
class _Storage:
    sid: int
    nbytes: int
    phase: str
    module: str
    category: str  # provisional until the end of the trace
    iteration: int
    dormant: bool = False  # resized to nothing (``UntypedStorage.resize_(0)``): its free is already recorded


@dataclass
class Placed:
    """What a placement (see :func:`trace_step`) tells the tracer about the model it set up."""

    # called at each phase's start with ``mark(tensor, category)``: categories the wrapper knows
    labeller: Callable[[Callable[[torch.Tensor, str], None]], None] | None = None
    # builds the optimizer instead of ``StepSpec.optimizer`` (ZeroRedundancyOptimizer around it)
    build_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None


Placement = Callable[[nn.Module, torch.device, "torch.dtype | None"], contextlib.AbstractContextManager[Placed]]


@dataclass
class Trace:
    """The raw result of tracing one reference step (two iterations) at one batch size."""

    batch_size: int
    device: str
    events: list[Event]
    activation_bytes_by_module: dict[str, int]
    notes: list[str] = field(default_factory=list)
    numels: dict[int, int] = field(default_factory=dict)  # storage id -> elements of the tensor that made it
    module_types: dict[str, str] = field(default_factory=dict)  # qualified name -> class name
    # where the step's phases begin in ``events``: (phase, iteration, index); the "end" mark
    # closes the step (what follows is the teardown's frees)
    marks: list[tuple[str, int, int]] = field(default_factory=list)
    window_only: bool = False  # only the first iteration's forward and backward were run
    # CUDA kernels' own buffers, one entry per op call (_cuda_scratch), so that fit can size them
    # at another batch size; and the card's compute capability the rules were run for
    kernel_calls: list[KernelCall] = field(default_factory=list)
    compute_capability: tuple[int, int] | None = None
    loss: str | None = None  # which loss the step trained on, in words (None: inference)

    def mark_index(self, phase: str, iteration: int | None = None) -> int | None:
        """Where ``phase`` (of ``iteration``; None: any) begins in ``events``."""
        return next((i for p, it, i in self.marks if p == phase and iteration in (None, it)), None)


class _Holder:
    """What a saved-tensors pack hook returns: the replay empties it once its node has run."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor: torch.Tensor | None = tensor


class _StorageBirthRecorder(TorchDispatchMode):
    """Sees every aten op's outputs and registers storages it has not seen yet."""

    def __init__(self, tracer: _Tracer) -> None:
        # TorchDispatchMode.__init__ has no annotations (torch/utils/_python_dispatch.py), and mypy's
        # untyped_calls_exclude does not reach a call through super()
        super().__init__()  # type: ignore[no-untyped-call]
        self.tracer = tracer

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _ANSWERED_HERE and isinstance(args[0], FakeTensor):
            # Answered as the fake mode answers them, without a trip through it (thousands per
            # step): `.device` (autograd's and the optimizer's device checks), and `.item()` of a
            # constant (the optimizer's CPU step counters, read for the bias corrections).
            first = args[0]
            if func is _PRIM_DEVICE and not first.fake_mode.in_kernel_invocation:
                return first.fake_device
            if func is _ITEM:
                if first.constant is not None:
                    with no_dispatch():
                        return first.constant.item()
                value = self.tracer.values.item(first)
                if value is not None:
                    return value
        tracer = self.tracer
        kwargs = kwargs or {}
        if _is_foreach_inplace(func.overloadpacket) and tracer.skippable(args):
            if tracer.observe is not None:  # skipped, not free: the optimizer's updates on the device
                tracer.observe(func, args, kwargs, None, tracer.phase, tracer.iteration)
            return None
        held = tracer.wrapped_scalars(func, args, kwargs) if tracer.device_type == "cpu" else []
        out = run_fast(func, args, kwargs)
        if out is None:
            try:
                out = fake_dispatch(func, args, kwargs)
            except (DataDependentOutputException, DynamicOutputShapeException):
                out = tracer.values.answer(func, args, kwargs)  # computed for real from known values
                if out is None:
                    raise
        tracer.values.follow(func, args, kwargs, out)
        if tracer.observe is not None:
            tracer.observe(func, args, kwargs, out, tracer.phase, tracer.iteration)
        if tracer.collectives and func in _RESIZE_OPS:
            # a tensor's storage grown in place (an ``out=`` result, ``resize_``): its bytes are new memory
            tracer.storage_resized(args[0].untyped_storage(), args[0].untyped_storage().nbytes())
        if tracer.collectives and func.namespace in _COLLECTIVE_NAMESPACES:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    tracer.mark(t, "communication")
        if isinstance(out, torch.Tensor):
            tracer.track(out)
        else:
            for t in out if isinstance(out, (tuple, list)) else tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    tracer.track(t)
        if tracer.unlinked_scalars:
            tracer.output_of_scalar_op(out)
        kept = unreduced_loss(func, args, kwargs, tracer.device_type)
        if kept is not None:  # the result keeps the unreduced storage, and the kernel holds more (_loss_kernels)
            tracer.resize(out, kept[0])
            tracer.run_program(kept[1], "temporaries")
        if held:
            tracer.release(held)
        if tracer.cuda_workspaces is not None:
            tracer.cuda_workspace(func)
            tracer.kernel_scratch(func, args, kwargs)
        if tracer.scratch is not None and is_scratch_op(func, args):
            extra, extrapolated = tracer.scratch.measure(func, args, kwargs, out)
            for fake, nbytes in tracer.scratch.resized:
                tracer.resize(fake, nbytes)
            tracer.scratch.resized.clear()
            tracer.transient(extra, note=f"{func} scratch extrapolated from batch 1 and 2" if extrapolated else None)
        return out


class _Tracer:
    def __init__(self, model: nn.Module) -> None:
        self.storages: dict[int, _Storage] = {}  # by storage _cdata, while alive
        self.refs: dict[weakref.ref[Any], int] = {}  # weak reference to a live storage -> its _cdata
        self.raw: list[tuple[str, _Storage]] = []  # ("alloc"|"free", storage)
        self.final_category: dict[int, str] = {}
        self.ids = itertools.count()
        self.phase = "setup"
        self.iteration = 0
        self.setup_category = "inputs"
        self.module_stack: list[str] = [""]
        self.module_calls: list[tuple[nn.Module, tuple[int, ...] | None]] = []  # running modules, input shapes
        self.module_names = {id(m): name for name, m in reversed(list(model.named_modules(remove_duplicate=False)))}
        # autograd sequence numbers at which the running module changed, to map nodes to modules
        self.seq_marks: list[int] = [0]
        self.seq_modules: list[str] = [""]
        self.saved_bytes: dict[str, dict[int, int]] = {}
        self.current_holders: list[_Holder] = []
        self.scratch: ScratchMeter | None = None  # CPU: kernel scratch measured for real
        self.device_type = "cpu"
        self.cuda_workspaces: tuple[int, int] | None = None  # (cuBLAS per handle, cuDNN per conv call)
        self.cublas_threads: set[str] = set()
        self.compute_capability = DEFAULT_CAPABILITY  # the card's, for kernel choices (_cuda_scratch)
        self.kernel_calls: list[KernelCall] = []
        self.numels: dict[int, int] = {}  # storage id -> elements of the tensor that created it
        self.notes: list[str] = []
        self.values = Values(self.track)  # real values of the batch's ids and masks, for models that read them
        self.marks: list[tuple[str, int, int]] = []  # (phase, iteration, index in raw) where a phase begins
        # CPU: wrapped numbers autograd keeps: by node sequence number, and by the real tensor the node holds
        self.saved_scalars: dict[int, _Storage] = {}
        self.unlinked_scalars: list[tuple[Any, _Storage]] = []
        self.scalar_refs: dict[int, weakref.ref[Any]] = {}
        self.live_scalars: set[int] = set()
        # a user's step: phases follow what runs (the model's forward, a backward, an optimizer step)
        self.on_phase: Callable[[str], None] | None = None
        # a distributed run (_distributed): categories its wrapper knows, given at each phase's start
        # (sharded gradients, gathered parameters); collectives' tensors are communication buffers
        self.labeller: Callable[[Callable[[torch.Tensor, str], None]], None] | None = None
        self.collectives = False
        # hooks registered on non-leaf tensors (Tensor.register_hook), by the node they run before:
        # (the tensor's output number, its hook dict); recorded in distributed runs (FSDP2's pre-backward)
        # (nodes take no weak references: an entry goes when its node runs)
        self.tensor_hooks: dict[Any, list[tuple[int, Any]]] = {}
        # sees every op after it ran: (func, args, kwargs, out, phase, iteration); _roofline counts with it
        self.observe: Observer | None = None

    # -- storages ---------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP2's sharded parameters): its shard's storage
        if isinstance(local, torch.Tensor):
            t = local
        if t.device.type != self.device_type:
            return  # e.g. optimizer step counters, which live on the CPU in a CUDA run
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # e.g. sparse or functional tensors without a storage
        key = st._cdata
        if key in self.storages:
            return
        numel = t.numel()
        rec = _Storage(
            next(self.ids), st.nbytes(), self.phase, self.module_stack[-1], self._provisional(), self.iteration
        )
        self.storages[key] = rec
        self.numels[rec.sid] = numel
        self.raw.append(("alloc", rec))
        self.refs[weakref.ref(st, self._freed)] = key

    def _freed(self, ref: weakref.ref[Any]) -> None:
        rec = self.storages.pop(self.refs.pop(ref), None)
        if rec is not None and not rec.dormant:
            self.raw.append(("free", rec))

    def storage_resized(self, storage: Any, nbytes: int) -> None:
        """``UntypedStorage.resize_``: the old bytes die and new ones are born under the same storage
        (FSDP2 frees an unsharded parameter with ``resize_(0)`` and gathers into it after ``resize_(n)``,
        torch/distributed/fsdp/_fully_shard/_fsdp_param.py ``free_storage`` / ``alloc_storage``); the
        category stays with the storage."""
        key = storage._cdata
        rec = self.storages.get(key)
        if rec is None or (rec.nbytes == nbytes and not rec.dormant):
            return
        if not rec.dormant:
            self.raw.append(("free", rec))
        new = _Storage(next(self.ids), nbytes, self.phase, self.module_stack[-1], rec.category, self.iteration)
        new.dormant = nbytes == 0
        self.storages[key] = new
        if not new.dormant:
            self.numels[new.sid] = self.numels.get(rec.sid, 0) * nbytes // max(rec.nbytes, 1)
            self.raw.append(("alloc", new))

    def _provisional(self) -> str:
        return self.setup_category if self.phase == "setup" else "temporaries"

    def skippable(self, args: tuple[Any, ...]) -> bool:
        """Whether an in-place foreach op can be skipped: it allocates nothing on the device, and
        its tensors hold no values the fake mode tracks (step counters are CPU constants)."""
        for arg in args:
            for t in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(t, torch.Tensor) and (
                    t.device.type != self.device_type or getattr(t, "constant", None) is not None
                ):
                    return False
        return True

    def storage_of(self, t: torch.Tensor) -> _Storage | None:
        local = getattr(t, "_local_tensor", None)
        if isinstance(local, torch.Tensor):
            t = local
        try:
            return self.storages.get(t.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return None

    def mark(self, t: torch.Tensor, category: str, *, wrapper: bool = False) -> None:
        rec = self.storage_of(t)
        # a distributed wrapper's buffers made before the window (DDP's buckets) are filed as set-up
        # memory at birth; the wrapper's own label (``wrapper``) is final
        if rec is not None and (rec.category not in _SETUP_CATEGORIES or wrapper):
            rec.category = category

    def cuda_workspace(self, func: Any) -> None:
        """Library workspaces a CUDA run takes through the caching allocator.

        cuBLAS: one workspace per handle and stream, allocated at the first GEMM and kept; the
        forward runs on the calling thread and the backward on autograd's device thread, each
        with its own handle, so a training step holds two. cuDNN: a workspace per convolution
        call, freed when the call returns (modelled here as a transient after the outputs).
        """
        assert self.cuda_workspaces is not None
        name = _op_family(func)
        if name in _CUBLAS_OPS:
            thread = "autograd" if self.phase == "backward" else "main"
            if thread not in self.cublas_threads:
                self.cublas_threads.add(thread)
                rec = _Storage(
                    next(self.ids),
                    self.cuda_workspaces[0],
                    self.phase,
                    self.module_stack[-1],
                    "workspaces",
                    self.iteration,
                )
                self.raw.append(("alloc", rec))
        elif name in _CUDNN_CONV_OPS and self.cuda_workspaces[1] > 0:
            rec = _Storage(
                next(self.ids), self.cuda_workspaces[1], self.phase, self.module_stack[-1], "workspaces", self.iteration
            )
            self.raw.append(("alloc", rec))
            self.raw.append(("free", rec))

    def kernel_scratch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Buffers the op's CUDA kernel takes through the caching allocator and frees before it
        returns (``_cuda_scratch``): born and dead after the op's outputs, in the kernel's order."""
        program = kernel_scratch(func, args, kwargs, self.compute_capability)
        if not program:
            return
        sids = self.run_program(program, "workspaces")
        self.kernel_calls.append((str(func), tuple(sids), describe(tuple(args)), dict(kwargs)))

    def run_program(self, program: list[tuple[Any, ...]], category: str) -> list[int]:
        """Buffers a kernel takes and gives back inside one op, as a program of ``("alloc", name,
        nbytes)`` / ``("free", name)`` steps in the kernel's order (what is left is freed at the
        end, newest first); returns the buffers' storage ids in allocation order."""
        held: dict[str, _Storage] = {}
        sids = []
        for step in program:
            if step[0] == "alloc":
                rec = _Storage(next(self.ids), step[2], self.phase, self.module_stack[-1], category, self.iteration)
                held[step[1]] = rec
                sids.append(rec.sid)
                self.raw.append(("alloc", rec))
            else:
                self.raw.append(("free", held.pop(step[1])))
        for rec in reversed(held.values()):
            self.raw.append(("free", rec))
        return sids

    def resize(self, t: torch.Tensor, nbytes: int) -> None:
        """The real kernel makes this output another size than the meta kernel says (its birth record is fixed)."""
        rec = self.storage_of(t)
        if rec is not None:
            rec.nbytes = nbytes

    def transient(self, nbytes: int, note: str | None = None) -> None:
        """Memory a kernel takes and gives back inside one op (CPU scratch): born and dead at once."""
        if nbytes <= 0:
            return
        rec = _Storage(next(self.ids), nbytes, self.phase, self.module_stack[-1], "temporaries", self.iteration)
        self.raw.append(("alloc", rec))
        self.raw.append(("free", rec))
        if note is not None and note not in self.notes:
            self.notes.append(note)

    def held(self, sizes: list[int]) -> list[_Storage]:
        """Memory born now and held through the op that follows (see :meth:`release`)."""
        held = [
            _Storage(next(self.ids), n, self.phase, self.module_stack[-1], "temporaries", self.iteration) for n in sizes
        ]
        self.raw.extend(("alloc", rec) for rec in held)
        return held

    def release(self, held: list[_Storage]) -> None:
        self.raw.extend(("free", rec) for rec in reversed(held))

    def wrapped_scalars(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[_Storage]:
        """CPU: the 0-dim tensors Python numbers become around this op (see :mod:`batchfit._cpu_scalars`).

        Those autograd keeps for backward live until the op's node runs (:meth:`release_saved`) or
        the node dies unrun (a checkpoint's recomputed graph; :meth:`link_scalars` follows the real
        tensor the node holds); the others, and TensorIterator's casts of them, are held through the op."""
        self.link_scalars()
        wrapped = wrapped_numbers(func, args, kwargs)
        if not wrapped:
            return []
        held = []
        for nbytes, _, name in wrapped:
            if saved_for_backward(func, args, name):
                # the op's node was made just before it was dispatched: the last sequence number
                (rec,) = self.held([nbytes])
                rec.category = "activations"
                self.live_scalars.add(rec.sid)
                self.saved_scalars[torch._C._autograd._get_sequence_nr() - 1] = rec
                self.unlinked_scalars.append((args[0] if str(func).startswith("aten.mul_") else None, rec))
            else:
                held.append(nbytes)
        return self.held(held + cast_bytes(args, wrapped))

    def output_of_scalar_op(self, out: Any) -> None:
        """The op that saved a wrapped number returned ``out``: its node will be ``out.grad_fn``."""
        if self.unlinked_scalars and self.unlinked_scalars[-1][0] is None and isinstance(out, torch.Tensor):
            self.unlinked_scalars[-1] = (out, self.unlinked_scalars[-1][1])

    def link_scalars(self) -> None:
        """Follow the real wrapped-number tensors the last ops' nodes hold: they die with the node."""
        for out, rec in self.unlinked_scalars:
            node = getattr(out, "grad_fn", None)
            held = getattr(node, "_saved_other", None) if node is not None else None
            if not isinstance(held, torch.Tensor) or isinstance(held, FakeTensor):
                self._free_scalar(rec)
                continue
            self.scalar_refs[rec.sid] = weakref.ref(held.untyped_storage(), functools.partial(self._scalar_died, rec))
        self.unlinked_scalars.clear()

    def _scalar_died(self, rec: _Storage, ref: weakref.ref[Any]) -> None:
        self._free_scalar(rec)

    def _free_scalar(self, rec: _Storage) -> None:
        self.scalar_refs.pop(rec.sid, None)
        if rec.sid in self.live_scalars:
            self.live_scalars.discard(rec.sid)
            self.raw.append(("free", rec))

    def release_saved(self, node: Any) -> None:
        rec = self.saved_scalars.pop(node._sequence_nr(), None)
        if rec is not None:
            self._free_scalar(rec)

    # -- modules ----------------------------------------------------------------------------
    def enter_module(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        name = self.module_names.get(id(module), type(module).__name__)
        if name == "" and len(self.module_stack) == 1 and self.on_phase is not None:
            self.on_phase("forward")
        self.module_stack.append(name)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.module_calls.append((module, tuple(first.shape) if first is not None else None))
        self._mark_seq(name)

    def exit_module(self, module: nn.Module) -> None:
        if len(self.module_stack) > 1:
            self.module_stack.pop()
            self.module_calls.pop()
        self._mark_seq(self.module_stack[-1])

    def _mark_seq(self, name: str) -> None:
        self.seq_marks.append(torch._C._autograd._get_sequence_nr())
        self.seq_modules.append(name)

    def module_of_node(self, node: Any) -> str:
        seq = node._sequence_nr()
        i = bisect.bisect_right(self.seq_marks, seq) - 1
        return self.seq_modules[max(i, 0)]

    # -- saved tensors ----------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> _Holder:
        self.saved(t)
        # detached: saving an output with its grad_fn would make a reference cycle
        return _Holder(t)

    def saved(self, t: torch.Tensor) -> None:
        """``t`` is kept for a backward: by autograd (:meth:`pack`; also a recomputation's, inside a
        reentrant checkpoint's backward) or by selective checkpointing's cache (:func:`_sac_cache_tracked`)."""
        rec = self.storage_of(t)
        if rec is not None:
            if rec.category == "temporaries":
                rec.category = "activations"
            if self.phase == "forward" and self.iteration == 1:  # per-layer figures: one forward's worth
                self.saved_bytes.setdefault(self.module_stack[-1], {})[rec.sid] = rec.nbytes

    def unpack(self, holder: _Holder) -> torch.Tensor:
        self.current_holders.append(holder)
        if holder.tensor is None:
            # the engine's own message (SavedVariable::unpack) for a node whose tensors were released
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors after "
                "they have already been freed). Specify retain_graph=True if you need to backward through "
                "the graph a second time or if you need to access saved tensors after calling backward."
            )
        return holder.tensor

    # -- result -----------------------------------------------------------------------------
    def events(self) -> list[Event]:
        """The timeline; frees that follow one another are put in storage order.

        Some frees come in an order set by memory addresses (autocast's cache of cast weights is
        a hash map keyed by pointers, emptied when autocast exits), which differs between runs.
        Frees with no allocation between them leave the caching allocator in the same state
        whatever their order (free neighbours merge either way), so sorting them loses nothing
        and makes traces of the same step comparable event by event.
        """
        self.link_scalars()
        for rec in list(self.saved_scalars.values()):  # graphs that never ran backward die with the step
            self._free_scalar(rec)
        self.saved_scalars.clear()
        ordered: list[tuple[str, _Storage]] = []
        cuts = sorted({index for _, _, index in self.marks if 0 < index < len(self.raw)})
        for start, stop in zip([0, *cuts], [*cuts, len(self.raw)]):  # a phase's first event stays first
            for is_free, run in itertools.groupby(self.raw[start:stop], key=lambda entry: entry[0] == "free"):
                entries = list(run)
                ordered.extend(sorted(entries, key=lambda entry: entry[1].sid) if is_free else entries)
        return [
            Event(seq, action, rec.sid, rec.nbytes, rec.category, rec.module, rec.phase, rec.iteration)  # type: ignore[arg-type]
            for seq, (action, rec) in enumerate(ordered)
        ]


@contextlib.contextmanager
def _module_hooks(tracer: _Tracer) -> Iterator[None]:
    """Global (not per-model) forward hooks: the user's model gets no hooks of ours."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    # no always_call: when a forward raises, the stack keeps the module that failed (for the message)
    pre = register_module_forward_pre_hook(lambda m, a: tracer.enter_module(m, a))
    post = register_module_forward_hook(lambda m, a, o: tracer.exit_module(m))
    # a user's step: any optimizer's step begins the optimizer phase
    step = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: tracer.on_phase("optimizer") if tracer.on_phase is not None else None
    )

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for value in state_tensors(optimizer):  # any optimizer's, also one a user's step made
            tracer.mark(value, "optimizer_state")

    stepped = register_optimizer_step_post_hook(after_step)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        step.remove()
        stepped.remove()


class _GradScaler:
    """The memory behaviour of ``torch.amp.GradScaler``: a scale tensor, a scaled loss, and an
    in-place unscale with an inf check per device and dtype (``GradScaler('cuda')`` disables
    itself without a GPU, so it is reproduced here with the same ops)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._scale: torch.Tensor | None = None
        self.growth_tracker: torch.Tensor | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            self._scale = torch.full((), 2.0**16, dtype=torch.float32, device=self.device)
            self.growth_tracker = torch.full((), 0, dtype=torch.int32, device=self.device)
        return loss * self._scale.to(loss.dtype)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        assert self._scale is not None
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self.device)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        optimizer.step()
        self.found_inf = found_inf

    def update(self) -> None:
        assert self._scale is not None and self.growth_tracker is not None
        torch._amp_update_scale_(self._scale, self.growth_tracker, self.found_inf, 2.0, 0.5, 2000)
        del self.found_inf


class _Replay:
    """PyTorch's autograd engine, re-enacted in Python for memory (see the module docstring).

    It stands in for the engine itself (``Variable._execution_engine``, see :func:`_engine_replaced`),
    so every way into a backward pass reaches it: ``loss.backward()``, ``torch.autograd.backward``
    and ``torch.autograd.grad`` from the reference step, a user's ``--step``, a library, or a node's
    own backward (reentrant checkpointing), with the engine's arguments (``inputs=``,
    ``retain_graph``; gradients of non-leaf tensors; ``create_graph`` is refused with a message).
    """

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer
        self._saved_attrs: dict[type, tuple[str, ...]] = {}
        self._callbacks: list[list[Any]] = []  # queue_callback's callbacks, one list per running pass
        self._frames_released: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()

    def backward(self, loss: torch.Tensor) -> None:
        """The reference step's ``loss.backward()``."""
        if loss.grad_fn is None:
            raise BatchfitError(
                tr("the loss does not depend on any trainable parameter"),
                hint=tr("check that some parameters have requires_grad=True, or use `mode='inference'`"),
            )
        loss.backward()

    def run_backward(
        self,
        tensors: tuple[Any, ...],
        grad_tensors: tuple[torch.Tensor | None, ...],
        keep_graph: bool,
        create_graph: bool,
        inputs: tuple[Any, ...] = (),
        allow_unreachable: bool = False,
        accumulate_grad: bool = True,
    ) -> tuple[torch.Tensor | None, ...]:
        """``ImperativeEngine.run_backward`` (torch/csrc/autograd/python_engine.cpp): the arguments
        ``torch.autograd.backward`` / ``grad`` pass after making the root gradients."""
        if create_graph:
            raise BatchfitError(
                tr("backward with create_graph=True (higher-order gradients) is not simulated"),
                hint=tr(
                    "batchfit replays the backward pass without building a graph of it; use `batchfit measure` (a real run) for steps that differentiate twice"
                ),
            )
        roots: list[tuple[Any, int, torch.Tensor | None]] = []
        for i, (t, grad) in enumerate(zip(tensors, grad_tensors)):
            edge = _gradient_edge(t)
            if edge is None:
                raise RuntimeError(f"element {i} of tensors does not require grad and does not have a grad_fn")
            roots.append((edge[0], edge[1], grad))
        outputs: list[tuple[Any, int] | None] = []
        for t in inputs:
            if isinstance(t, torch.Tensor) and not t.requires_grad:
                raise RuntimeError("One of the differentiated Tensors does not require grad")
            outputs.append(_gradient_edge(t))
        tracer = self.tracer
        if tracer.on_phase is not None:
            tracer.on_phase("backward")
        saved_module, saved_holders = tracer.module_stack[-1], tracer.current_holders
        group = _graph_exec_group()
        self._callbacks.append([])
        try:
            with group, torch.no_grad():
                captured = self._run(roots, outputs, keep_graph, accumulate_grad, tensors, inputs)
            for callback in self._callbacks[-1]:
                callback()
        finally:
            self._callbacks.pop()
            tracer.module_stack[-1], tracer.current_holders = saved_module, saved_holders
        if not accumulate_grad and not allow_unreachable and any(g is None for g in captured):
            raise RuntimeError(
                "One of the differentiated Tensors appears to not have been used in the graph. "
                "Set allow_unused=True if this is the desired behavior."
            )
        return captured

    def _run(
        self,
        roots: list[tuple[Any, int, torch.Tensor | None]],
        outputs: list[tuple[Any, int] | None],
        keep_graph: bool,
        accumulate: bool,
        tensors: tuple[Any, ...],
        inputs: tuple[Any, ...],
    ) -> tuple[torch.Tensor | None, ...]:
        # engine.cpp compute_dependencies: every node reachable from the roots, with its count of
        # incoming edges (the roots' own edges come from the graph root, which runs first)
        deps: dict[Any, int] = {}
        stack = []
        for node, _, _ in roots:
            deps[node] = deps.get(node, 0) + 1
            if deps[node] == 1:
                stack.append(node)
        seen = set(stack)
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                deps[nxt] = deps.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        del seen, stack
        # engine.cpp init_to_execute: with `inputs`, only nodes on a path to one of them run;
        # autograd.grad captures the gradient arriving at each input's edge instead of running it
        captures: dict[Any, list[tuple[int, int]]] = {}
        retain: dict[Any, list[tuple[int, torch.Tensor]]] = {}  # backward(inputs=non-leaf): retain_grad()
        for idx, edge in enumerate(outputs):
            if edge is None:
                continue
            if accumulate:
                t = inputs[idx]
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    retain.setdefault(edge[0], []).append((edge[1], t))
            else:
                captures.setdefault(edge[0], []).append((edge[1], idx))
        needed = _needed(roots, {e[0] for e in outputs if e is not None}, accumulate) if outputs else None
        captured: list[torch.Tensor | None] = [None] * len(outputs) if not accumulate else []
        buffers: dict[Any, list[Any]] = {}
        counter = itertools.count()
        ready: list[tuple[int, int, Any]] = []
        tracer = self.tracer

        def deliver(nxt: Any, nr: int, grad: torch.Tensor | None) -> None:
            # engine.cpp evaluate_function, for each output: count the edge, then add the
            # gradient to the next node's input buffer unless that node will not execute
            deps[nxt] -= 1
            if needed is not None and nxt not in needed and nxt not in captures:
                return
            slot = buffers.get(nxt)
            if slot is None:
                slot = buffers[nxt] = [None] * len(nxt._input_metadata)
            if grad is not None:
                grad = self._validate(nxt, nr, grad)
                old = slot[nr]
                if old is None:
                    slot[nr] = grad
                else:
                    slot[nr] = None
                    slot[nr] = self._sum(old, grad)
                del old
            if deps[nxt] == 0:
                heapq.heappush(ready, (-_priority(nxt), next(counter), nxt))

        # the graph root (a GraphRoot node, or the only root's own node when there is one)
        for node, nr, grad in roots:
            deliver(node, nr, grad)
        del grad
        while ready:
            node = heapq.heappop(ready)[2]
            inputs_ = buffers.pop(node)
            for nr, idx in captures.get(node, ()):
                captured[idx] = inputs_[nr]
            for nr, t in retain.get(node, ()):
                # the retains_grad hook (VariableHooks::retain_grad): a contiguous clone, then sums
                if inputs_[nr] is not None:
                    t.grad = (
                        inputs_[nr].clone(memory_format=torch.contiguous_format)
                        if t.grad is None
                        else t.grad + inputs_[nr]
                    )
            if needed is not None and node not in needed:
                del inputs_, node
                continue
            tracer.module_stack[-1] = tracer.module_of_node(node)
            if type(node).__name__ == "AccumulateGrad":
                grad = inputs_[0]
                inputs_.clear()
                if grad is not None:
                    self._accumulate(node.variable, grad)
                del grad, inputs_, node
                continue
            for nr, hooks in tracer.tensor_hooks.pop(node, ()) if tracer.tensor_hooks else ():
                # engine.cpp call_tensor_pre_hooks: a tensor's hooks see its gradient, and may replace it
                for hook in list(hooks.values()):
                    if inputs_[nr] is not None:
                        changed = hook(inputs_[nr])
                        if changed is not None:
                            inputs_[nr] = changed
                        # the engine holds the gradient in the input buffer only: a local kept here
                        # would be one more reference, and the buffer's accumulation further down
                        # (input_buffer.cpp: in place only when it holds the last one) would copy
                        del changed
            depth = len(tracer.module_stack)
            tracer.current_holders = []
            edges, outs = _call_node(node, inputs_)
            del inputs_
            # a forward re-run inside the node (checkpointing) may stop early, inside a module
            del tracer.module_stack[depth:], tracer.module_calls[depth - 1 :]
            # engine.cpp call_function: validate_outputs (a bias's sum_to_size, dtype casts) runs as
            # part of the call, before evaluate_function releases the node's saved tensors, so a
            # broadcast bias's reduced gradient is born while they are still alive
            outs = tuple(
                self._validate(nxt, nr, grad) if nxt is not None and grad is not None else grad
                for (nxt, nr), grad in zip(edges, outs)
            )
            if not keep_graph:
                self._release(node)
            for (nxt, nr), grad in zip(edges, outs):
                if nxt is not None:
                    deliver(nxt, nr, grad)
                del grad
            del outs, node
        del roots[:]
        return tuple(captured)

    @staticmethod
    def _validate(nxt: Any, nr: int, grad: torch.Tensor) -> torch.Tensor:
        """What the engine's validate_outputs does: reduce broadcast shapes, cast dtypes."""
        meta = nxt._input_metadata[nr]
        if tuple(grad.shape) != tuple(meta.shape):
            grad = grad.sum_to_size(meta.shape)
        if grad.dtype != meta.dtype:
            grad = grad.to(meta.dtype)
        return grad

    @staticmethod
    def _sum(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # input_buffer.cpp accumulate(): in place when the buffer holds the last reference to a
        # dense, non-overlapping tensor (refs here: `old` local + getrefcount's argument).
        if sys.getrefcount(old) <= 3 and not old._is_view() and is_non_overlapping_and_dense(old):
            return old.add_(new)
        return old + new

    def _accumulate(self, variable: torch.Tensor, grad: torch.Tensor) -> None:
        # accumulate_grad.h: steal the incoming gradient when nothing else holds it and its
        # layout obeys the parameter's; otherwise clone it; later gradients add in place.
        if variable.grad is None:
            # refs: `grad` here + the caller's local + getrefcount's argument; one more means
            # another input buffer holds the same tensor (use_count > 1 in C++: no steal)
            if sys.getrefcount(grad) <= 3 and _obeys_layout(grad, variable):
                variable.grad = grad
            else:
                variable.grad = _clone_like(grad, variable)
        else:
            variable.grad.add_(grad)
        rec = self.tracer.storage_of(variable)
        if rec is not None and rec.category == "parameters":
            self.tracer.mark(variable.grad, "gradients")
        # the engine runs a leaf's post-accumulate hooks (Tensor.register_post_accumulate_grad_hook)
        # right after AccumulateGrad (accumulate_grad.cpp, PostAccumulateGradHook)
        hooks = getattr(variable, "_post_accumulate_grad_hooks", None)
        for hook in list(hooks.values()) if hooks else ():
            hook(variable)

    def _release(self, node: Any) -> None:
        """Drop what the node saved, as Node::release_variables does once it has run.

        The holders our pack hook made are emptied. A tensor saved under another hook (a
        non-reentrant checkpoint's) holds nothing of ours; what such a checkpoint keeps for its
        recomputation (its inputs) lives until the last node that saved under it is released.
        """
        names = self._saved_attrs.get(type(node))
        if names is None:
            names = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
            self._saved_attrs[type(node)] = names
        self.tracer.release_saved(node)
        if not names:
            # a node whose saved tensors Python cannot see (a C++ custom Function): what it
            # unpacked while it ran
            self._empty(self.tracer.current_holders)
            self.tracer.current_holders = []
            return
        self.tracer.current_holders = []
        holders: list[Any] = []
        for name in names:
            with contextlib.suppress(Exception):
                raw = getattr(node, name)
                for saved in raw if isinstance(raw, (list, tuple)) else (raw,):
                    packed = _packed(saved, node, name)
                    if packed is not None and not isinstance(packed, _Holder):
                        self._release_foreign(saved, packed)
                    holders.append(packed)
        holders.extend(self.tracer.current_holders)  # older torch: unpacking registered them
        self._empty(holders)
        self.tracer.current_holders = []

    @staticmethod
    def _empty(holders: list[Any]) -> None:
        for holder in holders:
            if isinstance(holder, _Holder):
                holder.tensor = None

    def _release_foreign(self, saved: Any, packed: Any) -> None:
        frame = _checkpoint_frame(getattr(saved, "unpack_hook", None))
        if frame is None:
            return
        released = self._frames_released.setdefault(frame, set())
        released.add(id(packed))
        alive = [h for h in (w() for w in frame.weak_holders) if h is not None]
        if all(id(h) in released for h in alive):
            # the frame is dead for the engine: what it holds goes (the inputs it saved, its
            # recomputation's closure with the forward's RNG state), though our graph still
            # references it
            self._empty([getattr(s, "data", None) for s in _frame_inputs(frame)])
            frame.saved_args = []
            frame.input_saver = None
            frame.recompute_fn = None
            frame.recomputed.clear()


def _call_node(node: Any, grads: list[Any]) -> tuple[Any, tuple[Any, ...]]:
    """Run one node: its next edges and the gradients it sends along them."""
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        outs = node(*grads)
        return node.next_functions, outs if isinstance(outs, tuple) else (outs,)
    # a custom autograd.Function (python_function.cpp PyNode::apply): missing gradients are
    # materialized as zeros (the default; ctx.set_materialize_grads(False) is not readable from
    # Python), and the backward returns one gradient per forward argument, of which those for
    # tensors that require grad go along the node's edges
    for i, grad in enumerate(grads):
        if grad is None:
            meta = node._input_metadata[i]  # type: ignore[attr-defined]  # the node's, not in the stubs
            grads[i] = torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
    outs = node.apply(*grads)
    grads.clear()
    outs = outs if isinstance(outs, tuple) else (outs,)
    needs = node.needs_input_grad
    if len(outs) != len(needs):
        raise RuntimeError(
            f"function {type(node).__name__} returned an incorrect number of gradients "
            f"(expected {len(needs)}, got {len(outs)})"
        )
    edges = tuple(edge for edge in node.next_functions if edge[0] is not None)
    return edges, tuple(grad for grad, need in zip(outs, needs) if need)


def _gradient_edge(t: Any) -> tuple[Any, int] | None:
    """The (node, input number) a gradient for ``t`` flows into (impl::gradient_edge), or None."""
    if isinstance(t, torch.autograd.graph.GradientEdge):
        return t.node, t.output_nr
    if t.grad_fn is not None:
        return t.grad_fn, t.output_nr
    if not t.requires_grad:
        return None
    with torch.enable_grad():
        return t.view_as(t).grad_fn.next_functions[0][0], 0  # the leaf's AccumulateGrad


def _needed(roots: list[tuple[Any, int, Any]], targets: set[Any], accumulate: bool) -> set[Any]:
    """engine.cpp GraphTask::init_to_execute: the nodes with a path to an input's edge."""
    needed: set[Any] = set(targets) if accumulate else set()
    done: set[Any] = set()
    for root, _, _ in roots:
        stack: list[tuple[Any, Iterator[Any]]] = [(root, iter(root.next_functions))]
        if root in done:
            continue
        done.add(root)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                if stack and (node in needed or node in targets):
                    needed.add(stack[-1][0])
                continue
            nxt = child[0]
            if nxt is None:
                continue
            if nxt in done:
                if nxt in needed or nxt in targets:
                    needed.add(node)
                continue
            done.add(nxt)
            stack.append((nxt, iter(nxt.next_functions)))
    return needed


def _checkpoint_frame(hook: Any) -> Any:
    """The non-reentrant checkpoint frame an unpack hook belongs to (torch.utils.checkpoint), or None."""
    for cell in getattr(hook, "__closure__", None) or ():
        with contextlib.suppress(ValueError):
            value = cell.cell_contents
            if type(value).__name__ == "_CheckpointFrame":
                return value
            if callable(value) and getattr(value, "__closure__", None):
                inner = _checkpoint_frame(value)
                if inner is not None:
                    return inner
    return None


def _frame_inputs(frame: Any) -> tuple[Any, ...]:
    """The SavedTensors in which a non-reentrant checkpoint frame keeps its function's inputs.

    torch/utils/checkpoint.py keeps them in ``_CheckpointFrame.saved_args`` (``save_inputs``, since
    pytorch#174327; torch 2.14); torch 2.11's saves them with ``ctx.save_for_backward`` in a
    ``_NoopSaveInputs`` node whose output is ``frame.input_saver``
    (``_checkpoint_without_reentrant_generator``), a node no backward runs. Either way they live
    as long as the frame, and so does ``recompute_fn``'s closure with the forward's RNG state.
    """
    saved = getattr(frame, "saved_args", None)
    if saved is not None:
        return tuple(saved)
    node = getattr(getattr(frame, "input_saver", None), "grad_fn", None)
    return tuple(getattr(node, "_raw_saved_tensors", ()))


def _graph_exec_group() -> contextlib.AbstractContextManager[Any]:
    """One graph-task id for a replayed pass: non-reentrant checkpointing keys its recomputation
    by the engine's graph task (-1 outside the C++ engine, which would recompute at every unpack)."""
    group = getattr(torch.utils.checkpoint, "GraphExecGroup", None)
    if group is None or torch._C._get_graph_exec_group() is not None:
        return contextlib.nullcontext()
    return group()  # type: ignore[no-any-return]


class _Engine:
    """Stands in for ``Variable._execution_engine`` while a step is traced: the C++ engine cannot
    run on fake CUDA tensors (``hasPrimaryContext``), and one replay for both devices keeps CPU
    and CUDA comparable. Whatever else is asked of the engine goes to the real one."""

    def __init__(self, real: Any, replay: _Replay) -> None:
        self._real = real
        self._replay = replay

    def run_backward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
        return self._replay.run_backward(*args, **kwargs)

    def queue_callback(self, callback: Any) -> None:
        if not self._replay._callbacks:
            raise RuntimeError("Final callbacks can only be installed during backward pass.")
        self._replay._callbacks[-1].append(callback)

    def is_checkpoint_valid(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _engine_replaced(replay: _Replay) -> Iterator[None]:
    from torch.autograd.variable import Variable

    real = Variable._execution_engine
    Variable._execution_engine = _Engine(real, replay)  # type: ignore[assignment]
    try:
        yield
    finally:
        Variable._execution_engine = real


@contextlib.contextmanager
def _tensor_hooks_tracked(tracer: _Tracer) -> Iterator[None]:
    """Record hooks put on non-leaf tensors, which the replay runs before their node (the engine
    keeps them on the node, where Python cannot read them)."""
    real = torch.Tensor.register_hook

    def register_hook(t: torch.Tensor, hook: Any) -> Any:
        handle = real(t, hook)  # type: ignore[no-untyped-call]  # torch leaves Tensor.register_hook unannotated
        if t.grad_fn is not None:
            entries = tracer.tensor_hooks.setdefault(t.grad_fn, [])
            if all(d is not t._backward_hooks for _, d in entries):
                entries.append((t.output_nr, t._backward_hooks))
        return handle

    torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.register_hook = real  # type: ignore[method-assign]


@contextlib.contextmanager
def _storage_resizes_tracked(tracer: _Tracer) -> Iterator[None]:
    """Report ``UntypedStorage.resize_`` (a Python-level storage method, below no dispatcher) to the tracer."""
    real = torch.UntypedStorage.resize_

    def resize_(storage: Any, size: int) -> Any:
        out = real(storage, size)
        tracer.storage_resized(storage, size)
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = real  # type: ignore[method-assign]


@contextlib.contextmanager
def _sac_cache_tracked(tracer: _Tracer) -> Iterator[None]:
    """Selective activation checkpointing (``create_selective_checkpoint_contexts``) keeps the
    outputs its policy saves in its own cache, outside autograd's saved tensors: torch/utils/
    checkpoint.py, ``_CachingTorchDispatchMode.__torch_dispatch__`` wraps each in a
    ``_VersionWrapper`` (torch 2.11 to 2.15), which no pack hook sees (unless the checkpoint asks
    for ``respect_saved_tensors_hooks=True``). Their lifetimes need nothing from here (the cache
    lives in the checkpoint frame's recomputation closure, which the replay drops with the frame);
    they are filed as activations, as autograd's saved tensors are. The FutureWarning torch gives
    when hooks are active around such a region is about this tracer's hooks, not the user's step."""
    import torch.utils.checkpoint as checkpoint

    wrapper = getattr(checkpoint, "_VersionWrapper", None)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="A saved_tensors_hooks context .* selective activation checkpoint", category=FutureWarning
        )
        if wrapper is None:
            yield
            return
        real = wrapper.__init__

        def init(self: Any, val: Any, *args: Any, **kwargs: Any) -> None:
            real(self, val, *args, **kwargs)
            if isinstance(val, torch.Tensor):
                tracer.saved(val)

        wrapper.__init__ = init
        try:
            yield
        finally:
            wrapper.__init__ = real


@contextlib.contextmanager
def _rng_states_tracked(tracer: _Tracer) -> Iterator[None]:
    """CPU: ``torch.get_rng_state()`` makes a real host tensor (the generator's state, 5,056 bytes
    for mt19937) outside the dispatcher; checkpointing keeps one per checkpointed call to replay
    its randomness (torch.utils.checkpoint, ``preserve_rng_state``), and ``fork_rng`` one more
    while it recomputes. Such a tensor is tracked like any other storage."""
    real = torch.get_rng_state

    def get_rng_state() -> torch.Tensor:
        state = real()
        tracer.track(state)
        return state

    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = real


def _packed(saved: Any, node: Any, name: str) -> Any:
    """What the pack hook returned for a saved tensor, without unpacking it (which costs an op)."""
    data = getattr(saved, "data", None)
    if data is not None:
        return data
    with contextlib.suppress(Exception):
        getattr(node, name.replace("_raw_saved_", "_saved_", 1))  # older torch: unpack registers it
    return None


def _priority(node: Any) -> int:
    # AccumulateGrad has sequence number UINT64_MAX in C++ (runs as soon as it is ready)
    return sys.maxsize if type(node).__name__ == "AccumulateGrad" else int(node._sequence_nr())


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether the elements of ``t`` fill its storage span exactly once (some dim order is contiguous)."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _obeys_layout(grad: torch.Tensor, variable: torch.Tensor) -> bool:
    if is_non_overlapping_and_dense(variable):
        return grad.stride() == variable.stride()
    return grad.is_contiguous()


def _clone_like(grad: torch.Tensor, variable: torch.Tensor) -> torch.Tensor:
    if is_non_overlapping_and_dense(variable):
        out = torch.empty_strided(variable.shape, variable.stride(), dtype=grad.dtype, device=grad.device)
        return out.copy_(grad)
    return grad.clone(memory_format=torch.contiguous_format)


_frozen_depth = 0


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the garbage collector off the objects that exist now (imports, the model) for a while.

    A trace makes many short-lived objects, and every full collection also walks the ~340k
    objects that importing torch leaves (0.4 s of a 2.3 s ResNet-50 trace measured here); in a
    forked child it would moreover touch, and so copy, every page of the parent's heap.
    ``gc.freeze()`` sets those objects aside; they go back when the outermost block ends.
    """
    global _frozen_depth
    if _frozen_depth == 0:
        gc.freeze()
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0:
            gc.unfreeze()


def trace_step(
    workload: Workload,
    batch_size: int,
    spec: StepSpec,
    *,
    cuda_workspaces: tuple[int, int] | None = None,
    window_only: bool = False,
    compute_capability: tuple[int, int] | None = None,
    observe: Observer | None = None,
    placement: Placement | None = None,
) -> Trace:
    """Trace the reference step at one batch size on fake tensors (see docs/architecture.md).

    ``cuda_workspaces`` = (cuBLAS workspace per handle, cuDNN workspace per convolution call) in
    bytes adds the library workspaces a CUDA run takes through the caching allocator, and the
    buffers CUDA kernels take inside an op (``_cuda_scratch``; ``compute_capability`` picks the
    kernels, sm80 when not given). ``observe`` sees every aten op after it ran (``_roofline``).
    ``placement(model, device, dtype)``: a context manager that gives the model fake parameters and
    buffers in its own way (a distributed wrapper's sharded ones, ``_distributed``) instead of
    :func:`fake_state` put in place by reparametrization; it runs inside the fake mode, filed as setup.
    ``window_only``: run only the first iteration's forward and backward (about half the work);
    :func:`batchfit._compose.compose` completes such a trace from a full one at another size.
    """
    with frozen_heap(), quiet_fake_tensor_logs(), cpu_threads(spec.threads if spec.device == "cpu" else None):
        return _trace_step(
            workload, batch_size, spec, cuda_workspaces, window_only, compute_capability, observe, placement
        )


def _trace_step(
    workload: Workload,
    batch_size: int,
    spec: StepSpec,
    cuda_workspaces: tuple[int, int] | None,
    window_only: bool,
    compute_capability: tuple[int, int] | None = None,
    observe: Observer | None = None,
    placement: Placement | None = None,
) -> Trace:
    if window_only and (spec.mode != "train" or spec.step is not None):
        raise ValueError("window_only traces need the reference training step (no custom step)")
    model = workload.model
    tracer = _Tracer(model)
    tracer.observe = observe
    device = torch.device(spec.device)
    tracer.scratch = ScratchMeter() if device.type == "cpu" else None
    tracer.device_type = device.type
    if device.type == "cuda":
        tracer.cuda_workspaces = cuda_workspaces
        tracer.compute_capability = compute_capability or tracer.compute_capability
    param_dtype = spec.precision.param_dtype if spec.precision.param_dtype != torch.float32 else None
    buffer_names = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    setup_end = 0

    def make_labels(choice: LossChoice) -> Any:
        nonlocal setup_end
        labels, setup_end = _file_under_setup(tracer, choice.labels, setup_end)
        return labels

    def on_phase(phase: str, iteration: int) -> None:
        if tracer.labeller is not None:
            tracer.labeller(functools.partial(tracer.mark, wrapper=True))
        tracer.marks.append((phase, iteration, len(tracer.raw)))
        tracer.phase, tracer.iteration = phase, iteration
        tracer.module_stack[-1] = "optimizer" if phase == "optimizer" else ""

    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            # nn.RNNBase asks its (fake) weights for data pointers; harmless here
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            stack.enter_context(real_tensor_paths())
            # values drawn for real (a single random draw, _values.Values.follow) use the CPU's
            # generator: its state is saved before the fake mode starts and restored afterwards
            stack.enter_context(torch.random.fork_rng(devices=[]))
            # a placement turns meta tensors (a wrapper built them outside the mode) into fake ones
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=placement is not None))
            stack.enter_context(_StorageBirthRecorder(tracer))
            stack.enter_context(train_mode(model, spec.mode == "train"))
            # before the window: parameters, buffers, the batch, the optimizer (no state yet)
            tracer.setup_category = "parameters"
            placed = Placed()
            if placement is not None:
                placed = stack.enter_context(placement(model, device, param_dtype))
                tracer.labeller = placed.labeller
                tracer.collectives = True
                stack.enter_context(_storage_resizes_tracked(tracer))
                stack.enter_context(_tensor_hooks_tracked(tracer))
                state = dict(model.named_buffers(remove_duplicate=False))
            else:
                state = fake_state(model, device, dtype=param_dtype)
            for name, t in state.items():
                rec = tracer.storage_of(t)
                if rec is not None and name in buffer_names:
                    rec.category = "buffers"
            tracer.setup_category = "inputs"
            inputs = batch_inputs(workload, batch_size, device, param_dtype)
            if placement is None:
                stack.enter_context(state_in_place(model, state))
            del state
            optimizer = None
            if spec.mode == "train":
                params = unique_trainable(model)
                if not params:
                    raise BatchfitError(
                        tr("the model has no trainable parameters"),
                        hint=tr("unfreeze some parameters, or use `mode='inference'`"),
                    )
                tracer.setup_category = "optimizer_state"  # what a constructor allocates (bitsandbytes' maps)
                if placed.build_optimizer is not None:
                    optimizer = placed.build_optimizer(params)
                else:
                    optimizer = spec.optimizer.build(params, device_type=device.type)
                tracer.setup_category = "inputs"
                del params
            labels = None
            if spec.step is not None:
                choice = label_choice(model, inputs, spec)  # not recorded: tracked storages only
                if choice.target is not None:
                    labels = make_labels(choice)
                del choice
            setup_end = len(tracer.raw)
            stack.enter_context(_module_hooks(tracer))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tracer.pack, tracer.unpack))
            replay = _Replay(tracer)
            stack.enter_context(_engine_replaced(replay))
            stack.enter_context(_sac_cache_tracked(tracer))
            if device.type == "cpu":
                stack.enter_context(_rng_states_tracked(tracer))
            if device.type == "cuda":
                stack.enter_context(cuda_kernel_choices(tracer.notes))
            if spec.step is not None:
                tracer.on_phase = lambda phase: on_phase(phase, tracer.iteration) if phase != tracer.phase else None
            batch = Batch(inputs, labels)
            del inputs, labels  # the loop owns the batch: a new one can replace it
            make_batch = batch_maker(workload, device, param_dtype)

            def new_batch(size: int, like: LabelsLike | None) -> Batch:
                made = make_batch(size, like)
                for t in [*made.inputs.tensors(), made.labels]:
                    if isinstance(t, torch.Tensor):
                        tracer.mark(t, "inputs")
                return made

            dataset_size = workload.dataset.train_size if workload.dataset is not None else None
            loss = run_step(
                model,
                batch,
                spec,
                optimizer,
                backward=replay.backward,
                make_labels=make_labels,
                new_batch=new_batch,
                tail=tail_sizes(spec, batch_size, dataset_size),
                scaler=_GradScaler(spec.device) if spec.precision.grad_scaler and spec.mode == "train" else None,
                on_phase=on_phase,
                window_only=window_only,
            )
            if optimizer is not None:
                _note_bitsandbytes(optimizer, device.type, tracer.notes)
            tracer.notes.extend(quantized_note(model))
            del batch, optimizer
    except BatchfitError:
        raise
    except Exception as exc:
        raise _explain(exc, workload, batch_size, tracer) from exc
    if tracer.scratch is not None and tracer.scratch.skipped:
        tracer.notes.append(
            "kernel scratch not modelled for " + ", ".join(sorted(set(tracer.scratch.skipped)))
        )
    if tracer.values.answered:
        tracer.notes.append(
            "values read by the model ("
            + ", ".join(tracer.values.answered)
            + ") computed for real on the CPU from the batch's integer inputs and constants"
            " (memory is counted on the fake tensors as for every op)"
        )
    activation_bytes = {m: sum(v.values()) for m, v in tracer.saved_bytes.items()}
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    return Trace(
        batch_size,
        spec.device,
        tracer.events(),
        activation_bytes,
        tracer.notes,
        tracer.numels,
        types,
        list(tracer.marks),
        window_only,
        tracer.kernel_calls,
        tracer.compute_capability if tracer.cuda_workspaces is not None else None,
        loss,
    )


def _note_bitsandbytes(optimizer: torch.optim.Optimizer, device_type: str, notes: list[str]) -> None:
    """Say where a paged optimizer's state is (CUDA managed memory, outside PyTorch's allocator), and
    what a CPU estimate of bitsandbytes' optimizer leaves out."""
    from ._bnb import is_bitsandbytes_optimizer, paged_bytes
    from ._units import format_bytes

    if not is_bitsandbytes_optimizer(optimizer):
        return
    if device_type == "cpu":
        notes.append(
            "bitsandbytes' CPU optimizer kernels (torch.compile'd, bitsandbytes/backends/default/ops.py) make "
            "temporaries not modelled here; the optimizer state is exact, and the GPU kernels update in place"
        )
    paged = paged_bytes(optimizer)
    if paged:
        notes.append(
            f"{format_bytes(paged)} of paged optimizer state is in CUDA managed memory (bitsandbytes "
            "functional.get_paged: cudaMallocManaged), outside PyTorch's allocator: not in this peak nor in "
            "max_memory_allocated; nvidia-smi counts its pages while they are on the GPU (prefetched there "
            "for each optimizer step), and the driver moves them to host memory when the GPU is full"
        )


def _file_under_setup(tracer: _Tracer, make: Any, setup_end: int) -> tuple[Any, int]:
    """Make something that exists before the window (labels: a DataLoader made them) and file
    its storages' births under setup, at the end of the setup events."""
    saved = tracer.phase, tracer.setup_category, tracer.iteration
    tracer.phase, tracer.setup_category, tracer.iteration = "setup", "inputs", 0
    start = len(tracer.raw)
    try:
        made = make()
    finally:
        tracer.phase, tracer.setup_category, tracer.iteration = saved
    born = tracer.raw[start:]
    del tracer.raw[start:]
    for _, rec in born:
        rec.category, rec.module = "inputs", ""
    tracer.raw[setup_end:setup_end] = born
    tracer.marks = [(p, it, i + len(born) if i >= setup_end else i) for p, it, i in tracer.marks]
    return made, setup_end + len(born)


def _explain(exc: Exception, workload: Workload, batch_size: int, tracer: _Tracer) -> BatchfitError:
    """Turn a failure inside the model into a message that names the layer and the fix."""
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    fake_limits = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)
    if isinstance(exc, fake_limits) or any(s in text for s in ("data-dependent", "numpy", "non-fake")):
        where = tr(" in module {module!r}", module=tracer.module_stack[-1]) if len(tracer.module_stack) > 1 else ""
        return BatchfitError(
            tr(
                "the model cannot run on fake tensors{where}: {name}: {text}",
                where=where,
                name=type(exc).__name__,
                text=text,
            ),
            hint=tr(
                "it reads tensor values (e.g. .item(), numpy, data-dependent shapes); use `batchfit measure` (a real run) instead"
            ),
            exit_code=ExitCode.UNSUPPORTED,
        )
    if tracer.module_calls and tracer.phase == "forward":
        module, shape = tracer.module_calls[-1]
        return layer_failure(workload, tracer.module_stack[-1], module, shape, exc)
    where = tr("your step function's {phase}", phase=tracer.phase) if tracer.on_phase is not None else tracer.phase
    hint = tr("rerun with --debug for the traceback")
    if "hasPrimaryContext" in text or "CUDA driver" in text or "no NVIDIA driver" in text:
        hint = tr(
            "something in the step asks the CUDA driver (e.g. torch.cuda.synchronize(), a real "
            "torch.cuda call or a CUDA stream), which fake CUDA tensors cannot answer; guard it with "
            "torch.cuda.is_available(), or use `device='cpu'`; {hint}",
            hint=hint,
        )
    return BatchfitError(
        tr(
            "the training step failed in {where} at batch size {batch_size}: {name}: {text}",
            where=where,
            batch_size=batch_size,
            name=type(exc).__name__,
            text=text,
        ),
        hint=hint,
    )
