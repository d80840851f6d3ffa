"""Shared fixtures; ``pytest --overwrite`` regenerates the golden files under tests/golden/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The command line speaks the locale's language (LANG=zh_CN.UTF-8 prints Chinese, batchfit._i18n); the tests
# compare English output, so they pin it (LANGUAGE comes first in gettext's order). tests/test_i18n.py sets its own.
os.environ["LANGUAGE"] = "en"

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--overwrite", action="store_true", help="rewrite golden files instead of comparing")


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """``golden("name.txt", text)`` compares with tests/golden/name.txt (or rewrites it with --overwrite)."""
    overwrite = request.config.getoption("--overwrite")

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if overwrite or not path.exists():
            if not overwrite:
                pytest.fail(f"golden file {path} is missing: run pytest --overwrite once and review it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert text == path.read_text(), f"output differs from {path} (pytest --overwrite to accept)"

    return check
