"""The default summary: correct parameters (counted once), shapes at the real batch, mult-adds as run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from batchfit import BatchfitError
from batchfit._models import MLP, ModelInputs
from batchfit._summary import SCHEMA_VERSION, LayerRow, ModelSummary, summary
from zoo import LLAMA_7B, LLAMA_TINY, ZOO, Llama


def row(s: ModelSummary, name: str, call: int = 1) -> LayerRow:
    return next(r for r in s.rows if r.name == name and r.call == call)


# ---------------------------------------------------------------------------------------------
# The zoo: every awkward model summarises, and its numbers add up


def zoo_summary(name: str, batch_size: int = 3, **kwargs: Any) -> tuple[nn.Module, ModelSummary]:
    entry = ZOO[name]
    model = entry.build()
    if entry.make_inputs is None:
        return model, summary(model, input_size=entry.input_size, batch_size=batch_size, **kwargs)
    return model, summary(model, input_data=entry.inputs(batch_size), **kwargs)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_parameters_and_output_shapes(name: str) -> None:
    model, s = zoo_summary(name)
    entry = ZOO[name]
    assert s.total_params == entry.params  # worked out by hand in the zoo
    assert s.trainable_params == entry.trainable_params
    assert sum(r.params for r in s.rows) == entry.params  # every parameter has exactly one row
    assert sum(r.trainable_params for r in s.rows) == entry.trainable_params
    assert sum(r.flops for r in s.rows) == s.total_flops  # self FLOPs add up to the total
    # the model's output at batch 3, run for real in eval mode, has the shapes of the first row
    model.eval()
    with torch.no_grad():
        out = ModelInputs.of(entry.inputs(3)).call(model)
    assert s.rows[0].output_shapes == _shapes(out)


def test_module_used_several_times_counts_once() -> None:
    _, s = zoo_summary("reused")
    calls = [r for r in s.rows if r.name == "block"]
    assert [r.call for r in calls] == [1, 2, 3]
    assert [r.params for r in calls] == [8 * 8 + 8, 0, 0]
    assert [r.shared_params for r in calls] == [0, 72, 72]
    assert [r.mult_adds for r in calls] == [3 * 8 * 8] * 3  # batch 3, each call runs again
    assert "(reused)" in str(s)


def test_tied_weights_count_once_and_linear_on_3d_input() -> None:
    _, s = zoo_summary("tied_lm")
    assert row(s, "embed").params == 50 * 16
    head = row(s, "head")
    assert head.params == 0 and head.shared_params == 50 * 16
    # Linear on (3, 12, 16): every one of the 36 positions is a (16 -> out) product
    assert row(s, "mix").mult_adds == 3 * 12 * 16 * 16
    assert head.mult_adds == 3 * 12 * 16 * 50
    assert "(tied)" in str(s)


def test_frozen_layers_are_marked() -> None:
    _, s = zoo_summary("frozen", depth=3)
    conv = row(s, "backbone.0")
    assert conv.params == 3 * 8 * 9 + 8 and conv.trainable_params == 0
    assert conv.mult_adds == 3 * 16 * 16 * 8 * (3 * 3 * 3)  # batch x H x W x out x (in x k x k)
    neck = row(s, "neck")
    assert (neck.params, neck.trainable_params) == (72, 8)  # weight frozen, bias trainable
    lines = str(s).splitlines()
    assert any("0 (Conv2d)" in line and line.endswith("frozen") for line in lines)
    assert any("neck (Linear)" in line and line.endswith("partial") for line in lines)


def test_parameters_held_by_containers_and_uncalled_modules() -> None:
    _, s = zoo_summary("param_holders")
    assert s.rows[0].params == 12  # the bare nn.Parameter on the model
    offsets = row(s, "offsets", call=0)
    assert not offsets.called and offsets.params == 3 * 12 and offsets.type == "ParameterList"
    assert "(not called)" in str(s)


def test_nested_module_lists_are_transparent() -> None:
    _, s = zoo_summary("nested_lists")
    assert [r.name for r in s.rows[1:]] == [f"stages.{i}.{j}" for i in range(2) for j in range(3)]
    assert all(r.depth == 1 for r in s.rows[1:])


def test_lstm_and_dict_outputs() -> None:
    _, s = zoo_summary("lstm")
    assert row(s, "lstm").output_shapes == [(3, 7, 20), (2, 3, 20), (2, 3, 20)]
    assert row(s, "lstm").output_bytes == 4 * (3 * 7 * 20 + 2 * 2 * 3 * 20)
    _, d = zoo_summary("dict_input")
    assert d.rows[0].output_shapes == [(3, 32), (3, 2)] or d.rows[0].output_shapes == [(3, 2), (3, 32)]


def test_transformer_encoder_attention_mult_adds() -> None:
    _, s = zoo_summary("transformer_encoder", batch_size=2)
    b, seq, d, ff, heads = 2, 10, 32, 64, 4
    attn = row(s, "encoder.layers.0.self_attn")
    # in-projection, QK^T and AV (per head: seq x seq x d/heads each), out-projection
    assert attn.mult_adds_inclusive == b * seq * d * 3 * d + 2 * b * heads * seq * seq * (d // heads) + b * seq * d * d
    per_layer = attn.mult_adds_inclusive + 2 * b * seq * d * ff
    assert s.total_mult_adds == 2 * per_layer


def test_llama_tiny_mult_adds_include_attention() -> None:
    _, s = zoo_summary("llama_tiny", batch_size=2)
    assert s.total_mult_adds == LLAMA_TINY.mult_adds(2, 16)
    assert s.total_params == LLAMA_TINY.params


def test_llama_7b_parameters_on_meta() -> None:
    with torch.device("meta"):
        model = Llama(LLAMA_7B)
    assert LLAMA_7B.params == 6_738_415_616  # LLaMA-7B's published parameter count
    assert sum(p.numel() for p in model.parameters()) == LLAMA_7B.params


# ---------------------------------------------------------------------------------------------
# The seed's models, batch size, depth


@pytest.mark.parametrize(("dataset", "inputs", "params"), [("mnist", 784, 101_770), ("cifar10", 3072, 394_634)])
def test_seed_mlp(dataset: str, inputs: int, params: int) -> None:
    s = summary("mlp", dataset=dataset, batch_size=64)
    assert s.total_params == params == inputs * 128 + 128 + 128 * 10 + 10
    assert s.total_mult_adds == 64 * (inputs * 128 + 128 * 10)
    assert s.param_bytes == 4 * params
    assert s.input_bytes == 64 * inputs * 4
    assert [r.output_shapes for r in s.rows] == [[(64, 10)], [(64, inputs)], [(64, 128)], [(64, 128)], [(64, 10)]]
    assert s.leaf_output_bytes == 4 * 64 * (inputs + 128 + 128 + 10)


def test_depth_folds_rows_into_their_parent() -> None:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    s = summary(model, input_size=(3, 64, 64), depth=1)
    visible = s.visible_rows()
    assert {r.depth for r in visible} == {0, 1}
    layer1 = next(r for r in visible if r.name == "layer1")
    assert layer1.params_inclusive == sum(p.numel() for p in model.layer1.parameters())
    line = next(line for line in str(s).splitlines() if "layer1 (Sequential)" in line)
    assert f"{layer1.params_inclusive:,}" in line and f"{layer1.mult_adds_inclusive:,}" in line
    assert "BasicBlock" not in str(s)
    assert "BasicBlock" in str(summary(model, input_size=(3, 64, 64), depth=2))


def test_to_dict_schema() -> None:
    d = summary("mlp", dataset="mnist").to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    for key in ("total_params", "trainable_params", "total_mult_adds", "param_bytes", "layers"):
        assert key in d
    assert d["total_params"] == 101_770 and d["param_bytes"] == 407_080
    assert d["layers"][2]["name"] == "1" and d["layers"][2]["output_shapes"] == [[1, 128]]
    json.dumps(d)  # plain JSON types only
    classic = summary("mlp", dataset="mnist", style="classic").to_dict()
    assert classic["classic"]["total_params"] == 101_770


def test_rich_rendering_has_the_rows() -> None:
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=150, color_system=None).print(summary("mlp", dataset="mnist"))
    text = buf.getvalue()
    assert "1 (Linear)" in text and "100,480" in text and "Total params: 101,770" in text


# ---------------------------------------------------------------------------------------------
# Never change the user's model


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.device) for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
    }


def _assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    for name, (p, value, requires_grad, device) in before["params"].items():
        q = after["params"][name][0]
        assert q is p and q.requires_grad == requires_grad and q.device == device
        assert torch.equal(q.detach(), value)
    assert all(after["grads"][n] is g for n, g in before["grads"].items())
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value)


@pytest.mark.parametrize("style", ["default", "classic"])
def test_model_is_not_changed(style: str) -> None:
    model = ZOO["frozen"].build()
    model.train()
    model.backbone.eval()  # mixed modes must come back as they were, module by module
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.head.register_forward_hook(lambda *a: None)
    before = _snapshot(model)
    summary(model, input_size=(3, 16, 16), style=style, module_mode="train" if style == "default" else None)
    _assert_same(model, before)


def test_model_is_not_changed_when_the_forward_fails() -> None:
    model = MLP(784)
    model.train()
    before = _snapshot(model)
    with pytest.raises(BatchfitError):
        summary(model, input_size=(3, 32, 32))  # eval mode for the run, then back to train
    _assert_same(model, before)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_wrong_input_names_layer_shape_and_fix() -> None:
    with pytest.raises(BatchfitError) as info:
        summary(MLP(784), input_size=(3, 32, 32))
    err = info.value
    assert err.message == "layer 1 (Linear) expected last dim 784, got input of shape (1, 3072)"
    assert err.hint is not None and "`input_size=(1, 28, 28)`" in err.hint and "`dataset='mnist'`" in err.hint


def test_wrong_channels_suggests_the_channel_count() -> None:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    with pytest.raises(BatchfitError) as info:
        summary(model, input_size=(1, 28, 28))
    assert (
        info.value.message
        == "layer conv1 (Conv2d) expected 3 input channels (dim 1), got input of shape (1, 1, 28, 28)"
    )
    assert info.value.hint is not None and "`input_size=(3, 28, 28)`" in info.value.hint


@pytest.mark.parametrize(
    ("sample", "proposal"),
    [
        ((3, 28), "`input_size=(3, 28, 28)`"),
        ((28, 28), "`input_size=(3, 28, 28)`"),
        ((3, 28, 28, 2), "`input_size=(3, 32, 32)`"),
    ],
)
def test_a_sample_with_the_wrong_rank_for_a_conv_says_so(sample: tuple[int, ...], proposal: str) -> None:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    with pytest.raises(BatchfitError) as info:
        summary(model, input_size=sample)
    got = ", ".join(str(d) for d in (1, *sample))
    assert info.value.message == f"layer conv1 (Conv2d) expected a 4-d input (N, C, H, W), got input of shape ({got})"
    assert info.value.hint == f"one sample is (C, H, W) without the batch dimension, e.g. {proposal}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"style": "fancy"}, "unknown style"),
        ({"module_mode": "sideways"}, "unknown module mode"),
        ({"mode": "eval"}, "module_mode"),  # the old name, which would reach the model's constructor
        ({"depth": -1}, "depth"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(BatchfitError, match=match):
        summary("mlp", dataset="mnist", **kwargs)


def test_no_input_shape() -> None:
    with pytest.raises(BatchfitError, match="no input shape"):
        summary(nn.Linear(3, 4))
