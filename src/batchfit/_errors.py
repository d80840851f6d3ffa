"""The one exception batchfit raises for problems a user can fix, and the exit codes."""

from __future__ import annotations

from collections.abc import Collection
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Process exit codes of the ``batchfit`` command (documented in the README)."""

    OK = 0
    INTERNAL = 1  # a bug in batchfit: please report it (rerun with --debug)
    USAGE = 2  # bad command line (typer/click's own code)
    INPUT = 3  # bad model, input, dataset, GPU name or file: the message says what to fix
    DOES_NOT_FIT = 4  # the model does not fit the memory budget even at batch size 1
    NO_DEVICE = 5  # the command needs a device this machine does not have (e.g. CUDA)
    UNSUPPORTED = 6  # the model cannot be simulated and no fallback applies


class BatchfitError(Exception):
    """A problem the user can fix: ``message`` says what is wrong, ``hint`` what to do.

    >>> err = BatchfitError("unknown model 'resnet17'", hint="did you mean 'resnet18'?")
    >>> str(err)
    "unknown model 'resnet17' (did you mean 'resnet18'?)"
    """

    def __init__(self, message: str, *, hint: str | None = None, exit_code: ExitCode = ExitCode.INPUT):
        self.message = message
        self.hint = hint
        self.exit_code = exit_code
        super().__init__(f"{message} ({hint})" if hint else message)


def check_suffix(path: str | Path, suffixes: Collection[str], message: str, hint: str) -> Path:
    """``path`` as a :class:`Path` when it ends in one of ``suffixes`` (any case), else a usage error.

    ``message`` may name ``{path}`` and ``{suffix}`` (both quoted as Python writes them).

    >>> check_suffix("out.SVG", (".png", ".svg"), "cannot write {path}", "name it FILE.png").name
    'out.SVG'
    >>> check_suffix("out", (".png",), "cannot write {path}: {suffix}", "name it FILE.png")
    Traceback (most recent call last):
    batchfit._errors.BatchfitError: cannot write 'out': '(no extension)' (name it FILE.png)
    """
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        text = message.format(path=repr(str(out)), suffix=repr(out.suffix or "(no extension)"))
        raise BatchfitError(text, hint=hint, exit_code=ExitCode.USAGE)
    return out
