"""docs/lesson.ipynb stays runnable: its code cells run in order, in one namespace, as Jupyter would.

nbclient is not needed: the cells are read from the notebook's JSON. A cell ending in an
expression is evaluated like Jupyter's display: its ``_repr_html_`` must give HTML.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).parent.parent / "docs" / "lesson.ipynb"


def code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def run_cell(source: str, namespace: dict[str, Any], name: str) -> Any:
    """Run a cell; return the value of its last line when that is an expression (what Jupyter shows)."""
    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), namespace)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), name, "eval"), namespace)


def test_lesson_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the notebook writes its report and snapshot next to itself
    namespace: dict[str, Any] = {"__name__": "__main__"}
    shown = 0
    for i, source in enumerate(code_cells(NOTEBOOK)):
        value = run_cell(source, namespace, f"{NOTEBOOK.name}[{i}]")
        if hasattr(value, "_repr_html_"):
            page = value._repr_html_()
            assert page.startswith("<") and len(page) > 200
            shown += 1
    assert shown >= 4  # summary, estimates, fit
    assert (tmp_path / "mlp_t4_report.html").exists() and (tmp_path / "mlp_t4_step.pickle").exists()
