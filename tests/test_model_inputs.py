"""How a model and its inputs are given: keyword inputs, --input beside example_inputs, a model
file's own folder on the import path, the classifier head's size, a TorchScript submodule."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from batchfit import BatchfitError, estimate, load_workload, summary
from batchfit._measure import measure_step
from batchfit._models import count_parameters
from batchfit._step import make_spec

# -- inputs by keyword (issue 12, item 10) ---------------------------------------------------------

x, m = torch.zeros(2, 3), torch.ones(2, 3)


@pytest.mark.parametrize(
    ("made", "n_args", "keys"),
    [
        (x, 1, []),  # one tensor: one positional input
        ((x, m), 2, []),  # a tuple: positional inputs
        ([x, m], 2, []),
        ({"x": x, "mask": m}, 0, ["x", "mask"]),  # a dict: keyword inputs, model(**d)
        (({"x": x, "mask": m},), 1, []),  # a 1-tuple holding a dict: the dict positionally
        (((x,), {"mask": m}), 1, ["mask"]),  # an (args, kwargs) pair
        (([x], {"mask": m}), 1, ["mask"]),
        ((x, {"mask": m}), 2, []),  # a tensor and a dict: both positional (not a pair)
    ],
)
def test_the_forms_example_inputs_may_take(made: object, n_args: int, keys: list[str]) -> None:
    from batchfit._models import ModelInputs

    got = ModelInputs.of(made)
    assert len(got.args) == n_args and list(got.kwargs) == keys
    assert sum(t.numel() for t in got.tensors()) == sum(t.numel() for t in torch.utils._pytree.tree_leaves(made))


class _Masked(nn.Module):
    """A transformers-like forward: positional ids, keyword-only attention mask and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = (self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1)
        return nn.functional.cross_entropy(self.head(h), labels)  # the model returns its loss


def _masked_inputs(b: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.zeros(b, 7, dtype=torch.long),
        "attention_mask": torch.ones(b, 7),
        "labels": torch.zeros(b, dtype=torch.long),
    }


def test_a_dict_of_keyword_inputs_is_estimated_exactly_on_cpu() -> None:
    # used to fail: the dict was passed as one positional argument ('dict' object has no attribute ...)
    w = load_workload(_Masked(), example_inputs=_masked_inputs)
    est = estimate(w, batch_size=6, device="cpu", optimizer="adam")
    real = measure_step(w, 6, make_spec("cpu", "adam"))
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
    s = summary(w)
    assert [shape for shape, _ in s.inputs] == [(1, 7), (1, 7), (1,)] and s.total_params == 20 * 8 + 8 * 5 + 5


def test_keyword_inputs_in_bf16_and_through_a_step_function(tmp_path: Path) -> None:
    # bf16 converted the inputs with x.is_floating_point() on each positional input: a dict broke it
    w = load_workload(_Masked(), example_inputs=_masked_inputs)
    assert estimate(w, batch_size=4, device="cpu", precision="bf16").peak_allocated_bytes > 0
    # a --step function gets the inputs in the form example_inputs gave them: here the dict
    f = tmp_path / "loop.py"
    f.write_text(
        "def step(model, inputs, labels, optimizer):\n"
        "    assert isinstance(inputs, dict), type(inputs)\n"
        "    model(**inputs).backward()\n"
        "    optimizer.step()\n"
        "    optimizer.zero_grad(set_to_none=True)\n"
    )
    assert estimate(w, batch_size=4, device="cpu", step=f"{f}:step").peak_allocated_bytes > 0


# -- --input beside a file's example_inputs (item 7) -------------------------------------------------

_SHAPE_AGNOSTIC = (
    "import torch\nfrom torch import nn\n"
    "class Net(nn.Module):\n"
    "    def __init__(self, num_classes=3):\n"
    "        super().__init__(); self.fc = nn.Linear(1, num_classes)\n"
    "    def forward(self, x):\n"
    "        return self.fc(x.sum(-1, keepdim=True))\n"
    "def example_inputs(batch_size):\n"
    "    return torch.rand(batch_size, 8)\n"
)


def test_input_given_beside_example_inputs_is_used(tmp_path: Path) -> None:
    f = tmp_path / "agnostic.py"
    f.write_text(_SHAPE_AGNOSTIC)
    assert [s for s, _ in summary(f"{f}:Net").inputs] == [(1, 8)]  # the file's example inputs
    assert [s for s, _ in summary(f"{f}:Net", input_size=(6,)).inputs] == [(1, 6)]  # was ignored: (1, 8)
    with pytest.raises(BatchfitError, match="both input_size and example_inputs") as info:
        load_workload(nn.Linear(8, 3), (8,), example_inputs=lambda b: torch.rand(b, 8))
    assert "give one" in (info.value.hint or "")


# -- a model file imports its neighbours (item 8) ----------------------------------------------------


def test_a_model_file_imports_modules_from_its_own_folder(tmp_path: Path) -> None:
    folder = tmp_path / "project_h12b"
    folder.mkdir()
    (folder / "blocks_h12b.py").write_text("from torch import nn\nclass Block(nn.Linear):\n    pass\n")
    (folder / "lazy_h12b.py").write_text("WIDTH = 5\n")
    (folder / "net.py").write_text(
        "from torch import nn\nfrom blocks_h12b import Block\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        from lazy_h12b import WIDTH  # imported while the model is built\n"
        "        super().__init__(); self.a = Block(4, WIDTH)\n"
        "    def forward(self, x):\n        return self.a(x)\n"
    )
    try:
        w = load_workload(f"{folder / 'net.py'}:Net", (4,))
        assert count_parameters(w.model) == 4 * 5 + 5
        assert str(folder) not in sys.path and str(folder.resolve()) not in sys.path  # not left behind
    finally:
        sys.modules.pop("blocks_h12b", None)
        sys.modules.pop("lazy_h12b", None)


# -- the classifier head (item 9) --------------------------------------------------------------------


def test_timm_models_keep_their_own_head_unless_asked() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        own = timm.create_model("resnet18d", pretrained=False)  # timm's own default head
    w = load_workload("timm:resnet18d")
    assert count_parameters(w.model) == count_parameters(own) == 11_708_744  # was 11,200,874 (10 classes)
    assert w.num_classes == own.num_classes == 1000
    seven = load_workload("timm:resnet18d", num_classes=7)
    assert seven.model.fc.out_features == 7 and seven.num_classes == 7
    assert load_workload("timm:resnet18d", dataset="cifar10").model.fc.out_features == 10  # the dataset's


@pytest.mark.parametrize(
    ("model", "kwargs", "classes"),
    [
        ("resnet18", {}, 1000),  # torchvision: ImageNet's head, as before
        ("resnet18", {"dataset": "cifar10"}, 10),
        ("resnet18", {"num_classes": 3}, 3),
        ("mlp", {}, 10),
        ("cnn", {"dataset": "cifar10", "num_classes": 4}, 4),
    ],
)
def test_registry_heads(model: str, kwargs: dict, classes: int) -> None:
    w = load_workload(model, **kwargs)
    last = [mod for mod in w.model.modules() if isinstance(mod, nn.Linear)][-1]
    assert last.out_features == classes and w.num_classes == classes


def test_num_classes_reaches_a_model_file_only_when_it_takes_it(tmp_path: Path) -> None:
    f = tmp_path / "heads.py"
    f.write_text(_SHAPE_AGNOSTIC + "class Fixed(nn.Module):\n    def forward(self, x):\n        return x\n")
    w = load_workload(f"{f}:Net", num_classes=6)
    assert w.model.fc.out_features == 6 and w.num_classes == 6
    assert load_workload(f"{f}:Net").num_classes is None  # the file's own default, not claimed
    with pytest.raises(BatchfitError, match="takes no num_classes"):
        load_workload(f"{f}:Fixed", num_classes=6)


def test_summary_shows_the_head() -> None:
    s = summary("resnet18", num_classes=12)
    assert s.num_classes == 12 and s.to_dict()["num_classes"] == 12
    assert ", 12 classes," in str(s).splitlines()[0]


# -- a torch.jit.script submodule ----------------------------------------------------------------------


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _WithScript(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():  # torch.jit.script is deprecated, and still used
            warnings.simplefilter("ignore", FutureWarning)
            self.inner = torch.jit.script(_Inner())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def test_summary_of_a_model_with_a_scripted_submodule() -> None:
    # used to fail: register_forward_pre_hook is not supported on ScriptModules (exit 3, blaming the inputs)
    s = summary(_WithScript(), input_size=(8,), batch_size=4)
    assert s.total_params == (8 * 8 + 8) + (8 * 3 + 3)
    assert s.total_mult_adds == 4 * 8 * 8 + 4 * 8 * 3  # the scripted Linear's matmul is counted too
    rows = {r.name: r for r in s.rows}
    assert rows["inner"].output_shapes == [(4, 8)] and rows["head"].output_shapes == [(4, 3)]
    assert not rows["inner.fc"].called and "(in TorchScript)" in str(s)
