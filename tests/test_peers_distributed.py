"""The distributed peers (bench/peers): DeepSpeed's ZeRO estimators restated as formulas, checked
against the tables DeepSpeed itself printed in Hugging Face's docs, and against DeepSpeed when installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_peers_{name}", ROOT / "bench" / "peers" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zf = _load("zero_formulas")


@pytest.fixture(scope="module")
def t0_3b() -> tuple[int, int]:
    """bigscience/T0_3B's parameters as DeepSpeed counts them (AutoModel: T5Model, T5 v1.1 XL shape)."""
    transformers = pytest.importorskip("transformers")
    T5Config, T5Model = transformers.T5Config, transformers.T5Model

    cfg = T5Config(
        d_model=2048,
        d_ff=5120,
        d_kv=64,
        num_layers=24,
        num_heads=32,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = T5Model(cfg)
    return zf.model_params(model)


# ``estimate_zero3_model_states_mem_needs_all_live(T0_3B, num_gpus_per_node=N)`` as printed in Hugging
# Face transformers' docs (docs/source/*/main_classes/deepspeed.md, "Memory Requirements"):
# (per CPU, per GPU) in DeepSpeed's unit (bytes / 2**30), in its row order
PUBLISHED_T0_3B = {
    1: [("70.00", "0.25"), ("70.00", "0.25"), ("62.23", "5.43"), ("62.23", "5.43"), ("0.37", "46.91"), ("15.56", "46.91")],
    2: [("70.00", "0.25"), ("70.00", "0.25"), ("62.23", "2.84"), ("62.23", "2.84"), ("0.74", "23.58"), ("31.11", "23.58")],
}


def test_t0_3b_counts_as_deepspeed_printed_them(t0_3b: tuple[int, int]) -> None:
    total, largest = t0_3b
    # "SW: Model with 2783M total params, 65M largest layer params." (int(x / 1e6))
    assert (int(total / 1e6), int(largest / 1e6)) == (2783, 65)
    assert largest == 32128 * 2048  # the shared embedding


@pytest.mark.parametrize("gpus", [1, 2])
def test_zero3_formulas_reproduce_the_published_tables(t0_3b: tuple[int, int], gpus: int) -> None:
    rows = zf.zero3_table(*t0_3b, gpus_per_node=gpus)
    assert [(zf.gb(r.cpu_bytes), zf.gb(r.gpu_bytes)) for r in rows] == PUBLISHED_T0_3B[gpus]
    assert [r.options for r in rows][:3] == [
        "offload_param=cpu, offload_optimizer=cpu, zero_init=1",
        "offload_param=cpu, offload_optimizer=cpu, zero_init=0",
        "offload_param=none, offload_optimizer=cpu, zero_init=1",
    ]


def test_zero2_per_gpu_bytes_by_hand() -> None:
    # 2 bytes (16-bit parameters) + 18 / GPUs (gradients 2 + 4, master parameters 4, Adam 8)
    assert zf.zero2(10**9, gpus_per_node=8).gpu_bytes == 2 * 10**9 + 18 * 10**9 // 8
    assert zf.zero2(10**9, gpus_per_node=4, nodes=2).gpu_bytes == zf.zero2(10**9, gpus_per_node=8).gpu_bytes
    assert zf.zero2(10**9, offload_optimizer=True).gpu_bytes == 2 * 10**9
    # the host: 4 bytes per parameter per GPU of the node, x 1.5 (DeepSpeed's margin)
    assert zf.zero2(10**9, gpus_per_node=8).cpu_bytes == int(10**9 * 4 * 8 * 1.5)


def test_against_deepspeed_itself_when_installed() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for total, largest, gpn, nodes in [(2_783_959_040, 65_798_144, 2, 1), (124_439_808, 38_597_376, 8, 2)]:
        for off in (False, True):
            assert estimate_zero2_model_states_mem_needs(total, gpn, nodes, cpu_offload=off) == (
                zf.zero2(total, gpus_per_node=gpn, nodes=nodes, offload_optimizer=off).cpu_bytes,
                zf.zero2(total, gpus_per_node=gpn, nodes=nodes, offload_optimizer=off).gpu_bytes,
            )
        for r in zf.zero3_table(total, largest, gpus_per_node=gpn, nodes=nodes):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                total, largest, gpn, nodes, r.offload_optimizer, r.offload_params, r.zero_init
            )
            assert (cpu, gpu) == (r.cpu_bytes, r.gpu_bytes)


@pytest.mark.xfail(
    torch.__version__ < (2, 14),  # TorchVersion compares with a tuple
    reason="torch 2.11's FSDPMemTracker files 306,232 B under OPT at world 2 where 2.14's files the two moments "
    "and the step counters (76,856 B); the peer's own change, not investigated",
    strict=True,
)
def test_fsdp_memtracker_on_the_fake_group_holds_rank0s_shards() -> None:
    fm = _load("fsdp_memtracker")

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

    for world in (2, 8):
        r = fm.fsdp_peak(
            build,
            lambda b: (torch.randn(b, 64),),
            8,
            world_size=world,
            block="Linear",
            loss=lambda out: out.pow(2).mean(),
        )
        # fully_shard splits dim 0 like torch.chunk: rank 0 holds ceil(rows / world) rows of each parameter
        rows = [(256, 64), (256, 1), (10, 256), (10, 1)]  # fc1 weight and bias, fc2 weight and bias
        shard = sum(-(-r_ // world) * c for r_, c in rows) * 4
        assert r["breakdown"]["SHARDED_PARAM"] == shard
        # AdamW's two moments of rank 0's shards, and a 4-byte step per parameter (not sharded)
        assert r["breakdown"]["OPT"] == 2 * shard + 4 * len(rows)
        assert r["peak_bytes"] == sum(r["breakdown"].values())
