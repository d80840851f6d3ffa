"""A model of PyTorch's CUDA caching allocator that replays an event timeline.

The tracer records every storage's birth and death (:mod:`batchfit._events`); this module replays
that list through the rules of ``c10/cuda/CUDACachingAllocator.cpp`` and reports what
``torch.cuda.max_memory_allocated()`` and ``torch.cuda.max_memory_reserved()`` would say.
Each rule below names the function of the C++ source it follows; docs/allocator.md lists them.

>>> from batchfit._events import Event
>>> events = [
...     Event(0, "alloc", 1, 3_000_000, "activations", "", "forward", 1),  # 2.86 MiB -> 20 MiB segment
...     Event(1, "alloc", 2, 100, "temporaries", "", "forward", 1),  # 100 B -> 512 B in a 2 MiB segment
...     Event(2, "free", 2, 100, "temporaries", "", "forward", 1),
... ]
>>> result = simulate(events)
>>> result.peak_allocated_bytes, result.peak_reserved_bytes
(3000832, 23068672)
>>> AllocatorConfig.parse("max_split_size_mb:128,expandable_segments:True").max_split_size_bytes
134217728
"""

from __future__ import annotations

import difflib
import os
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from ._errors import BatchfitError, ExitCode
from ._events import CATEGORIES, Event
from ._i18n import tr
from ._render import Cell, Rendered, Styled, Table
from ._units import format_bytes

SCHEMA_VERSION = 1

# Constants of CUDACachingAllocator.cpp (same names, snake case).
K_MIN_BLOCK_SIZE = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1_048_576  # largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2_097_152  # "small" allocations are packed in 2 MiB blocks
K_MIN_LARGE_ALLOC = 10_485_760  # allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2_097_152  # round up large allocations to 2 MiB
K_LARGE_BUFFER = 20_971_520  # "large" allocations may be packed in 20 MiB blocks

_MB = 1024 * 1024
# roundup_power2_divisions has one entry per power-of-two interval from 1 MiB to 64 GiB
# (AllocatorConfig.cpp: kRoundUpPowerOfTwoIntervals, kRoundUpPowerOfTwoStart/End).
_ROUNDUP_INTERVALS = 16
_ROUNDUP_START_LOG2 = 20
# "unlimited" max_split_size (std::numeric_limits<size_t>::max() in the source)
_UNLIMITED = 1 << 64
# Blocks are kept in sorted lists keyed by one int, (size << _ADDR_BITS) | address, so the
# best-fit search (smallest size, then lowest address: BlockComparatorSize) is one bisect.
_ADDR_BITS = 52
# Virtual address space of an expandable segment when no device limit is known (the source
# reserves 1 1/8 of the card's memory; only its being large matters to the rules).
_DEFAULT_EXPANDABLE_SPAN = 1 << 44

Environ = Mapping[str, str]


# --------------------------------------------------------------------------------------------
# Settings: PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF
# --------------------------------------------------------------------------------------------


def _config_error(text: str, problem: str) -> BatchfitError:
    return BatchfitError(
        tr("cannot read the allocator settings {text!r}: {problem}", text=text, problem=problem),
        hint=tr(
            "write them as PYTORCH_CUDA_ALLOC_CONF does, comma-separated key:value pairs, e.g. "
            "max_split_size_mb:128,expandable_segments:True (keys: {keys})",
            keys=", ".join(sorted(_PARSERS)),
        ),
    )


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _lex(text: str) -> list[str]:
    """Split like ``ConfigTokenizer``: ``, : [ ]`` are tokens of their own, whitespace is dropped."""
    tokens: list[str] = []
    buf: list[str] = []
    for ch in text:
        if ch in ",:[]":
            if buf:
                tokens.append("".join(buf))
                buf.clear()
            tokens.append(ch)
        elif not ch.isspace():
            buf.append(ch)
    if buf:
        tokens.append("".join(buf))
    return tokens


class _Tokens:
    """Index-checked access to the lexed settings, raising :class:`BatchfitError` like PyTorch's checks."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.items = _lex(text)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int, what: str) -> str:
        if i >= len(self.items):
            raise _config_error(self.text, tr("expected {what} at the end", what=what))
        return self.items[i]

    def expect(self, i: int, token: str) -> None:
        got = self.get(i, repr(token))
        if got != token:
            raise _config_error(self.text, tr("expected {token!r} but found {got!r}", token=token, got=got))

    def size_t(self, i: int, key: str) -> int:
        got = self.get(i, tr("a value for {key}", key=key))
        if not got.isdigit():
            raise _config_error(self.text, tr("{key} needs a non-negative integer, not {got!r}", key=key, got=got))
        return int(got)

    def double(self, i: int, key: str) -> float:
        got = self.get(i, tr("a value for {key}", key=key))
        try:
            return float(got)
        except ValueError:
            raise _config_error(self.text, tr("{key} needs a number, not {got!r}", key=key, got=got)) from None

    def boolean(self, i: int, key: str) -> bool:
        got = self.get(i, tr("True or False for {key}", key=key))
        if got not in ("True", "False"):
            raise _config_error(
                self.text, tr("{key} takes 'True' or 'False' (capitalised), not {got!r}", key=key, got=got)
            )
        return got == "True"


# Each parser reads ``key:value`` starting at the key's index, stores into ``out`` and returns the
# index of the value's last token (the parse loop then expects a ',').
_Parser = Callable[[_Tokens, int, dict[str, Any]], int]


def _parse_large_segment(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    tok.expect(i + 1, ":")
    value = tok.size_t(i + 2, "large_segment_size_mb")
    if value <= K_MIN_LARGE_ALLOC // _MB:
        raise _config_error(
            tok.text,
            tr("large_segment_size_mb must be > {k_min_large_alloc}", k_min_large_alloc=K_MIN_LARGE_ALLOC // _MB),
        )
    out["large_segment_size_bytes"] = value * _MB
    return i + 2


def _mb_at_least_segment(tok: _Tokens, i: int, out: dict[str, Any], key: str) -> int:
    tok.expect(i + 1, ":")
    value = tok.size_t(i + 2, key)
    floor_mb = out.get("large_segment_size_bytes", K_LARGE_BUFFER) // _MB
    if value < floor_mb:
        raise _config_error(tok.text, tr("{key} too small, must be >= {floor_mb}", key=key, floor_mb=floor_mb))
    return value * _MB


def _parse_max_split(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    out["max_split_size_bytes"] = _mb_at_least_segment(tok, i, out, "max_split_size_mb")
    return i + 2


def _parse_non_split_rounding(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    out["max_non_split_rounding_bytes"] = _mb_at_least_segment(tok, i, out, "max_non_split_rounding_mb")
    return i + 2


def _parse_gc_threshold(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    tok.expect(i + 1, ":")
    value = tok.double(i + 2, "garbage_collection_threshold")
    if not 0.0 < value < 1.0:
        raise _config_error(tok.text, tr("garbage_collection_threshold must be in (0.0, 1.0)"))
    out["garbage_collection_threshold"] = value
    return i + 2


def _parse_roundup(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    """``parseRoundUpPower2Divisions``: one power of two for all sizes, or ``[MB:div,...,>:div]``."""
    tok.expect(i + 1, ":")
    i += 2
    divisions = [0] * _ROUNDUP_INTERVALS
    if tok.get(i, tr("a value for {key}", key="roundup_power2_divisions")) != "[":
        value = tok.size_t(i, "roundup_power2_divisions")
        if not _is_pow2(value):
            raise _config_error(tok.text, tr("roundup_power2_divisions must be a power of 2"))
        out["roundup_power2_divisions"] = (value,) * _ROUNDUP_INTERVALS
        return i
    first, last_index = True, 0
    while True:
        i += 1
        boundary = tok.get(i, tr("']' closing {key}", key="roundup_power2_divisions"))
        if boundary == "]":
            break
        tok.expect(i + 1, ":")
        value = tok.size_t(i + 2, "roundup_power2_divisions")
        i += 2
        if value != 0 and not _is_pow2(value):
            raise _config_error(tok.text, tr("roundup divisions must be a power of 2, or 0 to disable rounding"))
        if boundary == ">":
            for j in range(last_index + 1, _ROUNDUP_INTERVALS):
                divisions[j] = value
        else:
            if not boundary.isdigit() or not _is_pow2(int(boundary)):
                raise _config_error(
                    tok.text, tr("roundup intervals must be powers of 2 (in MB), not {boundary!r}", boundary=boundary)
                )
            index = min(int(boundary).bit_length() - 1, _ROUNDUP_INTERVALS - 1)
            if first:  # the first entry also covers every smaller interval
                for j in range(index):
                    divisions[j] = value
                first = False
            divisions[index] = value
            last_index = index
        if tok.get(i + 1, tr("']' closing {key}", key="roundup_power2_divisions")) != "]":
            tok.expect(i + 1, ",")
            i += 1
    out["roundup_power2_divisions"] = tuple(divisions)
    return i


def _parse_bool(key: str, field_name: str | None) -> _Parser:
    def parse(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
        tok.expect(i + 1, ":")
        value = tok.boolean(i + 2, key)
        if field_name:
            out[field_name] = value
        return i + 2

    return parse


def _parse_backend(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
    tok.expect(i + 1, ":")
    value = tok.get(i + 2, tr("a value for {key}", key="backend"))
    if value not in ("native", "cudaMallocAsync"):
        raise _config_error(
            tok.text, tr("unknown allocator backend {value!r}; options are native and cudaMallocAsync", value=value)
        )
    out["backend"] = value
    return i + 2


def _parse_positive_pow2(key: str) -> _Parser:
    def parse(tok: _Tokens, i: int, out: dict[str, Any]) -> int:
        tok.expect(i + 1, ":")
        value = tok.size_t(i + 2, key)
        if key == "pinned_num_register_threads" and not _is_pow2(value):
            raise _config_error(tok.text, tr("{key} has to be a power of 2", key=key))
        if value == 0:
            raise _config_error(tok.text, tr("{key} has to be greater than 0", key=key))
        return i + 2

    return parse


# The keys PyTorch accepts (AcceleratorAllocatorConfig::parseArgs + CUDAAllocatorConfig::parseArgs).
# Keys about pinned host memory or locking are validated and ignored: they move no device memory.
_PARSERS: dict[str, _Parser] = {
    "large_segment_size_mb": _parse_large_segment,
    "max_split_size_mb": _parse_max_split,
    "max_non_split_rounding_mb": _parse_non_split_rounding,
    "garbage_collection_threshold": _parse_gc_threshold,
    "roundup_power2_divisions": _parse_roundup,
    "expandable_segments": _parse_bool("expandable_segments", "expandable_segments"),
    "backend": _parse_backend,
    "release_lock_on_cudamalloc": _parse_bool("release_lock_on_cudamalloc", None),
    "pinned_use_cuda_host_register": _parse_bool("pinned_use_cuda_host_register", None),
    "pinned_use_background_threads": _parse_bool("pinned_use_background_threads", None),
    "graph_capture_record_stream_reuse": _parse_bool("graph_capture_record_stream_reuse", None),
    "pinned_num_register_threads": _parse_positive_pow2("pinned_num_register_threads"),
    "pinned_reserve_segment_size_mb": _parse_positive_pow2("pinned_reserve_segment_size_mb"),
}


@dataclass(frozen=True)
class AllocatorConfig:
    """The caching allocator's settings (the keys of ``PYTORCH_CUDA_ALLOC_CONF``), in bytes.

    ``None`` for ``max_split_size_bytes`` means unlimited (PyTorch's default);
    ``max_non_split_rounding_bytes=None`` means "the large segment size" (its default).

    >>> cfg = AllocatorConfig.parse("roundup_power2_divisions:4")
    >>> cfg.round_size(1200), cfg.round_size(1_200_000)
    (1536, 1310720)
    >>> str(AllocatorConfig())
    'default'
    """

    max_split_size_bytes: int | None = None
    max_non_split_rounding_bytes: int | None = None
    large_segment_size_bytes: int = K_LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * _ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    backend: str = "native"
    source: str = field(default="", compare=False)  # the text it was parsed from, for messages

    def __post_init__(self) -> None:
        if len(self.roundup_power2_divisions) != _ROUNDUP_INTERVALS:
            raise BatchfitError(
                tr(
                    "roundup_power2_divisions needs {roundup_intervals} entries (1 MiB .. 64 GiB), not {n_roundup_power2_divisions}",
                    roundup_intervals=_ROUNDUP_INTERVALS,
                    n_roundup_power2_divisions=len(self.roundup_power2_divisions),
                ),
                hint=tr("use AllocatorConfig.parse('roundup_power2_divisions:4') or a 16-tuple"),
            )
        if self.max_split_size_bytes is not None and self.max_split_size_bytes < self.large_segment_size_bytes:
            raise BatchfitError(
                tr(
                    "max_split_size ({max_split_size_bytes}) is below the large segment size ({large_segment_size_bytes})",
                    max_split_size_bytes=format_bytes(self.max_split_size_bytes),
                    large_segment_size_bytes=format_bytes(self.large_segment_size_bytes),
                ),
                hint=tr("PyTorch requires max_split_size_mb >= 20 (or >= large_segment_size_mb)"),
            )

    # -- parsing ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> AllocatorConfig:
        """Read settings written as ``PYTORCH_CUDA_ALLOC_CONF`` is (same keys, same checks)."""
        tok = _Tokens(text)
        out: dict[str, Any] = {}
        # large_segment_size_mb is read first: the floors of the other two sizes depend on it
        # (AcceleratorAllocatorConfig::parseArgs does the same two passes).
        for i, item in enumerate(tok.items):
            if item == "large_segment_size_mb" and (i == 0 or tok.items[i - 1] == ","):
                _parse_large_segment(tok, i, out)
        i = 0
        while i < len(tok):
            key = tok.items[i]
            parser = _PARSERS.get(key)
            if parser is None:
                close = difflib.get_close_matches(key, list(_PARSERS), n=1)
                problem = (
                    tr("unrecognised key {key!r} (did you mean {close!r}?)", key=key, close=close[0])
                    if close
                    else tr("unrecognised key {key!r}", key=key)
                )
                raise _config_error(text, problem)
            i = parser(tok, i, out)
            if i + 1 < len(tok):
                tok.expect(i + 1, ",")
                i += 1
            i += 1
        return cls(source=text, **out)

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> AllocatorConfig:
        """The settings this process would use: ``PYTORCH_ALLOC_CONF``, else ``PYTORCH_CUDA_ALLOC_CONF``.

        >>> AllocatorConfig.from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}).expandable_segments
        True
        """
        env = os.environ if environ is None else environ
        for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
            text = env.get(name)
            if text is not None:
                return cls.parse(text)
        return cls()

    # -- the rules that depend on the settings ---------------------------------------------------

    @property
    def split_limit_bytes(self) -> int:
        """``max_split_size`` as an int (a huge value when unlimited)."""
        return _UNLIMITED if self.max_split_size_bytes is None else self.max_split_size_bytes

    @property
    def non_split_rounding_bytes(self) -> int:
        return (
            self.large_segment_size_bytes
            if self.max_non_split_rounding_bytes is None
            else self.max_non_split_rounding_bytes
        )

    def divisions_for(self, size: int) -> int:
        """``roundup_power2_divisions(size)``: the divisions of the power-of-two interval holding ``size``."""
        index = max(0, size.bit_length() - 1 - _ROUNDUP_START_LOG2)
        return self.roundup_power2_divisions[min(index, _ROUNDUP_INTERVALS - 1)]

    def round_size(self, nbytes: int) -> int:
        """The block size a request of ``nbytes`` gets (``round_size``): 512 B multiples, or power-of-2 divisions.

        >>> AllocatorConfig().round_size(1), AllocatorConfig().round_size(513)
        (512, 1024)
        """
        if nbytes < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        divisions = self.divisions_for(nbytes)
        if divisions > 1 and nbytes > K_MIN_BLOCK_SIZE * divisions:
            return _roundup_power2_next_division(nbytes, divisions)
        return -(-nbytes // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE

    def allocation_size(self, size: int) -> int:
        """The segment cudaMalloc'ed for a rounded request that no cached block serves (``get_allocation_size``)."""
        if size <= K_SMALL_SIZE:
            return K_SMALL_BUFFER
        if size < K_MIN_LARGE_ALLOC:
            return self.large_segment_size_bytes
        return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE

    # -- rendering ---------------------------------------------------------------------------

    def to_string(self) -> str:
        """The settings as a ``PYTORCH_CUDA_ALLOC_CONF`` string (empty for the defaults)."""
        parts: list[str] = []
        if self.large_segment_size_bytes != K_LARGE_BUFFER:
            parts.append(f"large_segment_size_mb:{self.large_segment_size_bytes // _MB}")
        if self.max_split_size_bytes is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size_bytes // _MB}")
        if self.max_non_split_rounding_bytes is not None:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_bytes // _MB}")
        if self.garbage_collection_threshold:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold}")
        if any(self.roundup_power2_divisions):
            divs = self.roundup_power2_divisions
            if len(set(divs)) == 1:
                parts.append(f"roundup_power2_divisions:{divs[0]}")
            else:
                listed = ",".join(f"{1 << i}:{d}" for i, d in enumerate(divs))
                parts.append(f"roundup_power2_divisions:[{listed}]")
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.backend != "native":
            parts.append(f"backend:{self.backend}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.to_string() or "default"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "conf": self.to_string(),
            "max_split_size_bytes": self.max_split_size_bytes,
            "max_non_split_rounding_bytes": self.non_split_rounding_bytes,
            "large_segment_size_bytes": self.large_segment_size_bytes,
            "roundup_power2_divisions": list(self.roundup_power2_divisions),
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "expandable_segments": self.expandable_segments,
            "backend": self.backend,
        }


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: 1200 with 4 divisions of [1024, 2048) -> 1280."""
    if _is_pow2(size):
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


# --------------------------------------------------------------------------------------------
# The allocator state
# --------------------------------------------------------------------------------------------


class _Segment:
    """An expandable segment: a large virtual range mapped page by page."""

    __slots__ = ("page", "ptr")

    def __init__(self, ptr: int, page: int) -> None:
        self.ptr = ptr
        self.page = page


class _Block:
    __slots__ = ("allocated", "gc_base", "key", "mapped", "next", "prev", "ptr", "seg", "size", "small")

    def __init__(self, ptr: int, size: int, small: bool, seg: _Segment | None = None, mapped: bool = True) -> None:
        self.ptr = ptr
        self.size = size
        self.small = small
        self.seg = seg
        self.mapped = mapped
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.gc_base = 0
        self.key = 0

    def splice(self, before: _Block | None, after: _Block | None) -> None:
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


class _Pool:
    """One ``BlockPool``: free mapped blocks sorted by (size, address), unmapped ones by address."""

    __slots__ = ("blocks", "gc_calls", "keys", "small", "unmapped", "unmapped_ptrs")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[int] = []
        self.blocks: dict[int, _Block] = {}
        self.unmapped_ptrs: list[int] = []
        self.unmapped: dict[int, _Block] = {}
        self.gc_calls = 0

    def insert(self, block: _Block) -> None:
        key = (block.size << _ADDR_BITS) | block.ptr
        block.key = key
        block.gc_base = self.gc_calls
        insort(self.keys, key)
        self.blocks[key] = block

    def remove(self, block: _Block) -> None:
        keys = self.keys
        del keys[bisect_left(keys, block.key)]
        del self.blocks[block.key]

    def insert_unmapped(self, block: _Block) -> None:
        insort(self.unmapped_ptrs, block.ptr)
        self.unmapped[block.ptr] = block

    def remove_unmapped(self, block: _Block) -> None:
        del self.unmapped_ptrs[bisect_left(self.unmapped_ptrs, block.ptr)]
        del self.unmapped[block.ptr]


class _Allocator:
    """``DeviceCachingAllocator`` for one device and one stream (a training step uses one)."""

    def __init__(self, config: AllocatorConfig, device_limit_bytes: int | None, allowed_bytes: int | None) -> None:
        self.cfg = config
        self.limit = device_limit_bytes
        self.allowed = allowed_bytes
        self.gc_on = allowed_bytes is not None and config.garbage_collection_threshold > 0.0
        self.plain_rounding = not any(config.roundup_power2_divisions)
        self.small = _Pool(small=True)
        self.large = _Pool(small=False)
        self.allocated = 0
        self.reserved = 0
        self.segments = 0
        self.peak_segments = 0
        self.num_device_alloc = 0
        self.num_device_free = 0
        self.num_alloc_retries = 0
        self.next_ptr = K_SMALL_BUFFER  # never 0: 0 is the null pointer
        span = _DEFAULT_EXPANDABLE_SPAN if device_limit_bytes is None else device_limit_bytes + device_limit_bytes // 8
        self.expandable_span = span

    # -- malloc ---------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> _Block | None:
        """``DeviceCachingAllocator::malloc``; ``None`` means CUDA out of memory."""
        cfg = self.cfg
        if self.plain_rounding:  # round_size without roundup_power2_divisions: 512 B multiples
            size = K_MIN_BLOCK_SIZE if nbytes < K_MIN_BLOCK_SIZE else (nbytes + 511) & ~511
        else:
            size = cfg.round_size(nbytes)
        pool = self.small if size <= K_SMALL_SIZE else self.large
        block = self.get_free_block(pool, size)
        if block is None:
            if self.gc_on:
                self.garbage_collect()
            alloc_size = cfg.allocation_size(size)
            block = self.alloc_block(pool, size, alloc_size, False)
            if block is None and self.release_available_cached_blocks(pool, size):
                block = self.alloc_block(pool, size, alloc_size, False)
            if block is None:
                self.release_cached_blocks()
                block = self.alloc_block(pool, size, alloc_size, True)
            if block is None:
                return None
        remaining = block.size - size
        # should_split: small pool / expandable: any remainder of >= 512 B; large pool: only
        # requests below max_split_size, and only when more than 1 MiB would remain.
        if pool.small or cfg.expandable_segments:
            split = remaining >= K_MIN_BLOCK_SIZE
        else:
            split = size < cfg.split_limit_bytes and remaining > K_SMALL_SIZE
        if split:  # alloc_found_block: the front becomes the allocation, the rest stays cached
            front = _Block(block.ptr, size, pool.small, block.seg)
            front.splice(block.prev, block)
            block.ptr += size
            block.size = remaining
            pool.insert(block)
            block = front
        block.allocated = True
        self.allocated += block.size
        return block

    def get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """Best fit: the smallest cached block that fits, lowest address first (``get_free_block``)."""
        if self.gc_on:
            pool.gc_calls += 1
        keys = pool.keys
        i = bisect_left(keys, size << _ADDR_BITS)
        if i == len(keys):
            return None
        blocks = pool.blocks
        block = blocks[keys[i]]
        if block.seg is not None:
            # A block that can grow into unmapped pages counts as that big for best fit, so a
            # later block that stays smaller is preferred.
            def expandable_size(b: _Block) -> int:
                nxt = b.next
                return b.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

            while block.seg is not None and i + 1 < len(keys):
                candidate = blocks[keys[i + 1]]
                if expandable_size(candidate) >= expandable_size(block):
                    break
                i += 1
                block = candidate
        limit = self.cfg.split_limit_bytes
        if size < limit and block.size >= limit:
            return None  # do not hand an oversize block to a smaller request
        if size >= limit and block.size >= size + self.cfg.non_split_rounding_bytes:
            return None  # an oversize request takes an oversize block only within the rounding limit
        del keys[i]
        del blocks[block.key]
        return block

    def alloc_block(self, pool: _Pool, size: int, alloc_size: int, is_retry: bool) -> _Block | None:
        """A new segment (``alloc_block``): cudaMalloc, or mapping pages of an expandable segment."""
        if is_retry:
            self.num_alloc_retries += 1
        if self.allowed is not None and self.reserved + alloc_size > self.allowed:
            return None
        if self.cfg.expandable_segments:
            return self.try_allocate_expandable_block(pool, size)
        if self.limit is not None and self.reserved + alloc_size > self.limit:
            return None
        block = _Block(self.take_address(alloc_size), alloc_size, pool.small)
        self.reserved += alloc_size
        self.segments += 1
        self.peak_segments = max(self.peak_segments, self.segments)
        self.num_device_alloc += 1
        return block

    def take_address(self, nbytes: int) -> int:
        ptr = self.next_ptr
        self.next_ptr += -(-nbytes // K_SMALL_BUFFER) * K_SMALL_BUFFER
        return ptr

    # -- free -------------------------------------------------------------------------------------

    def free(self, block: _Block) -> None:
        """``free`` + ``free_block``: the block goes back to its pool, merged with free neighbours."""
        block.allocated = False
        self.allocated -= block.size
        pool = self.small if block.small else self.large
        if block.prev is not None:
            self.try_merge(block, block.prev, pool)
        if block.next is not None:
            self.try_merge(block, block.next, pool)
        pool.insert(block)

    @staticmethod
    def try_merge(dst: _Block, src: _Block | None, pool: _Pool) -> int:
        """``try_merge_blocks``: ``dst`` (not in a pool list) swallows its free neighbour ``src``."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        if src.mapped:
            pool.remove(src)
        else:
            pool.remove_unmapped(src)
        dst.size += src.size
        return src.size

    # -- giving memory back ----------------------------------------------------------------------

    def release_block(self, block: _Block, pool: _Pool) -> None:
        """``release_block``: cudaFree a whole cached segment."""
        pool.remove(block)
        self.reserved -= block.size
        self.segments -= 1
        self.num_device_free += 1

    def release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """Free oversize cached blocks, just enough for the request (only with max_split_size set)."""
        limit = self.cfg.split_limit_bytes
        if limit == _UNLIMITED:
            return False
        target = max(size, limit)
        keys, blocks = pool.keys, pool.blocks
        i = bisect_left(keys, target << _ADDR_BITS)
        if i < len(keys):
            block = blocks[keys[i]]
            if block.prev is not None or block.next is not None:
                return False  # deviation: the source would cudaFree a split block's base; never seen
            self.release_block(block, pool)
            return True
        released = 0
        j = i - 1
        while released < target and j >= 0:
            block = blocks[keys[j]]
            if block.size < limit:
                break
            if block.prev is None and block.next is None:
                released += block.size
                self.release_block(block, pool)
            j -= 1
        return released >= target

    def release_cached_blocks(self) -> None:
        """``release_cached_blocks`` (``empty_cache``): free every unsplit cached segment, unmap free pages."""
        for pool in (self.large, self.small):
            to_unmap: list[_Block] = []
            for key in list(pool.keys):
                block = pool.blocks[key]
                if block.seg is not None:
                    to_unmap.append(block)
                elif block.prev is None and block.next is None:
                    self.release_block(block, pool)
            for block in to_unmap:
                self.unmap_block(block, pool)
                if not block.mapped and block.prev is None and block.next is None:
                    pool.remove_unmapped(block)  # release_expandable_segment
                    self.segments -= 1

    def garbage_collect(self) -> None:
        """``garbage_collect_cached_blocks``: free the oldest unused large segments above the threshold."""
        assert self.allowed is not None
        threshold = int(self.cfg.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self.large
        freeable = [b for b in (pool.blocks[k] for k in pool.keys) if b.prev is None and b.next is None]
        if not freeable:
            return
        total_age = sum(pool.gc_calls - b.gc_base for b in freeable)
        count = len(freeable)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for key in list(pool.keys):
                block = pool.blocks[key]
                if block.prev is None and block.next is None and pool.gc_calls - block.gc_base >= age_threshold:
                    freed = True
                    reclaimed += block.size
                    total_age -= pool.gc_calls - block.gc_base
                    count -= 1
                    self.release_block(block, pool)

    # -- expandable segments ---------------------------------------------------------------------

    def find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """The lowest address with ``size`` bytes of free or unmapped space (``find_expandable_block``)."""
        for ptr in pool.unmapped_ptrs:
            candidate = pool.unmapped[ptr]
            prev = candidate.prev
            if prev is not None and not prev.allocated:
                candidate = prev
            room = 0
            b: _Block | None = candidate
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return candidate
        page = K_SMALL_BUFFER if pool.small else self.cfg.large_segment_size_bytes
        span = -(-self.expandable_span // page) * page
        seg = _Segment(self.take_address(span), page)
        block = _Block(seg.ptr, span, pool.small, seg, mapped=False)
        pool.insert_unmapped(block)
        self.segments += 1
        self.peak_segments = max(self.peak_segments, self.segments)
        return block

    def map_block(self, block: _Block, size: int, pool: _Pool) -> bool:
        """``map_block``: back the first ``size`` bytes of an unmapped block with whole pages."""
        seg = block.seg
        assert seg is not None
        page = seg.page
        begin = (block.ptr - seg.ptr) // page
        end = -(-(block.ptr + size - seg.ptr) // page)
        mapped = (end - begin) * page
        if self.limit is not None and self.reserved + mapped > self.limit:
            return False
        pool.remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.ptr + mapped, block.size - mapped, pool.small, seg, mapped=False)
            rest.splice(block, block.next)
            pool.insert_unmapped(rest)
            block.size = mapped
        self.try_merge(block, block.prev, pool)
        self.try_merge(block, block.next, pool)
        pool.insert(block)
        self.reserved += mapped
        self.num_device_alloc += 1
        return True

    def try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        candidate = self.find_expandable_block(pool, size)
        if not candidate.mapped and not self.map_block(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None
            if not self.map_block(nxt, min(size - candidate.size, nxt.size), pool):
                return None
            candidate = nxt  # map_block merged the free candidate into nxt
        pool.remove(candidate)
        return candidate

    def unmap_block(self, block: _Block, pool: _Pool) -> None:
        """``unmap_block``: give the whole free pages inside a free block back to CUDA."""
        seg = block.seg
        assert seg is not None
        page = seg.page
        begin = -(-(block.ptr - seg.ptr) // page)
        end = (block.ptr + block.size - seg.ptr) // page
        if begin >= end:
            return
        pool.remove(block)
        start = seg.ptr + begin * page
        length = (end - begin) * page
        before = start - block.ptr
        after = block.size - before - length
        if before > 0:
            head = _Block(block.ptr, before, pool.small, seg)
            head.splice(block.prev, block)
            pool.insert(head)
        if after > 0:
            tail = _Block(start + length, after, pool.small, seg)
            tail.splice(block, block.next)
            pool.insert(tail)
        block.ptr, block.size, block.mapped = start, length, False
        self.try_merge(block, block.prev, pool)
        self.try_merge(block, block.next, pool)
        pool.insert_unmapped(block)
        self.reserved -= length
        self.num_device_free += 1


class AllocatorAction(NamedTuple):
    """One thing the allocator did, as ``torch.cuda.memory._record_memory_history()`` records it.

    ``action``: ``alloc``, ``free_requested``, ``free_completed`` (``size`` is the request, before
    rounding, as ``TraceEntry::ALLOC``/``FREE_*`` carry it in CUDACachingAllocator.cpp),
    ``segment_alloc``/``segment_free`` (cudaMalloc/cudaFree of a segment), ``segment_map``/
    ``segment_unmap`` (pages of an expandable segment), ``oom`` (``device_free``: what CUDA had
    left). ``event``: the index, in the replayed list, of the event that made the allocator act.
    """

    action: str
    addr: int
    size: int
    event: int
    device_free: int = 0


class BlockState(NamedTuple):
    """A block of a segment at the end of a replay; ``storage`` is ``None`` for a free block."""

    address: int
    size: int
    storage: int | None


class SegmentState(NamedTuple):
    """A segment (one contiguous mapped range for an expandable segment) and its blocks, by address."""

    address: int
    size: int
    small: bool
    expandable: bool
    blocks: list[BlockState]


@dataclass(frozen=True)
class AllocatorHistory:
    """Every action of a replay with its addresses, and the segments when the replay ended."""

    actions: list[AllocatorAction]
    segments: list[SegmentState]


class _RecordingAllocator(_Allocator):
    """The same allocator, also writing down what it does (only when a replay asks for its history,
    so the searches of ``fit``, which never do, run the plain class at full speed)."""

    def __init__(self, config: AllocatorConfig, device_limit_bytes: int | None, allowed_bytes: int | None) -> None:
        super().__init__(config, device_limit_bytes, allowed_bytes)
        self.actions: list[AllocatorAction] = []
        self.requested: dict[int, int] = {}  # address of an allocated block -> bytes requested
        self.now = 0

    def watch(self, events: Iterable[Event]) -> Iterable[Event]:
        for i, ev in enumerate(events):
            self.now = i
            yield ev

    def malloc(self, nbytes: int) -> _Block | None:
        block = super().malloc(nbytes)
        if block is None:
            limit = self.allowed if self.allowed is not None else self.limit
            free = max(0, limit - self.reserved) if limit is not None else 0
            self.actions.append(AllocatorAction("oom", 0, nbytes, self.now, free))
            return None
        self.requested[block.ptr] = nbytes
        self.actions.append(AllocatorAction("alloc", block.ptr, nbytes, self.now))
        return block

    def free(self, block: _Block) -> None:
        ptr, nbytes = block.ptr, self.requested.pop(block.ptr)
        self.actions.append(AllocatorAction("free_requested", ptr, nbytes, self.now))
        super().free(block)
        self.actions.append(AllocatorAction("free_completed", ptr, nbytes, self.now))

    def alloc_block(self, pool: _Pool, size: int, alloc_size: int, is_retry: bool) -> _Block | None:
        block = super().alloc_block(pool, size, alloc_size, is_retry)
        if block is not None and not self.cfg.expandable_segments:  # expandable: map_block records
            self.actions.append(AllocatorAction("segment_alloc", block.ptr, block.size, self.now))
        return block

    def release_block(self, block: _Block, pool: _Pool) -> None:
        self.actions.append(AllocatorAction("segment_free", block.ptr, block.size, self.now))
        super().release_block(block, pool)

    def map_block(self, block: _Block, size: int, pool: _Pool) -> bool:
        ptr, before = block.ptr, self.reserved  # unmapped blocks start on a page boundary
        ok = super().map_block(block, size, pool)
        if ok:
            self.actions.append(AllocatorAction("segment_map", ptr, self.reserved - before, self.now))
        return ok

    def unmap_block(self, block: _Block, pool: _Pool) -> None:
        before = self.reserved
        super().unmap_block(block, pool)
        if self.reserved < before:  # block now covers exactly the unmapped pages
            self.actions.append(AllocatorAction("segment_unmap", block.ptr, before - self.reserved, self.now))

    def segments_now(self, live: dict[int, _Block]) -> list[SegmentState]:
        """The segments as ``snapshot()`` lists them: one per cudaMalloc, or per mapped range of an
        expandable segment (``DeviceCachingAllocator::snapshot``)."""
        owner = {id(b): storage for storage, b in live.items()}
        blocks = [*live.values(), *(b for pool in (self.small, self.large) for b in pool.blocks.values())]
        heads = [b for b in blocks if b.prev is None or not b.prev.mapped]
        out = []
        for head in sorted(heads, key=lambda b: b.ptr):
            states: list[BlockState] = []
            b: _Block | None = head
            while b is not None and b.mapped:
                states.append(BlockState(b.ptr, b.size, owner.get(id(b)) if b.allocated else None))
                b = b.next
            out.append(SegmentState(head.ptr, sum(s.size for s in states), head.small, head.seg is not None, states))
        return out


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocatorSeries:
    """Allocated and reserved bytes after each event (for plots)."""

    seq: list[int]
    allocated_bytes: list[int]
    reserved_bytes: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes}


@dataclass(frozen=True)
class AllocatorResult(Rendered):
    """What the caching allocator's counters say after replaying a timeline.

    ``peak_allocated_bytes`` is ``torch.cuda.max_memory_allocated()`` (block sizes, i.e. requests
    rounded as the allocator rounds them); ``peak_reserved_bytes`` is ``max_memory_reserved()``.
    """

    peak_allocated_bytes: int
    peak_allocated_seq: int | None
    peak_reserved_bytes: int
    peak_reserved_seq: int | None
    allocated_by_category_bytes: dict[str, int]
    final_allocated_bytes: int
    final_reserved_bytes: int
    peak_segments: int
    num_device_alloc: int
    num_device_free: int
    num_alloc_retries: int
    num_events: int
    config: AllocatorConfig
    device_limit_bytes: int | None = None
    oom: bool = False
    oom_seq: int | None = None
    oom_request_bytes: int | None = None
    series: AllocatorSeries | None = None
    history: AllocatorHistory | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_allocated_seq": self.peak_allocated_seq,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "peak_reserved_seq": self.peak_reserved_seq,
            "allocated_by_category_bytes": dict(self.allocated_by_category_bytes),
            "final_allocated_bytes": self.final_allocated_bytes,
            "final_reserved_bytes": self.final_reserved_bytes,
            "peak_segments": self.peak_segments,
            "num_device_alloc": self.num_device_alloc,
            "num_device_free": self.num_device_free,
            "num_alloc_retries": self.num_alloc_retries,
            "num_events": self.num_events,
            "config": self.config.to_dict(),
            "device_limit_bytes": self.device_limit_bytes,
            "oom": self.oom,
            "oom_seq": self.oom_seq,
            "oom_request_bytes": self.oom_request_bytes,
        }
        if self.series is not None:
            out["series"] = self.series.to_dict()
        return out

    def table(self) -> Table:
        """The peaks (with the events they happen at), the live bytes by category at the allocated peak."""
        rows: list[list[Cell]] = [
            ["peak allocated", format_bytes(self.peak_allocated_bytes), str(self.peak_allocated_seq)],
            ["peak reserved", format_bytes(self.peak_reserved_bytes), str(self.peak_reserved_seq)],
        ]
        rows += [[f"  {name}", format_bytes(n), ""] for name, n in self.allocated_by_category_bytes.items() if n]
        footer = [f"segments: {self.peak_segments} at most, {self.num_device_alloc} device allocations"]
        if self.oom:
            rows.append(
                [Styled("OUT OF MEMORY", "bold red"), format_bytes(self.oom_request_bytes or 0), str(self.oom_seq)]
            )
            limit = format_bytes(self.device_limit_bytes or 0)
            footer.append(f"out of memory: the request at event {self.oom_seq} does not fit the device limit ({limit})")
        return Table(f"CUDA caching allocator ({self.config})", ["counter", "bytes", "at event"], rows, footer=footer)

    def sections(self) -> list[Table]:
        return [self.table()]


def simulate(
    events: Iterable[Event],
    config: AllocatorConfig | None = None,
    device_limit_bytes: int | None = None,
    *,
    allowed_bytes: int | None = None,
    record_series: bool = True,
    breakdown: bool = True,
    history: bool = False,
) -> AllocatorResult:
    """Replay ``events`` through the caching-allocator model.

    ``device_limit_bytes``: what cudaMalloc can get on the card (its memory less the CUDA context
    and other processes); past it the allocator frees its cache and retries, then reports OOM
    (the replay stops there). ``allowed_bytes``: the cap set by
    ``torch.cuda.set_per_process_memory_fraction`` (it also enables ``garbage_collection_threshold``).
    Events with ``nbytes == 0`` allocate nothing (PyTorch hands out a null pointer).
    ``breakdown=False`` skips the per-category accounting (``allocated_by_category_bytes`` is then
    empty): for a search that only asks whether a step fits. ``history=True`` also records every
    action with its addresses and the segments at the end (``AllocatorResult.history``), for
    :mod:`batchfit._snapshot`; it costs the plain replay nothing when off.

    >>> from batchfit._events import Event
    >>> ev = [Event(0, "alloc", 1, 30 << 20, "parameters", "", "setup", 0)]
    >>> simulate(ev, device_limit_bytes=20 << 20).oom
    True
    """
    cfg = AllocatorConfig() if config is None else config
    if cfg.backend != "native":
        raise BatchfitError(
            tr(
                "the allocator backend {backend!r} is not modelled (it is CUDA's own stream-ordered allocator)",
                backend=cfg.backend,
            ),
            hint=tr("drop backend:cudaMallocAsync from PYTORCH_CUDA_ALLOC_CONF for the estimate"),
            exit_code=ExitCode.UNSUPPORTED,
        )
    recorder = _RecordingAllocator(cfg, device_limit_bytes, allowed_bytes) if history else None
    state = recorder or _Allocator(cfg, device_limit_bytes, allowed_bytes)
    if recorder is not None:
        events = recorder.watch(events)
    live: dict[int, _Block] = {}
    zero_sized: set[int] = set()
    category_of: dict[int, str] = {}
    by_category: dict[str, int] = dict.fromkeys((*CATEGORIES, "workspaces"), 0)
    peak_categories = dict(by_category)
    peak_alloc = peak_res = 0
    peak_alloc_seq: int | None = None
    peak_res_seq: int | None = None
    series_seq: list[int] = []
    series_alloc: list[int] = []
    series_res: list[int] = []
    oom_seq: int | None = None
    oom_bytes: int | None = None
    count = 0
    peak_pending = False
    malloc, free = state.malloc, state.free
    for ev in events:
        count += 1
        storage = ev.storage
        if ev.action == "alloc":
            if storage in live or storage in zero_sized:
                raise _trace_error(ev, tr("allocates a storage that is already alive"))
            if ev.nbytes <= 0:
                zero_sized.add(storage)
            else:
                block = malloc(ev.nbytes)
                if block is None:
                    oom_seq, oom_bytes = ev.seq, ev.nbytes
                    break
                live[storage] = block
                if breakdown:
                    cat = ev.category
                    category_of[storage] = cat
                    by_category[cat] = by_category.get(cat, 0) + block.size
                if state.allocated > peak_alloc:
                    # the breakdown is copied lazily, at the next free: within a run of
                    # allocations only the last new peak matters
                    peak_alloc, peak_alloc_seq = state.allocated, ev.seq
                    peak_pending = True
                if state.reserved > peak_res:
                    peak_res, peak_res_seq = state.reserved, ev.seq
        else:
            freed = live.pop(storage, None)
            if freed is not None:
                if breakdown:
                    if peak_pending:
                        peak_categories = dict(by_category)
                        peak_pending = False
                    by_category[category_of.pop(storage)] -= freed.size
                free(freed)
            elif storage in zero_sized:
                zero_sized.discard(storage)
            else:
                raise _trace_error(ev, tr("frees a storage that is not alive"))
        if record_series:
            series_seq.append(ev.seq)
            series_alloc.append(state.allocated)
            series_res.append(state.reserved)
    if peak_pending and breakdown:
        peak_categories = dict(by_category)
    if not breakdown:
        peak_categories = {}
    series = AllocatorSeries(series_seq, series_alloc, series_res) if record_series else None
    return AllocatorResult(
        peak_allocated_bytes=peak_alloc,
        peak_allocated_seq=peak_alloc_seq,
        peak_reserved_bytes=peak_res,
        peak_reserved_seq=peak_res_seq,
        allocated_by_category_bytes=peak_categories,
        final_allocated_bytes=state.allocated,
        final_reserved_bytes=state.reserved,
        peak_segments=state.peak_segments,
        num_device_alloc=state.num_device_alloc,
        num_device_free=state.num_device_free,
        num_alloc_retries=state.num_alloc_retries,
        num_events=count,
        config=cfg,
        device_limit_bytes=device_limit_bytes,
        oom=oom_seq is not None,
        oom_seq=oom_seq,
        oom_request_bytes=oom_bytes,
        series=series,
        history=AllocatorHistory(recorder.actions, recorder.segments_now(live)) if recorder is not None else None,
    )


def _trace_error(ev: Event, problem: str) -> BatchfitError:
    return BatchfitError(
        tr(
            "event {seq} ({action} of storage {storage}) {problem}",
            seq=ev.seq,
            action=ev.action,
            storage=ev.storage,
            problem=problem,
        ),
        hint=tr("a timeline needs exactly one alloc per storage and at most one free after it"),
    )


def with_settings(config: AllocatorConfig, text: str | None) -> AllocatorConfig:
    """``config`` with the settings in ``text`` applied on top (``None``/empty: unchanged).

    >>> with_settings(AllocatorConfig(), "expandable_segments:True").expandable_segments
    True
    """
    if not text:
        return config
    parsed = AllocatorConfig.parse(text)
    changes = {
        name: getattr(parsed, name)
        for name in AllocatorConfig.__dataclass_fields__
        if name != "source" and getattr(parsed, name) != getattr(AllocatorConfig(), name)
    }
    return replace(config, source=text, **changes)


__all__ = [
    "K_LARGE_BUFFER",
    "K_MIN_BLOCK_SIZE",
    "K_MIN_LARGE_ALLOC",
    "K_ROUND_LARGE",
    "K_SMALL_BUFFER",
    "K_SMALL_SIZE",
    "AllocatorAction",
    "AllocatorConfig",
    "AllocatorHistory",
    "AllocatorResult",
    "AllocatorSeries",
    "BlockState",
    "SegmentState",
    "simulate",
    "with_settings",
]
