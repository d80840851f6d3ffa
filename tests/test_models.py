from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from batchfit import BatchfitError, InputSpec, load_workload
from batchfit._models import count_parameters, fake_state


@pytest.mark.parametrize(("dataset", "params"), [("mnist", 101_770), ("cifar10", 394_634)])
def test_seed_mlps(dataset: str, params: int) -> None:
    w = load_workload("mlp", dataset=dataset)
    assert count_parameters(w.model) == params
    # the seed's arithmetic: 784 x 128 + 128 = 100,480; 128 x 10 + 10 = 1,290
    lin1, lin2 = w.model[1], w.model[3]
    assert lin1.weight.numel() + lin1.bias.numel() == (100_480 if dataset == "mnist" else 3072 * 128 + 128)
    assert lin2.weight.numel() + lin2.bias.numel() == 1_290


def test_models_are_built_on_meta() -> None:
    w = load_workload("resnet50")
    assert all(p.is_meta for p in w.model.parameters())
    assert w.inputs == (InputSpec((3, 224, 224)),)
    assert count_parameters(w.model) == 25_557_032


def test_input_spec_parsing() -> None:
    assert InputSpec.parse("1,28,28") == InputSpec((1, 28, 28))
    assert InputSpec.parse("3x32x32") == InputSpec((3, 32, 32))
    assert InputSpec.parse("128:int64") == InputSpec((128,), torch.int64)
    with pytest.raises(BatchfitError, match="cannot read the input shape"):
        InputSpec.parse("a,b")
    with pytest.raises(BatchfitError, match="unknown dtype"):
        InputSpec.parse("128:int65")


def test_unknown_model_suggests() -> None:
    with pytest.raises(BatchfitError) as info:
        load_workload("resnet17")
    assert "resnet18" in (info.value.hint or "")


def test_user_file_model_and_example_inputs(tmp_path) -> None:
    f = tmp_path / "mymodel.py"
    f.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.emb = nn.Embedding(100, 8); self.fc = nn.Linear(8, 3)\n"
        "    def forward(self, ids, mask):\n        return self.fc(self.emb(ids) * mask.unsqueeze(-1)).mean(1)\n"
        "def example_inputs(batch_size):\n"
        "    return (torch.zeros(batch_size, 16, dtype=torch.long), torch.ones(batch_size, 16))\n"
    )
    w = load_workload(f"{f}:Net")
    assert count_parameters(w.model) == 100 * 8 + 8 * 3 + 3
    with FakeTensorMode():
        ids, mask = w.make_inputs(4, "cpu").args
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and mask.dtype == torch.float32


def test_user_file_import_error_names_file(tmp_path) -> None:
    f = tmp_path / "broken.py"
    f.write_text("import does_not_exist_anywhere\n")
    with pytest.raises(BatchfitError, match=r"broken\.py"):
        load_workload(f"{f}:Net")


def test_fake_state_keeps_ties() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    with torch.device("meta"):
        m = Tied()
    with FakeTensorMode():
        state = fake_state(m, "cpu")
    assert state["emb.weight"] is state["head.weight"]
    assert isinstance(state["emb.weight"], nn.Parameter)
    assert count_parameters(m) == 40


def test_timm_names_need_timm(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_timm(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(BatchfitError) as info:
        load_workload("timm:resnet50")
    assert "timm" in info.value.message and info.value.hint == "pip install timm"


def test_package_module_target_and_function_returning_a_module() -> None:
    # package.module:NAME with NAME a function returning a module (torchvision's own builder)
    w = load_workload("torchvision.models:mobilenet_v3_small", input_size=(3, 64, 64))
    assert count_parameters(w.model) == 2_542_856
    with pytest.raises(BatchfitError, match="defines no"):
        load_workload("torchvision.models:resnet_17")


def test_every_torchvision_classifier_is_registered() -> None:
    import torchvision

    from batchfit._models import model_names

    names = set(model_names())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert {"mlp", "cnn"} <= names


@pytest.mark.parametrize(
    ("dataset", "shape", "classes", "size"),
    [
        ("mnist", (1, 28, 28), 10, 60_000),
        ("fashion-mnist", (1, 28, 28), 10, 60_000),
        ("cifar10", (3, 32, 32), 10, 50_000),
        ("imagenet", (3, 224, 224), 1000, 1_281_167),
    ],
)
def test_dataset_presets(dataset: str, shape: tuple[int, ...], classes: int, size: int) -> None:
    from batchfit import get_dataset

    info = get_dataset(dataset)
    assert (info.shape, info.num_classes, info.train_size) == (shape, classes, size)
    w = load_workload("mlp", dataset=dataset)
    assert w.model[3].out_features == classes
