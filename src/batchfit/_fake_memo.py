"""The fake mode's own cached answer for an op, reached without its costly cache key.

``FakeTensorMode`` caches each op's output metadata under a key made from the op and every
argument's ``TensorMetadata`` (torch/_subclasses/fake_tensor.py, ``FakeTensorMode._cache_key``,
``_prep_args_for_hash``, ``extract_tensor_metadata``). Building that key, and the trip through
the dispatcher and the mode's wrappers to get there, cost about 160 us of the 190 us a cached
``mm`` takes (measured here, torch 2.14.1); the answer itself (``_output_from_cache_entry``) about
30 us. A traced step of an 8B model runs some 40,000 such ops.

:func:`fake_dispatch` keeps a memo from a cheap key to the fake mode's own key and cache entry. The cheap
key holds every field the fake mode's key holds (the op; the default dtype and device; inference
mode; per tensor: dtype, shape, strides, storage offset and bytes, device, layout, requires_grad,
quantized/conj/neg/inference flags; per other argument its type and value), so two calls with the
same cheap key have the same fake-mode key and get the entry the fake mode would look up; the
output is then made by the fake mode's own ``_output_from_cache_entry``, as its cache hit makes
it. A call is memoised only when it was seen to reach that entry directly (the entry was created
by the call, or the call was exactly one cache hit), and only in the plain setting the tracer
runs in: one fake mode, no other dispatch mode, no shape environment, plain fake tensors and
plain Python values as arguments. Anything else goes the usual way, as do torch versions whose
fake mode lacks these internals (checked at import).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

try:
    from torch._subclasses._fake_tensor_utils import _CacheKeyState
    from torch._subclasses.fake_tensor import (
        FakeTensor,
        FakeTensorMode,
        _BypassDispatchCache,
        _DispatchCacheValidEntry,
    )

    _AVAILABLE = all(
        hasattr(FakeTensorMode, name)
        for name in ("_cache_key", "_output_from_cache_entry", "cache", "cache_hits", "cache_misses")
    )
except ImportError:  # another torch: the usual dispatch only
    _AVAILABLE = False

# _output_from_cache_entry's parameters: (state, entry, key, func, args) in torch 2.11-2.14, (state, entry,
# key, args) in 2.15 (the op is read from the key); any other layout: the usual dispatch only
_PASSES_FUNC = False
if _AVAILABLE:
    _params = list(inspect.signature(FakeTensorMode._output_from_cache_entry).parameters)
    _PASSES_FUNC = _params == ["self", "state", "entry", "key", "func", "args"]
    _AVAILABLE = _PASSES_FUNC or _params == ["self", "state", "entry", "key", "args"]

_FAKE_KEY = torch._C._TorchDispatchModeKey.FAKE
_LAYOUT: Any = torch._C.TensorBase.layout.__get__  # type: ignore[attr-defined]  # the C value, not FakeTensor's property
# argument types whose (type, value) pair is what the fake mode's key holds for them
_PLAIN = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout))
_UNKNOWN = object()  # an argument the cheap key does not cover

# cheap key -> (the fake mode's key, its cache entry), or None: this call goes the usual way
_memo: dict[tuple[Any, ...], tuple[Any, Any] | None] = {}
answered = 0  # ops answered from the memo (tests check that the memo was used)


def _arg_key(arg: Any, mode: list[Any]) -> Any:
    kind = type(arg)
    if kind is FakeTensor:
        if arg.constant is not None or _LAYOUT(arg) is not torch.strided:
            return _UNKNOWN
        if mode[0] is None:
            mode[0] = arg.fake_mode
        elif arg.fake_mode is not mode[0]:
            return _UNKNOWN
        return (
            arg.dtype,
            tuple(arg.shape),
            arg.stride(),
            arg.storage_offset(),
            arg.untyped_storage().nbytes(),
            arg.fake_device,
            arg.requires_grad,
            arg.is_quantized,
            arg.is_conj(),
            arg.is_neg(),
            arg.is_inference(),
        )
    if kind in _PLAIN:
        return (kind, arg)
    if kind is list or kind is tuple:
        parts = []
        for a in arg:
            k = _arg_key(a, mode)
            if k is _UNKNOWN:
                return _UNKNOWN
            parts.append(k)
        return (kind, tuple(parts))
    return _UNKNOWN


def _cheap_key(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...] | None, Any]:
    mode: list[Any] = [None]
    parts: list[Any] = [func]
    for a in args:
        k = _arg_key(a, mode)
        if k is _UNKNOWN:
            return None, None
        parts.append(k)
    for name, a in kwargs.items():
        k = _arg_key(a, mode)
        if k is _UNKNOWN:
            return None, None
        parts.append((name, k))
    fake = mode[0]
    if (
        fake is None
        or fake.shape_env is not None
        or not fake.cache_enabled
        or fake.cache_crosscheck_enabled
        or fake.in_kernel_invocation
        or torch._C._len_torch_dispatch_stack() != 1
        or torch._C._get_dispatch_mode(_FAKE_KEY) is not fake
    ):
        return None, None
    parts.append(torch.get_default_dtype())
    parts.append(torch._C._get_default_device())
    parts.append(torch.is_inference_mode_enabled())
    return tuple(parts), fake


def fake_dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` under the fake mode, answered from its cache entry when memoised.

    Called from a dispatch mode's ``__torch_dispatch__`` entered right above the fake mode.
    """
    if not _AVAILABLE:
        return func(*args, **kwargs)
    cheap, fake = _cheap_key(func, args, kwargs)
    if cheap is None:
        return func(*args, **kwargs)
    try:
        found = _memo[cheap]
    except KeyError:
        pass
    except TypeError:  # an unhashable value among the arguments
        return func(*args, **kwargs)
    else:
        if found is None:
            return func(*args, **kwargs)
        global answered
        answered += 1
        key, entry = found
        if _PASSES_FUNC:
            return fake._output_from_cache_entry(_CacheKeyState(None), entry, key, func, args)
        return fake._output_from_cache_entry(_CacheKeyState(None), entry, key, args)
    # first sight: the fake mode's key, taken before the op runs (an in-place op changes its arguments)
    try:
        key = fake._cache_key(_CacheKeyState(None), func, args, kwargs)
    except _BypassDispatchCache:
        key = None
    cache = FakeTensorMode.cache
    before = cache.get(key) if key is not None else None
    hits, misses = FakeTensorMode.cache_hits, FakeTensorMode.cache_misses
    out = func(*args, **kwargs)
    after = cache.get(key) if key is not None else None
    direct = isinstance(after, _DispatchCacheValidEntry) and (
        (before is None and FakeTensorMode.cache_misses > misses)
        or (before is after and FakeTensorMode.cache_hits == hits + 1 and FakeTensorMode.cache_misses == misses)
    )
    _memo[cheap] = (key, after) if direct else None
    return out
