"""Bytes are ints everywhere; this module is the one place that turns them into text and back.

>>> format_bytes(1_048_576)
'1.00 MiB'
>>> format_bytes(1_048_152, unit="MB")
'1.05 MB'
>>> parse_size("24GiB"), parse_size("24GB"), parse_size("24G"), parse_size("1024")
(25769803776, 24000000000, 25769803776, 1024)
"""

from __future__ import annotations

import re
from typing import Literal

from ._errors import BatchfitError
from ._i18n import tr

Unit = Literal["auto", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]

_FACTORS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}


def format_bytes(n: int | float, unit: Unit = "auto", digits: int = 2) -> str:
    """Render a byte count; ``auto`` picks the largest binary unit that keeps the value >= 1."""
    if unit == "auto":
        unit = "B"
        for candidate in ("KiB", "MiB", "GiB", "TiB"):
            if abs(n) >= _FACTORS[candidate]:
                unit = candidate  # type: ignore[assignment]
    if unit == "B":
        return f"{int(n):,} B"
    return f"{n / _FACTORS[unit]:,.{digits}f} {unit}"


def gib(n: int | float) -> str:
    """GiB in prose (advice, plot labels).

    >>> gib(3 * 2**30)
    '3.00 GiB'
    """
    return format_bytes(n, "GiB")


def mib_cell(n: int | None) -> str:
    """A table cell in MiB without the unit (the column header or title says MiB); ``-`` for None.

    >>> mib_cell(1_048_576), mib_cell(None)
    ('1.00', '-')
    """
    return "-" if n is None else format_bytes(n, unit="MiB").removesuffix(" MiB")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_SUFFIXES: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 10**3,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 10**6,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 10**9,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 10**12,
}


def parse_size(text: str) -> int:
    """Parse a memory size: ``24GiB`` and ``24G`` are binary, ``24GB`` decimal, a bare number is bytes."""
    match = _SIZE_RE.match(text)
    suffix = match.group(2).lower() if match else None
    if match is None or suffix not in _SUFFIXES:
        raise BatchfitError(
            tr("cannot read the memory size {text!r}", text=text),
            hint=tr("write e.g. 24GiB or 24G (2^30 bytes each), 24GB (10^9 bytes each), or a number of bytes"),
        )
    return int(float(match.group(1)) * _SUFFIXES[suffix])
