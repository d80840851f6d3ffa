"""Real values beside the fake trace, for models whose Python code reads tensor values.

Fake tensors have no data, so ``.item()``, ``if (mask == 0).all():`` or ``x[mask]`` (an output
shape that depends on values) cannot run on them: the fake mode raises
``DataDependentOutputException`` / ``DynamicOutputShapeException``. Such reads are nearly always
about the batch's integer and boolean tensors (token ids, attention masks, lengths) and the
constants the code makes, not about parameters. So the tracer keeps, beside each fake tensor whose
value can be known cheaply, a real CPU tensor with that value, and computes it op by op:

- seeds: tensors made from nothing but Python numbers (``torch.full``, ``arange``, ``zeros``, a
  ``torch.tensor`` constant), and integer or boolean tensors filled in place (``zero_``,
  ``fill_``, ``copy_``: how the batch's ids and masks are made);
- an op gets a real result when every tensor it reads has one, computed on the CPU (a CUDA
  device argument becomes the CPU);
- anything that reads a parameter, an activation or a floating input (noise) gets none, so no real
  memory proportional to the model is spent; an in-place write that cannot be computed drops the
  written tensor's value (and its views').

The memory accounting stays on the fake side: real tensors made here are invisible to the tracer
(they are made under ``no_dispatch``). A value read (``.item()``) or a value-dependent op is then
answered from the real tensor, and the trace notes which ops were; a read of a value that is not
known still raises, and the estimate falls back to real runs as before.
PyTorch's own ``FakeTensorMode(propagate_real_tensors=True)`` (torch/_subclasses/fake_tensor.py,
``FakeTensorMode._dispatch_impl``) runs every op for real once the inputs have real values,
parameters included, and needs a ``ShapeEnv`` with unbacked symbols for ``.item()``
(torch/_subclasses/fake_impls.py, ``local_scalar_dense``): a real training step's memory, which is
what this module avoids.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._mode_utils import no_dispatch
from torch.utils._pytree import tree_leaves, tree_map

from ._step import cpu_threads

_ATTR = "_batchfit_value"
# The largest tensor given a real value: 2^24 elements (128 MiB as int64), far above the masks,
# ids and lengths models read (batch x tokens), far below a batch of activations. A read of a
# larger tensor's value stops the trace as before (exit 6, or real runs where the device exists).
MAX_VALUE_ELEMENTS = 1 << 24
_OVERWRITES = frozenset(("aten.fill_", "aten.zero_", "aten.copy_"))
# ops that take a list of indices, where a boolean mask stands for its nonzero() positions
_INDEXING = frozenset(
    (
        torch.ops.aten.index.Tensor,
        torch.ops.aten.index_put.default,
        torch.ops.aten.index_put_.default,
        torch.ops.aten._index_put_impl_.default,
    )
)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.device) and x.type != "cpu":
        return torch.device("cpu")
    return x


class Values:
    """Real CPU values of the fake tensors that have cheap ones (see the module docstring)."""

    def __init__(self, track: Callable[[torch.Tensor], None]) -> None:
        self.track = track  # the tracer's: tensors made here are births like any op's outputs
        self.answered: list[str] = []  # ops answered from real values, in order, without repeats
        self._writes: dict[Any, tuple[tuple[int, str], ...]] = {}  # op -> (position, name) of written args
        # real storages overwritten by a write we could not follow, by address (kept alive here so
        # that the address is not reused): every view of them has lost its value
        self._dead: dict[int, Any] = {}

    # -- reading ----------------------------------------------------------------------------
    def value(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of fake tensor ``t``, or None where it is not known."""
        value = getattr(t, _ATTR, None)
        if value is None:
            if (
                not isinstance(t, FakeTensor)
                and type(t) is torch.Tensor  # not a subclass (a DTensor shard of a distributed trace)
                and t.device.type == "cpu"
                and (t.numel() == 0 or t.untyped_storage().nbytes() > 0)  # not a storage freed by resize_(0)
            ):
                # a literal on its way into the fake mode (``torch.tensor([-1, 0])`` reaches
                # ``aten.lift_fresh`` as a real tensor): transformers 4.4x's padding check,
                # ``pad_token_id in input_ids[:, [-1, 0]]`` (modeling_utils.py,
                # ``warn_if_padding_and_no_attention_mask``), indexes with one
                return t
            return getattr(t, "constant", None)  # a FakeTensor's small torch.tensor(...) constant
        if self._dead and value.untyped_storage().data_ptr() in self._dead:
            return None
        return value  # type: ignore[no-any-return]

    def _real(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        """``args`` and ``kwargs`` with every tensor replaced by its real value (None if one is unknown)."""
        missing = False

        def real(x: Any) -> Any:
            nonlocal missing
            if isinstance(x, torch.Tensor):
                value = self.value(x)
                if value is None:
                    missing = True
                return value
            return _to_cpu(x)

        out = tree_map(real, (args, kwargs))
        return None if missing else out

    def _note(self, func: Any) -> None:
        name = ".item()" if func is torch.ops.aten._local_scalar_dense.default else str(func.overloadpacket)
        if name not in self.answered:
            self.answered.append(name)

    # -- answering what the fake mode cannot ------------------------------------------------
    def item(self, t: torch.Tensor) -> Any | None:
        """``t.item()`` from the real value; None where the value is not known."""
        value = self.value(t)
        if value is None:
            return None
        self._note(torch.ops.aten._local_scalar_dense.default)
        with no_dispatch():
            return value.item()

    def answer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a value-dependent op (``nonzero``, ``unique``, ...) for real and return fake outputs
        of the real outputs' shapes, carrying their values; None if an input is unknown.

        Indexing with a boolean mask needs only the mask's value: the mask becomes its
        ``nonzero()`` positions, as the real kernels do (aten/src/ATen/native/IndexingUtils.h,
        ``expandTensors``: one ``(n, mask.dim())`` int64 tensor, born and dead around the op),
        and the op runs on the fake tensors with those.
        """
        if func in _INDEXING:
            return self._index_with_masks(func, args, kwargs)
        real = self._real(args, kwargs)
        if real is None:
            return None
        with no_dispatch(), torch.no_grad():
            real_out = func(*real[0], **real[1])
        device = next(t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        self._note(func)
        return tree_map(lambda r: self._fake(r, device), real_out)

    def _fake(self, r: Any, device: torch.device) -> Any:
        """A fake tensor (made by the fake mode, tracked) of real tensor ``r``'s layout, carrying it."""
        if not isinstance(r, torch.Tensor):
            return r
        t = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=device)
        self.track(t)
        setattr(t, _ATTR, r)
        return t

    def _index_with_masks(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        indices: list[Any] = []
        for index in args[1]:
            if index is None or index.dtype not in (torch.bool, torch.uint8):
                indices.append(index)
                continue
            value = self.value(index)
            if value is None:
                return None
            with no_dispatch():
                positions = value.nonzero()
            fake = self._fake(positions, index.device)
            for dim in range(positions.shape[1]):
                column = torch.ops.aten.select.int(fake, 1, dim)
                with no_dispatch():
                    setattr(column, _ATTR, positions[:, dim])
                indices.append(column)
        self._note(func)
        return func(args[0], indices, *args[2:], **kwargs)

    # -- following every op -----------------------------------------------------------------
    def follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Give ``out`` real values when every tensor ``func`` read has one (called after each op)."""
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and self.value(first) is None and not self._written(func):
            return  # the common case, decided at the first argument
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors.extend(b for b in a if isinstance(b, torch.Tensor))
        tensors.extend(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        writes = self._written(func)
        if not tensors and "empty" in func.overloadpacket.__name__:
            return  # uninitialised: no value (parameters are made this way)
        if any(self.value(t) is None for t in tensors) and not (writes and self._seed(func, args, tensors)):
            self._forget(writes, args, kwargs)
            return
        fakes = [out] if isinstance(out, torch.Tensor) else tree_leaves(out)
        noise = torch.Tag.nondeterministic_seeded in func.tags
        if any(isinstance(f, torch.Tensor) and f.numel() > (1 if noise else MAX_VALUE_ELEMENTS) for f in fakes):
            # a tensor of noise (rand inputs, uniform_, dropout's mask) is never a value a model
            # decides on, but a single draw is (OPT's LayerDrop, modeling_opt.py OPTDecoder.forward:
            # `dropout_probability = torch.rand([])`, `if dropout_probability < self.layerdrop`);
            # and a value as large as a whole batch of activations would cost its real memory
            self._forget(writes, args, kwargs)
            return
        real = self._real(args, kwargs)
        if real is None:
            self._forget(writes, args, kwargs)
            return
        try:
            # one thread: values are small, and a forked tracer (fit) must not enter the OpenMP
            # pool its parent started (a forked child's parallel region waits forever); a draw
            # uses the CPU generator, whose state the trace restores when it ends (_trace.trace_step)
            with no_dispatch(), torch.no_grad(), cpu_threads(1):
                real_out = func(*real[0], **real[1])
        except Exception:  # a value we cannot compute is a value we do not know
            self._forget(writes, args, kwargs)
            return
        reals = [real_out] if isinstance(real_out, torch.Tensor) else tree_leaves(real_out)
        if len(fakes) != len(reals):
            return
        for f, r in zip(fakes, reals):
            if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and f.shape == r.shape:
                setattr(f, _ATTR, r)

    def _seed(self, func: Any, args: tuple[Any, ...], tensors: list[torch.Tensor]) -> bool:
        """An integer/boolean tensor overwritten whole in place from known values gets a value."""
        target = args[0] if args else None
        if str(func.overloadpacket) not in _OVERWRITES or not isinstance(target, torch.Tensor):
            return False
        if target.is_floating_point() or target.is_complex() or target.numel() > MAX_VALUE_ELEMENTS:
            return False
        if any(self.value(t) is None for t in tensors if t is not target):
            return False
        with no_dispatch():
            setattr(target, _ATTR, torch.empty_strided(target.shape, target.stride(), dtype=target.dtype))
        return True

    def _written(self, func: Any) -> tuple[tuple[int, str], ...]:
        writes = self._writes.get(func)
        if writes is None:
            writes = tuple(
                (i, a.name)
                for i, a in enumerate(func._schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write
            )
            self._writes[func] = writes
        return writes

    def _forget(self, writes: tuple[tuple[int, str], ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A write we could not follow: the written tensor's value (and its views') is unknown now."""
        for i, name in writes:
            t = args[i] if i < len(args) else kwargs.get(name)
            value = getattr(t, _ATTR, None) if isinstance(t, torch.Tensor) else None
            if value is not None:
                # views of ``t`` were computed from this value and share its real storage
                storage = value.untyped_storage()
                self._dead[storage.data_ptr()] = storage


@contextlib.contextmanager
def real_tensor_paths() -> Iterator[None]:
    """Let libraries that treat a fake tensor as a sign of tracing take their real-tensor path.

    transformers (5.x) reads ``is_tracing(tensor)`` (transformers/utils/import_utils.py,
    ``is_tracing``), which is true for any ``FakeTensor`` (``is_fake_tensor``): its mask code then
    keeps attention masks that a real run skips after reading the padding mask's values
    (transformers/masking_utils.py, ``_ignore_causal_mask_sdpa``, ``_ignore_bidirectional_mask_sdpa``,
    ``find_packed_sequence_indices``, ``_preprocess_mask_arguments``), and its padding check is
    skipped (modeling_utils.py, ``warn_if_padding_and_no_attention_mask``). A batchfit trace is not
    a compile or an export: for its duration ``is_fake_tensor`` answers False, and the values those
    paths read come from :class:`Values`. Restored afterwards; nothing is done where transformers is
    not imported (a model that uses it has imported it by now).
    """
    module = sys.modules.get("transformers.utils.import_utils")
    original = getattr(module, "is_fake_tensor", None)
    if module is None or original is None:
        yield
        return
    module.is_fake_tensor = _never  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.is_fake_tensor = original  # type: ignore[attr-defined]


def _never(x: object) -> bool:
    return False
