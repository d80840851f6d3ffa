"""``batchfit`` with no arguments: the seed lesson's answer key, computed (not typed in)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

import batchfit._gpus
from batchfit._answer_key import SEED_TABLE, AnswerKey, answer_key
from batchfit._estimate import estimate
from batchfit._fit import fit
from batchfit._gpus import LocalGpu, get_gpu
from batchfit._measure import measure_step
from batchfit._models import MLP, load_workload
from batchfit._step import make_spec
from batchfit.cli import app

SEED_SIZES = [64, 256, 1024, 4096]


@pytest.fixture(scope="module")
def no_local_gpu() -> object:
    """The default card is then the catalogue's H100, whatever machine runs the tests."""
    patch = pytest.MonkeyPatch()
    patch.setattr(batchfit._gpus, "probe_local_gpu", lambda: None)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def key(no_local_gpu: object) -> AnswerKey:
    return answer_key()


def test_golden(key: AnswerKey, golden) -> None:
    golden("default_answer_key.txt", str(key) + "\n")


def test_cli_prints_the_answer_key(key: AnswerKey) -> None:
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == str(key) + "\n"


def test_cpu_column_is_estimate_on_cpu(key: AnswerKey) -> None:
    report = estimate("mlp", dataset="mnist", batch_size=SEED_SIZES, device="cpu")
    assert [e.peak_allocated_bytes for e in key.cpu] == [e.peak_allocated_bytes for e in report]
    text = str(key)
    for e in report:
        assert f"{e.peak_allocated_bytes:,} B" in text


def test_cpu_column_matches_a_real_cpu_step(key: AnswerKey) -> None:
    """What the answer key says: a real CPU training step measures the same, to the byte."""
    workload = load_workload("mlp", dataset="mnist")
    spec = make_spec("cpu", "sgd")
    for e in key.cpu[:2]:
        assert measure_step(workload, e.batch_size, spec).peak_allocated_bytes == e.peak_allocated_bytes


def test_cuda_column_is_estimate_on_the_default_card(key: AnswerKey) -> None:
    report = estimate("mlp", dataset="mnist", batch_size=SEED_SIZES)  # no --gpu: the default card
    assert key.fit.card == get_gpu("h100").name
    for mine, ref in zip(key.cuda, report, strict=True):
        assert (mine.peak_allocated_bytes, mine.peak_reserved_bytes, mine.total_bytes) == (
            ref.peak_allocated_bytes,
            ref.peak_reserved_bytes,
            ref.total_bytes,
        )
        assert mine.breakdown == ref.breakdown


def test_parameter_arithmetic(key: AnswerKey) -> None:
    model = MLP(784)
    n = sum(p.numel() for p in model.parameters())
    assert key.total_params == n == 784 * 128 + 128 + 128 * 10 + 10
    assert key.param_bytes == n * 4
    text = str(key)
    assert f"784 x 128 + 128 = {784 * 128 + 128:,}" in text
    assert f"128 x 10 + 10 =   {128 * 10 + 10:,}" in text
    assert f"   {n:,}  (the summary counts {n:,})" in text
    # the exact value in both units, beside the lesson's own approximation
    assert f"{n * 4:,} B = {n * 4 / 1024:.1f} KiB = {n * 4 / 1000:.1f} KB   (the lesson: ~403 KB)" in text


def test_seed_table_as_the_lesson_states_it(key: AnswerKey) -> None:
    table = key.seed_table()
    assert [row[0] for row in table.rows] == [f"{b:,}" for b in SEED_SIZES]
    for row, seed in zip(table.rows, SEED_TABLE, strict=True):
        assert (row[1], row[3], row[5]) == (seed.data, seed.intermediates, seed.total)
    assert [r.batch_size for r in SEED_TABLE] == SEED_SIZES


def test_what_the_hand_count_misses(key: AnswerKey) -> None:
    text = str(key)
    card = get_gpu("h100")
    assert f"{card.non_allocator_bytes / 2**20:,.2f} MiB that PyTorch's allocator never sees" in text
    assert f"{card.cublas_workspace_bytes / 2**20:,.2f} MiB per cuBLAS handle" in text
    # rounding to 512 B: each of the 4 parameter tensors
    rounded = sum(math.ceil(p.numel() * 4 / 512) * 512 for p in MLP(784).parameters())
    assert f"take {rounded:,} B instead of {key.param_bytes:,} B" in text
    assert "backward" in text and "temporaries" in text


def test_batch_size_by_the_seeds_rule(key: AnswerKey, no_local_gpu: object) -> None:
    ref = fit("mlp", dataset="mnist")
    assert key.fit.max_batch_size == ref.max_batch_size
    assert key.fit.recommended_batch_size == min(math.floor(0.8 * ref.max_batch_size), 60_000) == 60_000
    assert f"=> memory allows batch size {60_000:,}" in str(key)


def test_the_training_effect_half(key: AnswerKey) -> None:
    """The final answer is where training on the shipped digits stops keeping up, not 60,000."""
    t = key.training
    assert t is not None and t.dataset == "digits" and t.device == "cpu"
    assert [r.batch_size for r in t.runs] == [16, 32, 64, 128, 256, 512, 1024]
    assert all(r.samples == 10 * 1437 for r in t.runs)
    # the rule, checked from the runs themselves: raise from 16 while within 1 point of the best
    best = max(r.val_accuracy for r in t.runs)
    ok = [100 * (best - r.val_accuracy) <= 1 + 1e-9 for r in t.runs]
    first = ok.index(True)
    last = first
    while last + 1 < len(ok) and ok[last + 1]:
        last += 1
    expected = t.runs[last].batch_size
    assert key.recommended_batch_size == min(expected, key.fit.recommended_batch_size) == expected < 60_000
    text = str(key)
    assert f"=> use batch size {expected:,}: memory allows 60,000" in text
    assert t.reason in text and "scikit-learn's bundled 8x8 digits" in text
    assert "Linear(64, 128)" in text and f"{64 * 128 + 128 + 128 * 10 + 10:,} parameters" in text
    assert key.to_dict()["recommended_batch_size"] == expected


def test_noise_scale_at_initialisation_is_recomputable(key: AnswerKey) -> None:
    """The answer key's first noise figure: the same seeded model and examples give the same B_simple."""
    from batchfit._noise import noise_scale
    from batchfit._sweep import fresh_model, load_train_data, sample_order

    t = key.training
    assert t is not None and len(t.noise) == 2
    data = load_train_data("digits")
    pick = sample_order(data.train_size, 512, t.seed + 1)
    model = fresh_model(load_workload("mlp", (1, 8, 8), dataset="digits").model, "cpu", t.seed)
    ref = noise_scale(model, data.x_train[pick], data.y_train[pick])
    assert t.noise[0].b_simple == pytest.approx(ref.b_simple, rel=1e-6)
    assert f"B_simple = {ref.b_simple:,.0f} at initialisation" in str(key)
    assert all(n.resolved and 1 < n.b_simple < 1437 for n in t.noise)


def test_uses_the_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    a100 = get_gpu("a100-40gb")
    local = LocalGpu(a100.torch_names[0], a100.memory_bytes, a100.memory_bytes, (8, 0))
    monkeypatch.setattr(batchfit._gpus, "probe_local_gpu", lambda: local)
    key = answer_key()
    assert key.fit.card == a100.name
    assert "the local GPU" in str(key)
