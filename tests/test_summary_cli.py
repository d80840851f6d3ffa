"""`batchfit summary` on the command line, and golden files of every printed layout."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from batchfit._models import MLP
from batchfit._summary import summary
from batchfit.cli import app
from zoo import ZOO

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def torchsummary_text(model: object, size: tuple[int, ...]) -> str:
    torchsummary = pytest.importorskip("torchsummary")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        torchsummary.summary(model, size, device="cpu")
    return buf.getvalue()


@pytest.mark.parametrize(("dataset", "size"), [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_cli_classic_equals_torchsummary(dataset: str, size: tuple[int, ...]) -> None:
    code, out, _ = run("summary", "mlp", "--dataset", dataset, "--style", "classic")
    assert code == 0
    assert out == torchsummary_text(MLP(size[0] * size[1] * size[2]), size)


def test_cli_default_command_prints_the_seed_summary() -> None:
    code, out, _ = run()
    assert code == 0
    assert torchsummary_text(MLP(784), (1, 28, 28)) in out  # then the rest of the answer key (tests/test_default.py)


@pytest.mark.parametrize(("dataset", "params"), [("mnist", 101_770), ("cifar10", 394_634)])
def test_cli_json(dataset: str, params: int) -> None:
    code, out, _ = run("summary", "mlp", "--dataset", dataset, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["total_params"] == params and data["trainable_params"] == params
    assert data["schema_version"] == 2 and len(data["layers"]) == 5


def test_cli_options() -> None:
    code, out, err = run("summary", "mlp", "-d", "mnist", "--batch-size", "32", "--depth", "0", "--module-mode", "train")
    assert code == 0 and not err
    assert "batch size 32, train mode, depth 0" in out
    assert "[32, 10]" in out and "Linear" not in out.split("Total params")[0]


def test_cli_old_mode_flag_still_works_and_says_its_new_name() -> None:
    """summary's --mode (documented before the rename) gives the same table, with a deprecation line."""
    code, out, err = run("summary", "mlp", "-d", "mnist", "--depth", "0", "--mode", "train")
    assert code == 0 and "train mode, depth 0" in out
    assert "--mode is now --module-mode" in err
    code, _, err = run("summary", "mlp", "-d", "mnist", "--module-mode", "sideways")
    assert code == 3 and "unknown module mode 'sideways'" in err and "--module-mode eval" in err


def test_cli_bad_input_has_no_traceback(tmp_path: Path) -> None:
    model_file = tmp_path / "net.py"
    model_file.write_text(
        "from torch import nn\n"
        "def Net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))\n"
    )
    code, out, err = run("summary", f"{model_file}:Net", "--input", "3,32,32")
    assert code == 3
    assert "layer 1 (Linear) expected last dim 784, got input of shape (1, 3072)" in err
    assert "--input 1,28,28 / --dataset mnist" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "mlp", "--style", "fancy"], "unknown style"),
        (["summary", "resnet17"], "did you mean"),
        (["summary", "mlp", "--depth", "-2"], "depth"),
    ],
)
def test_cli_errors(args: list[str], message: str) -> None:
    code, out, err = run(*args)
    assert code == 3 and message in err and "Traceback" not in out + err


# ---------------------------------------------------------------------------------------------
# Golden files: every printed layout, plain text (pytest --overwrite to accept a change)


@pytest.mark.parametrize(
    ("golden_name", "args"),
    [
        ("summary_classic_mlp_mnist.txt", ["summary", "mlp", "-d", "mnist", "--style", "classic"]),
        ("summary_classic_resnet18.txt", ["summary", "resnet18", "--input", "3,224,224", "--style", "classic"]),
        ("summary_default_mlp_mnist.txt", ["summary", "mlp", "-d", "mnist"]),
        ("summary_default_cnn_cifar10_b64.txt", ["summary", "cnn", "-d", "cifar10", "-b", "64"]),
        ("summary_default_resnet18_depth2.txt", ["summary", "resnet18", "--depth", "2"]),
    ],
)
def test_golden_cli(golden, golden_name: str, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(*args)
    assert code == 0
    golden(golden_name, out)


@pytest.mark.parametrize("name", ["reused", "tied_lm", "frozen", "lstm", "param_holders", "transformer_encoder"])
def test_golden_zoo(golden, name: str) -> None:  # type: ignore[no-untyped-def]
    entry = ZOO[name]
    model = entry.build()
    if entry.make_inputs is None:
        s = summary(model, input_size=entry.input_size, batch_size=2, depth=4)
    else:
        s = summary(model, input_data=entry.inputs(2), depth=4)
    golden(f"summary_zoo_{name}.txt", str(s) + "\n")
    classic = summary(model, input_data=entry.inputs(2), style="classic")
    golden(f"summary_zoo_{name}_classic.txt", str(classic) + "\n")


def test_golden_rich_table(golden) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(summary("cnn", dataset="mnist"))
    golden("summary_rich_cnn_mnist.txt", buf.getvalue())


def _entry_point(*args: str) -> subprocess.CompletedProcess[str]:
    """The console entry point as a user runs it (it leaves through os._exit: no teardown)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "batchfit", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_entry_point_flushes_all_output_and_keeps_exit_codes() -> None:
    done = _entry_point("summary", "mlp", "--dataset", "mnist", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["total_params"] == 101_770  # the whole document arrived
    bad = _entry_point("summary", "no_such_model")
    assert bad.returncode == 3 and "no_such_model" in bad.stderr
    usage = _entry_point("summary", "mlp", "--style")
    assert usage.returncode == 2
