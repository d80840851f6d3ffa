"""``batchfit plan``: the one-screen answer, its JSON, its plot, and bad input."""

from __future__ import annotations

import importlib
import itertools
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchfit import BatchfitError
from batchfit._estimate import estimate
from batchfit._fit import fit
from batchfit._gpus import get_gpu
from batchfit._models import MLP
from batchfit._plan import STACK_CATEGORIES, Plan, check_plot_path, plan, sweep_sizes
from batchfit.cli import app

GIB = 1024**3
runner = CliRunner()


@pytest.fixture(scope="module")
def mlp_plan() -> Plan:
    return plan("mlp", dataset="mnist", gpu="h100", curve_points=24)


def test_max_and_recommended_are_fits(mlp_plan: Plan) -> None:
    ref = fit("mlp", dataset="mnist", gpu="h100")
    assert mlp_plan.max_batch_size == ref.max_batch_size
    assert mlp_plan.recommended_batch_size == ref.recommended_batch_size == 60_000  # MNIST's training set
    assert mlp_plan.budget_bytes == get_gpu("h100").memory_bytes


def test_table_sizes(mlp_plan: Plan) -> None:
    sizes = [p.batch_size for p in mlp_plan.rows]
    top = mlp_plan.max_batch_size
    powers = [2**k for k in range(int(math.log2(top)) + 1)]
    assert sizes == sorted({*powers, 64, 256, 1024, 4096, top, mlp_plan.recommended_batch_size})
    assert all(p.fits for p in mlp_plan.rows)


def test_points_equal_independent_estimates(mlp_plan: Plan) -> None:
    for b in (64, 4096):
        ref = estimate("mlp", dataset="mnist", batch_size=b, gpu="h100")
        point = mlp_plan.point(b)
        assert point.peak_allocated_bytes == ref.peak_allocated_bytes
        assert point.peak_reserved_bytes == ref.peak_reserved_bytes
        assert point.total_bytes == ref.total_bytes
        assert all(point.stack_bytes[c] == n for c, n in ref.breakdown.items())


def test_stack_reaches_the_total(mlp_plan: Plan) -> None:
    context = get_gpu("h100").non_allocator_bytes
    for p in (*mlp_plan.rows, *mlp_plan.curve):
        assert list(p.stack_bytes) == list(STACK_CATEGORIES)
        assert sum(p.stack_bytes.values()) == p.total_bytes
        assert p.cuda_context_bytes == context
        assert p.allocator_reserve_bytes == p.peak_reserved_bytes - p.peak_allocated_bytes >= 0
        assert p.total_bytes == p.peak_reserved_bytes + context


def test_curve_goes_past_the_max() -> None:
    small = plan("mlp", dataset="mnist", memory="2GiB", curve_points=12)  # memory, not 2^31 elements, binds
    sizes = [p.batch_size for p in small.curve]
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    top = small.max_batch_size
    assert sizes[-1] == math.ceil(1.25 * top)
    assert not small.point(top + 1).fits and small.point(top).fits
    assert small.point(sizes[-1]).total_bytes > small.budget_bytes


def test_sweep_sizes() -> None:
    # 1.25 x 10,000 = 12,500; 12,500 ** (k / 4) = 1, 10.57, 111.8, 1182.0, 12,500
    assert sweep_sizes(10_000, 5) == [1, 11, 112, 1182, 12_500]
    assert sweep_sizes(1, 10) == [1, 2]


def test_text(mlp_plan: Plan) -> None:
    text = str(mlp_plan)
    n_params = sum(p.numel() for p in MLP(784).parameters())
    assert f"parameters            {n_params:,} ({n_params:,} trainable)" in text
    assert f"largest batch that fits  {mlp_plan.max_batch_size:,}" in text
    row = next(line for line in text.splitlines() if line.rstrip().endswith("<- use"))
    assert row.split()[0] == "60,000"
    assert next(line for line in text.splitlines() if line.rstrip().endswith("<- max")).split()[0] == (
        f"{mlp_plan.max_batch_size:,}"
    )
    rec = mlp_plan.at_recommended
    assert f"total on the card (nvidia-smi)            {rec.total_bytes:,}" in text


def test_json(mlp_plan: Plan) -> None:
    data = json.loads(mlp_plan.to_json())
    assert data["schema_version"] == 1
    assert data["max_batch_size"] == mlp_plan.max_batch_size
    assert data["recommended_batch_size"] == 60_000
    assert data["summary"]["total_params"] == 101_770
    assert data["categories"] == list(STACK_CATEGORIES)
    assert [r["batch_size"] for r in data["table"]] == [p.batch_size for p in mlp_plan.rows]
    for point in (*data["table"], *data["curve"], data["at_recommended"]):
        assert sum(point["stack_bytes"].values()) == point["total_bytes"]
    assert data["headroom_bytes"] == data["budget_bytes"] - data["at_recommended"]["total_bytes"]


def test_throughput_is_the_roofline_estimate_and_says_so(mlp_plan: Plan) -> None:
    r = mlp_plan.throughput
    assert r is not None and r.unavailable is None
    assert [p.batch_size for p in r.points] == [
        p.batch_size for p in mlp_plan.rows if p.batch_size <= mlp_plan.max_batch_size
    ]
    sps = [p.samples_per_second for p in r.points]
    assert all(a < b for a, b in itertools.pairwise(sps))
    data = json.loads(mlp_plan.to_json())["throughput_estimate"]
    assert data["kind"] == "roofline estimate" and data["saturation_batch_size"] == r.saturation_batch_size
    assert [p["batch_size"] for p in data["points"]] == [p.batch_size for p in r.points]
    text = str(mlp_plan)
    assert "ROOFLINE ESTIMATE (not measured)" in text
    assert f"=> throughput saturates from batch size {r.saturation_batch_size:,}" in text
    _, right = mlp_plan.plot().axes
    assert "roofline estimate" in right.get_ylabel()


def test_plot_figure(mlp_plan: Plan) -> None:
    fig = mlp_plan.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # 1 .. 20 million
    assert "GiB" in ax.get_ylabel() and ax.get_xlabel() == "batch size"
    shown = mlp_plan.categories()
    assert len(ax.collections) == len(shown)  # one stacked area each
    assert [p.get_label() for p in ax.patches] == ["does not fit"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    card = next(v for k, v in lines.items() if k.startswith("the card"))
    assert card.get_ydata()[0] == pytest.approx(mlp_plan.budget_bytes / GIB)
    top = next(v for k, v in lines.items() if k.startswith("largest that fits"))
    assert top.get_xdata()[0] == mlp_plan.max_batch_size
    rec = next(v for k, v in lines.items() if k.startswith("recommended"))
    assert rec.get_xdata()[0] == 60_000
    # the top of the stack is the total in GiB
    stack_top = ax.collections[len(shown) - 1].get_paths()[0].vertices[:, 1].max()
    assert stack_top == pytest.approx(max(p.total_bytes for p in mlp_plan.curve) / GIB)


@pytest.mark.parametrize(("name", "magic"), [("memory.png", b"\x89PNG\r\n\x1a\n"), ("sub/memory.svg", b"<?xml")])
def test_plot_files(mlp_plan: Plan, tmp_path: Path, name: str, magic: bytes) -> None:
    out = mlp_plan.save_plot(tmp_path / name)
    data = out.read_bytes()
    assert data.startswith(magic)
    assert 10_000 < len(data) < 2_000_000
    if name.endswith(".png"):
        import matplotlib.image

        height, width = matplotlib.image.imread(out).shape[:2]
        assert (width, height) == (1320, 660)  # 11 x 5.5 inches at 120 dpi
    else:
        assert b"<svg" in data and b"largest that fits" in data


def test_jupyter_reprs(mlp_plan: Plan) -> None:
    png = mlp_plan._repr_png_()
    assert png.startswith(b"\x89PNG")
    page = mlp_plan._repr_html_()
    assert page.startswith("<pre>") and "data:image/png;base64," in page and "recommended" in page


@pytest.mark.parametrize("path", ["memory.jpg", "memory", "memory.pdf"])
def test_bad_plot_extension(path: str) -> None:
    with pytest.raises(BatchfitError, match="unknown image type") as info:
        check_plot_path(path)
    assert info.value.hint is not None and ".png" in info.value.hint


def test_traced_path_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the affine timeline every size is traced: the same numbers, a coarser curve."""
    plan_module = importlib.import_module("batchfit._plan")  # the module: batchfit._plan is the function

    def fit_without_timeline(*args: object, **kwargs: object):
        result = fit(*args, **kwargs)  # type: ignore[arg-type]
        result._timeline = None
        return result

    affine = plan("mlp", dataset="mnist", memory="2GiB", curve_points=8)
    monkeypatch.setattr(plan_module, "fit", fit_without_timeline)
    traced = plan("mlp", dataset="mnist", memory="2GiB", curve_points=8)
    assert any("not affine" in n for n in traced.notes)
    assert traced.rows == affine.rows
    sizes = [p.batch_size for p in traced.curve]
    top = traced.max_batch_size
    assert sizes == [*(p.batch_size for p in traced.rows), top + 1, math.ceil(1.25 * top)]


# -- the command line ----------------------------------------------------------------------------


def test_cli_text() -> None:
    result = runner.invoke(app, ["plan", "mlp", "-d", "mnist", "--gpu", "h100"])
    assert result.exit_code == 0, result.stderr
    assert f"largest batch that fits  {(2**31 - 1) // 784:,}" in result.stdout  # capped below 2^31 input elements
    assert "memory at the recommended batch size 60,000" in result.stdout


def test_cli_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "plan.svg"
    result = runner.invoke(app, ["plan", "mlp", "-d", "mnist", "--gpu", "h100", "--json", "--plot", str(out)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["recommended_batch_size"] == 60_000 and data["card"] == get_gpu("h100").name
    assert out.read_bytes().startswith(b"<?xml")
    assert f"plot written to {out}" in result.stderr


def test_cli_bad_plot_extension_fails_first(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "no-such-model", "--plot", str(tmp_path / "x.jpg")])
    assert result.exit_code == 2  # the plot path is checked before the model is even looked up
    assert "unknown image type '.jpg'" in result.stderr and "FILE.png" in result.stderr
    assert not (tmp_path / "x.jpg").exists()


def test_cli_unknown_model() -> None:
    result = runner.invoke(app, ["plan", "resnet17"])
    assert result.exit_code == 3
    assert "resnet17" in result.stderr and "hint:" in result.stderr


def test_cli_does_not_fit() -> None:
    result = runner.invoke(app, ["plan", "mlp", "-d", "mnist", "--memory", "100MiB"])
    assert result.exit_code == 4
    assert "does not fit" in result.stderr


def test_golden_text(mlp_plan: Plan, golden) -> None:
    golden("plan_mlp_mnist_h100.txt", str(mlp_plan) + "\n")
