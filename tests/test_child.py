"""Work in another process (``batchfit._child``): a forked call, and a fresh child speaking JSON."""

from __future__ import annotations

import os
import time

import pytest

from batchfit._child import ChildFailed, can_fork, fork_call, run_module
from batchfit._errors import BatchfitError
from batchfit._probe import AttemptConfig, _child_fit

needs_fork = pytest.mark.skipif(not can_fork(), reason="no fork here")


@needs_fork
def test_a_forked_call_sends_back_its_value_and_runs_elsewhere() -> None:
    child = fork_call(lambda: (os.getpid(), [1, 2, 3]))
    assert child is not None
    pid, value = child.result()
    assert value == [1, 2, 3] and pid != os.getpid() and pid == child.pid
    assert child.result() is None  # one result per child


@needs_fork
def test_a_failed_forked_call_gives_none_so_the_parent_does_the_work() -> None:
    child = fork_call(lambda: 1 // 0)
    assert child is not None and child.result() is None


@needs_fork
def test_cancel_stops_a_running_child_at_once() -> None:
    child = fork_call(lambda: time.sleep(30))
    assert child is not None
    began = time.perf_counter()
    child.cancel()
    assert time.perf_counter() - began < 5
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(child.pid, os.WNOHANG)


def test_no_fork_setting_turns_forks_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHFIT_NO_FORK", "1")
    assert not can_fork()


def test_a_child_that_prints_no_json_line_fails_with_its_last_error_line() -> None:
    with pytest.raises(ChildFailed, match=r"exited with code 1: .*No module named"):
        run_module("no_such_module_batchfit", {}, timeout_s=60)


def test_a_child_past_its_time_is_stopped() -> None:
    with pytest.raises(ChildFailed, match=r"timed out after 0\.01 s"):
        run_module("batchfit._probe", {"config": {"model": "mlp"}, "batch_size": 1}, timeout_s=0.01)


def test_the_probes_start_in_a_child_past_its_time_is_a_batchfit_error() -> None:
    # it was a raw subprocess.TimeoutExpired before the protocol was written once
    with pytest.raises(BatchfitError, match="timed out") as info:
        _child_fit(AttemptConfig("mlp", dataset="mnist"), 0.8, False, None, [], 0.01)
    assert "`start=N`" in (info.value.hint or "")  # the library names its parameter (the CLI shows --start)
