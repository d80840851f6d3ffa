"""``batchfit`` with no arguments: the lesson's answer key for the MNIST MLP."""

from __future__ import annotations


def run_default() -> None:
    """Print :func:`batchfit._plan.answer_key` (rich in a terminal, plain text when piped)."""
    from .._i18n import tr
    from .._plan import answer_key
    from .._render import show
    from ._app import err_console, handle_errors

    def body() -> None:
        with err_console.status(tr("working out the lesson's answer key...")):
            key = answer_key()
        show(key)

    handle_errors(body)()
