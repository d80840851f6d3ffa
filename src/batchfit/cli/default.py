"""``batchfit`` with no arguments: the lesson's answer key for the MNIST MLP."""

from __future__ import annotations


def run_default() -> None:
    """Print :func:`batchfit._answer_key.answer_key` (rich in a terminal, plain text when piped)."""
    from .._answer_key import answer_key
    from .._i18n import tr
    from .._render import show
    from ._app import err_console, handle_errors

    def body() -> None:
        with err_console.status(tr("working out the lesson's answer key...")):
            key = answer_key()
        show(key)

    handle_errors(body)()
