"""Work in another process, written once: a forked child (``fork_call``) and a fresh Python child
speaking JSON (``run_module`` / ``serve``).

``fit`` forks: its traces run side by side in children that start with the imports, the model and
the traces already in memory, and send back a pickle through a pipe. ``probe --isolate`` starts a
fresh interpreter per attempt (``python -m batchfit._probe``): nothing an attempt leaves behind (a
broken CUDA context, cached blocks) reaches the next. That protocol is one JSON payload on stdin
and one JSON line on stdout; a :class:`BatchfitError` in the child comes back as the same error.

>>> child = fork_call(lambda: 6 * 7) if can_fork() else None
>>> child is None or child.result() == 42
True
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import BatchfitError, ExitCode
from ._i18n import get_language, language_from_env, set_language

# -- a forked child ------------------------------------------------------------------------------


def can_fork() -> bool:
    """Side-by-side work needs fork (Linux, macOS); BATCHFIT_NO_FORK=1 turns it off."""
    return hasattr(os, "fork") and not os.environ.get("BATCHFIT_NO_FORK")


class Child:
    """A call running in a forked child; :meth:`result` waits for it, :meth:`cancel` stops it."""

    def __init__(self, pid: int, read: int) -> None:
        self.pid, self.read = pid, read
        self.done = False

    def result(self) -> Any:
        """What the call returned, or None when it failed (the caller then does the work itself)."""
        import pickle

        if self.done:
            return None
        self.done = True
        with os.fdopen(self.read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        if status != 0 or not payload:
            return None
        try:
            return pickle.loads(payload)
        except Exception:
            return None

    def cancel(self) -> None:
        """Stop a child whose result is no longer needed, and reap it."""
        import signal

        if self.done:
            return
        self.done = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.close(self.read)
        os.waitpid(self.pid, 0)


def fork_call(call: Callable[[], Any]) -> Child | None:
    """Run ``call()`` in a forked child (what the parent holds is already in memory there);
    None when the fork fails. The result travels back pickled."""
    import pickle
    import warnings

    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded process": the child only computes
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return None
    if pid == 0:  # the child: compute, send the result, leave without running any cleanup
        code = 0
        try:
            os.close(read)
            payload = pickle.dumps(call(), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(write, "wb") as pipe:
                pipe.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    return Child(pid, read)


# -- a fresh Python child, JSON in and out -------------------------------------------------------


class ChildFailed(Exception):
    """The child timed out, crashed or printed no JSON line (``str()`` says which)."""


def src_root() -> Path:
    """The directory holding the ``batchfit`` package (put on a child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with batchfit importable, for ``subprocess`` children."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src_root()), path) if p)
    env["LANGUAGE"] = get_language()  # the child's messages come back to the user: in the parent's language
    env.update(extra or {})
    return env


def run_module(module: str, payload: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """``python -m module`` with ``payload`` as JSON on stdin; the dict of its last JSON line.

    Raises the :class:`BatchfitError` the child reported (see :func:`serve`), and
    :class:`ChildFailed` when it timed out or printed no JSON line.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", module],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"timed out after {timeout_s:g} s") from None
    result = _last_json_line(done.stdout)
    if result is None or "status" not in result:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        raise ChildFailed(f"the child process exited with code {done.returncode}: {_shorten(tail) or 'no output'}")
    if result["status"] == "batchfit_error":
        raise BatchfitError(result["message"], hint=result.get("hint"), exit_code=ExitCode(result["exit_code"]))
    return result


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """A child's side of :func:`run_module`: read the payload, print ``handle(payload)`` as one
    JSON line (a :class:`BatchfitError` as ``{"status": "batchfit_error", ...}``)."""
    payload = json.loads(sys.stdin.read())
    set_language(language_from_env())  # the parent's language, passed in LANGUAGE by child_env
    try:
        reply = handle(payload)
    except BatchfitError as exc:
        reply = {"status": "batchfit_error", "message": exc.message, "hint": exc.hint, "exit_code": int(exc.exit_code)}
    print(json.dumps(reply), flush=True)


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _shorten(line: str, limit: int = 500) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."
