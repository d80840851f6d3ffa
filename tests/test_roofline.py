"""The roofline estimate: the step's FLOPs and bytes per op, checked by hand and against a real CPU step."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from batchfit._gpus import PEAK_KINDS, Peaks, Provenance, card_from_entry, get_gpu, list_gpus, load_catalogue
from batchfit._models import load_workload
from batchfit._roofline import (
    AffineCost,
    MissingPeak,
    OpCost,
    StepCost,
    peak_kind,
    roofline,
    smallest_within,
    step_cost,
)
from batchfit._step import make_spec

ROOT = Path(__file__).resolve().parents[1]
M, K, H, C = 8, 20, 16, 4  # batch, inputs, hidden units, classes
F32 = 4  # bytes per float32 element


def flop_ops(cost: StepCost) -> list[OpCost]:
    return [op for op in cost.ops if op.flops]


# -- FLOPs -----------------------------------------------------------------------------------------


def test_a_linear_layer_counts_2mnk_forward_and_once_more_backward() -> None:
    cost = step_cost(load_workload(nn.Sequential(nn.Linear(K, C)), (K,)), make_spec("cuda"), M)
    ops = flop_ops(cost)
    # forward: addmm (M x K) @ (K x C); backward: the weight's gradient only (the input needs none)
    assert [op.op for op in ops] == ["aten.addmm", "aten.mm"]
    assert [op.flops for op in ops] == [2 * M * K * C, 2 * M * K * C]
    assert cost.flops == 4 * M * K * C


def test_an_mlps_hidden_layer_costs_twice_its_forward_in_backward() -> None:
    model = nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, C))
    cost = step_cost(load_workload(model, (K,)), make_spec("cuda"), M)
    forward = 2 * M * (K * H + H * C)
    backward = 2 * (2 * M * H * C) + 2 * M * K * H  # layer 2: input and weight grads; layer 1: weight grad
    assert cost.flops == forward + backward
    assert sorted(op.flops for op in flop_ops(cost)) == sorted(
        [2 * M * K * H, 2 * M * H * C, 2 * M * H * C, 2 * M * H * C, 2 * M * K * H]
    )


def test_flops_equal_torchs_counter_on_a_real_cpu_step() -> None:
    """Independent path: torch's FlopCounterMode around one real CPU step of the same loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(M, 3, 8, 8), torch.zeros(M, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    expected = counter.get_total_flops()
    assert expected > 0
    assert step_cost(load_workload(model, (3, 8, 8)), make_spec("cuda"), M).flops == expected


def test_autocast_matmuls_run_at_the_bf16_peak_and_the_casts_move_bytes() -> None:
    model = nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, C))
    cost = step_cost(load_workload(model, (K,)), make_spec("cuda", precision="amp-bf16"), M)
    assert {op.kind for op in flop_ops(cost)} == {"bf16"}
    casts = [op for op in cost.ops if op.op == "aten._to_copy"]
    # each iteration casts the FP32 weights for the BF16 matmuls: read 4 B, write 2 B per element
    assert any(op.nbytes == (F32 + 2) * K * H for op in casts)


# -- bytes -----------------------------------------------------------------------------------------


def test_bytes_of_the_forward_matmul_and_the_sgd_update_by_hand() -> None:
    cost = step_cost(load_workload(nn.Sequential(nn.Linear(K, C)), (K,)), make_spec("cuda"), M)
    addmm = next(op for op in cost.ops if op.op == "aten.addmm")
    assert addmm.nbytes == F32 * (C + M * K + K * C + M * C)  # bias, input, weight read; output written
    update = [op for op in cost.ops if op.op.startswith("aten._foreach")]
    params = F32 * (K * C + C)
    assert [(op.op, op.nbytes) for op in update] == [("aten._foreach_add_", 3 * params)]  # p, grad read; p written
    views = [op for op in cost.ops if op.op in ("aten.t", "aten.view", "aten.detach")]
    assert views and all(op.nbytes == 0 for op in views)


# -- along the batch axis --------------------------------------------------------------------------


def test_costs_are_lines_in_the_batch_size_checked_against_a_direct_trace() -> None:
    workload = load_workload(nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, C)), (K,))
    spec = make_spec("cuda", optimizer="adam")
    affine = AffineCost([step_cost(workload, spec, b) for b in (2, 4, 8)])
    assert affine.ok
    assert affine.at(100) == step_cost(workload, spec, 100)


def test_costs_that_are_not_lines_are_refused() -> None:
    def cost(b: int, flops: int, op: str = "aten.mm") -> StepCost:
        return StepCost(b, (OpCost(op, "fp32", flops, 8 * b),))

    assert AffineCost([cost(b, 10 * b) for b in (2, 4, 8)]).ok
    assert not AffineCost([cost(b, b * b) for b in (2, 4, 8)]).ok
    assert not AffineCost([cost(2, 20), cost(4, 40), cost(8, 80, "aten.bmm")]).ok
    with pytest.raises(ValueError):
        AffineCost([cost(2, 20), cost(2, 20), cost(4, 40)])


# -- the roofline ----------------------------------------------------------------------------------

PEAKS = Peaks({"fp32": 10, "bf16": 100}, 5, Provenance("assumed", "test"))


def test_each_op_takes_the_larger_of_compute_and_memory_time() -> None:
    compute = OpCost("aten.mm", "fp32", flops=100, nbytes=10)  # 100 / 10 = 10 s vs 10 / 5 = 2 s
    memory = OpCost("aten.relu", None, flops=0, nbytes=100)  # 100 / 5 = 20 s
    assert compute.seconds(PEAKS) == 10 and not compute.memory_bound(PEAKS)
    assert memory.seconds(PEAKS) == 20 and memory.memory_bound(PEAKS)
    step = StepCost(1, (compute, memory))
    assert step.seconds(PEAKS) == 30 and step.memory_bound_seconds(PEAKS) == 20
    # per op, never below the whole step's max(FLOPs / peak, bytes / bandwidth)
    assert step.seconds(PEAKS) >= max(step.flops / 10, step.nbytes / 5)


def test_tf32_falls_back_to_fp32_and_a_missing_kind_is_said() -> None:
    assert OpCost("aten.convolution", "tf32", 100, 0).seconds(PEAKS) == 10  # no TF32 tensor cores
    assert OpCost("aten.mm", "bf16", 100, 0).seconds(PEAKS) == 1
    with pytest.raises(MissingPeak):
        OpCost("aten.mm", "fp16", 100, 0).seconds(PEAKS)


def test_peak_kind_follows_torchs_tf32_switches() -> None:
    before, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_kind("aten.mm", torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert peak_kind("aten.mm", torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert peak_kind("aten.convolution", torch.float32) == "fp32"
        assert peak_kind("aten.mm", torch.float16) == "fp16"
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = cudnn


def test_the_mlps_roofline_rises_and_saturates_on_an_h100() -> None:
    sizes = [2**k for k in range(0, 17)]
    r = roofline(load_workload("mlp", dataset="mnist"), make_spec("cuda"), get_gpu("h100"), sizes)
    assert r.method == "affine" and r.unavailable is None
    sps = [p.samples_per_second for p in r.points]
    assert all(a < b for a, b in itertools.pairwise(sps))
    assert sps[-1] / sps[-2] < 1.01  # saturated
    sat = r.saturation_batch_size
    assert sat == smallest_within(zip(sizes, sps)) and 1 < sat < sizes[-1]
    best = max(sps)
    assert sps[sizes.index(sat)] >= 0.95 * best > sps[sizes.index(sat) - 1]
    d = r.to_dict()
    assert d["kind"] == "roofline estimate" and d["saturation_batch_size"] == sat
    assert d["peaks"]["status"] == "reported"
    text = str(r)
    assert "ROOFLINE ESTIMATE (not measured)" in text and f"saturates from batch size {sat:,}" in text


def test_no_estimate_without_the_cards_peaks() -> None:
    workload = load_workload("mlp", dataset="mnist")
    r = roofline(workload, make_spec("cuda"), get_gpu("rtx3060"), [64])
    assert r.points == [] and "no peak FLOP/s for NVIDIA GeForce RTX 3060" in (r.unavailable or "")
    assert "no roofline estimate" in str(r)
    r = roofline(workload, make_spec("cuda", precision="bf16"), get_gpu("t4"), [64])
    assert r.unavailable == "the GPU catalogue has no bf16 peak for Tesla T4"


def test_smallest_within() -> None:
    assert smallest_within([]) is None
    assert smallest_within([(8, 100.0), (16, 196.0), (32, 200.0)]) == 16
    assert smallest_within([(8, 100.0), (16, 189.0), (32, 200.0)]) == 32


# -- the catalogue's peaks -------------------------------------------------------------------------


def test_every_cards_peaks_say_where_they_come_from() -> None:
    with_peaks = [c for c in list_gpus() if c.peaks is not None]
    assert len(with_peaks) >= 15
    for card in with_peaks:
        p = card.peaks
        assert p is not None and p.provenance.status == "reported" and "https://" in p.provenance.source
        assert set(p.flops_per_second) <= set(PEAK_KINDS) and "fp32" in p.flops_per_second
        for kind in ("tf32", "fp16", "bf16"):
            assert p.flops_per_second.get(kind, p.flops_per_second["fp32"]) >= p.flops_per_second["fp32"]
        assert 100e9 <= p.bandwidth_bytes_per_second <= 10e12


def test_dense_peaks_are_the_datasheets_sparse_figures_halved() -> None:
    h100 = get_gpu("h100-sxm").peaks
    assert h100 is not None
    assert 2 * h100.flops_per_second["bf16"] == 1979 * 10**12 and 2 * h100.flops_per_second["tf32"] == 989 * 10**12
    a100 = get_gpu("a100-80gb").peaks
    assert a100 is not None and a100.flops_per_second["bf16"] == 312 * 10**12  # printed dense | sparse
    assert "bf16" not in (get_gpu("v100").peaks or PEAKS).flops_per_second  # Volta: no BF16 tensor cores


def test_peaks_round_trip_through_the_catalogue_entry() -> None:
    card = get_gpu("l40s")
    entry = card.to_dict()
    rebuilt = card_from_entry(
        {
            **entry,
            "memory": {"bytes": card.memory_bytes, **card.provenance["memory"].to_dict()},
            "cublas_workspace": {"bytes": card.cublas_workspace_bytes, **card.provenance["cublas_workspace"].to_dict()},
        },
        load_catalogue().defaults,
    )
    assert rebuilt.peaks == card.peaks
    assert "TFLOP/s dense" in str(card)


def test_a_step_that_cannot_be_costed_leaves_the_estimate_out_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchfit._roofline as rl

    def fails(*args: object, **kwargs: object) -> StepCost:
        raise RuntimeError("no formula for this op")

    monkeypatch.setattr(rl, "step_cost", fails)
    r = roofline(load_workload("mlp", dataset="mnist"), make_spec("cuda"), get_gpu("h100"), [64])
    assert r.points == [] and r.unavailable == "the step could not be costed (RuntimeError: no formula for this op)"


def test_the_gpu_throughput_check_dry_runs_here(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput_validate.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = bench.run(tmp_path, dry_run=True, max_batch=16, repeats=1)
    assert [(r["model"], r["batch_size"], r["dry_run"]) for r in records] == [("mlp", 8, True)]
    assert all(r["measured_samples_per_second"] > 0 and r["roofline_samples_per_second"] > 0 for r in records)
    assert json.loads((tmp_path / "throughput.json").read_text()) == records
    assert "the numbers compare nothing" in bench.table(records)


def test_the_ceiling_is_above_a_published_measurement() -> None:
    """NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, "Training performance: NVIDIA DGX-1
    16GB (8x V100 16GB)", 1 GPU: 367 img/s in FP32 (the tightest of its four single-GPU figures)."""
    workload = load_workload("resnet50", dataset="imagenet")
    r = roofline(workload, make_spec("cuda", optimizer="sgd-momentum"), get_gpu("v100-16gb"), [256])
    (point,) = r.points
    assert point.flops / 256 == pytest.approx(24.3e9, rel=0.01)  # ~3 x resnet50's 8.2 GFLOP forward
    assert 367 < point.samples_per_second < 367 / 0.5  # a ceiling, and not a loose one
