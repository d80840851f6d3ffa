"""The typer application and the one place that turns errors into messages and exit codes.

Every command module (``cli/summary.py``, ``cli/estimate.py``, ...) registers itself on ``app``
with ``@command(...)``; this keeps the commands apart (one file each) and the error policy in one
place: a :class:`BatchfitError` prints its message and hint and exits with its code; anything else
prints a one-line internal error (the traceback only with ``--debug``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperOption

from .._errors import BatchfitError, ExitCode
from .._i18n import language_from_env, set_language, tr

app = typer.Typer(
    name="batchfit",
    help=(
        "What a PyTorch model is, how much GPU memory one training step takes and where it goes, "
        "and which batch size to use - without needing the GPU.\n\n"
        "Run with no command for the lesson's answer key (the MNIST MLP)."
    ),
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True, highlight=False)
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return _state["debug"]


def set_debug(value: bool) -> None:
    from .._explain import show_torch_logs

    _state["debug"] = value
    show_torch_logs(value)  # --debug keeps PyTorch's own logs (a failed fake kernel logs its traceback)


DEBUG_HELP = "Show full tracebacks (and PyTorch's own logs) instead of short error messages."
LANG_HELP = "The language of the output: en or zh (default: from LANGUAGE, LC_ALL, LC_MESSAGES or LANG)."


def choose_language(lang: str | None) -> None:
    """``--lang``, else the environment's locale (``LANG=zh_CN.UTF-8``): see batchfit._i18n."""
    try:
        set_language(lang if lang is not None else language_from_env())
    except BatchfitError as exc:
        raise typer.BadParameter(f"{exc.message} ({exc.hint})", param_hint="'--lang'") from None


class _Command(TyperCommand):
    """A command that takes ``--debug`` after its name too (``batchfit estimate mlp --debug``).

    Every hint says "rerun with --debug", and users put it at the end; the root's ``--debug``
    (``batchfit --debug estimate ...``) keeps working.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            TyperOption(
                param_decls=["--debug"],
                is_flag=True,
                default=False,
                expose_value=False,
                callback=lambda ctx, param, value: set_debug(True) if value else None,
                help=DEBUG_HELP,
            )
        )
        self.params.append(
            TyperOption(
                param_decls=["--lang"],
                default=None,
                expose_value=False,
                callback=lambda ctx, param, value: choose_language(value) if value is not None else None,
                help=LANG_HELP,
            )
        )


def handle_errors(fn: F) -> F:
    """Run a command body with batchfit's error policy."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # the reader went away (`batchfit ... | head`): stop quietly, as Unix tools do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
        except BatchfitError as exc:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]{tr('error:')}[/] {exc.message}", soft_wrap=True)
            if exc.hint:
                err_console.print(f"[bold]{tr('hint:')}[/] {exc.hint}", soft_wrap=True)
            raise typer.Exit(int(exc.exit_code)) from None
        except Exception as exc:
            if debug_enabled():
                raise
            err_console.print(
                f"[bold red]{tr('internal error:')}[/] {type(exc).__name__}: {exc}\n"
                + tr("This is a bug in batchfit; rerun with --debug for the traceback and report it."),
                soft_wrap=True,
            )
            raise typer.Exit(int(ExitCode.INTERNAL)) from None

    return wrapper  # type: ignore[return-value]


def command(name: str, **kwargs: Any) -> Callable[[F], F]:
    """``@command("summary")``: register a command with the error policy applied."""

    def decorator(fn: F) -> F:
        app.command(name, cls=_Command, **kwargs)(handle_errors(fn))
        return fn

    return decorator


def is_terminal() -> bool:
    return sys.stdout.isatty()
