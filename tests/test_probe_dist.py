"""The distributed probe: real gloo processes on the CPU (torchrun, world 2), one of them running
out of memory alone (the probe tests' stand-in device, inside tests/dist_probe_model.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchfit._errors import BatchfitError, ExitCode
from batchfit._probe import expected_attempts
from batchfit._probe_dist import combine

HERE = Path(__file__).parent
MODEL = f"{HERE / 'dist_probe_model.py'}:OneRankOOM"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], *, oom_max: int, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 ARGS`` on 127.0.0.1; rank 1's stand-in device holds ``oom_max`` samples."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
        "BATCHFIT_TEST_OOM_RANK": "1",
        "BATCHFIT_TEST_OOM_MAX": str(oom_max),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def test_torchrun_probe_with_one_rank_out_of_memory_alone() -> None:
    # rank 1 runs out of memory above 37 samples, rank 0 never does: at 39 in the backward (before
    # rank 1's gradients reach the all-reduce rank 0 waits in), at 38 in the forward (before DDP is made)
    # "--" ends torchrun's own options: it would take --start and --max for abbreviations of its own
    probe = ["-m", "batchfit", "--", "probe", MODEL, "-i", "16", "--device", "cpu", "--start", "39", "--max", "64"]
    done = _torchrun([*probe, "--no-estimates", "--peer-timeout", "60", "--json"], oom_max=37)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(line.startswith("{") for line in done.stdout.splitlines()) == 1, done.stdout  # rank 0 alone prints
    r = json.loads(done.stdout[done.stdout.index("{") :])
    assert r["world_size"] == 2 and r["device"] == "cpu x 2 ranks (DDP over gloo)"
    assert (r["max_batch_size"], r["first_failing_batch_size"], r["exact"]) == (37, 38, True)
    # the same search as on one device: 39 x, 38 x, 36 ok, 37 ok
    assert [(a["batch_size"], a["status"]) for a in r["attempts"]] == [(39, "oom"), (38, "oom"), (36, "ok"), (37, "ok")]
    assert r["attempt_count"] == expected_attempts(39, 37)
    by_size = {a["batch_size"]: a for a in r["attempts"]}
    for a in r["attempts"]:
        assert [x["rank"] for x in a["ranks"]] == [0, 1]
        assert a["seconds"] < 30  # well under the peer timeout: nobody waited for it
    for b in (36, 37):
        a = by_size[b]
        assert all(x["status"] == "ok" for x in a["ranks"])
        assert a["peak_allocated_bytes"] == max(x["peak_allocated_bytes"] for x in a["ranks"]) > 0
    for b in (38, 39):
        assert by_size[b]["message"].startswith("rank 1: OutOfMemoryError: CUDA out of memory")
        assert by_size[b]["ranks"][1]["status"] == "oom"
    # 39, backward: rank 0 was inside DDP's all-reduce; rank 1 closed the attempt's group, so it failed at once
    rank0 = by_size[39]["ranks"][0]
    assert rank0["status"] == "error" and not rank0["stopped_by_peer"]
    assert "gloo" in rank0["message"] and "Connection" in rank0["message"]
    # 38, forward (rank 1's labels forward, before the wrapper): rank 0 stopped at the agreement before it
    assert by_size[38]["ranks"][0]["stopped_by_peer"] is True


def _rank(rank: int, status: str, **kw: Any) -> dict[str, Any]:
    return {"rank": rank, "status": status, "stopped_by_peer": False, "message": None, **kw}


def test_combine_rules() -> None:
    ok = combine(4, [_rank(0, "ok", peak_allocated_bytes=10, seconds=1.0), _rank(1, "ok", peak_allocated_bytes=12)])
    assert (ok.status, ok.peak_allocated_bytes, ok.seconds) == ("ok", 12, 1.0)
    # an error on a rank with no out-of-memory anywhere is an error (the search stops on it)
    err = combine(4, [_rank(0, "error", message="ValueError: bad"), _rank(1, "error", stopped_by_peer=True)])
    assert err.status == "error" and err.message == "rank 0: ValueError: bad"
    # out-of-memory on one rank explains a collective failing on another
    oom = combine(4, [_rank(0, "error", message="RuntimeError: closed"), _rank(1, "oom", message="OutOfMemoryError")])
    assert oom.status == "oom" and oom.message == "rank 1: OutOfMemoryError"
    # a problem with the settings on any rank stops every rank with that error
    with pytest.raises(BatchfitError, match="rank 1: no trainable") as info:
        combine(4, [_rank(0, "ok"), _rank(1, "error", fatal=("no trainable parameters", "use --mode inference", 3))])
    assert info.value.exit_code == ExitCode(3) and info.value.hint == "use --mode inference"


def test_probe_on_cpu_needs_a_cap() -> None:
    with pytest.raises(BatchfitError, match="needs a cap"):
        from batchfit._probe import probe

        probe("mlp", dataset="mnist", device="cpu", start=4)


def test_the_start_under_torchrun_is_fits_per_gpu_max_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from batchfit._models import load_workload
    from batchfit._probe import _estimated_max

    seen: list[Any] = []

    def fake_fit(workload: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["dist"])
        if kwargs["dist"] is not None and kwargs["step"] == "unsupported":
            raise BatchfitError("`step` with `gpus` is not simulated yet", exit_code=ExitCode.UNSUPPORTED)
        return types.SimpleNamespace(max_batch_size=100 if kwargs["dist"] is None else 90)

    monkeypatch.setitem(sys.modules, "batchfit._fit", types.SimpleNamespace(fit=fake_fit))
    w = load_workload("mlp", dataset="mnist")
    notes: list[str] = []
    assert _estimated_max(w, "adam", "fp32", None, None, 0.8, False, None, notes, world_size=4) == 90
    assert seen[-1].world_size == 4 and seen[-1].strategy == "ddp"
    assert "per-GPU max under DDP on 4 GPUs" in notes[-1]
    # where DDP cannot be estimated, one GPU's max, and a note that says so
    assert _estimated_max(w, "adam", "fp32", None, "unsupported", 0.8, False, None, notes, world_size=4) == 100
    assert seen[-1] is None and "could not be estimated" in notes[-1]
