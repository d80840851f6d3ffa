"""The layer table: torchsummary's classic layout (bug-compatible) and a richer, correct default.

Both run the model's forward once on fake tensors (no memory, no real compute), through
``torch.func.functional_call`` so the user's module is never changed, with forward hooks that
record every module call. The default style also counts the operations actually run with
``torch.utils.flop_counter.FlopCounterMode`` (multiply-adds = FLOPs / 2).

>>> s = summary("mlp", dataset="mnist")
>>> s.total_params, s.trainable_params, s.total_mult_adds
(101770, 101770, 101632)
>>> [row.output_shapes for row in s.rows[1:3]]
[[(1, 784)], [(1, 128)]]
>>> print(summary("mlp", dataset="mnist", style="classic"))  # doctest: +ELLIPSIS
----------------------------------------------------------------
        Layer (type)               Output Shape         Param #
================================================================
           Flatten-1                  [-1, 784]               0
              Linear-2                  [-1, 128]         100,480
...
Estimated Total Size (MB): 0.40
----------------------------------------------------------------
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ._errors import BatchfitError
from ._explain import fmt_shape as _fmt_shape
from ._explain import layer_failure, quiet_fake_tensor_logs
from ._i18n import tr
from ._models import InputSize, ModelInputs, Workload, fake_state, load_workload, state_in_place
from ._render import Cell, Rendered, Section, Styled, Table, Text, pad
from ._step import train_mode
from ._units import format_bytes

SCHEMA_VERSION = 2  # 2: "mode" became "module_mode" (estimate's "mode" is train/inference)

Style = Literal["default", "classic"]
ModuleMode = Literal["eval", "train", "same"]  # the modules' train/eval mode in the forward

#: torchsummary runs its forward at batch 2 (so that BatchNorm works in train mode).
CLASSIC_FORWARD_BATCH = 2

# style -> the mode the forward runs in when none is asked for. The classic layout leaves the
# model's own mode alone, as torchsummary does; the default describes inference, as torchinfo does.
_DEFAULT_MODULE_MODE: dict[str, ModuleMode] = {"default": "eval", "classic": "same"}
_MODULE_MODES: dict[str, bool | None] = {"eval": False, "train": True, "same": None}


# FlopCounterMode has no formula for the CPU flash-attention kernel that scaled_dot_product_attention
# picks for CPU tensors; without one, attention would count zero multiply-adds here.
def _cpu_flash_attention_flops(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _extra_flop_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    names = {"_scaled_dot_product_flash_attention_for_cpu": _cpu_flash_attention_flops}
    return {getattr(aten, name): fn for name, fn in names.items() if hasattr(aten, name)}


# ---------------------------------------------------------------------------------------------
# Recording one forward


@dataclass
class _Call:
    """One call of one module during the recorded forward (pre-order position = list index)."""

    module: nn.Module
    name: str
    depth: int
    parent: int | None
    call: int  # 1 for the module's first call, 2 for its second, ...
    input_shape: tuple[int, ...] | None
    flops_before: int = 0
    flops_after: int = 0
    finished: int = 0  # 0 while running; then its position in the order calls finish (1, 2, ...)
    output: Any = None  # shapes only (tuples of ints, nested like the output), never tensors
    output_bytes: int = 0
    classic: _ClassicInfo | None = None


@dataclass
class _ClassicInfo:
    """What torchsummary's hook reads, at the moment its hook runs."""

    key_class: str
    output_shape: list[Any]
    nb_params: int
    trainable: bool | None
    compatible: bool = True  # False where torchsummary itself would crash on this module


def _shapes(value: Any) -> Any:
    """The output with every tensor replaced by its shape (a tuple), keeping the nesting."""
    return tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None, value)


def _leaf_tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _first_shape(args: Any, kwargs: Any) -> tuple[int, ...] | None:
    leaves = _leaf_tensors((args, kwargs))
    return tuple(leaves[0].shape) if leaves else None


def _classic_class_name(module: nn.Module) -> str:
    # torchsummary's own expression, kept verbatim so that odd class reprs give the same key
    return str(module.__class__).split(".")[-1].split("'")[0]


def _classic_info(module: nn.Module, output: Any, batch_size: int) -> _ClassicInfo:
    """What torchsummary 1.5.1's hook records (its quirks included), without its crashes."""
    compatible = True
    if isinstance(output, (list, tuple)) and all(isinstance(o, torch.Tensor) for o in output):
        shape: list[Any] = [[-1, *list(o.size())[1:]] for o in output]
    elif isinstance(output, torch.Tensor) and output.dim() > 0:
        shape = list(output.size())
        shape[0] = batch_size
    else:
        # torchsummary crashes here (LSTM's (out, (h, c)), dicts, None, 0-d tensors): one [-1, ...]
        # per tensor, the rule it applies to tuples of tensors
        compatible = False
        shape = [[-1, *list(t.size())[1:]] for t in _leaf_tensors(output)]
    nb_params = 0
    trainable: bool | None = None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        nb_params += math.prod(weight.size())
        trainable = bool(weight.requires_grad)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        nb_params += math.prod(bias.size())
    return _ClassicInfo(_classic_class_name(module), shape, nb_params, trainable, compatible)


class _ModuleCallRecorder:
    """Forward hooks on every module of ``model`` that record each call, removed on exit."""

    def __init__(self, model: nn.Module, *, classic_batch: int | None = None) -> None:
        self.model = model
        self.names: dict[int, str] = {id(m): name for name, m in model.named_modules()}
        self.calls: list[_Call] = []
        self.stack: list[int] = []
        self.counts: dict[int, int] = {}
        self.finished = 0
        self.classic_batch = classic_batch
        self.flops: Callable[[], int] = lambda: 0
        self._handles: list[Any] = []

    def __enter__(self) -> _ModuleCallRecorder:
        try:
            scripted = set()
            for module in self.model.modules():
                if isinstance(module, torch.jit.ScriptModule):
                    # a ScriptModule refuses hooks of its own; the global hooks below see its calls
                    # (the modules inside it run in TorchScript, which calls no hooks)
                    scripted.add(id(module))
                    continue
                # appended last, so like torchsummary we see the output after the user's own hooks
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
            if scripted:
                from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

                def pre(module: nn.Module, args: Any) -> None:
                    if id(module) in scripted:
                        self._pre(module, args, {})

                def post(module: nn.Module, args: Any, output: Any) -> None:
                    if id(module) in scripted:
                        self._post(module, args, {}, output)

                self._handles.append(register_module_forward_pre_hook(pre))
                self._handles.append(register_module_forward_hook(post))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        key = id(module)
        self.counts[key] = self.counts.get(key, 0) + 1
        parent = self.stack[-1] if self.stack else None
        call = _Call(
            module=module,
            name=self.names.get(key, type(module).__name__),
            depth=len(self.stack),
            parent=parent,
            call=self.counts[key],
            input_shape=_first_shape(args, kwargs),
            flops_before=self.flops(),
        )
        self.stack.append(len(self.calls))
        self.calls.append(call)

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        index = self.stack.pop()
        call = self.calls[index]
        call.flops_after = self.flops()
        self.finished += 1
        call.finished = self.finished
        call.output = _shapes(output)
        call.output_bytes = sum(t.numel() * t.element_size() for t in _leaf_tensors(output))
        if self.classic_batch is not None and not (
            isinstance(module, (nn.Sequential, nn.ModuleList)) or module is self.model
        ):
            call.classic = _classic_info(module, output, self.classic_batch)


def _fake_inputs(workload: Workload, batch_size: int, input_data: Any) -> ModelInputs:
    """The inputs as fake tensors (call inside the FakeTensorMode); ``input_data`` in any form
    :meth:`ModelInputs.of` reads."""
    if input_data is None:
        return workload.make_inputs(batch_size, "cpu")

    def fake_like(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return t

    return ModelInputs.of(input_data).map(fake_like)


def _record(
    workload: Workload,
    batch_size: int,
    module_mode: ModuleMode,
    *,
    count_flops: bool,
    classic_batch: int | None = None,
    input_data: Any = None,
) -> tuple[_ModuleCallRecorder, list[tuple[tuple[int, ...], torch.dtype]]]:
    """Run one forward of ``workload`` on fake tensors with every module call recorded."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    model = workload.model
    recorder = _ModuleCallRecorder(model, classic_batch=classic_batch)
    inputs: list[tuple[tuple[int, ...], torch.dtype]] = []
    try:
        with (
            quiet_fake_tensor_logs(),
            train_mode(model, _MODULE_MODES[module_mode]),
            FakeTensorMode(allow_non_fake_inputs=True),
        ):
            state = fake_state(model, "cpu")
            batch = _fake_inputs(workload, batch_size, input_data)
            inputs = [(tuple(t.shape), t.dtype) for t in batch.tensors()]
            counter = (
                FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
                if count_flops
                else contextlib.nullcontext()
            )
            with recorder, counter, state_in_place(model, state):
                if isinstance(counter, FlopCounterMode):
                    recorder.flops = counter.get_total_flops
                batch.call(model)
    except BatchfitError:
        raise
    except Exception as exc:
        raise _explain_failure(workload, recorder, exc) from exc
    return recorder, inputs


# ---------------------------------------------------------------------------------------------
# Explaining a failed forward


def _explain_failure(workload: Workload, recorder: _ModuleCallRecorder, exc: Exception) -> BatchfitError:
    """Name the layer whose forward failed, what it got, what it expected, and the likely fix."""
    if not recorder.stack:
        return layer_failure(workload, None, None, None, exc)
    call = recorder.calls[recorder.stack[-1]]
    return layer_failure(workload, call.name, call.module, call.input_shape, exc)


# ---------------------------------------------------------------------------------------------
# The rows


@dataclass
class LayerRow:
    """One row of the default table: one call of one module (or a module the forward never called).

    ``params`` counts the parameters held directly by this module that no earlier row counted
    (tied and shared parameters are counted once, where they first appear); ``*_inclusive`` add
    every row below this one. ``flops`` are the operations run in this call outside its child
    modules; multiply-adds are FLOPs / 2.
    """

    name: str  # qualified name in the model ("" for the model itself)
    type: str
    depth: int
    parent: int | None  # index of the parent row
    call: int  # 1 = first call of this module, 2 = second, ...; 0 = never called
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_bytes: int = 0
    params: int = 0
    trainable_params: int = 0
    param_bytes: int = 0
    shared_params: int = 0  # held by this module but counted at an earlier row (tied, or a reused module)
    flops: int = 0
    params_inclusive: int = 0
    trainable_params_inclusive: int = 0
    param_bytes_inclusive: int = 0
    flops_inclusive: int = 0
    leaf: bool = True

    @property
    def mult_adds(self) -> int:
        return self.flops // 2

    @property
    def mult_adds_inclusive(self) -> int:
        return self.flops_inclusive // 2

    @property
    def called(self) -> bool:
        return self.call > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "depth": self.depth,
            "parent": self.parent,
            "call": self.call,
            "output_shapes": [list(s) for s in self.output_shapes],
            "output_bytes": self.output_bytes,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "param_bytes": self.param_bytes,
            "shared_params": self.shared_params,
            "mult_adds": self.mult_adds,
            "params_inclusive": self.params_inclusive,
            "trainable_params_inclusive": self.trainable_params_inclusive,
            "param_bytes_inclusive": self.param_bytes_inclusive,
            "mult_adds_inclusive": self.mult_adds_inclusive,
        }


@dataclass
class _Node:
    module: nn.Module
    name: str
    call: _Call | None
    children: list[_Node] = field(default_factory=list)


def _build_rows(recorder: _ModuleCallRecorder) -> list[LayerRow]:
    calls = recorder.calls
    if not calls:
        return []
    nodes = [_Node(c.module, c.name, c) for c in calls]
    for c, node in zip(calls, nodes, strict=True):
        if c.parent is not None:
            nodes[c.parent].children.append(node)
    called = {id(c.module) for c in calls}
    has_called: dict[int, bool] = {}

    def any_called(m: nn.Module) -> bool:
        if id(m) not in has_called:
            has_called[id(m)] = any(id(x) in called for x in m.modules())
        return has_called[id(m)]

    placed: set[int] = set()

    def attach_uncalled(module: nn.Module, node: _Node) -> None:
        # modules the forward never ran (a ParameterList, a head used only through its weight)
        # still hold parameters: give them rows under their nearest called ancestor
        for child in module.children():
            if id(child) in called or id(child) in placed:
                continue
            placed.add(id(child))
            name = recorder.names.get(id(child), "")
            if any_called(child):
                # a plain container (ModuleList, ModuleDict) whose members were called directly
                if any(True for _ in child.parameters(recurse=False)):
                    node.children.append(_Node(child, name, None))
                attach_uncalled(child, node)
            else:
                new = _Node(child, name, None)
                node.children.append(new)
                attach_uncalled(child, new)

    for c, node in zip(calls, nodes, strict=True):
        if c.call == 1:
            attach_uncalled(c.module, node)

    rows: list[LayerRow] = []
    seen: set[int] = set()

    def emit(node: _Node, depth: int, parent: int | None) -> None:
        c = node.call
        row = LayerRow(name=node.name, type=type(node.module).__name__, depth=depth, parent=parent, call=0)
        if c is not None:
            row.call = c.call
            row.output_shapes = _shape_leaves(c.output)
            row.output_bytes = c.output_bytes
            row.flops_inclusive = c.flops_after - c.flops_before
        for p in node.module.parameters(recurse=False):
            if id(p) in seen:
                row.shared_params += p.numel()
                continue
            seen.add(id(p))
            row.params += p.numel()
            row.param_bytes += p.numel() * p.element_size()
            if p.requires_grad:
                row.trainable_params += p.numel()
        index = len(rows)
        rows.append(row)
        for child in node.children:
            emit(child, depth + 1, index)

    emit(nodes[0], 0, None)
    # inclusive sums, children before parents (rows are in pre-order)
    for row in rows:
        row.params_inclusive = row.params
        row.trainable_params_inclusive = row.trainable_params
        row.param_bytes_inclusive = row.param_bytes
    for row in reversed(rows):
        if row.parent is not None:
            parent = rows[row.parent]
            parent.params_inclusive += row.params_inclusive
            parent.trainable_params_inclusive += row.trainable_params_inclusive
            parent.param_bytes_inclusive += row.param_bytes_inclusive
            if row.called:
                parent.leaf = False
    child_flops = [0] * len(rows)
    for row in rows:
        if row.parent is not None:
            child_flops[row.parent] += row.flops_inclusive
    for row, inner in zip(rows, child_flops, strict=True):
        row.flops = row.flops_inclusive - inner
    return rows


def _shape_leaves(shapes: Any) -> list[tuple[int, ...]]:
    leaves, _ = tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    return [leaf for leaf in leaves if isinstance(leaf, tuple)]


# ---------------------------------------------------------------------------------------------
# The classic (torchsummary 1.5.1) layout


@dataclass(frozen=True)
class ClassicRow:
    """One torchsummary row: ``Linear-2``, its output shape with the batch shown as ``batch_size``."""

    layer: str
    output_shape: list[Any]
    params: int
    trainable: bool | None  # None: the module has no ``weight`` (torchsummary leaves it out of "trainable")
    compatible: bool = True  # False: torchsummary crashes here; this row is batchfit's stand-in

    @property
    def output_numel(self) -> int:
        """What the row adds to torchsummary's "Forward/backward pass size" (its np.prod, sign included)."""
        if self.compatible:
            return math.prod(_flat_ints(self.output_shape))  # np.prod over a list of lists multiplies them all
        return sum(math.prod(s) for s in self.output_shape)


@dataclass
class ClassicSummary:
    """torchsummary 1.5.1's table, byte for byte, quirks included.

    Its quirks, kept on purpose: a module is a row per call (a reused module counts its
    parameters again); only ``weight`` and ``bias`` count as parameters, and a row is trainable
    only when its ``weight`` requires grad; the forward runs at batch 2 but shows ``batch_size``
    (-1); "MB" are MiB; the sizes assume 4 bytes per value; "Input size" is the product of all
    input dims (across several inputs too) times ``batch_size``.
    """

    rows: list[ClassicRow]
    input_size: list[tuple[int, ...]]
    batch_size: int = -1

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(r.params for r in self.rows if r.trainable is True)

    def _sizes_mib(self) -> tuple[float, float, float, float]:
        total_output = sum(r.output_numel for r in self.rows)
        input_prod = math.prod(d for shape in self.input_size for d in shape)
        # the same float operations in the same order as torchsummary, so the rounding agrees
        total_input_size = abs(input_prod * self.batch_size * 4.0 / (1024**2.0))
        total_output_size = abs(2.0 * total_output * 4.0 / (1024**2.0))
        total_params_size = abs(self.total_params * 4.0 / (1024**2.0))
        total_size = total_params_size + total_output_size + total_input_size
        return total_input_size, total_output_size, total_params_size, total_size

    def __str__(self) -> str:
        lines = [
            "-" * 64,
            f"{pad(tr('Layer (type)'), 20, True)}  {pad(tr('Output Shape'), 25, True)} {pad(tr('Param #'), 15, True)}",
            "=" * 64,
        ]
        for row in self.rows:
            lines.append(f"{row.layer:>20}  {row.output_shape!s:>25} {f'{row.params:,}':>15}")
        total, trainable = self.total_params, self.trainable_params
        inp, out, par, tot = self._sizes_mib()
        lines += [
            "=" * 64,
            tr("Total params: {n:,}", n=total),
            tr("Trainable params: {n:,}", n=trainable),
            tr("Non-trainable params: {n:,}", n=total - trainable),
            "-" * 64,
            tr("Input size (MB): {size:0.2f}", size=inp),
            tr("Forward/backward pass size (MB): {size:0.2f}", size=out),
            tr("Params size (MB): {size:0.2f}", size=par),
            tr("Estimated Total Size (MB): {size:0.2f}", size=tot),
            "-" * 64,
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        inp, out, par, tot = self._sizes_mib()
        return {
            "layers": [
                {
                    "layer": r.layer,
                    "output_shape": r.output_shape,
                    "params": r.params,
                    "trainable": r.trainable,
                    "torchsummary_compatible": r.compatible,
                }
                for r in self.rows
            ],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "input_size_mib": inp,
            "forward_backward_size_mib": out,
            "params_size_mib": par,
            "estimated_total_size_mib": tot,
        }


def _flat_ints(shape: list[Any]) -> list[int]:
    out: list[int] = []
    for d in shape:
        if isinstance(d, list):
            out.extend(_flat_ints(d))
        else:
            out.append(int(d))
    return out


def _classic(workload: Workload, module_mode: ModuleMode, batch_size: int | None, input_data: Any) -> ClassicSummary:
    display_batch = -1 if batch_size is None else batch_size
    recorder, inputs = _record(
        workload,
        CLASSIC_FORWARD_BATCH,
        module_mode,
        count_flops=False,
        classic_batch=display_batch,
        input_data=input_data,
    )
    finished = sorted(
        (c for c in recorder.calls if c.classic is not None),
        key=lambda c: c.finished,
    )
    rows: list[ClassicRow] = []
    for index, c in enumerate(finished, start=1):
        info = c.classic
        assert info is not None
        rows.append(
            ClassicRow(f"{info.key_class}-{index}", info.output_shape, info.nb_params, info.trainable, info.compatible)
        )
    input_size = [s.shape for s in workload.inputs] if input_data is None else [shape[1:] for shape, _ in inputs]
    return ClassicSummary(rows, input_size, display_batch)


# ---------------------------------------------------------------------------------------------
# The summary


_UNITS_NOTE = "KiB = 1024 B, MiB = 1024^2 B, GiB = 1024^3 B; MB = 10^6 B"


@dataclass
class ModelSummary(Rendered):
    """What ``batchfit summary`` prints: rows, totals, and (for ``style="classic"``) torchsummary's table.

    ``str()`` is plain text in the chosen style; in a rich console the default style is a table.
    Bytes are ints; ``to_dict()`` is the JSON form (``schema_version`` included).
    """

    model: str
    style: Style
    batch_size: int
    module_mode: ModuleMode
    depth: int
    inputs: list[tuple[tuple[int, ...], str]]
    rows: list[LayerRow]
    total_params: int
    trainable_params: int
    total_flops: int
    param_bytes: int
    buffer_bytes: int
    input_bytes: int
    classic: ClassicSummary | None = None
    num_classes: int | None = None  # the head batchfit built (--num-classes); None: the model's own code chose it

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def total_mult_adds(self) -> int:
        return self.total_flops // 2

    @property
    def leaf_output_bytes(self) -> int:
        """Sum of the outputs of the innermost called modules (what torchinfo calls the pass size, / 2)."""
        return sum(r.output_bytes for r in self.rows if r.called and r.leaf)

    # -- rows as shown ------------------------------------------------------------------------

    def visible_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if r.depth <= self.depth]

    def _cells(self, row: LayerRow) -> list[str]:
        folded = row.depth == self.depth  # rows below it are hidden: it shows their sums
        params = row.params_inclusive if folded else row.params
        trainable = row.trainable_params_inclusive if folded else row.trainable_params
        param_bytes = row.param_bytes_inclusive if folded else row.param_bytes
        flops = row.flops_inclusive if folded else row.flops
        if row.call > 1 and row.shared_params:
            param_text = "(reused)"
        elif params == 0 and row.shared_params:
            param_text = "(tied)"
        else:
            param_text = f"{params:,}" if params else "--"
        if not row.called:
            # the modules inside a torch.jit.script module run in TorchScript, which calls no hooks
            shape_text = "(in TorchScript)" if row.type == "RecursiveScriptModule" else "(not called)"
        else:
            shape_text = ", ".join("[" + ", ".join(str(d) for d in s) + "]" for s in row.output_shapes) or "--"
        train_text = (
            "--" if params == 0 else "yes" if trainable == params else "frozen" if trainable == 0 else "partial"
        )
        return [
            shape_text,
            param_text,
            format_bytes(param_bytes) if param_bytes else "--",
            format_bytes(row.output_bytes) if row.called else "--",
            f"{flops // 2:,}" if flops else "--",
            train_text,
        ]

    def _names(self) -> list[str]:
        """The first column: the call tree, each name relative to its parent where it can be."""
        rows = self.visible_rows()
        index_of = {id(r): i for i, r in enumerate(self.rows)}
        last_child: dict[int | None, int] = {}
        for r in rows:
            last_child[r.parent] = index_of[id(r)]
        out = []
        for r in rows:
            if r.parent is None:
                out.append(r.type)
                continue
            prefix = ""
            ancestor = self.rows[r.parent]
            while ancestor.parent is not None:
                is_last = last_child.get(ancestor.parent) == index_of[id(ancestor)]
                prefix = ("  " if is_last else "│ ") + prefix
                ancestor = self.rows[ancestor.parent]
            branch = "└─" if last_child.get(r.parent) == index_of[id(r)] else "├─"
            parent_name = self.rows[r.parent].name
            short = r.name[len(parent_name) + 1 :] if parent_name and r.name.startswith(parent_name + ".") else r.name
            out.append(f"{prefix}{branch}{short} ({r.type})")
        return out

    _HEADERS = ("Layer (type)", "Output shape", "Param #", "Param bytes", "Output bytes", "Mult-adds", "Trainable")

    def _header_line(self) -> str:
        shapes = ", ".join(f"{_fmt_shape(s)} {d}" for s, d in self.inputs)
        classes = f", {self.num_classes:,} classes" if self.num_classes is not None else ""
        return (
            f"{self.model}: input {shapes}{classes}, batch size {self.batch_size}, {self.module_mode} mode, depth {self.depth}"
        )

    def _totals_lines(self) -> list[str]:
        def sized(n: int) -> str:
            return f"{format_bytes(n)} ({n:,} B)" if n >= 1024 else f"{n:,} B"

        return [
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            f"Total mult-adds: {self.total_mult_adds:,} (= FLOPs / 2, ops counted as run)",
            f"Params size: {sized(self.param_bytes)}",
            f"Buffers size: {sized(self.buffer_bytes)}",
            f"Input size: {sized(self.input_bytes)}",
            f"Leaf outputs size: {sized(self.leaf_output_bytes)} (one forward; not the training memory: "
            "see batchfit estimate)",
            f"Units: {_UNITS_NOTE}",
        ]

    def table(self) -> Table:
        """The default layout: the call tree's rows, framed (``=`` rules) with the totals below."""
        rows: list[list[Cell]] = []
        styles: list[str | None] = []
        for name, row in zip(self._names(), self.visible_rows(), strict=True):
            cells: list[Cell] = [name, *self._cells(row)]
            if cells[-1] == "frozen":
                cells[-1] = Styled("frozen", "cyan")
            rows.append(cells)
            styles.append("dim" if not row.called or row.call > 1 else None)
        return Table(
            self._header_line(),
            self._HEADERS,
            rows,
            right=[i not in (0, 1, 6) for i in range(len(self._HEADERS))],
            footer=self._totals_lines(),
            styles=styles,
            no_wrap=(0,),
            rule="=",
        )

    def sections(self) -> list[Section]:
        if self.style == "classic" and self.classic is not None:
            return [Text(str(self.classic))]
        return [self.table()]

    def to_text(self) -> str:
        """The chosen layout as plain, fixed-width text (no terminal needed)."""
        return str(self)

    def _repr_html_(self) -> str:
        from ._html import fragment, summary_html

        return fragment(summary_html(self))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see docs/summary.md for the schema)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "style": self.style,
            "batch_size": self.batch_size,
            "module_mode": self.module_mode,
            "inputs": [{"shape": list(s), "dtype": d} for s, d in self.inputs],
            "num_classes": self.num_classes,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "total_mult_adds": self.total_mult_adds,
            "total_flops": self.total_flops,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "input_bytes": self.input_bytes,
            "leaf_output_bytes": self.leaf_output_bytes,
            "layers": [r.to_dict() for r in self.rows],
        }
        if self.classic is not None:
            out["classic"] = self.classic.to_dict()
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_options(
    style: str, module_mode: str | None, depth: int = 0, batch_size: int | None = None
) -> ModuleMode:
    """Validate the options before any model is built; returns the module mode the forward runs in.

    >>> check_options("classic", None)
    'same'
    """
    if style not in _DEFAULT_MODULE_MODE:
        raise BatchfitError(
            tr("unknown style {style!r}", style=style), hint=tr("use {names}", names=' or '.join(f'`style={s!r}`' for s in _DEFAULT_MODULE_MODE))
        )
    module_mode = module_mode or _DEFAULT_MODULE_MODE[style]
    if module_mode not in _MODULE_MODES:
        raise BatchfitError(
            tr("unknown module mode {module_mode!r}", module_mode=module_mode),
            hint=tr("use {names}", names=', '.join(f'`module_mode={m!r}`' for m in _MODULE_MODES)),
        )
    if depth < 0:
        raise BatchfitError(tr("`depth` must be 0 or more, got {depth}", depth=depth), hint=tr("e.g. `depth=3`"))
    if batch_size is not None and batch_size < 1:
        raise BatchfitError(tr("`batch_size` must be at least 1, got {batch_size}", batch_size=batch_size), hint=tr("e.g. `batch_size=64`"))
    return module_mode  # type: ignore[return-value]


def summary(
    model: str | nn.Module | Workload,
    input_size: InputSize = None,
    *,
    dataset: str | None = None,
    batch_size: int | None = None,
    depth: int = 3,
    style: Style = "default",
    module_mode: ModuleMode | None = None,
    num_classes: int | None = None,
    input_data: Any = None,
    **model_kwargs: Any,
) -> ModelSummary:
    """Summarise a model: a registry name (``"resnet18"``), your own ``nn.Module``, or a :class:`Workload`.

    ``input_size`` is one sample's shape without the batch dimension (a list of shapes for several
    inputs); ``dataset`` a preset that gives it. ``input_data`` instead passes example inputs
    (a tensor, a tuple of positional inputs, or a dict of keyword inputs; only shapes and dtypes
    are used). ``batch_size`` is the batch the default style shows (default 1); in the classic
    style it is what torchsummary's own ``batch_size`` argument does (default -1). ``module_mode``
    is the train/eval mode the modules run the forward in: ``eval`` (default style), ``train``, or
    ``same`` (the model's own, the classic default). Your model is never changed.

    >>> s = summary(nn.Sequential(nn.Linear(4, 3)), input_size=(4,), batch_size=8)
    >>> s.rows[1].output_shapes, s.total_mult_adds
    ([(8, 3)], 96)
    """
    if "mode" in model_kwargs:  # else it would reach the model's constructor, or be ignored
        raise BatchfitError(
            tr("summary() calls the modules' train/eval mode `module_mode` (`mode` is estimate's train/inference)"),
            hint=tr("use `module_mode='eval'`, 'train' or 'same'"),
        )
    module_mode = check_options(style, module_mode, depth, batch_size)
    workload = load_workload(model, input_size, dataset=dataset, num_classes=num_classes, **model_kwargs)
    if input_data is None and not workload.inputs and workload.example_inputs is None:
        raise BatchfitError(
            tr("no input shape for model {name!r}", name=workload.name),
            hint=tr("give one sample's shape (`input_size=(3, 224, 224)`) or a `dataset`"),
        )
    shown_batch = batch_size or 1
    recorder, inputs = _record(workload, shown_batch, module_mode, count_flops=True, input_data=input_data)
    rows = _build_rows(recorder)
    params = dict(workload.model.named_parameters())
    buffers = dict(workload.model.named_buffers())
    input_bytes = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in inputs)
    result = ModelSummary(
        model=workload.name,
        style=style,
        batch_size=inputs[0][0][0] if input_data is not None and inputs and inputs[0][0] else shown_batch,
        module_mode=module_mode,
        depth=depth,
        inputs=[(s, _dtype_name(d)) for s, d in inputs],
        rows=rows,
        total_params=sum(p.numel() for p in params.values()),
        trainable_params=sum(p.numel() for p in params.values() if p.requires_grad),
        total_flops=recorder.calls[0].flops_after - recorder.calls[0].flops_before if recorder.calls else 0,
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers.values()),
        input_bytes=input_bytes,
        num_classes=workload.num_classes,
    )
    if style == "classic":
        result.classic = _classic(workload, module_mode, batch_size, input_data)
    return result


__all__ = ["SCHEMA_VERSION", "ClassicRow", "ClassicSummary", "LayerRow", "ModelSummary", "check_options", "summary"]
