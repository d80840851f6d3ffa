"""fit and plan on several GPUs (--gpus/--nodes/--strategy): the per-GPU max, the 0.8 rule and the global batch."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from batchfit._distributed import make_dist
from batchfit._estimate import Estimator, make_spec
from batchfit._fit import fit
from batchfit._models import load_workload

SETTING = {"memory": "600MiB", "optimizer": "adam", "dataset": "mnist"}


@pytest.fixture(scope="module")
def ddp_fit():  # type: ignore[no-untyped-def]
    return fit("mlp", gpus=2, **SETTING)


def test_per_gpu_max_is_the_boundary_of_every_rank(ddp_fit) -> None:  # type: ignore[no-untyped-def]
    r = ddp_fit
    dist = make_dist(2)
    assert r.dist == dist and r.world_size == 2
    # the boundary, checked with the distributed estimate of each size (every rank must fit)
    est = Estimator(load_workload("mlp", dataset="mnist"), make_spec("cuda", "adam"), memory="600MiB", dist=dist)
    assert all(x.estimate.fits for x in est.at(r.max_batch_size).ranks)
    assert not all(x.estimate.fits for x in est.at(r.max_batch_size + 1).ranks)
    # DDP's gradient buckets cost memory one GPU does not spend: never a larger max than one GPU's
    single = fit("mlp", **SETTING)
    assert r.max_batch_size <= single.max_batch_size
    # the lesson's rule per GPU, and the global batch per optimizer step
    assert r.recommended_batch_size == math.floor(0.8 * r.max_batch_size)
    assert r.global_recommended_batch_size == 2 * r.recommended_batch_size
    assert r.global_max_batch_size == 2 * r.max_batch_size
    d = r.to_dict()
    assert d["per_gpu"] is True and d["world_size"] == 2 and d["distributed"]["strategy"] == "ddp"
    assert d["global_recommended_batch_size"] == 2 * d["recommended_batch_size"]
    text = str(r)
    assert "global batch (per GPU x GPUs)" in text and f"{r.recommended_batch_size:,} x 2 = " in text
    # nodes multiply the world: the global batch is per GPU x GPUs per node x nodes
    four = dataclasses.replace(r, dist=make_dist(2, nodes=2))
    assert four.world_size == 4 and four.global_recommended_batch_size == 4 * r.recommended_batch_size


def test_the_global_batch_is_capped_at_the_training_set() -> None:
    # MNIST has 60,000 training images: 4 GPUs at most 15,000 each per step
    r = fit("mlp", gpus=4, memory="1GiB", optimizer="sgd", dataset="mnist")
    assert r.max_batch_size * 4 > 60_000
    assert r.recommended_batch_size == 15_000 and r.global_recommended_batch_size == 60_000
    assert any("capped at the mnist training set" in n for n in r.notes)


def test_plan_cli_with_gpus_json() -> None:
    from typer.testing import CliRunner

    from batchfit.cli import app

    args = ["plan", "mlp", "-d", "mnist", "--memory", "600MiB", "-o", "adam", "--gpus", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["world_size"] == 2 and data["distributed"]["world_size"] == 2
    assert data["global_recommended_batch_size"] == 2 * data["recommended_batch_size"]
    assert data["global_max_batch_size"] == 2 * data["max_batch_size"]
    assert "communication" in data["categories"] and "gathered_parameters" in data["categories"]
    assert data["at_recommended"]["batch_size"] == data["recommended_batch_size"]


def test_distributed_options_need_gpus() -> None:
    from batchfit._errors import BatchfitError

    with pytest.raises(BatchfitError, match="need `gpus=N`"):  # the library names its parameter
        fit("mlp", dataset="mnist", strategy="fsdp")


def test_the_global_batch_counts_gradient_accumulation(ddp_fit) -> None:  # type: ignore[no-untyped-def]
    # the Trainer's effective batch: per_device_train_batch_size x world size x gradient_accumulation_steps
    r = dataclasses.replace(ddp_fit, grad_accum=4)
    assert r.global_recommended_batch_size == r.recommended_batch_size * 2 * 4
    assert r.global_max_batch_size == r.max_batch_size * 2 * 4
    d = r.to_dict()
    assert d["global_recommended_batch_size"] == d["recommended_batch_size"] * 2 * 4
    assert d["global_max_batch_size"] == d["max_batch_size"] * 2 * 4
    text = str(r)
    assert "global batch (per GPU x GPUs x micro-batches)" in text
    assert f"{r.recommended_batch_size:,} x 2 x 4 = {r.recommended_batch_size * 8:,}" in text
    # the estimate's own global batch, in its JSON and in its rank table's title
    spec = make_spec("cuda", "adam", grad_accum=4)
    e = Estimator(load_workload("mlp", dataset="mnist"), spec, memory="600MiB", dist=make_dist(2)).at(16)
    assert e.grad_accum == 4 and e.global_batch_size == 16 * 2 * 4
    assert e.to_dict()["global_batch_size"] == 128
    assert "(global batch 128)" in str(e)


def test_the_global_batch_cap_counts_gradient_accumulation() -> None:
    # 60,000 MNIST images: 4 GPUs x 3 micro-batches give at most 5,000 per GPU per micro-batch
    r = fit("mlp", gpus=4, grad_accum=3, memory="1GiB", optimizer="sgd", dataset="mnist")
    assert r.max_batch_size * 4 * 3 > 60_000
    assert r.recommended_batch_size == 5_000 and r.global_recommended_batch_size == 60_000
    assert any("capped at the mnist training set" in n and "x 3 micro-batches" in n for n in r.notes)
