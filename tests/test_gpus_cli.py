"""``batchfit gpus`` and the shared --gpu / --memory / --free options."""

from __future__ import annotations

import io
import json
from typing import Any

import typer
from rich.console import Console
from typer.testing import CliRunner

from batchfit._gpus import list_gpus
from batchfit.cli import app
from batchfit.cli._common import FreeOpt, GpuOpt, MemoryOpt, budget_from_options
from batchfit.cli.gpus import catalogue_table

runner = CliRunner()


def test_gpus_lists_the_catalogue_as_json() -> None:
    result = runner.invoke(app, ["gpus", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["default_card"] == "h100-sxm"
    assert len(data["cards"]) == len(list_gpus())


def test_gpus_shows_one_card() -> None:
    result = runner.invoke(app, ["gpus", "H100-80GB", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["key"] == "h100-sxm"
    assert card["cublas_workspace_bytes"] == 32 * 1024 * 1024
    assert card["peaks"]["bandwidth_bytes_per_second"] == 3_350 * 10**9 and "datasheet" in card["peaks"]["source"]
    text = runner.invoke(app, ["gpus", "rtx4090"]).stdout
    assert "compute capability 8.9" in text and "[assumed]" in text


def test_unknown_gpu_is_an_input_error_with_a_hint() -> None:
    result = runner.invoke(app, ["gpus", "h1000"])
    assert result.exit_code == 3
    assert "unknown GPU" in result.output and "hint:" in result.output


def test_the_table_layout(golden: Any) -> None:
    buffer = io.StringIO()
    Console(file=buffer, width=170, color_system=None).print(catalogue_table(list_gpus()))
    golden("gpus_table.txt", buffer.getvalue())
    golden("gpus_table_plain.txt", str(catalogue_table(list_gpus())))


def test_shared_options_resolve_a_budget() -> None:
    probe = typer.Typer()
    seen: dict[str, Any] = {}

    @probe.command()
    def main(gpu: GpuOpt = None, memory: MemoryOpt = None, free: FreeOpt = False) -> None:
        seen["budget"] = budget_from_options(gpu, memory, free)

    assert runner.invoke(probe, ["--gpu", "a100-40gb"]).exit_code == 0
    assert seen["budget"].card.key == "a100-40gb"
    assert runner.invoke(probe, ["-g", "t4", "-m", "8GB"]).exit_code == 0
    assert seen["budget"].budget_bytes == 8 * 10**9
    assert seen["budget"].card.key == "t4"
