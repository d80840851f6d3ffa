"""The ``batchfit`` command line: a thin layer over the Python API.

Each command lives in its own module and registers itself on :data:`app` when imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

# Command modules register themselves on import (one file per command).
from . import estimate as _estimate  # noqa: F401
from . import fit as _fit  # noqa: F401
from . import gpus as _gpus  # noqa: F401
from . import models_cmd as _models_cmd  # noqa: F401  (order: after app exists)
from . import plan as _plan  # noqa: F401
from . import probe as _probe  # noqa: F401
from . import show as _show  # noqa: F401
from . import summary as _summary_cmd  # noqa: F401
from . import sweep as _sweep_cmd  # noqa: F401
from ._app import DEBUG_HELP, LANG_HELP, app, choose_language, set_debug


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
    lang: Annotated[str | None, typer.Option("--lang", help=LANG_HELP)] = None,
) -> None:
    set_debug(debug)
    choose_language(lang)
    if ctx.invoked_subcommand is None:
        from .default import run_default

        run_default()


def main() -> None:
    """The console entry point: run the command, then leave without the interpreter's teardown.

    Tearing down torch and the traced objects one by one took about 2 s of a 14 s ``fit`` here
    (measured: the command's output was complete at 12.0 s, the process ended at 14.4 s). All
    output is flushed first; batchfit leaves no other state behind.
    """
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BrokenPipeError, ValueError):  # reader gone, or the stream closed
                stream.flush()
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code or 0)


__all__ = ["app", "main"]
