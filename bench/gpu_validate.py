"""The GPU validation run: calibration, the estimate-vs-measurement suite, and the peer comparison.

One command on a machine with a CUDA GPU (about 5 minutes on an H100)::

    PYTHONPATH=src python3 bench/gpu_validate.py --out $OUT

Without CUDA (or with ``--dry-run``) it plans every case, runs the CPU-side estimate children for
the first few small cases to prove the path works, and writes the same files marked
``"dry_run": true``. ``--only mlp`` restricts the suite (and peers) to cases whose id contains
``mlp``; ``--budget-seconds`` skips whatever is left when time runs out, and records that.

How each number is obtained (see docs/probe.md):

* the estimate, exactly as a user without a GPU gets it: a child process with
  ``CUDA_VISIBLE_DEVICES=""`` calls ``Estimator(...).at(b)`` for the card named explicitly
  (``--gpu <catalogue key>``, found from the local card's name);
* the measurement: a fresh child process per (case, batch size) runs ``measure_step`` on cuda
  (``max_memory_allocated``, ``max_memory_reserved``, ``mem_get_info``) and asks NVML (pynvml)
  for this process's memory;
* the kernels' own allocations (``batchfit._cuda_scratch``): for each op of ``KERNEL_CASES``, one
  child measures how far ``max_memory_allocated`` rises inside the op beyond its outputs (after a
  warm-up call) beside the rule's prediction; ops no rule models are measured too (predicted 0);
* the peers: ``batchfit._probe`` (isolated attempts), Lightning's ``Tuner.scale_batch_size(mode=
  "binsearch")`` and accelerate's ``find_executable_batch_size``, each in its own child process with
  a time cap, all under the same ``torch.cuda.set_per_process_memory_fraction`` (a smaller card's
  worth of memory, so every trial is quick).

* several GPUs, only when the machine has more than one (else skipped, with a line saying so):
  ``MULTI_CASES`` under DDP and FSDP2 (``fully_shard`` per block) at 2 GPUs and at all of them, each
  rank a process on its own GPU (``torch.multiprocessing``, NCCL) running the reference step, its
  ``max_memory_allocated`` / ``max_memory_reserved`` beside the per-rank estimate
  (``Estimator(..., dist=make_dist(N, strategy=...))`` with CUDA hidden).

Files written under ``--out`` (at most 8): environment.json, calibration.json, kernels.json,
suite.json, peers.json, multigpu.json; each a JSON list of records.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

SCHEMA_VERSION = 1
GPT2 = "bench/peers/gpt2_small.py:GPT2Small"
DRY_RUN_CARD = "h100-sxm"  # what a dry run plans for


@dataclass(frozen=True)
class Case:
    """One workload of the suite, measured at each of ``batch_sizes``."""

    id: str
    model: str
    optimizer: str
    precision: str
    batch_sizes: tuple[int, ...]
    dataset: str | None = None

    @property
    def family(self) -> str:
        return family_of(self.model)


# About 33 measurements; every case fits an 80 GB card several times over at its largest size.
SUITE: tuple[Case, ...] = (
    Case("mlp-mnist-sgd-fp32", "mlp", "sgd", "fp32", (64, 1024, 4096), "mnist"),
    Case("mlp-cifar10-adam-fp32", "mlp", "adam", "fp32", (64, 1024, 4096), "cifar10"),
    Case("cnn-cifar10-adam-amp", "cnn", "adam", "amp-bf16", (64, 256, 1024), "cifar10"),
    Case("resnet18-sgdm-fp32", "resnet18", "sgd-momentum", "fp32", (32, 128, 256)),
    Case("resnet18-adamw-amp", "resnet18", "adamw", "amp-bf16", (64, 256, 512)),
    Case("resnet50-sgd-fp32", "resnet50", "sgd", "fp32", (32, 64, 128)),
    Case("resnet50-adamw-amp", "resnet50", "adamw", "amp-bf16", (64, 128, 256)),
    Case("vit_b_16-adamw-amp", "vit_b_16", "adamw", "amp-bf16", (16, 64, 128)),
    Case("vit_b_16-sgd-fp32", "vit_b_16", "sgd", "fp32", (16, 32, 64)),
    Case("gpt2-adamw-amp", GPT2, "adamw", "amp-bf16", (2, 8, 16)),
    Case("gpt2-adamw-fp32", GPT2, "adamw", "fp32", (2, 4, 8)),
)

# The peer comparison: one case each, searched by batchfit probe, Lightning and accelerate.
PEER_CASES: tuple[Case, ...] = (
    Case("resnet50-sgdm-amp", "resnet50", "sgd-momentum", "amp-bf16", ()),
    Case("gpt2-adamw-amp", GPT2, "adamw", "amp-bf16", ()),
)
PEERS = ("batchfit-probe", "lightning-binsearch", "accelerate")

# Several GPUs (only when the machine has more than one): each case per strategy at 2 GPUs and at
# all of them, every rank's real peaks (NCCL, one process per GPU) beside the per-rank estimate.
MULTI_CASES: tuple[Case, ...] = (
    Case("mlp-mnist-sgd-fp32", "mlp", "sgd", "fp32", (1024,), "mnist"),
    Case("resnet18-adamw-amp", "resnet18", "adamw", "amp-bf16", (64,)),
    Case("gpt2-adamw-fp32", GPT2, "adamw", "fp32", (4,)),
)
MULTI_STRATEGIES = ("ddp", "fsdp")

# model spec substring -> family (first match wins), for the accuracy report
FAMILIES: tuple[tuple[str, str], ...] = (
    ("gpt2", "gpt2"),
    ("vit", "vit"),
    ("resnet", "resnet"),
    ("cnn", "cnn"),
    ("mlp", "mlp"),
)


def family_of(model: str) -> str:
    low = model.lower()
    return next((fam for key, fam in FAMILIES if key in low), "other")


# ---------------------------------------------------------------------------------------------
# Child processes: python bench/gpu_validate.py --child KIND, JSON in on stdin, one JSON line out


def run_child(kind: str, payload: dict[str, Any], *, timeout_s: float, hide_cuda: bool = False) -> dict[str, Any]:
    """Run one child; returns its JSON, or ``{"error": ...}`` when it failed or timed out."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", kind],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout_s),
            env=env,
            cwd=str(ROOT),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "child_seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                out = json.loads(line)
            except json.JSONDecodeError:
                break
            out["child_seconds"] = seconds
            return out
    tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
    return {"error": f"child exited with code {done.returncode}: {tail[-800:]}", "child_seconds": seconds}


def _child_main(kind: str) -> None:
    payload = json.loads(sys.stdin.read() or "{}")
    try:
        out = CHILDREN[kind](payload)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:800]}
    print(json.dumps(out), flush=True)


def child_env(_: dict[str, Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "torch": str(torch.__version__),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "cuda": bool(torch.cuda.is_available()),
        "device_count": int(torch.cuda.device_count()) if torch.cuda.is_available() else 0,
    }
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out.update(
            card=props.name,
            total_memory_bytes=int(props.total_memory),
            compute_capability=[int(props.major), int(props.minor)],
            cudnn=torch.backends.cudnn.version(),
        )
        from batchfit._calibrate import _driver_version

        out["driver"] = _driver_version()
    versions = {}
    for name in ("torchvision", "timm", "lightning", "pytorch_lightning", "accelerate", "pynvml"):
        try:
            mod = __import__(name)
            versions[name] = str(getattr(mod, "__version__", "?"))
        except Exception:
            versions[name] = None
    out["packages"] = versions
    return out


def child_calibrate(_: dict[str, Any]) -> dict[str, Any]:
    from batchfit._calibrate import calibrate

    return calibrate()


# ---------------------------------------------------------------------------------------------
# CUDA kernels' own allocations (batchfit._cuda_scratch): each rule's prediction beside what
# max_memory_allocated shows inside the op, at a few shapes. One child, after a warm-up call per op
# (lazy module loading and first-call allocations happen outside the measured call).

# (id, kind, parameters); kinds: sdpa (backward of one attention call), embedding (backward),
# foreach_norm, conv (cuDNN, the catalogue's per-call constant), and single ops that no rule
# models (predicted 0), whose measured scratch says whether one is needed.
KERNEL_CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("flash-bwd-bf16-4x16x1024x64", "sdpa", {"backend": "flash", "shape": (4, 16, 1024, 64), "dtype": "bfloat16"}),
    ("flash-bwd-bf16-2x8x2000x128", "sdpa", {"backend": "flash", "shape": (2, 8, 2000, 128), "dtype": "bfloat16"}),
    ("flash-bwd-fp16-8x12x512x64", "sdpa", {"backend": "flash", "shape": (8, 12, 512, 64), "dtype": "float16"}),
    (
        "efficient-bwd-bf16-4x16x1024x64",
        "sdpa",
        {"backend": "efficient", "shape": (4, 16, 1024, 64), "dtype": "bfloat16"},
    ),
    (
        "efficient-bwd-bf16-2x8x1000x128",
        "sdpa",
        {"backend": "efficient", "shape": (2, 8, 1000, 128), "dtype": "bfloat16"},
    ),
    ("efficient-bwd-fp32-4x8x512x64", "sdpa", {"backend": "efficient", "shape": (4, 8, 512, 64), "dtype": "float32"}),
    (
        "efficient-bwd-fp32-1x4x2048x128",
        "sdpa",
        {"backend": "efficient", "shape": (1, 4, 2048, 128), "dtype": "float32"},
    ),
    (
        "efficient-fwd-bf16-2x8x1024x256",
        "sdpa_forward",
        {"backend": "efficient", "shape": (2, 8, 1024, 256), "dtype": "bfloat16"},
    ),
    (
        "embedding-bwd-fp32-4096x50257x768",
        "embedding",
        {"tokens": 4096, "vocab": 50257, "dim": 768, "dtype": "float32"},
    ),
    (
        "embedding-bwd-bf16-16384x32000x1024",
        "embedding",
        {"tokens": 16384, "vocab": 32000, "dim": 1024, "dtype": "bfloat16"},
    ),
    (
        "embedding-bwd-fp32-2048x50257x768-direct",
        "embedding",
        {"tokens": 2048, "vocab": 50257, "dim": 768, "dtype": "float32"},
    ),
    (
        "foreach-norm-fp32-gpt2",
        "foreach_norm",
        {"numels": (50257 * 768,) + (768 * 2304, 768 * 768, 768 * 3072, 3072 * 768) * 12},
    ),
    ("conv-fwd-fp32-64x256x56x56", "conv", {"shape": (64, 256, 56, 56), "out": 64, "kernel": 1, "dtype": "float32"}),
    ("conv-fwd-bf16-64x64x56x56-3x3", "conv", {"shape": (64, 64, 56, 56), "out": 64, "kernel": 3, "dtype": "bfloat16"}),
    (
        "conv-bwd-fp32-64x64x56x56-3x3",
        "conv",
        {"shape": (64, 64, 56, 56), "out": 64, "kernel": 3, "dtype": "float32", "backward": True},
    ),
    # a .sum() loss's stride-0 gradient through the last Linear (Blas.cpp, prepare_matrix_for_cublas)
    ("mm-expanded-grad-fp16-4096x30522x768", "mm", {"rows": 4096, "vocab": 30522, "dim": 768, "dtype": "float16"}),
    (
        "mm-contiguous-fp16-4096x30522x768",
        "mm",
        {"rows": 4096, "vocab": 30522, "dim": 768, "dtype": "float16", "dense": True},
    ),
    # the 0-dim result keeps the unreduced storage, and the kernel holds one more (_loss_kernels)
    ("mse-loss-fp32-8192x4096", "reduced_loss", {"op": "mse_loss", "shape": (8192, 4096), "dtype": "float32"}),
    ("bce-fp32-8192x4096", "reduced_loss", {"op": "binary_cross_entropy", "shape": (8192, 4096), "dtype": "float32"}),
    ("sum-all-fp32-64M", "op", {"op": "sum_all", "shape": (64 * 1024 * 1024,), "dtype": "float32"}),
    ("sum-dim0-fp32-65536x1024", "op", {"op": "sum_dim0", "shape": (65536, 1024), "dtype": "float32"}),
    ("log-softmax-bf16-8192x50257", "op", {"op": "log_softmax", "shape": (8192, 50257), "dtype": "bfloat16"}),
    ("nll-loss-fp32-8192x50257", "op", {"op": "nll_loss", "shape": (8192, 50257), "dtype": "float32"}),
)


def _kernel_setup(kind: str, p: dict[str, Any], device: str, cc: tuple[int, int], conv_bytes: int) -> tuple[Any, Any]:
    """(run, program): ``run()`` performs the op once (CUDA only); ``program`` the rule's buffers
    (``None`` when no rule models the op, so the estimate adds nothing)."""
    import torch
    import torch.nn.functional as F

    from batchfit import _cuda_scratch as cs

    dtype = getattr(torch, p.get("dtype", "float32"))
    real = device == "cuda"
    if kind == "sdpa":
        b, h, s, d = p["shape"]
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=real) for _ in range(3))
        g = torch.randn(b, s, h, d, device=device, dtype=dtype).transpose(1, 2)  # the fused kernels' layout
        rule = cs.flash_backward_program if p["backend"] == "flash" else cs.efficient_backward_program
        program = rule(g, q, k, v, cc)
        if not real:
            return None, program
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if p["backend"] == "flash" else SDPBackend.EFFICIENT_ATTENTION
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)), program
    if kind == "sdpa_forward":
        b, h, s, d = p["shape"]
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
        program = cs.efficient_forward_program(q, v)
        return (lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True)), program
    if kind == "embedding":
        n, vocab, dim = p["tokens"], p["vocab"], p["dim"]
        w = torch.randn(vocab, dim, device=device, dtype=dtype, requires_grad=real)
        idx = torch.randint(0, vocab, (n,), device=device) if real else torch.empty(n, dtype=torch.int64, device=device)
        g = torch.randn(n, dim, device=device, dtype=dtype)
        program = cs.embedding_backward_program(g, idx, vocab, False)
        if not real:
            return None, program
        out = F.embedding(idx, w)
        return (lambda: torch.autograd.grad(out, w, g, retain_graph=True)), program
    if kind == "mm":
        n, vocab, dim = p["rows"], p["vocab"], p["dim"]
        make = (
            (lambda *shape: torch.randn(*shape, device=device, dtype=dtype))
            if real
            else (lambda *shape: torch.empty(*shape, device=device, dtype=dtype))
        )
        g = make(n, vocab) if p.get("dense") else make(1, 1).expand(n, vocab)
        w = make(vocab, dim)
        return (lambda: torch.mm(g, w)), cs.cublas_operands_program(g, w)
    if kind == "reduced_loss":
        from batchfit._loss_kernels import unreduced_loss

        func = getattr(torch.ops.aten, p["op"]).default
        x = torch.rand(*p["shape"], device=device, dtype=dtype) if real else torch.empty(*p["shape"], device=device)
        y = torch.rand_like(x) if real else torch.empty_like(x)
        args = (x, y, 1) if p["op"] == "mse_loss" else (x, y, None, 1)
        kept = unreduced_loss(func, args, {}, "cuda")
        assert kept is not None
        # the result's storage (measured as `outputs_bytes`) is kept[0]; kept[1] what the op holds inside
        return (lambda: func(*args)), kept[1]
    if kind == "foreach_norm":
        ts = [torch.randn(n, device=device) if real else torch.empty(n, device=device) for n in p["numels"]]
        return (lambda: torch._foreach_norm(ts, 2)), cs.foreach_norm_program(ts)
    if kind == "conv":
        n, c, hh, ww = p["shape"]
        kk = p["kernel"]
        x = torch.randn(n, c, hh, ww, device=device, dtype=dtype) if real else None
        wt = torch.randn(p["out"], c, kk, kk, device=device, dtype=dtype) if real else None
        program = [("alloc", "cudnn_workspace", conv_bytes)]  # the catalogue's per-call constant
        if not real:
            return None, program
        torch.backends.cudnn.benchmark = False
        pad = [kk // 2, kk // 2]
        if p.get("backward"):
            y = torch.ops.aten.convolution(x, wt, None, [1, 1], pad, [1, 1], False, [0, 0], 1)
            gy = torch.randn_like(y)
            return (
                lambda: torch.ops.aten.convolution_backward(
                    gy, x, wt, None, [1, 1], pad, [1, 1], False, [0, 0], 1, [True, True, False]
                )
            ), program
        return (lambda: torch.ops.aten.convolution(x, wt, None, [1, 1], pad, [1, 1], False, [0, 0], 1)), program
    # single ops no rule models
    x = torch.randn(*p["shape"], device=device, dtype=dtype) if real else None
    if not real:
        return None, None
    op = p["op"]
    if op == "sum_all":
        return (lambda: x.sum()), None
    if op == "sum_dim0":
        return (lambda: x.sum(0)), None
    if op == "log_softmax":
        return (lambda: torch.ops.aten._log_softmax(x, 1, False)), None
    target = torch.randint(0, p["shape"][1], (p["shape"][0],), device=device)
    logp = torch.log_softmax(x, 1)
    return (lambda: torch.ops.aten.nll_loss_forward(logp, target, None, 1, -100)), None


def _measure_op(run: Any, round_size: Any) -> dict[str, int]:
    """Peak rise inside ``run()`` beyond its outputs (each output storage rounded as the allocator does)."""
    import torch
    from torch.utils._pytree import tree_leaves

    run()  # warm-up: modules load lazily, first-call allocations (cuBLAS/cuDNN handles) happen here
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    storages = {}
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    outputs = sum(round_size(n) for n in storages.values())
    held_after = torch.cuda.memory_allocated() - base
    del out
    return {"peak_rise_bytes": peak, "outputs_bytes": outputs, "held_after_bytes": held_after}


def child_kernels(payload: dict[str, Any]) -> dict[str, Any]:
    """Each KERNEL_CASES op: the rule's prediction (peak of its buffers, allocator-rounded) and, on
    CUDA, the measured rise of max_memory_allocated inside the op beyond its outputs."""
    import torch

    from batchfit import _cuda_scratch as cs
    from batchfit._allocator import AllocatorConfig
    from batchfit._gpus import card_for_local, get_gpu, probe_local_gpu

    real = torch.cuda.is_available() and not payload.get("dry_run")
    device = "cuda" if real else "meta"
    local = probe_local_gpu() if real else None
    card = card_for_local(local) if local is not None else get_gpu(DRY_RUN_CARD)
    cc = local.compute_capability if local is not None else (card.compute_capability or (9, 0))
    round_size = AllocatorConfig().round_size
    records = []
    for case_id, kind, params in KERNEL_CASES:
        rec: dict[str, Any] = {"id": case_id, "kind": kind, "params": params, "compute_capability": list(cc)}
        began = time.perf_counter()
        try:
            run, program = _kernel_setup(kind, params, device, cc, card.conv_workspace_bytes)
            rec["modelled"] = program is not None
            rec["buffers"] = [list(step) for step in program or []]
            rec["predicted_bytes"] = cs.peak_bytes(program or [], round_size)
            if kind == "reduced_loss":  # the result's real storage: the unreduced size, allocator-rounded
                numel = math.prod(params["shape"])
                rec["predicted_outputs_bytes"] = round_size(numel * getattr(torch, params["dtype"]).itemsize)
            if real:
                m = _measure_op(run, round_size)
                rec.update(m)
                rec["measured_bytes"] = m["peak_rise_bytes"] - m["outputs_bytes"]
                rec["error_bytes"] = rec["predicted_bytes"] - rec["measured_bytes"]
            del run
        except Exception as exc:  # one op failing (a kernel this card lacks) must not lose the others
            rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        if real:
            torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - began, 3)
        records.append(rec)
    return {"records": records, "torch": str(torch.__version__), "card": card.name, "measured": real}


def _workload(case: dict[str, Any]) -> Any:
    from batchfit._models import load_workload

    return load_workload(case["model"], dataset=case.get("dataset"))


def child_estimate(payload: dict[str, Any]) -> dict[str, Any]:
    """The estimate as a user without a GPU gets it (the parent hides CUDA from this process)."""
    import torch

    from batchfit._estimate import Estimator
    from batchfit._step import make_spec

    case = payload["case"]
    out: dict[str, Any] = {"torch": str(torch.__version__), "cuda_visible": bool(torch.cuda.is_available())}
    est = Estimator(
        _workload(case),
        make_spec("cuda", case["optimizer"], case["precision"]),
        gpu=payload.get("gpu"),
        memory=payload.get("memory"),
    )
    results = {}
    for b in case["batch_sizes"]:
        start = time.perf_counter()
        try:
            e = est.at(b)
            results[str(b)] = {
                "peak_allocated_bytes": e.peak_allocated_bytes,
                "peak_reserved_bytes": e.peak_reserved_bytes,
                "total_bytes": e.total_bytes,
                "method": e.method,
                "notes": e.notes,
                "card": e.card,
                "seconds": time.perf_counter() - start,
            }
        except Exception as exc:
            results[str(b)] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    out["results"] = results
    return out


def child_fit(payload: dict[str, Any]) -> dict[str, Any]:
    """fit()'s max and recommendation without a GPU, for the card and memory named."""
    import torch

    from batchfit._fit import fit

    case = payload["case"]
    start = time.perf_counter()
    r = fit(
        _workload(case),
        gpu=payload.get("gpu"),
        memory=payload.get("memory"),
        optimizer=case["optimizer"],
        precision=case["precision"],
    )
    return {
        "torch": str(torch.__version__),
        "max_batch_size": r.max_batch_size,
        "recommended_batch_size": r.recommended_batch_size,
        "budget_bytes": r.budget_bytes,
        "seconds": time.perf_counter() - start,
    }


def child_measure(payload: dict[str, Any]) -> dict[str, Any]:
    """One reference step on cuda in this fresh process, measured."""
    import torch

    from batchfit._calibrate import _nvml_process_bytes
    from batchfit._measure import measure_step
    from batchfit._probe import is_oom
    from batchfit._step import make_spec

    case = payload["case"]
    b = int(payload["batch_size"])
    workload = _workload(case)
    spec = make_spec("cuda", case["optimizer"], case["precision"])
    out: dict[str, Any] = {"torch": str(torch.__version__)}
    try:
        m = measure_step(workload, b, spec)
    except Exception as exc:
        out["error"] = ("oom: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:800]
        return out
    out.update(
        peak_allocated_bytes=m.peak_allocated_bytes,
        peak_reserved_bytes=m.peak_reserved_bytes,
        mem_get_info_used_bytes=m.device_used_bytes,
        step_seconds=m.seconds,
        samples_per_second=m.samples_per_second,
    )
    # NVML's process figure after the step: measure_step emptied the cache, so what the process
    # holds then is the memory the allocator never sees (plus what it could not release); the peak
    # reserved on top of that is what nvidia-smi showed at the peak.
    nvml = _nvml_process_bytes(torch.cuda.get_device_properties(0))
    reserved_after = int(torch.cuda.memory_reserved())
    out["nvml_process_bytes_after"] = nvml
    out["reserved_after_bytes"] = reserved_after
    if nvml is not None and m.peak_reserved_bytes is not None:
        out["measured_total_bytes"] = nvml - reserved_after + m.peak_reserved_bytes
        out["measured_total_source"] = "nvml process memory after the step - reserved after + peak reserved"
    else:
        out["measured_total_bytes"] = m.device_used_bytes
        out["measured_total_source"] = "mem_get_info used at the end of the step (whole device)"
    return out


# -- peers: real models built the ordinary way, the same step as batchfit's reference step ---------


def _real_model_and_inputs(case: dict[str, Any]) -> tuple[Any, Any]:
    """An ordinary model (real parameters) and ``make_inputs(batch_size, device)``."""
    import importlib.util

    import torch

    if case["model"] == GPT2:
        path, _, name = case["model"].rpartition(":")
        spec = importlib.util.spec_from_file_location("gpt2_small_peer", ROOT / path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = getattr(module, name)()
        vocab, seq = module.VOCAB, module.SEQ_LEN

        def tokens(b: int, device: Any) -> tuple[Any, ...]:
            return (torch.randint(0, vocab, (b, seq), device=device),)

        return model, tokens
    import torchvision

    model = torchvision.models.get_model(case["model"], num_classes=1000)

    def images(b: int, device: Any) -> tuple[Any, ...]:
        return (torch.randn(b, 3, 224, 224, device=device),)

    return model, images


def _optimizer(name: str, params: Any) -> Any:
    import torch

    table = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.01),
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    }
    return table[name](params)


def _loss(out: Any) -> Any:
    import torch
    import torch.nn.functional as F

    logits = out.flatten(0, -2) if out.dim() > 2 else out
    return F.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def _limit_memory(payload: dict[str, Any]) -> None:
    import torch

    if payload.get("memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(float(payload["memory_fraction"]))


def child_lightning(payload: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import torch

    try:
        import lightning.pytorch as pl
        from lightning.pytorch.tuner import Tuner
    except ImportError:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.tuner import Tuner  # type: ignore[no-redef]

    _limit_memory(payload)
    case = payload["case"]
    model, make_inputs = _real_model_and_inputs(case)
    trials: list[int] = []  # one entry per trial (a new batch size reaching training_step)

    class Indices(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 1 << 24  # never the limit: Lightning stops growing at the dataset's length

        def __getitem__(self, i: int) -> int:
            return i

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.batch_size = 2

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(Indices(), batch_size=self.batch_size)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            b = int(batch.shape[0])
            if not trials or trials[-1] != b:  # binsearch never tries one size twice in a row
                trials.append(b)
            # the batch is made on the device, as in batchfit's reference step (no host copies)
            return _loss(self.model(*make_inputs(b, self.device)))

        def configure_optimizers(self) -> Any:
            return _optimizer(case["optimizer"], self.parameters())

    precision = "bf16-mixed" if case["precision"] == "amp-bf16" else "32-true"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cuda",
            devices=1,
            precision=precision,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        found = Tuner(trainer).scale_batch_size(Lit(), mode="binsearch", init_val=2, max_trials=25, steps_per_trial=3)
    return {
        "batch_size_found": found,
        "attempts": len(trials),
        "trial_batch_sizes": trials,
        "steps_per_trial": 3,
        "seconds": time.perf_counter() - start,
        "version": str(pl.__version__),
    }


def child_accelerate(payload: dict[str, Any]) -> dict[str, Any]:
    import accelerate
    import torch
    from accelerate.utils import find_executable_batch_size

    _limit_memory(payload)
    case = payload["case"]
    model, make_inputs = _real_model_and_inputs(case)
    model = model.cuda().train()
    tried: list[int] = []
    amp = case["precision"] == "amp-bf16"
    start = time.perf_counter()

    @find_executable_batch_size(starting_batch_size=int(payload["starting_batch_size"]))
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        optimizer = _optimizer(case["optimizer"], model.parameters())
        inputs = make_inputs(batch_size, "cuda")
        for _ in range(2):  # the reference step's two iterations
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = _loss(model(*inputs))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return batch_size

    found = train()
    return {
        "batch_size_found": found,
        "attempts": len(tried),
        "trial_batch_sizes": tried,
        "starting_batch_size": int(payload["starting_batch_size"]),
        "seconds": time.perf_counter() - start,
        "version": str(accelerate.__version__),
    }


def child_probe(payload: dict[str, Any]) -> dict[str, Any]:
    from batchfit._probe import probe

    case = payload["case"]
    start = time.perf_counter()
    r = probe(
        case["model"],
        dataset=case.get("dataset"),
        optimizer=case["optimizer"],
        precision=case["precision"],
        start=int(payload["start"]),
        isolate=True,
        memory_fraction=payload.get("memory_fraction"),
        estimates=False,
        attempt_timeout_s=float(payload.get("attempt_timeout_s", 120)),
    )
    out = r.to_dict()
    out.update(batch_size_found=r.max_batch_size, attempts=len(r.attempts), seconds=time.perf_counter() - start)
    out["trial_batch_sizes"] = [a.batch_size for a in r.attempts]
    return out


def child_dist_estimate(payload: dict[str, Any]) -> dict[str, Any]:
    """The per-rank estimate of a distributed step, as a user without a GPU gets it (CUDA hidden)."""
    import torch

    from batchfit._distributed import make_dist
    from batchfit._estimate import Estimator, make_spec

    case, b = payload["case"], int(payload["batch_size"])
    dist = make_dist(int(payload["world_size"]), strategy=payload["strategy"])
    start = time.perf_counter()
    est = Estimator(
        _workload(case),
        make_spec("cuda", case["optimizer"], case["precision"]),
        gpu=payload.get("gpu"),
        memory=payload.get("memory"),
        dist=dist,
    ).at(b)
    ranks = {}
    for r in est.ranks:
        for rank in r.same_as:
            ranks[str(rank)] = {
                "peak_allocated_bytes": r.estimate.peak_allocated_bytes,
                "peak_reserved_bytes": r.estimate.peak_reserved_bytes,
                "total_bytes": r.estimate.total_bytes,
            }
    return {
        "torch": str(torch.__version__),
        "cuda_visible": bool(torch.cuda.is_available()),
        "ranks": ranks,
        "seconds": time.perf_counter() - start,
    }


def _dist_rank(rank: int, port: int, payload: dict[str, Any], out: str) -> None:
    """One rank of a real distributed step on GPU ``rank`` (NCCL), as batchfit's reference loop."""
    import copy

    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from batchfit._distributed import make_dist, wrap_model
    from batchfit._estimate import make_spec
    from batchfit._step import Batch, batch_inputs, batch_maker, label_choice, run_step, unique_trainable

    world, case, b = int(payload["world_size"]), payload["case"], int(payload["batch_size"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    tdist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        workload = _workload(case)
        spec = make_spec("cuda", case["optimizer"], case["precision"])
        dist = make_dist(world, strategy=payload["strategy"])
        model = copy.deepcopy(workload.model).to("meta")
        if dist.strategy.startswith("fsdp"):
            wrap_model(model, dist, "cuda")
            model.to_empty(device=device)
            run_model: Any = model
        else:
            model.to_empty(device=device)
            run_model = DistributedDataParallel(model, device_ids=[rank])
        with torch.no_grad():  # values only matter for numerics
            for prm in model.parameters():
                prm.normal_(0.0, 0.02)
        optimizer = spec.optimizer.build(unique_trainable(model), device_type="cuda")
        inputs = batch_inputs(workload, b, device, None, values=True)
        choice = label_choice(run_model, inputs, spec)
        batch = Batch(inputs, choice.labels())
        del choice, inputs
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run_step(
            run_model,
            batch,
            spec,
            optimizer,
            backward=lambda loss: loss.backward(),
            new_batch=batch_maker(workload, device, None, values=True),
        )
        del batch
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(device)
        result = {
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "mem_get_info_used_bytes": int(total - free),
        }
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:800]}
    finally:
        tdist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def child_dist_measure(payload: dict[str, Any]) -> dict[str, Any]:
    """Every rank's real peaks: one process per GPU (torch.multiprocessing, spawn), NCCL."""
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    world = int(payload["world_size"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(Path(tmp) / f"{r}.json") for r in range(world)]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_dist_rank, args=(r, port, payload, files[r])) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(float(payload.get("timeout_s", 240)))
        for p in procs:
            if p.is_alive():
                p.kill()
        ranks = {
            str(r): json.loads(Path(f).read_text()) if Path(f).exists() else {"error": f"exit code {procs[r].exitcode}"}
            for r, f in enumerate(files)
        }
    return {"torch": str(torch.__version__), "ranks": ranks}


CHILDREN = {
    "env": child_env,
    "calibrate": child_calibrate,
    "kernels": child_kernels,
    "estimate": child_estimate,
    "fit": child_fit,
    "measure": child_measure,
    "lightning": child_lightning,
    "accelerate": child_accelerate,
    "probe": child_probe,
    "dist_estimate": child_dist_estimate,
    "dist_measure": child_dist_measure,
}


# ---------------------------------------------------------------------------------------------
# The parent: plans, runs children, keeps time, writes the files


class Clock:
    """Elapsed time against the budget; sections end at a share of it."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, until_share: float = 1.0) -> float:
        return self.budget_s * until_share - self.elapsed()


def _case_dict(case: Case) -> dict[str, Any]:
    return asdict(case)


def _card_key(env: dict[str, Any], dry_run: bool) -> tuple[str | None, str | None]:
    """The catalogue card the estimates plan for: (gpu key, memory) - memory only for unknown cards."""
    if dry_run:
        return DRY_RUN_CARD, None
    from batchfit._gpus import load_catalogue

    known = load_catalogue().by_torch_name(env.get("card", ""))
    if known is not None:
        return known.key, None
    return None, str(env["total_memory_bytes"])


def _rel(est: int | None, meas: int | None) -> float | None:
    if est is None or meas is None or meas == 0:
        return None
    return (est - meas) / meas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "out", help="result folder (default $OUT, else ./out)"
    )
    parser.add_argument("--dry-run", action="store_true", help="plan everything, estimate a few small cases, no GPU")
    parser.add_argument("--only", action="append", default=[], help="only cases whose id contains this (repeatable)")
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="skip what is left after this long")
    parser.add_argument("--suite-share", type=float, default=0.55, help="share of the budget the suite may use")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--peer-memory-fraction",
        type=float,
        default=0.15,
        help="torch.cuda.set_per_process_memory_fraction for every peer (a smaller card, quicker trials)",
    )
    parser.add_argument("--workers", type=int, default=4, help="estimate children at once (CPU only)")
    parser.add_argument("--dry-run-estimates", type=int, default=2, help="estimate groups run in a dry run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(args.child)
        return 0

    clock = Clock(args.budget_seconds)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: dict[str, float] = {}
    skipped: list[str] = []

    def section(name: str, began: float) -> None:
        sections[name] = round(time.perf_counter() - began, 2)
        print(f"[{clock.elapsed():7.1f} s] {name} done in {sections[name]:.1f} s", flush=True)

    # 1. environment (in a child: this process never creates a CUDA context, which would take
    #    memory on the card and shift every total and boundary measured after it)
    began = time.perf_counter()
    env = run_child("env", {}, timeout_s=120)
    dry_run = bool(args.dry_run or not env.get("cuda"))
    why_dry = "--dry-run" if args.dry_run else "torch.cuda.is_available() is False" if dry_run else None
    gpu_key, memory = _card_key(env, dry_run)
    print(f"environment: {json.dumps(env)}", flush=True)
    print(f"dry run: {dry_run} ({why_dry})" if dry_run else f"estimating for catalogue card {gpu_key or memory}")
    section("environment", began)

    # 2. calibration first, in a fresh process (cuBLAS workspaces are only seen when created)
    began = time.perf_counter()
    calibration = run_child("calibrate", {}, timeout_s=min(180, max(10, clock.left())))
    section("calibration", began)
    non_allocator = (calibration.get("catalogue_update") or {}).get("non_allocator", {}).get("bytes")

    common = {
        "gpu": env.get("card") if not dry_run else f"(dry run: planned for {DRY_RUN_CARD})",
        "driver": env.get("driver"),
        "torch": env.get("torch"),
        "dry_run": dry_run,
        "estimate_card": gpu_key or f"--memory {memory}",
    }

    def selected(case: Case) -> bool:
        return not args.only or any(s in case.id for s in args.only)

    cases = [c for c in SUITE if selected(c)]
    peer_cases = [c for c in PEER_CASES if selected(c)] if not args.skip_peers else []

    # 3a. estimates: CPU-only children in the background while the GPU measures
    pool = futures.ThreadPoolExecutor(max_workers=max(1, args.workers))
    estimate_jobs: dict[str, futures.Future[dict[str, Any]]] = {}
    to_estimate = cases[: args.dry_run_estimates] if dry_run else cases
    for case in to_estimate:
        payload = {"case": _case_dict(case), "gpu": gpu_key, "memory": memory}
        estimate_jobs[case.id] = pool.submit(run_child, "estimate", payload, timeout_s=300, hide_cuda=True)
    fit_jobs: dict[str, futures.Future[dict[str, Any]]] = {}
    total_memory = env.get("total_memory_bytes")
    peer_memory = None
    if not dry_run and total_memory and peer_cases:
        from batchfit._gpus import get_gpu, load_catalogue

        card = get_gpu(gpu_key) if gpu_key else None
        non_alloc = card.non_allocator_bytes if card else load_catalogue().defaults["non_allocator"]["bytes"]
        # the fraction caps what the allocator may reserve; fit's budget less its non-allocator
        # figure is exactly that cap
        peer_memory = str(int(args.peer_memory_fraction * total_memory) + int(non_alloc))
        for case in peer_cases:
            payload = {"case": _case_dict(case), "gpu": gpu_key, "memory": peer_memory}
            fit_jobs[case.id] = pool.submit(run_child, "fit", payload, timeout_s=300, hide_cuda=True)

    # 5. several GPUs, only when this machine has more than one: every rank's real peaks (NCCL, one
    #    process per GPU) beside the per-rank estimate made without a GPU; a dry run estimates the
    #    first planned setting on the CPU to prove the path
    gpus = int(env.get("device_count") or 0)
    worlds = sorted({2, gpus}) if gpus > 2 else [2]
    multi_plan = [
        (case, strategy, world)
        for case in MULTI_CASES
        if selected(case)
        for strategy in MULTI_STRATEGIES
        for world in worlds
    ]
    multi_skip = (
        "dry run: planned, not measured"
        if dry_run
        else f"this machine has {gpus} GPU{'s' if gpus != 1 else ''}: the multi-GPU section needs more than one"
        if gpus < 2
        else None
    )
    if multi_skip and not dry_run:
        print(f"multi-GPU: skipped ({multi_skip})", flush=True)
    def dist_payload(case: Case, strategy: str, world: int) -> dict[str, Any]:
        return {
            "case": _case_dict(case),
            "strategy": strategy,
            "world_size": world,
            "batch_size": case.batch_sizes[0],
            "gpu": gpu_key,
            "memory": memory,
        }

    dist_jobs: dict[int, futures.Future[dict[str, Any]]] = {}
    for i, (case, strategy, world) in enumerate(multi_plan):
        if multi_skip is None or (dry_run and i == 0):
            job = pool.submit(run_child, "dist_estimate", dist_payload(case, strategy, world), timeout_s=300, hide_cuda=True)
            dist_jobs[i] = job

    # 3a'. CUDA kernels' own allocations, each rule beside a measurement (in a dry run the
    #      predictions only, on meta tensors), while the estimate children run on the CPU
    began = time.perf_counter()
    kernels = run_child(
        "kernels", {"dry_run": dry_run}, timeout_s=min(180, max(120, clock.left(0.6))), hide_cuda=dry_run
    )
    for r in kernels.get("records", []):
        got = r.get("error") or (
            f"predicted {r.get('predicted_bytes'):,} B, measured {r['measured_bytes']:,} B"
            if "measured_bytes" in r
            else f"predicted {r.get('predicted_bytes'):,} B"
        )
        print(f"  kernel {r['id']}: {got}", flush=True)
    section("kernel allocations", began)

    # 3b. measurements: one fresh child per (case, batch size), round-robin so a budget cut
    #     still leaves every family measured
    began = time.perf_counter()
    plan = [
        (case, b)
        for i in range(max((len(c.batch_sizes) for c in cases), default=0))
        for case in cases
        for b in case.batch_sizes[i : i + 1]
    ]
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for case, b in plan:
        if dry_run:
            measured[(case.id, b)] = {"skipped": "dry run: planned, not measured"}
            continue
        left = clock.left(args.suite_share)
        if left < 10:
            measured[(case.id, b)] = {"skipped": "budget: no time left for the suite"}
            skipped.append(f"suite {case.id} batch {b}")
            continue
        result = run_child("measure", {"case": _case_dict(case), "batch_size": b}, timeout_s=min(120, left))
        measured[(case.id, b)] = result
        status = result.get("error") or f"alloc {result.get('peak_allocated_bytes'):,} B"
        print(f"  measured {case.id} batch {b}: {status} ({result.get('child_seconds', 0):.1f} s)", flush=True)
    section("suite measurements", began)

    began = time.perf_counter()
    estimates: dict[str, dict[str, Any]] = {}
    for case_id, job in estimate_jobs.items():
        try:
            estimates[case_id] = job.result(timeout=max(5, clock.left(0.75)))
        except futures.TimeoutError:
            estimates[case_id] = {"error": "budget: the estimate did not finish in time"}
            skipped.append(f"estimate {case_id}")
    section("suite estimates (waited for)", began)

    suite_records = []
    for case, b in plan:
        est_all = estimates.get(case.id, {"skipped": "dry run: estimated only for the first cases"})
        est = (est_all.get("results") or {}).get(str(b), {})
        meas = measured[(case.id, b)]
        rec: dict[str, Any] = {
            **common,
            "schema_version": SCHEMA_VERSION,
            "case": case.id,
            "model": case.model,
            "family": case.family,
            "dataset": case.dataset,
            "batch_size": b,
            "optimizer": case.optimizer,
            "precision": case.precision,
            "torch_estimate": est_all.get("torch"),
            "torch_measurement": meas.get("torch"),
            "estimate_saw_cuda": est_all.get("cuda_visible"),
            "estimated_peak_allocated_bytes": est.get("peak_allocated_bytes"),
            "measured_peak_allocated_bytes": meas.get("peak_allocated_bytes"),
            "estimated_peak_reserved_bytes": est.get("peak_reserved_bytes"),
            "measured_peak_reserved_bytes": meas.get("peak_reserved_bytes"),
            "estimated_total_bytes": est.get("total_bytes"),
            "measured_total_bytes": meas.get("measured_total_bytes"),
            "measured_total_source": meas.get("measured_total_source"),
            "mem_get_info_used_bytes": meas.get("mem_get_info_used_bytes"),
            "nvml_process_bytes_after": meas.get("nvml_process_bytes_after"),
            "calibrated_total_bytes": (est["peak_reserved_bytes"] + non_allocator)
            if est.get("peak_reserved_bytes") is not None and non_allocator is not None
            else None,
            "estimate_method": est.get("method"),
            "estimate_notes": est.get("notes"),
            "estimate_seconds": est.get("seconds"),
            "measure_seconds": meas.get("child_seconds"),
            "samples_per_second": meas.get("samples_per_second"),
            "error": est_all.get("error") or est.get("error") or meas.get("error"),
            "skipped": meas.get("skipped") or est_all.get("skipped"),
        }
        for metric in ("peak_allocated", "peak_reserved", "total"):
            rec[f"{metric}_rel_error"] = _rel(rec[f"estimated_{metric}_bytes"], rec[f"measured_{metric}_bytes"])
        suite_records.append(rec)

    # 4. peers
    began = time.perf_counter()
    peer_records = []
    runs_left = len(peer_cases) * len(PEERS)
    for case in peer_cases:
        fit_result: dict[str, Any] = {}
        if case.id in fit_jobs:
            try:
                fit_result = fit_jobs[case.id].result(timeout=max(5, clock.left(0.9)))
            except futures.TimeoutError:
                fit_result = {"error": "budget: fit did not finish in time"}
        est_max = fit_result.get("max_batch_size")
        for peer in PEERS:
            base: dict[str, Any] = {
                **common,
                "schema_version": SCHEMA_VERSION,
                "case": case.id,
                "model": case.model,
                "family": case.family,
                "optimizer": case.optimizer,
                "precision": case.precision,
                "peer": peer,
                "memory_fraction": args.peer_memory_fraction,
                "fit_memory": peer_memory,
                "estimated_max_batch_size": est_max,
                "estimated_recommended_batch_size": fit_result.get("recommended_batch_size"),
                "fit_error": fit_result.get("error"),
            }
            left = clock.left(0.97)
            per_run = min(150.0, left / max(1, runs_left))
            runs_left -= 1
            if dry_run:
                peer_records.append({**base, "skipped": "dry run: planned, not run"})
                continue
            if per_run < 15:
                peer_records.append({**base, "skipped": "budget: no time left for the peers"})
                skipped.append(f"peer {peer} {case.id}")
                continue
            payload: dict[str, Any] = {
                "case": _case_dict(case),
                "memory_fraction": args.peer_memory_fraction,
            }
            if peer == "batchfit-probe":
                if est_max is None:
                    peer_records.append({**base, "error": f"no estimated start: {fit_result.get('error')}"})
                    continue
                payload.update(start=est_max, attempt_timeout_s=60)
                result = run_child("probe", payload, timeout_s=per_run)
            elif peer == "lightning-binsearch":
                result = run_child("lightning", payload, timeout_s=per_run)
            else:
                # accelerate only shrinks (x0.9 per OOM): start it above the boundary, at the power
                # of two over twice the estimate
                payload["starting_batch_size"] = 2 ** math.ceil(math.log2(2 * est_max)) if est_max else 4096
                result = run_child("accelerate", payload, timeout_s=per_run)
            rec = {**base, **{k: v for k, v in result.items() if k not in ("attempts_detail",)}}
            rec["wall_seconds"] = result.get("child_seconds")
            rec["batch_size"] = result.get("batch_size_found")
            peer_records.append(rec)
            print(
                f"  peer {peer} on {case.id}: found {result.get('batch_size_found')} in "
                f"{result.get('attempts')} attempts, {result.get('child_seconds', 0):.1f} s {result.get('error') or ''}",
                flush=True,
            )
    # the measured boundary (batchfit probe's exact one) beside every peer's answer
    for case in peer_cases:
        probe_rec = next((r for r in peer_records if r["case"] == case.id and r["peer"] == "batchfit-probe"), None)
        boundary = probe_rec.get("max_batch_size") if probe_rec and probe_rec.get("exact") else None
        for r in peer_records:
            if r["case"] == case.id:
                r["measured_max_batch_size"] = boundary
                rec_b = r.get("estimated_recommended_batch_size")
                r["recommended_runs"] = (rec_b <= boundary) if boundary is not None and rec_b is not None else None
    section("peers", began)

    # 5. several GPUs (planned, and estimated in the background, with the suite's estimates above)
    began = time.perf_counter()
    multi_records: list[dict[str, Any]] = []
    for i, (case, strategy, world) in enumerate(multi_plan):
        b = case.batch_sizes[0]
        payload = dist_payload(case, strategy, world)
        est: dict[str, Any] = {}
        meas: dict[str, Any] = {}
        if i in dist_jobs:
            try:
                est = dist_jobs[i].result(timeout=max(30, clock.left(1.5)))
            except futures.TimeoutError:
                est = {"error": "budget: the estimate did not finish in time"}
        if multi_skip is None:
            left = max(30, clock.left(1.5))
            meas = run_child("dist_measure", {**payload, "timeout_s": min(240, left)}, timeout_s=min(300, left + 30))
        for rank in range(world):
            e = (est.get("ranks") or {}).get(str(rank), {})
            m = (meas.get("ranks") or {}).get(str(rank), {})
            rec = {
                **common,
                "schema_version": SCHEMA_VERSION,
                "case": case.id,
                "model": case.model,
                "family": case.family,
                "optimizer": case.optimizer,
                "precision": case.precision,
                "strategy": strategy,
                "world_size": world,
                "rank": rank,
                "batch_size": b,
                "estimated_peak_allocated_bytes": e.get("peak_allocated_bytes"),
                "measured_peak_allocated_bytes": m.get("peak_allocated_bytes"),
                "estimated_peak_reserved_bytes": e.get("peak_reserved_bytes"),
                "measured_peak_reserved_bytes": m.get("peak_reserved_bytes"),
                "estimated_total_bytes": e.get("total_bytes"),
                "mem_get_info_used_bytes": m.get("mem_get_info_used_bytes"),
                "estimate_saw_cuda": est.get("cuda_visible"),
                "estimate_seconds": est.get("seconds"),
                "measure_seconds": meas.get("child_seconds"),
                "error": est.get("error") or meas.get("error") or m.get("error"),
                "skipped": multi_skip,
            }
            for metric in ("peak_allocated", "peak_reserved"):
                rec[f"{metric}_rel_error"] = _rel(rec[f"estimated_{metric}_bytes"], rec[f"measured_{metric}_bytes"])
            multi_records.append(rec)
        if est or meas:
            first = multi_records[-world]
            got = first["error"] or (
                f"rank 0 alloc est. {first['estimated_peak_allocated_bytes']}, meas. {first['measured_peak_allocated_bytes']}"
            )
            print(f"  multi-GPU {case.id} {strategy} x{world}: {got}", flush=True)
    section("multi-GPU", began)
    pool.shutdown(wait=False, cancel_futures=True)

    environment = [
        {
            **common,
            "schema_version": SCHEMA_VERSION,
            "environment": env,
            "dry_run_reason": why_dry,
            "budget_seconds": args.budget_seconds,
            "elapsed_seconds": round(clock.elapsed(), 2),
            "sections_seconds": sections,
            "skipped": skipped,
            "cases": [c.id for c in cases],
            "peer_cases": [c.id for c in peer_cases],
            "argv": sys.argv[1:],
        }
    ]
    files = {
        "environment.json": environment,
        "calibration.json": [{**common, "schema_version": SCHEMA_VERSION, **calibration}],
        "kernels.json": [
            {**common, "schema_version": SCHEMA_VERSION, **r, "torch_kernels": kernels.get("torch")}
            for r in kernels.get("records", [])
        ]
        or [{**common, "schema_version": SCHEMA_VERSION, "error": kernels.get("error")}],
        "suite.json": suite_records,
        "peers.json": peer_records,
        "multigpu.json": multi_records,
    }
    for name, data in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=1, default=str) + "\n")
    print_summary(suite_records, peer_records, skipped, clock)
    print(f"wrote {', '.join(files)} to {out_dir} ({clock.elapsed():.1f} s)", flush=True)
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def print_summary(suite: list[dict[str, Any]], peers: list[dict[str, Any]], skipped: list[str], clock: Clock) -> None:
    """The short table printed last."""
    print("\ncase                      batch   alloc err  reserved err  total err  note")
    for r in suite:
        note = r.get("error") or r.get("skipped") or ""
        print(
            f"{r['case']:<25} {r['batch_size']:>5}  {_pct(r['peak_allocated_rel_error']):>10}  "
            f"{_pct(r['peak_reserved_rel_error']):>12}  {_pct(r['total_rel_error']):>9}  {str(note)[:60]}"
        )
    errs = [abs(r["peak_allocated_rel_error"]) for r in suite if r["peak_allocated_rel_error"] is not None]
    if errs:
        print(f"peak allocated: median |error| {statistics.median(errs):.2%}, worst {max(errs):.2%} over {len(errs)}")
    if peers:
        print("\npeer                 case                 found  attempts  seconds  note")
        for r in peers:
            note = r.get("error") or r.get("skipped") or ""
            secs = r.get("wall_seconds")
            print(
                f"{r['peer']:<20} {r['case']:<20} {r.get('batch_size_found') or '-':>5}  {r.get('attempts') or '-':>8}  "
                f"{f'{secs:.1f}' if secs else '-':>7}  {str(note)[:60]}"
            )
    if skipped:
        print(
            f"\nskipped for the budget: {len(skipped)} ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})"
        )
    print(f"elapsed {clock.elapsed():.1f} s of a {clock.budget_s:.0f} s budget")


if __name__ == "__main__":
    sys.exit(main())
