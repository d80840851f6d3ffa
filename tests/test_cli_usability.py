"""The command line as a new user meets it: errors without PyTorch's logs, --debug where users put
it, keyword inputs, --input and --num-classes in every command (issue 12, items 5-10)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchfit import BatchfitError, ExitCode
from batchfit.cli import app

runner = CliRunner()

_LINEAR_8 = "from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__(); self.fc = nn.Linear(8, 3)\n    def forward(self, x):\n        return self.fc(x)\n"

_KEYWORDS = (
    "import torch\nfrom torch import nn\n"
    "class Net(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__(); self.embed = nn.Embedding(20, 8); self.head = nn.Linear(8, 5)\n"
    "    def forward(self, input_ids, attention_mask=None):\n"
    "        return self.head((self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1))\n"
    "def example_inputs(batch_size):\n"
    "    return {'input_ids': torch.zeros(batch_size, 6, dtype=torch.long), 'attention_mask': torch.ones(batch_size, 6)}\n"
)


@pytest.fixture
def model_file(tmp_path: Path) -> Iterator[Path]:
    f = tmp_path / "linear8.py"
    f.write_text(_LINEAR_8)
    yield f


def _entry_point(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "batchfit", *args], capture_output=True, text=True, env=env, timeout=300
    )


# -- item 5: a shape error is batchfit's one message, not PyTorch's logged traceback first ----------


def test_a_shape_error_prints_only_batchfits_message(model_file: Path) -> None:
    # FakeTensorMode logs the meta kernel's traceback (about 17 lines) before raising; fit also
    # traces in forked children, which must be as quiet (estimate in-process: see below)
    out = _entry_point("fit", f"{model_file}:Net", "--input", "5", "--memory", "1GiB")
    assert out.returncode == ExitCode.INPUT, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: layer fc (Linear) expected last dim 8"), out.stderr
    assert lines[1:] == ["hint: the model expects 8 values per sample, e.g. --input 8"], out.stderr


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fake_tensor_logs() -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- item 6: --debug after the command too ----------------------------------------------------------


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_after_the_command_keeps_everything(model_file: Path, fake_tensor_logs: _Records, where: str) -> None:
    args = ["estimate", f"{model_file}:Net", "--input", "5", "-b", "2", "--device", "cpu"]
    args = [*args, "--debug"] if where == "after" else ["--debug", *args]  # "after" was "No such option" (exit 2)
    result = runner.invoke(app, args)
    assert isinstance(result.exception, BatchfitError), result.output  # the traceback, not a short message
    assert any("failed while attempting to run meta" in r.getMessage() for r in fake_tensor_logs.records)


def test_without_debug_pytorchs_log_stays_silent(model_file: Path, fake_tensor_logs: _Records) -> None:
    result = runner.invoke(app, ["estimate", f"{model_file}:Net", "--input", "5", "-b", "2", "--device", "cpu"])
    assert result.exit_code == ExitCode.INPUT and "expected last dim 8" in result.stderr
    assert fake_tensor_logs.records == []
    assert not logging.getLogger("torch._subclasses.fake_tensor").disabled  # given back afterwards


def test_debug_is_listed_in_each_commands_help() -> None:
    for command in ("summary", "estimate", "measure", "fit", "plan", "probe", "show", "gpus", "models"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--debug" in result.output, command


# -- item 10: keyword inputs in every command ---------------------------------------------------------


def test_keyword_inputs_in_every_command(tmp_path: Path) -> None:
    f = tmp_path / "keywords.py"
    f.write_text(_KEYWORDS)
    model = f"{f}:Net"
    s = runner.invoke(app, ["summary", model, "--json"])
    assert s.exit_code == 0, s.output
    assert [i["shape"] for i in json.loads(s.stdout)["inputs"]] == [[1, 6], [1, 6]]
    est = runner.invoke(app, ["estimate", model, "-b", "8", "--device", "cpu", "--json"])
    real = runner.invoke(app, ["measure", model, "-b", "8", "--device", "cpu", "--json"])
    assert est.exit_code == 0 and real.exit_code == 0, est.output + real.output
    # the simulated CPU step equals the real one, byte for byte, as for positional inputs
    est_peak = json.loads(est.stdout)["results"][0]["peak_allocated_bytes"]
    assert est_peak == json.loads(real.stdout)["results"][0]["peak_allocated_bytes"]
    fitted = runner.invoke(app, ["fit", model, "--memory", "2GiB", "--json"])
    assert fitted.exit_code == 0 and json.loads(fitted.stdout)["max_batch_size"] > 1000, fitted.output
    planned = runner.invoke(app, ["plan", model, "--memory", "2GiB"])
    assert planned.exit_code == 0 and "[6] int64; [6] float32" in planned.stdout, planned.output


# -- item 7: --input beside example_inputs, item 9: --num-classes shown; a scripted submodule --------


def test_input_beside_example_inputs_and_num_classes_on_the_command_line(tmp_path: Path) -> None:
    f = tmp_path / "agnostic.py"
    f.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=3):\n"
        "        super().__init__(); self.fc = nn.Linear(1, num_classes)\n"
        "    def forward(self, x):\n        return self.fc(x.sum(-1, keepdim=True))\n"
        "def example_inputs(batch_size):\n    return torch.rand(batch_size, 8)\n"
    )
    out = runner.invoke(app, ["summary", f"{f}:Net", "--input", "6", "--num-classes", "4", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [i["shape"] for i in data["inputs"]] == [[1, 6]]  # was [1, 8]: --input silently ignored
    assert data["num_classes"] == 4 and data["total_params"] == 1 * 4 + 4


def test_summary_of_a_scripted_submodule_on_the_command_line(tmp_path: Path) -> None:
    f = tmp_path / "scripted.py"
    f.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.inner = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))\n"
        "        self.head = nn.Linear(8, 3)\n"
        "    def forward(self, x):\n        return self.head(self.inner(x))\n"
    )
    out = runner.invoke(app, ["summary", f"{f}:Net", "--input", "8"])  # was exit 3, blaming the inputs
    assert out.exit_code == 0, out.output
    assert "Total params: 99" in out.stdout  # 8 x 8 + 8 + 8 x 3 + 3


# -- issue 13: the library speaks in parameters, the command line in its flags -------------------------

_SRC = Path(__file__).resolve().parents[1] / "src" / "batchfit"


def _error_texts(path: Path) -> Iterator[tuple[int, str]]:
    """The literal text of every message and hint given to an error class in one module (an
    f-string's fields as ``{}``)."""
    import ast

    def texts(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        else:
            for child in ast.iter_child_nodes(node):
                yield from texts(child)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "").endswith(("Error", "DoesNotFit")):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for text in texts(arg):
                    yield node.lineno, text


def test_library_errors_name_parameters_not_flags() -> None:
    import re

    flag = re.compile(r"(?<![\w-])--(?!debug\b)[a-z][a-z-]*")  # --debug: the command line's own switch
    command = re.compile(r"`batchfit [^`]*`")  # a whole command to run (e.g. `batchfit show mnist --download`)
    found = [
        f"{path.name}:{line}: {text!r}"
        for path in sorted(_SRC.glob("_*.py"))
        for line, text in _error_texts(path)
        if flag.search(command.sub("", text))
    ]
    assert not found, "\n".join(found)


def test_the_command_line_shows_parameters_as_its_flags() -> None:
    import batchfit
    from batchfit._step import make_spec
    from batchfit.cli._app import as_flags

    with pytest.raises(BatchfitError) as info:  # the library's words
        make_spec("tpu")
    assert info.value.hint == "use `device='cuda'` or `device='cpu'`"
    out = runner.invoke(app, ["estimate", "mlp", "--dataset", "mnist", "--device", "tpu"])  # the command's
    assert out.exit_code == 3 and "hint: use --device cuda or --device cpu" in out.stderr
    # a parameter whose flag has another name; a value in Python's form; one the command lacks
    out = runner.invoke(app, ["fit", "mlp", "--dataset", "mnist", "--context", "lots"])
    assert out.exit_code == 3 and "error: --context must be a size, not 'lots'" in out.stderr
    assert "hint: e.g. --context 600MiB" in out.stderr and "`" not in out.stderr
    # one check for fit, plan and probe, in the words of each side
    with pytest.raises(BatchfitError, match=r"`safety` must be in \(0, 1\], got 1.5"):
        batchfit.fit("mlp", dataset="mnist", safety=1.5)
    out = runner.invoke(app, ["fit", "mlp", "--dataset", "mnist", "--safety", "1.5"])
    assert out.exit_code == 3 and "error: --safety must be in (0, 1], got 1.5" in out.stderr
    assert "hint: the lesson's rule is --safety 0.8" in out.stderr
    flags = {"inputs": "--input", "free": "--free", "loss": "--loss"}
    text = "`input_size=(1, 28, 28)`, `free=True`, `loss='path/to/f.py:fn'` and `threads`"
    assert as_flags(text, flags) == "--input 1,28,28, --free, --loss path/to/f.py:fn and `threads`"
