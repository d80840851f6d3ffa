"""The messages' languages: English in the code, the others in one gettext catalogue per language.

Every sentence batchfit shows a user (the answer key, table headers, every :class:`BatchfitError`
message and hint) is written in English as the msgid of one call, ``tr("template {name}", name=value)``,
and looked up in ``_resources/locale/<lang>/LC_MESSAGES/batchfit.po`` (GNU gettext's format, read with
polib and served by the standard library's :mod:`gettext`). Placeholders are named, so a translation
may put them in its own order; English output is the msgid itself, formatted.

The library speaks English unless told (:func:`set_language`); the command line sets the language
from ``--lang`` or, without it, from ``LANGUAGE``/``LC_ALL``/``LC_MESSAGES``/``LANG`` (see
:func:`language_from_env`). How to add a language: docs/i18n.md.

>>> tr("unknown model {name!r}", name="resnet17")
"unknown model 'resnet17'"
>>> with language("zh"):
...     tr("unknown model {name!r}", name="resnet17")
"未知的模型 'resnet17'"
"""

from __future__ import annotations

import contextlib
import functools
import gettext
import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ._errors import BatchfitError, ExitCode

DOMAIN = "batchfit"
LANGUAGES = ("en", "zh")  # English is the source language (the msgids); every other one has a catalogue
LOCALE_DIR = Path(__file__).parent / "_resources" / "locale"
_ENV_VARS = ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")  # gettext's own order of precedence
_state = {"lang": "en"}


def catalogue_path(lang: str) -> Path:
    return LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


@functools.cache
def _translations(lang: str) -> gettext.NullTranslations:
    """The language's catalogue: its ``.po`` file compiled to ``.mo`` in memory (polib), served by :mod:`gettext`."""
    if lang == "en":
        return gettext.NullTranslations()
    import polib

    po = polib.pofile(str(catalogue_path(lang)))
    return gettext.GNUTranslations(io.BytesIO(po.to_binary()))


def tr(msgid: str, /, **values: Any) -> str:
    """``msgid`` (English, with ``{named}`` placeholders) in the current language, filled with ``values``.

    The one marker of a user-facing message: tests/test_i18n.py finds every call and checks that each
    catalogue translates it with the same placeholders.
    """
    text = _translations(_state["lang"]).gettext(msgid)
    return text.format(**values) if values else text


def phase_word(phase: str) -> str:
    """A step's phase (batchfit._events.PHASES) in the current language; other names unchanged."""
    words = {
        "setup": tr("setup"),
        "forward": tr("forward"),
        "backward": tr("backward"),
        "optimizer": tr("optimizer"),
        "eval": tr("eval"),
    }
    return words.get(phase, phase)


def get_language() -> str:
    """The language messages are printed in now: ``"en"`` or ``"zh"``."""
    return _state["lang"]


def _language_code(locale_name: str) -> str:
    """``"zh_CN.UTF-8"``, ``"zh-Hans"``, ``"zh"`` -> ``"zh"`` (the part before territory, codeset and modifier)."""
    return locale_name.strip().split(".")[0].split("@")[0].replace("-", "_").split("_")[0].lower()


def normalize_language(name: str) -> str:
    """``"zh_CN.UTF-8"`` -> ``"zh"``; an unknown language is a :class:`BatchfitError`."""
    code = _language_code(name)
    if code not in LANGUAGES:
        raise BatchfitError(
            tr("unknown language {name!r}", name=name),
            hint=tr("use one of {choices}", choices=", ".join(LANGUAGES)),
            exit_code=ExitCode.USAGE,
        )
    return code


def set_language(lang: str) -> None:
    """Print messages in ``lang`` (``"en"`` or ``"zh"``, or a locale name such as ``"zh_CN.UTF-8"``) from now on.

    >>> set_language("zh"); get_language()
    'zh'
    >>> set_language("en")
    """
    _state["lang"] = normalize_language(lang)


@contextlib.contextmanager
def language(lang: str) -> Iterator[None]:
    """Messages in ``lang`` inside the ``with`` block only."""
    before = _state["lang"]
    set_language(lang)
    try:
        yield
    finally:
        _state["lang"] = before


def language_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The language the environment asks for, as gettext reads it: the first set variable of
    ``LANGUAGE`` (a ``:``-separated list: its first entry), ``LC_ALL``, ``LC_MESSAGES``, ``LANG``; its
    language code if it has a catalogue (``zh_CN.UTF-8`` -> ``"zh"``), else English (``C``, ``POSIX``, others).

    >>> language_from_env({"LANG": "zh_CN.UTF-8"}), language_from_env({"LC_ALL": "C", "LANG": "zh_CN.UTF-8"})
    ('zh', 'en')
    """
    env = os.environ if environ is None else environ
    for var in _ENV_VARS:
        value = env.get(var, "")
        if value:
            code = _language_code(value.split(":")[0])
            return code if code in LANGUAGES else "en"
    return "en"


__all__ = [
    "LANGUAGES",
    "LOCALE_DIR",
    "catalogue_path",
    "get_language",
    "language",
    "language_from_env",
    "normalize_language",
    "phase_word",
    "set_language",
    "tr",
]
