"""Several GPUs: each rank's estimate (one process, PyTorch's fake process group) against real gloo
processes on this machine's CPU running the same reference loop (docs/distributed.md).

The gloo runs start once per world size (2 and 3 together) in a module fixture; the estimates
take about a second each.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from batchfit import BatchfitError
from batchfit._dist_measure import measure_ranks
from batchfit._distributed import DistSpec, distinct_ranks, estimate_ranks, fake_group, make_dist, wrap_model
from batchfit._estimate import make_spec
from batchfit._models import load_workload
from batchfit._training import AUTO_LOSS, LOSSES
from batchfit.cli import app
from dist_models import clipped_step

MODEL = f"{Path(__file__).with_name('dist_models.py')}:Blocks"
INPUT = [12]
BATCH = 8
SETTINGS = {
    "ddp": {"strategy": "ddp"},
    "ddp-bucket-view": {"strategy": "ddp", "gradient_as_bucket_view": True},
    # static_graph: the reducer's used-parameter maps, the first iteration's _DDPSink clone of the
    # outputs and its delayed copies into the buckets, no bucket rebuild before the third forward
    "ddp-static-graph": {"strategy": "ddp", "static_graph": True},
    "zero1": {"strategy": "zero1"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp-no-reshard": {"strategy": "fsdp", "reshard_after_forward": False},
    # bf16 compute over fp32 shards: oneDNN's bf16 matmul scratch, and on torch 2.15 a reduce-scatter in
    # fp32 (the parameters' dtype) whose CPU copy-in casts each bf16 gradient through a temporary
    "fsdp-bf16": {"strategy": "fsdp", "param_dtype": torch.bfloat16},
}
WORLDS = (2, 3)
# DDP's buffer broadcast at each forward, on a model with buffers (BatchNorm and a large table)
NORM_MODEL = f"{Path(__file__).with_name('dist_models.py')}:NormBlocks"
BUFFER_SETTINGS = {
    "ddp-buffers": {"strategy": "ddp"},
    "ddp-no-broadcast": {"strategy": "ddp", "broadcast_buffers": False},
    "ddp-buffers-static-graph": {"strategy": "ddp", "static_graph": True},
    "zero1-buffers": {"strategy": "zero1"},
}


def _spec():  # type: ignore[no-untyped-def]
    return make_spec("cpu", "adam", threads=1)


@pytest.fixture(scope="module")
def truth() -> dict[tuple[str, int], list[int]]:
    """Each rank's measured peak, by (setting, world size): real gloo processes on 127.0.0.1."""
    keys = [(name, world) for world in WORLDS for name in SETTINGS]
    dists = [DistSpec(world, **SETTINGS[name]) for name, world in keys]  # type: ignore[arg-type]
    # three counts per setting, the one most agree on kept: a free on a gloo worker thread is missing
    # from the profiler's records now and then, and where it is placed is right in most runs, not all
    # (docs/distributed.md)
    measured = measure_ranks(MODEL, BATCH, _spec(), dists, input_size=INPUT, repeats=3)
    return {key: [m.peak_allocated_bytes for m in ranks] for key, ranks in zip(keys, measured)}


@pytest.fixture(scope="module")
def buffer_truth() -> dict[str, list[int]]:
    """Each rank's measured peak at world 2 on the model with buffers, by setting."""
    dists = [DistSpec(2, **settings) for settings in BUFFER_SETTINGS.values()]  # type: ignore[arg-type]
    # five counts, not three: on torch 2.11 the lowest of three was still above the estimate now and
    # then on default DDP with buffers (+76 B on rank 1 once, +416 B on rank 0 once; exact in other
    # runs), before the frees missed on gloo's threads were placed at their last use (docs/distributed.md)
    measured = measure_ranks(NORM_MODEL, BATCH, _spec(), dists, input_size=INPUT, repeats=5)
    return {name: [m.peak_allocated_bytes for m in ranks] for name, ranks in zip(BUFFER_SETTINGS, measured)}


def _estimated(name: str, world: int) -> tuple[list[int], int]:
    model, settings = (NORM_MODEL, BUFFER_SETTINGS[name]) if name in BUFFER_SETTINGS else (MODEL, SETTINGS[name])
    workload = load_workload(model, INPUT)
    result = estimate_ranks(workload, BATCH, _spec(), DistSpec(world, **settings))  # type: ignore[arg-type]
    by_rank = {r: rank.estimate.peak_allocated_bytes for rank in result.ranks for r in rank.same_as}
    return [by_rank[r] for r in range(world)], result.peak.estimate.peak_allocated_bytes


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_rank_matches_real_gloo_processes(truth: dict[tuple[str, int], list[int]], name: str, world: int) -> None:
    per_rank, peak = _estimated(name, world)
    assert per_rank == truth[(name, world)]
    assert peak == max(truth[(name, world)])


@pytest.mark.parametrize("name", list(BUFFER_SETTINGS))
def test_buffer_broadcast_matches_real_gloo_processes(buffer_truth: dict[str, list[int]], name: str) -> None:
    per_rank, peak = _estimated(name, 2)
    assert per_rank == buffer_truth[name]
    assert peak == max(buffer_truth[name])


def test_ddp_under_autocast_matches_real_gloo_processes() -> None:
    # DDP users train in mixed precision with autocast (the torch.amp recipe; DDP's own
    # mixed_precision= is private and not simulated): buckets in the parameters' dtype, bf16 activations
    spec = make_spec("cpu", "adam", "amp-bf16", threads=1)
    dist = DistSpec(2)
    (measured,) = measure_ranks(NORM_MODEL, BATCH, spec, [dist], input_size=INPUT, repeats=5)
    estimated = estimate_ranks(load_workload(NORM_MODEL, INPUT), BATCH, spec, dist)
    assert [estimated.peak.estimate.peak_allocated_bytes] * 2 == [m.peak_allocated_bytes for m in measured]


# A Llama-3.1-8B's config shrunk to 2 layers of width 64 (GQA, SwiGLU, RMSNorm, rotary, its own
# loss); max_position_embeddings 32 makes hf:'s default sequence 32 tokens, since the gloo processes
# load the model by name
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 32, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip


def test_fsdp_llama_under_autocast_matches_real_gloo_processes(tmp_path: Path) -> None:
    """The route of docs/distributed.md's 8-GPU Llama-3.1-8B figure (FSDP2 per decoder layer, fp32
    master weights, autocast bf16, AdamW-like state), on a Llama small enough to run: each rank's peak
    equals two real gloo processes'. It is in backward, while layer 0's prefetched all-gather and a
    bf16 matmul's oneDNN scratch are alive. Before, the estimate was 98,796 B under: the truth counted
    gloo's worker-thread all-gather scratch (not left out: only ``c10d::`` ops were), its processes took
    the unpickled default loss for a user's (labels of their own), and the estimate had no bf16 matmul
    scratch."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    model = f"hf:{tmp_path}"
    spec = make_spec("cpu", "adam", "amp-bf16", threads=1)
    dist = DistSpec(2, strategy="fsdp")
    (measured,) = measure_ranks(model, 2, spec, [dist], repeats=3)
    estimated = estimate_ranks(load_workload(model), 2, spec, dist)
    by_rank = {r: rank.estimate.peak_allocated_bytes for rank in estimated.ranks for r in rank.same_as}
    assert [by_rank[0], by_rank[1]] == [m.peak_allocated_bytes for m in measured]
    assert estimated.peak.estimate.peak_phase == "backward"


def test_llama_activations_under_amp_bf16_follow_from_the_config(tmp_path: Path) -> None:
    """docs/distributed.md's per-layer table of the 8-GPU Llama-3.1-8B figure, on a small Llama with a
    CUDA trace: what autograd keeps when the weights and the residual stream are fp32 and the linears
    and SDPA run in bf16 under autocast, counted from the config at the start of backward."""
    b, s, h, inter, heads, kv_heads, head_dim, vocab, layers = 1, 256, 256, 512, 4, 2, 64, 1000, 2
    kv = kv_heads * head_dim
    config = TINY_LLAMA | {
        "hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "num_hidden_layers": layers, "max_position_embeddings": s,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    from batchfit import estimate

    workload = load_workload(f"hf:{tmp_path}", seq_len=s)
    result = estimate(workload, batch_size=b, optimizer="adamw", precision="amp-bf16", gpus=2, strategy="fsdp")
    events = result.ranks[0].estimate.events
    first = next(i for i, e in enumerate(events) if e.phase == "backward" and e.iteration == 2)
    alive: dict[int, int] = {}
    for e in events[:first]:
        if e.category == "activations":
            if e.is_alloc:
                alive[e.storage] = e.nbytes
            else:
                alive.pop(e.storage, None)
    per_layer = (
        2 * (2 * h * h + 2 * h * kv + 3 * h * inter)  # bf16 copies of q, k, v, o, gate, up, down (MmBackward0)
        + 2 * 4 * b * s * h  # both RMSNorms' fp32 output before the weight (its Mul keeps it)
        + 2 * 4 * b * s * h  # the fp32 residual stream after attention and after the MLP (the next pow)
        + 5 * 2 * b * s * h  # bf16 casts of the fp32 norm outputs for q, k, v, gate, up (one each)
        + 2 * 2 * b * s * h + 2 * 2 * b * s * kv  # SDPA's bf16 q and its output, its bf16 k and v
        + 4 * b * heads * s  # flash attention's log-sum-exp (fp32)
        + 16 + 8  # its rng_state (2 x uint64) and the unused 0-dim uint64 (flash_api.cpp mha_fwd)
        + 4 * 2 * b * s * inter  # gate and up outputs, SiLU's output, their product (bf16)
        + 2 * 4 * b * s  # both RMSNorms' rsqrt (fp32)
    )
    outside = (
        4 * b * s * h  # the embedding's output (fp32), read by layer 0's first norm
        + 4 * b * s * h + 4 * b * s  # the final norm's output and rsqrt
        + 2 * 4 * s * head_dim  # rotary cos and sin (fp32, one position row for the batch)
        + 2 * b * s * h + 2 * vocab * h  # lm_head's bf16 input cast and weight copy
        + 4 * b * s * vocab  # the logits upcast to fp32 for the loss
        + 8 * b * (s + 1) + 4  # the loss's labels padded by one (int64) and nll_loss's total weight
    )
    assert sum(alive.values()) == layers * per_layer + outside


def test_a_spec_sent_to_a_gloo_process_keeps_the_default_loss() -> None:
    # measure_ranks pickles the StepSpec into spawned processes; choose_loss tells the default
    # ("auto": the model's own loss) from a user's loss by identity
    spec = pickle.loads(pickle.dumps(make_spec("cpu", "adam", threads=1)))
    assert spec.loss is AUTO_LOSS
    assert pickle.loads(pickle.dumps(LOSSES["mse"])) == LOSSES["mse"]


def test_buffer_broadcast_is_in_the_peak(buffer_truth: dict[str, list[int]]) -> None:
    # a check that the comparison above can fail: on this model the broadcast's flat copy of the
    # float buffers (160,232 B) makes the peak, so an estimate that leaves the broadcast out (as
    # before it was modelled: the no-broadcast figure) is below the truth on every rank
    without = _estimated("ddp-no-broadcast", 2)[0]
    assert all(real > est for real, est in zip(buffer_truth["ddp-buffers"], without))


# Steps other than the reference loop, per rank against the same gloo processes (world 2): a user's
# step, inference, and a training run's tail (the epoch's last batch and an evaluation pass)
VARIANTS = {
    "step": {"step": clipped_step},
    "inference": {"mode": "inference"},
    "tail": {"last_batch": 3, "eval_batch_size": 16},
}
VARIANT_SETTINGS = ("ddp", "fsdp")


def _variant_spec(variant: str):  # type: ignore[no-untyped-def]
    return make_spec("cpu", "adam", threads=1, **VARIANTS[variant])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def variant_truth() -> dict[tuple[str, str], list[int]]:
    out = {}
    for variant in VARIANTS:
        dists = [DistSpec(2, **SETTINGS[name]) for name in VARIANT_SETTINGS]  # type: ignore[arg-type]
        measured = measure_ranks(MODEL, BATCH, _variant_spec(variant), dists, input_size=INPUT, repeats=3)
        for name, ranks in zip(VARIANT_SETTINGS, measured):
            out[(variant, name)] = [m.peak_allocated_bytes for m in ranks]
    return out


@pytest.mark.parametrize("name", VARIANT_SETTINGS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_steps_match_real_gloo_processes(
    variant_truth: dict[tuple[str, str], list[int]], variant: str, name: str
) -> None:
    workload = load_workload(MODEL, INPUT)
    result = estimate_ranks(workload, BATCH, _variant_spec(variant), DistSpec(2, **SETTINGS[name]))  # type: ignore[arg-type]
    by_rank = {r: rank.estimate.peak_allocated_bytes for rank in result.ranks for r in rank.same_as}
    assert [by_rank[0], by_rank[1]] == variant_truth[(variant, name)]


def test_the_last_batch_is_each_ranks_share_of_the_epoch() -> None:
    """``last_batch='auto'`` per rank: DistributedSampler gives each of 7 ranks ceil(60000 / 7) =
    8,572 MNIST samples, so the last batch of 64 holds 8,572 mod 64 = 60 (one GPU: 60,000 mod 64 = 32)."""
    workload = load_workload("mlp", dataset="mnist")
    spec = make_spec("cpu", "sgd", threads=1, last_batch="auto")
    est = estimate_ranks(workload, 64, spec, DistSpec(7, strategy="ddp")).peak.estimate
    start = next(i for p, it, i in est.marks if p == "forward" and it == 3)
    first_input = next(e for e in est.events[start:] if e.action == "alloc" and e.category == "inputs")
    assert first_input.nbytes == 60 * 784 * 4


def test_ranks_differ_where_shards_are_uneven(truth: dict[tuple[str, int], list[int]]) -> None:
    # a check that the comparison above can tell ranks apart: at world 3 FSDP2's and ZeRO-1's
    # ranks hold different amounts (dim 0 of 29, 61 and 7 does not divide by 3)
    assert len(set(truth[("fsdp", 3)])) > 1
    assert len(set(truth[("zero1", 3)])) > 1


def test_fsdp_shards_as_fully_shard_does() -> None:
    """distinct_ranks' shard sizes against the local shards fully_shard makes for each rank."""
    workload = load_workload(MODEL, INPUT)
    dist = DistSpec(3, strategy="fsdp")
    groups = distinct_ranks(workload.model, dist)
    local: dict[int, list[tuple[int, ...]]] = {}
    for rank in range(3):
        with fake_group(rank, 3):
            model = wrap_model(load_workload(MODEL, INPUT).model.to("meta"), dist, "cpu")
            local[rank] = [tuple(p.to_local().shape) for p in model.parameters()]  # type: ignore[operator]
    for group in groups:
        assert all(local[r] == local[group[0]] for r in group)
    firsts = [g[0] for g in groups]
    assert len({tuple(local[r]) for r in firsts}) == len(groups)


def test_zero1_partition_as_zero_redundancy_optimizer_does() -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from batchfit._distributed import _zero_partition

    workload = load_workload(MODEL, INPUT)
    params = list(workload.model.parameters())
    for rank in range(3):
        with fake_group(rank, 3):
            real = [torch.nn.Parameter(torch.empty(p.shape)) for p in params]
            opt = ZeroRedundancyOptimizer(real, optimizer_class=torch.optim.Adam)
            owned = {id(p) for p in opt.optim.param_groups[0]["params"]}
            mine = [i for i, o in enumerate(_zero_partition(params, 3)) if o == rank]
            assert {id(real[i]) for i in mine} == owned


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"gpus": 0}, "at least 1"),
        ({"gpus": 2, "strategy": "zero3"}, "unknown strategy"),
        ({"gpus": 2, "strategy": "ddp", "reshard_after_forward": False}, "`reshard_after_forward=False` applies to"),
        ({"gpus": 2, "strategy": "fsdp", "bucket_cap_mb": 10}, "`bucket_cap_mb` applies to"),
        ({"gpus": 2, "strategy": "fsdp", "broadcast_buffers": False}, "`broadcast_buffers=False` applies to"),
        ({"gpus": 2, "strategy": "fsdp-hybrid"}, "needs `nodes=2`"),
        ({"strategy": "fsdp"}, "need `gpus=N`"),
        ({"gpus": 2, "strategy": "fsdp", "param_dtype": "fp8"}, "unknown `param_dtype`"),
        # the verbs take the options as **kwargs (DistOptions): a misspelt one is refused, not ignored
        ({"gpus": 2, "reshard": False}, "unknown distributed option 'reshard'"),
    ],
)
def test_bad_settings_say_what_to_do(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(BatchfitError) as err:
        make_dist(**kwargs)  # type: ignore[arg-type]
    assert words in err.value.message and err.value.hint


@pytest.mark.parametrize(
    "spec",
    [
        DistSpec(4, nodes=2, strategy="fsdp-hybrid", reshard_after_forward=False, param_dtype=torch.bfloat16, wrap="Block"),
        DistSpec(3, strategy="zero1", bucket_cap_mb=10.0, gradient_as_bucket_view=True, static_graph=True),
        DistSpec(2, strategy="ddp", broadcast_buffers=False),
        DistSpec(2, strategy="fsdp", param_dtype=torch.float16, reduce_dtype=torch.float32, cpu_offload=True),
    ],
)
def test_options_give_back_the_same_spec(spec: DistSpec) -> None:
    # the CLI hands a DistSpec's options to estimate(): every field must survive the round trip
    assert make_dist(**spec.options()) == spec


def test_verbs_take_the_distributed_options_by_name() -> None:
    import batchfit

    options: batchfit.DistOptions = {"gpus": 2, "strategy": "zero1"}
    r = batchfit.estimate(MODEL, INPUT, batch_size=2, device="cpu", optimizer="adam", threads=1, **options)
    assert r.dist == DistSpec(2, strategy="zero1") and r.peak_rank is not None
    with pytest.raises(BatchfitError, match="unknown distributed option 'nodez'"):
        batchfit.estimate(MODEL, INPUT, batch_size=2, device="cpu", gpus=2, nodez=1)  # type: ignore[call-overload]


def test_wrap_names_a_class_the_model_has() -> None:
    workload = load_workload(MODEL, INPUT)
    with pytest.raises(BatchfitError, match="no module of class"):
        estimate_ranks(workload, 2, _spec(), DistSpec(2, strategy="fsdp", wrap="LlamaDecoderLayer"))


def _cli_estimate(model: str, *options: str) -> dict[str, Any]:
    """``batchfit estimate MODEL ... --json`` on the CPU at batch 8 (Adam, one thread): the first result."""
    args = ["estimate", model, "--input", "12", "--device", "cpu", "--threads", "1", "--optimizer", "adam"]
    res = CliRunner().invoke(app, [*args, "-b", "8", *options, "--json"])
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = json.loads(res.output)["results"][0]
    return out


def test_cli_json_gives_every_rank_and_the_peaking_ones_figures() -> None:
    out = _cli_estimate(MODEL, "--gpus", "3", "--strategy", "fsdp")
    ranks = out["ranks"]
    assert sorted(r for entry in ranks for r in entry["ranks"]) == [0, 1, 2]
    peak = max(ranks, key=lambda r: r["peak_allocated_bytes"])
    assert out["peak_allocated_bytes"] == peak["peak_allocated_bytes"]
    assert out["peak_rank"] == peak["rank"] and out["global_batch_size"] == 24
    # the breakdown adds up to the peak, sharded and gathered parameters apart
    assert sum(peak["breakdown"].values()) == peak["peak_allocated_bytes"]
    assert {"parameters", "gathered_parameters", "communication"} <= set(peak["breakdown"])


def test_cli_takes_the_ddp_options() -> None:
    out = _cli_estimate(NORM_MODEL, "--gpus", "2", "--static-graph", "--no-broadcast-buffers")
    spec = DistSpec(2, static_graph=True, broadcast_buffers=False)
    expected = estimate_ranks(load_workload(NORM_MODEL, INPUT), BATCH, _spec(), spec).peak.estimate
    assert out["peak_allocated_bytes"] == expected.peak_allocated_bytes


CHUNK_CAT_SHAPES = {"uneven": [(61, 29), (61,), (29, 61), (29,), (12,)], "even": [(12, 29), (24,)]}


def _reduce_scatter_input(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """FSDP2's reduce-scatter input for these gradients: fp32, each padded to a multiple of the world."""
    return torch.empty(world, sum(-(-g.shape[0] // world) * (g.numel() // g.shape[0]) for g in grads))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shapes", list(CHUNK_CAT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_cat_padding_is_what_the_cpu_kernel_allocates(world: int, shapes: str, dtype: torch.dtype) -> None:
    """FSDP2's reduce-scatter copy-in (``_chunk_cat``) pads, on the CPU, each gradient whose dim 0
    does not divide by the world size (TensorShape.cpp ``_pad_chunk``), and with gradients of
    another dtype than the fp32 output (torch 2.15 reduces bf16 gradients in fp32 unless told
    otherwise) casts each through a temporary of its own dtype: the rule against the real
    kernel, measured by the profiler."""
    from batchfit._cpu_scratch import _chunk_cat_padding, _profile_rise

    grads = [torch.randn(s).to(dtype) for s in CHUNK_CAT_SHAPES[shapes]]
    out = _reduce_scatter_input(grads, world)
    rise, _ = _profile_rise(lambda: torch._chunk_cat(grads, 0, world, out=out))
    assert _chunk_cat_padding((grads, 0, world), {"out": out}) == rise
    assert (rise > 0) == (shapes == "uneven" or dtype != out.dtype)


def _chunk_cat_mixed_dtype() -> Any:
    import torch.distributed.fsdp  # registers FSDP2's ops

    return getattr(torch.ops.fsdp, "chunk_cat_mixed_dtype", None)


@pytest.mark.skipif(_chunk_cat_mixed_dtype() is None, reason="FSDP2's copy-in op of torch 2.15 and later")
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(
    "dtypes",
    [("f32",) * 5, ("bf16",) * 5, ("bf16", "f32", "bf16", "f32", "f32"), ("f16", "bf16", "f32", "f32", "f32")],
    ids=["fp32", "bf16", "bf16-fp32", "three-dtypes"],
)
def test_chunk_cat_mixed_dtype_is_what_the_cpu_kernel_allocates(world: int, dtypes: tuple[str, ...]) -> None:
    """torch 2.15's FSDP2 copy-in, ``fsdp::chunk_cat_mixed_dtype`` (ChunkCat.cpp): one dtype goes to
    ``_chunk_cat`` as it is; mixed dtypes are each cast to the output's first, all held. Before the
    rule the tracer saw an op it did not know and counted no padding: FSDP2 without resharding was
    6,512 B under the gloo truth at world 2 on torch 2.15."""
    from batchfit._cpu_scratch import _chunk_cat_mixed_dtype_scratch, _profile_rise

    named = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    grads = [torch.randn(s).to(named[d]) for s, d in zip(CHUNK_CAT_SHAPES["uneven"], dtypes)]
    out = _reduce_scatter_input(grads, world)
    rise, _ = _profile_rise(lambda: _chunk_cat_mixed_dtype()(grads, 0, world, out=out))
    assert _chunk_cat_mixed_dtype_scratch((grads, 0, world), {"out": out}) == rise


def test_description_names_the_dtype_fsdp2_reduces_in() -> None:
    """With ``param_dtype`` alone, FSDP2 reduce-scatters in the gradients' dtype up to torch 2.14 and in
    the parameters' own from 2.15 (``FSDPParam.unsharded_grad_dtype``): the description says what the
    installed FSDP2's code does, read from its traced reduce-scatter input (a block's padded gradients
    are 3,720 elements at world 2; its all-gather buffer, in bf16, is 3,720 x 2 bytes either way)."""
    dist = DistSpec(2, strategy="fsdp", param_dtype=torch.bfloat16)
    est = estimate_ranks(load_workload(MODEL, INPUT), BATCH, _spec(), dist).ranks[0].estimate
    sizes = {
        e.nbytes
        for e in est.events
        if e.action == "alloc" and e.category == "communication" and e.phase == "backward" and e.module == "blocks.1"
    }
    assert 3720 * 2 in sizes
    assert (3720 * 4 in sizes) == dist.describe().endswith("params bf16, reduce in the parameters' dtype")
    assert (3720 * 4 in sizes) != dist.describe().endswith("params bf16, reduce bf16")


def test_cli_step_with_gpus() -> None:
    step = f"{Path(__file__).with_name('dist_models.py')}:clipped_step"
    out = _cli_estimate(MODEL, "--gpus", "2", "--strategy", "fsdp", "--step", step)
    # the same step as the library's (test_other_steps_match_real_gloo_processes checks it against gloo)
    spec = make_spec("cpu", "adam", threads=1, step=clipped_step)
    expected = estimate_ranks(load_workload(MODEL, INPUT), BATCH, spec, DistSpec(2, strategy="fsdp"))
    assert out["peak_allocated_bytes"] == expected.peak.estimate.peak_allocated_bytes
    assert sorted(r for entry in out["ranks"] for r in entry["ranks"]) == [0, 1]


@pytest.mark.parametrize(
    ("sizes", "world", "strategy"),
    [
        ({}, 3, "fsdp"),  # dimension 0 of 29, 61 and 7 does not divide by 3: ranks differ
        ({}, 3, "zero1"),
        ({"dim": 32, "hidden": 64, "classes": 8}, 4, "fsdp"),  # every dimension divides by 4: one group
    ],
)
def test_one_trace_per_group_is_each_ranks_own(
    monkeypatch: pytest.MonkeyPatch, sizes: dict[str, int], world: int, strategy: str
) -> None:
    """estimate_ranks traces one rank per group of distinct_ranks and gives its answer to the whole
    group: every rank traced on its own gives the same timeline, event for event."""
    import batchfit._distributed as distributed

    workload = load_workload(MODEL, INPUT, **sizes)
    dist = DistSpec(world, strategy=strategy)  # type: ignore[arg-type]
    shared = estimate_ranks(workload, 4, _spec(), dist)
    groups = distinct_ranks(workload.model, dist)
    assert [r.same_as for r in shared.ranks] == groups
    assert (groups == [list(range(world))]) == bool(sizes)
    monkeypatch.setattr(distributed, "distinct_ranks", lambda m, d: [[r] for r in range(d.world_size)])
    alone = estimate_ranks(workload, 4, _spec(), dist)
    timeline = {r.rank: [tuple(e) for e in r.estimate.events] for r in alone.ranks}
    for entry in shared.ranks:
        for r in entry.same_as:
            assert timeline[r] == [tuple(e) for e in entry.estimate.events], (entry.rank, r)


# -- the default device (CUDA, simulated without a driver) ----------------------------------------

CUDA_STRATEGIES = ("ddp", "zero1", "fsdp")


def _ranks_of(device: str, strategy: str, optimizer: str = "sgd-momentum") -> dict[int, Any]:
    """Each rank's estimate (``batchfit.estimate`` at world 2, batch 8), by rank."""
    from batchfit import estimate

    threads = {"threads": 1} if device == "cpu" else {}
    est = estimate(
        MODEL, INPUT, batch_size=BATCH, optimizer=optimizer, device=device, gpus=2, strategy=strategy, **threads
    )
    return {r: rank.estimate for rank in est.ranks for r in rank.same_as}


def _live_peaks(events: list[Any]) -> dict[str, int]:
    """The most bytes each category holds at once over the step (storage sizes, before any rounding)."""
    live: dict[str, int] = {}
    most: dict[str, int] = {}
    for e in events:
        live[e.category] = live.get(e.category, 0) + (e.nbytes if e.action == "alloc" else -e.nbytes)
        most[e.category] = max(most.get(e.category, 0), live[e.category])
    return most


@pytest.mark.parametrize("strategy", CUDA_STRATEGIES)
def test_cuda_estimate_holds_what_the_cpu_one_holds_per_rank(strategy: str) -> None:
    # the CPU run is equal to real gloo processes (above); which rank holds which shard, bucket or
    # optimizer state does not depend on the device. SGD with momentum: one buffer per parameter on
    # both devices (Adam's `step` counts live on the host beside CUDA parameters)
    # FSDP2's device-mesh rank map (torch.arange(world, dtype=int), kept on the host whatever the mesh's
    # device: _distributed's fsdp placement) is in the CPU run's `communication` and never on the card
    host_only = {"communication": 4 * 2} if strategy == "fsdp" else {}
    cpu, cuda = _ranks_of("cpu", strategy), _ranks_of("cuda", strategy)
    kept = ("parameters", "gradients", "optimizer_state", "communication", "gathered_parameters")
    for rank in (0, 1):
        on_cpu, on_cuda = _live_peaks(cpu[rank].events), _live_peaks(cuda[rank].events)
        expected = {c: on_cpu.get(c, 0) - host_only.get(c, 0) for c in kept}
        assert {c: on_cuda.get(c, 0) for c in kept} == expected
        assert on_cuda["communication" if strategy != "fsdp" else "gathered_parameters"] > 0


def test_cuda_zero1_shards_the_optimizer_state() -> None:
    zero1, ddp = _ranks_of("cuda", "zero1"), _ranks_of("cuda", "ddp")
    whole = _live_peaks(ddp[0].events)["optimizer_state"]
    shares = [_live_peaks(zero1[r].events)["optimizer_state"] for r in (0, 1)]
    # ZeroRedundancyOptimizer's partition: every parameter's momentum on exactly one rank
    assert sum(shares) == whole and all(0 < s < whole for s in shares)
    assert whole == 4 * sum(p.numel() for p in load_workload(MODEL, INPUT).model.parameters())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("strategy", CUDA_STRATEGIES)
def test_breakdown_adds_up_to_each_ranks_peak(strategy: str, device: str) -> None:
    # on CUDA both are block sizes (the allocator's rounding is in each category's bytes), so no
    # remainder: DDP's buckets and ZeRO's are counted under `communication` on both devices
    for est in _ranks_of(device, strategy, "adam").values():
        assert sum(est.breakdown.values()) == est.peak_allocated_bytes
        if strategy != "fsdp":
            assert est.breakdown["communication"] > 0
