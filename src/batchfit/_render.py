"""The one way results show themselves: rich in a terminal, aligned plain text when piped or in
``str()``, HTML in Jupyter.

A result describes itself as a list of sections (:class:`Table`, :class:`Facts`, :class:`Text`, or
a plain ``str``) and inherits :class:`Rendered`; the layouts live here, not in each result.

>>> t = Table("sizes", ["batch", "bytes"], [["64", "1,024"], ["4,096", "65,536"]], footer=["B = bytes"])
>>> print(t)
sizes
batch   bytes
-----  ------
64      1,024
4,096  65,536
B = bytes
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Styled(NamedTuple):
    """A cell with a terminal style (``"cyan"``, ``"dim"``); in plain text only its text shows."""

    text: str
    style: str

    def __str__(self) -> str:
        return self.text


Cell = str | Styled


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
    """A titled table whose cells are already text; numeric columns are right-aligned.

    Plain text: the title, the header, a line of dashes under each column, the rows, the footer
    lines. ``rule="="`` frames it instead, torchinfo's way: a rule of ``=`` across the whole width
    above and below the header, below the rows and below the footer. In a terminal the footer
    lines follow the table; ``styles`` (per row) and :class:`Styled` cells colour it there only.
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]] = field(default_factory=list)
    right: Sequence[bool] | None = None  # per column; default: all but the first
    footer: list[str] = field(default_factory=list)
    styles: Sequence[str | None] | None = None  # per row, in a terminal
    no_wrap: Sequence[int] = ()  # columns a terminal must not wrap
    rule: str | None = None

    def _right(self) -> list[bool]:
        return list(self.right) if self.right is not None else [i > 0 for i in range(len(self.columns))]

    def __str__(self) -> str:
        rows = [[str(c) for c in row] for row in self.rows]
        widths = [cell_len(c) for c in self.columns]
        for row in rows:
            widths = [max(w, cell_len(cell)) for w, cell in zip(widths, row)]
        right = self._right()

        def line(cells: Sequence[str]) -> str:
            out = [pad(c, w, r) for c, w, r in zip(cells, widths, right)]
            return "  ".join(out).rstrip()

        parts = [self.title] if self.title else []
        if self.rule:
            ruler = self.rule * (sum(widths) + 2 * (len(widths) - 1))
            parts += [ruler, line(self.columns), ruler, *(line(row) for row in rows), ruler]
            parts += [*self.footer, ruler] if self.footer else []
            return "\n".join(parts)
        parts.append(line(self.columns))
        parts.append("  ".join("-" * w for w in widths))
        parts.extend(line(row) for row in rows)
        parts.extend(self.footer)
        return "\n".join(parts)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table as RichTable
        from rich.text import Text as RichText

        table = RichTable(title=self.title or None, title_justify="left")
        for i, (name, r) in enumerate(zip(self.columns, self._right())):
            table.add_column(name, justify="right" if r else "left", no_wrap=i in self.no_wrap)
        styles = list(self.styles) if self.styles is not None else [None] * len(self.rows)
        for row, style in zip(self.rows, styles):
            cells = [RichText(c.text, style=c.style) if isinstance(c, Styled) else RichText(c) for c in row]
            table.add_row(*cells, style=style)
        if not self.footer:
            return table
        return Group(table, RichText("\n".join(self.footer)))


@dataclass
class Facts:
    """Named values, one a line: ``name  value`` with the names in a column."""

    pairs: Sequence[tuple[str, str]]

    def __str__(self) -> str:
        width = max((cell_len(k) for k, _ in self.pairs), default=0)
        return "\n".join(f"{pad(k, width)}  {v}".rstrip() for k, v in self.pairs)

    def __rich__(self) -> Any:
        from rich.table import Table as RichTable

        grid = RichTable.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        for k, v in self.pairs:
            grid.add_row(k, v)
        return grid


@dataclass
class Text:
    """A block of text (never read as rich markup), with a terminal style."""

    text: str
    style: str | None = None

    def __str__(self) -> str:
        return self.text

    def __rich__(self) -> Any:
        from rich.text import Text as RichText

        return RichText(self.text, style=self.style or "")


Section = Table | Facts | Text | str


def as_rich(section: Section) -> Any:
    """A section as a rich renderable (a ``str`` as text, not markup)."""
    return Text(section).__rich__() if isinstance(section, str) else section.__rich__()


def as_html(section: Section) -> str:
    from ._html import esc, table_html

    if isinstance(section, Table):
        return table_html(section)
    return f"<pre>{esc(section)}</pre>"


class Rendered:
    """Text, rich and HTML from one list of :meth:`sections`; sections are a blank line apart."""

    def sections(self) -> Sequence[Section]:
        raise NotImplementedError

    def __str__(self) -> str:
        return "\n\n".join(str(s) for s in self.sections())

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text as RichText

        parts: list[Any] = []
        for s in self.sections():
            parts += [RichText("")] if parts else []
            parts.append(as_rich(s))
        return parts[0] if len(parts) == 1 else Group(*parts)  # (an empty Group prints nothing)

    def _repr_html_(self) -> str:
        from ._html import fragment

        return fragment(*(as_html(s) for s in self.sections()))


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
