"""The classic style is torchsummary 1.5.1's output, byte for byte: checked against torchsummary itself."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from batchfit._models import CNN, MLP
from batchfit._summary import summary
from zoo import ZOO

torchsummary = pytest.importorskip("torchsummary")


def torchsummary_text(model: nn.Module, input_size: Any, **kwargs: Any) -> str:
    """What torchsummary prints for a real CPU model (its forward runs for real)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        torchsummary.summary(model, input_size, device="cpu", **kwargs)
    return buf.getvalue()


def classic_text(model: Any, **kwargs: Any) -> str:
    return str(summary(model, style="classic", **kwargs)) + "\n"  # print() adds the last newline


@pytest.mark.parametrize(
    ("make", "input_size"),
    [
        (lambda: MLP(784), (1, 28, 28)),
        (lambda: MLP(3072), (3, 32, 32)),
        (lambda: CNN(1, 28), (1, 28, 28)),
        (lambda: CNN(3, 32), (3, 32, 32)),
        (ZOO["reused"].build, (8,)),  # one module, three rows: its parameters counted three times
        (ZOO["frozen"].build, (3, 16, 16)),  # trainable only where `weight` requires grad
        (ZOO["nested_lists"].build, (8,)),
        (ZOO["param_holders"].build, (12,)),  # the bare Parameter and ParameterList are not counted
        (ZOO["two_inputs"].build, [(1, 28, 28), (1, 14, 14)]),  # Input size = product of ALL dims
    ],
    ids=["mlp-mnist", "mlp-cifar10", "cnn-mnist", "cnn-cifar10", "reused", "frozen", "nested", "holders", "two-inputs"],
)
def test_user_modules_match_torchsummary(make: Any, input_size: Any) -> None:
    torch.manual_seed(0)
    model = make()
    assert classic_text(model, input_size=input_size) == torchsummary_text(model, input_size)


def test_batch_size_argument_matches_torchsummary() -> None:
    model = ZOO["two_inputs"].build()
    sizes = [(1, 28, 28), (1, 14, 14)]
    assert classic_text(model, input_size=sizes, batch_size=16) == torchsummary_text(model, sizes, batch_size=16)


@pytest.mark.parametrize(
    ("name", "kwargs", "real"),
    [
        ("mlp", {"dataset": "mnist"}, lambda: (MLP(784), (1, 28, 28))),
        ("mlp", {"dataset": "cifar10"}, lambda: (MLP(3072), (3, 32, 32))),
        ("cnn", {"dataset": "mnist"}, lambda: (CNN(1, 28), (1, 28, 28))),
    ],
    ids=["mlp-mnist", "mlp-cifar10", "cnn-mnist"],
)
def test_registry_models_match_torchsummary(name: str, kwargs: dict[str, Any], real: Any) -> None:
    model, size = real()
    assert classic_text(name, **kwargs) == torchsummary_text(model, size)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_match_torchsummary(name: str) -> None:
    import torchvision

    model = getattr(torchvision.models, name)()
    expected = torchsummary_text(model, (3, 224, 224))
    assert classic_text(name, input_size=(3, 224, 224)) == expected
    assert classic_text(model, input_size=(3, 224, 224)) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchsummary feeding a tensor where a dict goes
@pytest.mark.parametrize("entry", ["lstm", "dict_input", "transformer_encoder"])
def test_where_torchsummary_crashes_classic_still_prints_rows(entry: str) -> None:
    zoo = ZOO[entry]
    model = zoo.build()
    inputs = zoo.inputs(2)
    with pytest.raises(Exception), contextlib.redirect_stdout(io.StringIO()):  # noqa: B017 - any crash
        torchsummary.summary(
            model, [tuple(inputs[0].shape[1:])] if entry != "dict_input" else [(1, 8, 8)], device="cpu"
        )
    s = summary(zoo.build(), input_data=inputs, style="classic")  # torchsummary left its hooks on `model`
    assert s.classic is not None
    text = str(s)
    # every module the forward ran (minus containers and the model) has its row, numbered in order
    assert [r.layer.rsplit("-", 1)[1] for r in s.classic.rows] == [str(i) for i in range(1, len(s.classic.rows) + 1)]
    assert "Total params:" in text and "Estimated Total Size (MB):" in text


def test_lstm_rows_show_every_output_tensor() -> None:
    zoo = ZOO["lstm"]
    s = summary(zoo.build(), input_size=(7, 10), style="classic")
    assert s.classic is not None
    lstm, head = s.classic.rows
    # (out, (h, c)) for batch_first, 2 layers, hidden 20: out (B, 7, 20), h and c (2, B, 20)
    assert lstm.layer == "LSTM-1" and lstm.output_shape == [[-1, 7, 20], [-1, 2, 20], [-1, 2, 20]]
    assert lstm.params == 0 and not lstm.compatible  # no `weight` attribute: torchsummary's rule
    assert head.layer == "Linear-2" and head.output_shape == [-1, 5] and head.params == 20 * 5 + 5
    # the pass size sums the tensors (torchsummary's np.prod would multiply them together)
    numel = 7 * 20 + 2 * 20 + 2 * 20
    assert s.classic.to_dict()["forward_backward_size_mib"] == pytest.approx(2 * (numel + 5) * 4 / 2**20)
