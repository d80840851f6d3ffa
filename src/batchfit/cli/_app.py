"""The typer application and the one place that turns errors into messages and exit codes.

Every command module (``cli/summary.py``, ``cli/estimate.py``, ...) registers itself on ``app``
with ``@command(...)``; this keeps the commands apart (one file each) and the error policy in one
place: a :class:`BatchfitError` prints its message and hint and exits with its code; anything else
prints a one-line internal error (the traceback only with ``--debug``).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer
import typer.models
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


# The library names its parameters in messages, in backticks: `threads` or `device='cpu'`. On the
# command line the same words are the running command's flags: `device='cpu'` -> --device cpu,
# `free=True` -> --free, `input_size=(3, 32, 32)` -> --input 3,32,32. A name that is no option of
# the command stays as the library wrote it.
_PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")
# where a command's option is called otherwise than the library's parameter it fills
_CLI_NAMES = {"input_size": "inputs", "context_bytes": "context", "max_batch_size": "max_batch"}


def command_flags(fn: Callable[..., Any]) -> dict[str, str]:
    """Each option of a command function's signature by its parameter name: ``{"batch_size": "--batch-size"}``."""
    flags = {}
    for name, hint in typing.get_type_hints(fn, include_extras=True).items():
        for info in getattr(hint, "__metadata__", ()):
            if not isinstance(info, typer.models.OptionInfo):
                continue
            # with Annotated, typer.Option("--name", ...) keeps the first declaration in `default`
            decls = [info.default, *(info.param_decls or ())]
            longs = [d for d in decls if isinstance(d, str) and d.startswith("--")]
            if longs:
                flags[name] = longs[0]
    return flags


def as_flags(text: str, flags: dict[str, str]) -> str:
    """Library words in command-line words.

    >>> as_flags("use `device='cuda'` or drop `free`", {"device": "--device", "free": "--free"})
    'use --device cuda or drop --free'
    >>> as_flags("give `input_size=(3, 32, 32)`, not `example_inputs`", {"inputs": "--input"})
    'give --input 3,32,32, not `example_inputs`'
    """

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        option = flags.get(_CLI_NAMES.get(name, name))
        if option is None:
            return match.group(0)
        if value is None or value == "True":
            return option
        value = value.strip()
        if value[:1] in ("(", "[") and value[-1:] in (")", "]"):
            value = ",".join(v.strip() for v in value[1:-1].split(",") if v.strip())
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{option} {value}"

    return _PARAMETER.sub(flag, text)


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
            flags = command_flags(fn)
            err_console.print(f"[bold red]{tr('error:')}[/] {as_flags(exc.message, flags)}", soft_wrap=True)
            if exc.hint:
                err_console.print(f"[bold]{tr('hint:')}[/] {as_flags(exc.hint, flags)}", soft_wrap=True)
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
