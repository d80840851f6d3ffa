"""The message catalogue: every marked message has every language, and ``--lang zh`` reaches the user.

Messages are marked with ``tr("English {named} template", named=value)`` (batchfit._i18n); this file
finds every call in the source (the AST, not a regex) and checks the catalogues against them.
Run it as a script to print the template (.pot) of every msgid: ``python tests/test_i18n.py``.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import polib
import pytest

from batchfit import BatchfitError
from batchfit._i18n import (
    LANGUAGES,
    catalogue_path,
    language,
    language_from_env,
    normalize_language,
    set_language,
    tr,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "batchfit"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _marked(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tr"


@functools.cache
def extract() -> dict[str, list[str]]:
    """Every msgid in the package, with where it is (``path:line``)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if _marked(node):
                assert isinstance(node, ast.Call)
                first = node.args[0] if node.args else None
                where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                    f"{where}: tr() needs a literal msgid (the catalogue cannot know a computed one)"
                )
                found.setdefault(first.value, []).append(where)
    return found


def _unmarked_texts(node: ast.expr | None) -> list[ast.expr]:
    """The literal strings in a message expression that reach the user without tr()."""
    if node is None or _marked(node):
        return []
    if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        return [node] if not (isinstance(node, ast.Constant) and node.value in ("", " ")) else []
    if isinstance(node, ast.IfExp):
        return _unmarked_texts(node.body) + _unmarked_texts(node.orelse)
    if isinstance(node, ast.BinOp):
        return _unmarked_texts(node.left) + _unmarked_texts(node.right)
    if isinstance(node, ast.List):
        return [t for e in node.elts for t in _unmarked_texts(e)]
    return []


def fields(text: str) -> set[tuple[str, str, str]]:
    """The placeholders of a template: (name, conversion, format spec)."""
    return {
        (name, conv or "", spec or "") for _, name, spec, conv in string.Formatter().parse(text) if name is not None
    }


# BatchfitError and its subclasses (DoesNotFit's second argument is its advice, a list of hints)
_ERRORS = ("BatchfitError", "DoesNotFit", "ProbeError")
# helpers that make a BatchfitError from a problem in words: the index of their first words argument
_FACTORIES = {"_config_error": 1, "_trace_error": 1, "check_suffix": 2}


def test_every_error_message_is_marked() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ERRORS:
                advice = [k.value for k in node.keywords if k.arg in ("hint", "advice")]
                parts = [*node.args[:2], *advice]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FACTORIES:
                parts = node.args[_FACTORIES[node.func.id] :]
            else:
                continue
            bad += [f"{path.name}:{t.lineno}" for part in parts for t in _unmarked_texts(part)]
    assert not bad, f"BatchfitError messages or hints without tr(): {bad}"
    subclasses = {
        node.name
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in _ERRORS for b in node.bases)
    }
    assert subclasses <= set(_ERRORS), f"add the new error classes to _ERRORS: {subclasses - set(_ERRORS)}"


def test_the_marker_is_found_everywhere() -> None:
    """The extraction sees the messages of the answer key, the tables and the errors (not a vacuous check)."""
    ids = extract()
    assert len(ids) > 300
    for msgid in ("unknown GPU {name!r}", "What the hand count misses:", "Total params: {n:,}", "hint:"):
        assert msgid in ids


@pytest.mark.parametrize("lang", [lang for lang in LANGUAGES if lang != "en"])
def test_every_message_has_every_language(lang: str) -> None:
    po = polib.pofile(str(catalogue_path(lang)))
    entries = {e.msgid: e for e in po if not e.obsolete}
    missing, empty, fuzzy, mismatched = [], [], [], []
    for msgid, where in extract().items():
        entry = entries.get(msgid)
        if entry is None:
            missing.append(f"{where[0]}: {msgid}")
        elif not entry.msgstr.strip():
            empty.append(msgid)
        elif "fuzzy" in entry.flags:
            fuzzy.append(msgid)
        elif fields(entry.msgstr) != fields(msgid):
            mismatched.append(f"{msgid!r} -> {entry.msgstr!r}")
    assert not missing, f"{len(missing)} msgids missing from {lang}: " + "\n".join(missing)
    assert not empty and not fuzzy, (empty, fuzzy)
    assert not mismatched, "placeholders differ:\n" + "\n".join(mismatched)
    stale = sorted(set(entries) - set(extract()))
    assert not stale, f"{lang} translates msgids the code no longer has: {stale}"


def test_translations_are_chinese() -> None:
    po = polib.pofile(str(catalogue_path("zh")))
    letters_only = [e.msgid for e in po if re.search(r"[a-z]{3}", e.msgid) and e.msgstr == e.msgid]
    # an identical translation is allowed only where the text is code or a name (e.g. "pip install timm")
    assert all(" " not in m or m.startswith(("pip ", "e.g. ")) for m in letters_only), letters_only
    assert sum(bool(CJK.search(e.msgstr)) for e in po) > 0.9 * len(po)


def test_lookup_and_placeholders() -> None:
    assert tr("unknown GPU {name!r}", name="h1000") == "unknown GPU 'h1000'"
    with language("zh"):
        text = tr("unknown GPU {name!r}", name="h1000")
    assert "'h1000'" in text and CJK.search(text)
    assert tr("unknown GPU {name!r}", name="h1000") == "unknown GPU 'h1000'"  # the block restored English


def test_language_from_the_environment() -> None:
    assert language_from_env({"LANG": "zh_CN.UTF-8"}) == "zh"
    assert language_from_env({"LANGUAGE": "zh_TW:en", "LANG": "en_US.UTF-8"}) == "zh"
    assert language_from_env({"LC_ALL": "C", "LANG": "zh_CN.UTF-8"}) == "en"  # LC_ALL wins over LANG
    assert language_from_env({"LANG": "de_DE.UTF-8"}) == "en"  # no catalogue: English
    assert language_from_env({}) == "en"
    assert normalize_language("zh_CN.UTF-8") == "zh"
    with pytest.raises(BatchfitError, match="unknown language 'fr'"):
        normalize_language("fr")


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _english_after() -> object:
    """The language is process state: every test here leaves English behind, as the library's default."""
    yield
    set_language("en")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process, with the locale variables as given (and no others)."""
    base = {k: v for k, v in os.environ.items() if k not in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")}
    base["PYTHONPATH"] = str(SRC.parent) + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "batchfit", *args], capture_output=True, text=True, env={**base, **(env or {})}
    )


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    from typer.testing import CliRunner

    from batchfit.cli import app

    clean = {"LANGUAGE": None, "LC_ALL": None, "LC_MESSAGES": None, "LANG": None}
    return CliRunner().invoke(app, list(args), env={**clean, **(env or {})})


# English words of the answer key's sentences (option names such as --memory aside): none may be left
_ENGLISH = re.compile(r"(?<![-\w])(the|and|of|is|are|with|batch size|memory|parameters|gradients)\b")


@pytest.fixture(scope="module")
def answer_key_zh() -> str:
    """The whole no-argument run with --lang zh (computed once: it trains the digits sweep)."""
    result = _invoke("--lang", "zh")
    assert result.exit_code == 0, result.stderr
    return str(result.stdout)


def test_no_argument_run_in_chinese(answer_key_zh: str) -> None:
    for term in ("显存", "批次大小", "中间变量", "梯度", "优化器状态"):  # the lesson's own words
        assert term in answer_key_zh, term
    english = _untranslated(answer_key_zh)
    assert not english, "untranslated lines:\n" + "\n".join(english)
    # only the words change: the figures are the English run's
    assert "1,050,712 B" in answer_key_zh and "101,770" in answer_key_zh


def _untranslated(text: str) -> list[str]:
    return [line for line in text.splitlines() if _ENGLISH.search(line)]


def test_no_argument_run_follows_lang_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """LANG=zh_CN.UTF-8 without --lang: the same run in Chinese (its memory half: the sweep is the fixture's)."""
    import batchfit._answer_key

    real = batchfit._answer_key.answer_key
    monkeypatch.setattr(batchfit._answer_key, "answer_key", lambda **kwargs: real(**kwargs, training=False))
    zh = _invoke(env={"LANG": "zh_CN.UTF-8"})
    assert zh.exit_code == 0, zh.stderr
    assert "课程的参考答案" in zh.stdout and "显存" in zh.stdout and "批次大小" in zh.stdout
    assert not _untranslated(zh.stdout)
    set_language("en")
    en = _invoke(env={"LANG": "C.UTF-8"})
    assert en.stdout.startswith("batchfit: the lesson's answer key") and not CJK.search(en.stdout)


def test_chinese_table_columns_line_up(answer_key_zh: str) -> None:
    """Plain-text tables pad by terminal columns (a CJK character takes two), so headers sit over their columns."""
    from batchfit._render import cell_len

    lines = answer_key_zh.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("--------  --")]
    assert len(rules) == 3  # the lesson's table, the GPU table, the training table
    for i in rules:
        # the header as the terminal shows it: one character per column (a wide one and a filler)
        shown = "".join(c + "\0" * (cell_len(c) - 1) for c in lines[i - 1]).ljust(len(lines[i]))
        assert CJK.search(shown)
        for dashes in re.finditer(r"-+", lines[i]):
            start, end = dashes.span()
            assert shown[end : end + 2].strip() == "", (shown, start, end)  # the gap between columns is blank
            assert start == 0 or shown[start - 2 : start] == "  "


def test_plain_table_pads_by_terminal_columns() -> None:
    """A header of CJK characters (two columns each) still sits over its column in plain text."""
    from batchfit._render import Table, cell_len

    text = str(Table("", ["批次大小", "显存"], [["64", "1.05 MB"], ["4,096", "19.75 MB"]]))
    header, dashes, *rows = text.splitlines()
    assert dashes == "--------  --------"  # 8 columns: four characters of two columns each
    assert cell_len(header) == len(dashes) == len(rows[1])
    assert str(Table("", ["batch", "memory"], [["64", "1.05 MB"]])).splitlines()[0] == "batch   memory"


def test_error_in_chinese_keeps_the_exit_code() -> None:
    args = ("fit", "mlp", "--dataset", "mnist", "--gpu", "h1000")
    en = _invoke(*args)
    zh_after = _invoke(*args, "--lang", "zh")
    zh_before = _invoke("--lang", "zh", *args)
    assert en.exit_code == zh_after.exit_code == zh_before.exit_code == 3
    assert "error: unknown GPU 'h1000'" in en.stderr and "hint: " in en.stderr
    # the library's words name parameters (`memory='24GiB'`); the catalogue is looked up with them, and
    # only then does the command line rewrite them into its flags, in either language
    assert "give the card's memory as --memory (e.g. --memory 24GiB)" in en.stderr
    with language("zh"):
        message, hint = tr("unknown GPU {name!r}", name="h1000"), tr("hint:")
        fix = tr("see `batchfit gpus`, or give the card's memory as `memory` (e.g. `memory='24GiB'`)")
    assert "`memory='24GiB'`" in fix and CJK.search(fix)
    for zh in (zh_after, zh_before):
        assert message in zh.stderr and hint in zh.stderr
        assert fix.replace("`memory='24GiB'`", "--memory 24GiB").replace("`memory`", "--memory") in zh.stderr
        assert "`memory" not in zh.stderr
        assert "unknown GPU" not in zh.stderr and "error:" not in zh.stderr
    assert zh_after.stderr == zh_before.stderr


def test_error_in_chinese_from_lang_env() -> None:
    """The real entry point, in a fresh process: LANG alone selects Chinese; --lang en overrides it."""
    zh = _run("fit", "mlp", "--dataset", "mnist", "--gpu", "h1000", env={"LANG": "zh_CN.UTF-8"})
    assert zh.returncode == 3
    with language("zh"):
        assert tr("unknown GPU {name!r}", name="h1000") in zh.stderr
    en = _invoke("fit", "mlp", "--gpu", "h1000", "--lang", "en", env={"LANG": "zh_CN.UTF-8"})
    assert en.exit_code == 3 and "unknown GPU 'h1000'" in en.stderr


def test_bad_lang_is_a_usage_error() -> None:
    done = _invoke("--lang", "fr")
    assert done.exit_code == 2 and "unknown language 'fr'" in done.stderr


def _pot() -> str:
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
    for msgid, where in extract().items():
        po.append(polib.POEntry(msgid=msgid, msgstr="", occurrences=[tuple(w.rsplit(":", 1)) for w in where]))
    return str(po)


if __name__ == "__main__":
    print(_pot())
