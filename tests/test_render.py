"""The one render path (``batchfit._render``): plain text, rich and HTML from the same sections."""

from __future__ import annotations

import io

from rich.console import Console

from batchfit._allocator import simulate
from batchfit._events import Event
from batchfit._render import Facts, Rendered, Styled, Table, Text

MiB = 1024**2


def _rich(obj: object, width: int = 100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(obj)
    return buf.getvalue()


def test_plain_table_aligns_columns_and_keeps_the_footer() -> None:
    t = Table("t", ["name", "n"], [["a", "1"], ["long name", "1,000"]], footer=["note"])
    assert str(t).splitlines() == [
        "t",
        "name           n",
        "---------  -----",
        "a              1",
        "long name  1,000",
        "note",
    ]


def test_ruled_table_is_framed_across_its_width() -> None:
    t = Table("head", ["a", "b"], [["x", "10"]], footer=["total 10"], rule="=")
    lines = str(t).splitlines()
    assert lines == ["head", "=" * 5, "a   b", "=" * 5, "x  10", "=" * 5, "total 10", "=" * 5]


def test_styled_cells_and_row_styles_show_only_in_a_terminal() -> None:
    t = Table("", ["who", "state"], [["w", Styled("frozen", "cyan")]], styles=["dim"])
    assert str(t).splitlines()[-1] == "w    frozen"
    assert "frozen" in _rich(t)


def test_cells_are_text_not_rich_markup() -> None:
    t = Table("", ["cell"], [["[bold]x[/bold]"]])
    assert "[bold]x[/bold]" in _rich(t) and "[bold]x[/bold]" in str(t)


def test_footer_follows_the_table_in_a_terminal() -> None:
    out = _rich(Table("title", ["a", "b"], [["1", "2"]], footer=["first note", "second note"]))
    lines = out.splitlines()
    assert lines[-2:] == ["first note", "second note"]
    assert lines[0].startswith("title")


def test_facts_line_up_their_names() -> None:
    f = Facts([("samples", "70"), ("one sample", "(1, 28, 28)")])
    assert str(f).splitlines() == ["samples     70", "one sample  (1, 28, 28)"]
    assert "one sample  (1, 28, 28)" in _rich(f)


class _Two(Rendered):
    def sections(self) -> list[Table | Text | str]:
        return [Text("intro", style="bold"), Table("t", ["a"], [["1"]]), "plain [not markup]"]


def test_rendered_gives_text_rich_and_html_from_the_same_sections() -> None:
    r = _Two()
    assert str(r) == "intro\n\nt\na\n-\n1\n\nplain [not markup]"
    assert [line.strip() for line in _rich(r).splitlines()][:2] == ["intro", ""]
    assert "plain [not markup]" in _rich(r)
    html = r._repr_html_()
    assert "<pre>intro</pre>" in html and "<caption>t</caption>" in html and "plain [not markup]" in html


def test_allocator_result_renders_through_the_table() -> None:
    events = [Event(0, "alloc", 1, 30 * MiB, "activations", "", "forward", 1)]
    events.append(Event(1, "alloc", 2, 20 * MiB, "temporaries", "", "forward", 1))
    r = simulate(events, device_limit_bytes=40 * MiB)
    text = str(r)
    assert text.startswith("CUDA caching allocator (")
    assert "peak allocated" in text and "30.00 MiB" in text and "OUT OF MEMORY" in text
    assert "segments: " in text and "device limit (40.00 MiB)" in text
    assert "OUT OF MEMORY" in _rich(r, 120)
