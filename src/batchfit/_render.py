"""One way to show a table: rich in a terminal, aligned plain text when piped or in ``str()``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def cell_len(text: str) -> int:
    """The columns ``text`` takes in a terminal: CJK characters take two (rich's own measure)."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len as measure

    return measure(text)


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns, on the left when ``right``."""
    fill = " " * max(0, width - cell_len(text))
    return fill + text if right else text + fill


@dataclass
class Table:
    """A titled table whose cells are already text; numeric columns are right-aligned."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]] = field(default_factory=list)
    right: Sequence[bool] | None = None  # per column; default: all but the first
    footer: list[str] = field(default_factory=list)

    def _right(self) -> list[bool]:
        return list(self.right) if self.right is not None else [i > 0 for i in range(len(self.columns))]

    def __str__(self) -> str:
        widths = [cell_len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, cell_len(cell)) for w, cell in zip(widths, row)]
        right = self._right()

        def line(cells: Sequence[str]) -> str:
            out = [pad(c, w, r) for c, w, r in zip(cells, widths, right)]
            return "  ".join(out).rstrip()

        parts = [self.title] if self.title else []
        parts.append(line(self.columns))
        parts.append("  ".join("-" * w for w in widths))
        parts.extend(line(row) for row in self.rows)
        parts.extend(self.footer)
        return "\n".join(parts)

    def __rich__(self) -> Any:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title or None, title_justify="left", caption="\n".join(self.footer) or None)
        for name, r in zip(self.columns, self._right()):
            table.add_column(name, justify="right" if r else "left")
        for row in self.rows:
            table.add_row(*row)
        return table


def show(*renderables: Any, file: Any = None) -> None:
    """Print objects: rich renderables in a terminal, their ``str()`` when output is piped."""
    stream = file or sys.stdout
    if stream.isatty():
        from rich.console import Console

        console = Console(file=stream)
        for r in renderables:
            console.print(r)
    else:
        for r in renderables:
            print(str(r), file=stream)
