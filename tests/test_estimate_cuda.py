"""CUDA semantics on a machine without a GPU: what a CUDA run would allocate, on fake tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchfit import estimate, load_workload
from batchfit._gpus import get_gpu
from batchfit._models import InputSpec, Workload
from zoo import zoo_workload

H100 = get_gpu("h100")


def _work(model_cls: type[nn.Module], *shape: int, dtype: torch.dtype = torch.float32, **kw: object) -> Workload:
    with torch.device("meta"):
        model = model_cls(**kw)
    return Workload(model_cls.__name__, model, (InputSpec(tuple(shape), dtype),))


class DropNet(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(1000, 1000)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(1000, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.fc(x)))


def test_dropout_mask_is_one_byte_per_element_on_cuda_and_four_on_cpu() -> None:
    batch = 256
    numel = batch * 1000
    for device, mask_bytes in (("cuda", numel), ("cpu", 4 * numel)):
        with_drop = estimate(_work(DropNet, 1000), batch_size=batch, device=device)
        without = estimate(_work(DropNet, 1000, p=0.0), batch_size=batch, device=device)
        saved = {e.nbytes for e in with_drop.events if e.category == "activations" and e.iteration == 1}
        assert mask_bytes in saved, (device, sorted(saved))
        # the mask is saved for backward on top of what the dropout-free net saves
        extra = with_drop.activation_bytes_by_module["drop"] - without.activation_bytes_by_module.get("drop", 0)
        assert extra >= mask_bytes


class Attention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, d)).mean(1)


@pytest.mark.parametrize("precision", ["amp-bf16", "fp32"])
def test_attention_uses_fused_kernels_on_cuda(precision: str) -> None:
    """An H100 runs flash (bf16) or memory-efficient (fp32) attention: nothing of size L x L."""
    batch, seq, heads = 2, 1024, 4
    r = estimate(_work(Attention, seq, 64), batch_size=batch, device="cuda", precision=precision)
    quadratic = batch * heads * seq * seq * 2  # the math path's score matrix, bf16
    assert max(e.nbytes for e in r.events if e.category != "workspaces") < quadratic
    # memory grows linearly with the sequence length: 4x the tokens, about 4x the activations
    r4 = estimate(_work(Attention, 4 * seq, 64), batch_size=batch, device="cuda", precision=precision)
    ratio = r4.breakdown["activations"] / r.breakdown["activations"]
    assert 3.5 < ratio < 4.5, ratio


def test_autocast_saves_low_precision_activations() -> None:
    w = load_workload("mlp", dataset="cifar10")
    fp32 = estimate(w, batch_size=1024, device="cuda")
    amp = estimate(w, batch_size=1024, device="cuda", precision="amp-bf16")
    assert amp.breakdown["parameters"] == fp32.breakdown["parameters"]  # fp32 master weights
    assert amp.activation_bytes_by_module["1"] < fp32.activation_bytes_by_module["1"]


def test_pure_bf16_halves_parameters_gradients_and_state() -> None:
    w = load_workload("mlp", dataset="cifar10")
    fp32 = estimate(w, batch_size=8, device="cpu", optimizer="adam")
    bf16 = estimate(w, batch_size=8, device="cpu", optimizer="adam", precision="bf16")
    assert bf16.breakdown["parameters"] * 2 == fp32.breakdown["parameters"]
    assert bf16.breakdown["gradients"] * 2 == fp32.breakdown["gradients"]
    # Adam's exp_avg and exp_avg_sq take the parameters' dtype; its `step` counters stay 4-byte
    # float32 scalars (torch/optim/adam.py `_init_group`), one per parameter tensor, in both runs
    steps = 4 * len(list(w.model.parameters()))
    assert (bf16.breakdown["optimizer_state"] - steps) * 2 == fp32.breakdown["optimizer_state"] - steps
    assert fp32.peak_phase == bf16.peak_phase == "optimizer"


def test_grad_scaler_runs_for_amp_fp16() -> None:
    """GradScaler (torch/amp/grad_scaler.py) adds exactly its own tensors to an amp-bf16 step:
    the scale (float32) and growth tracker (int32), made at the first `scale()` and kept; and per
    `step()`, `_unscale_grads_`'s inv_scale (`_scale.double().reciprocal().float()`: 8, 8, 4 B)
    and found_inf (float32)."""
    runs = {
        p: estimate("mlp", dataset="mnist", batch_size=64, device="cuda", precision=p, optimizer="adam")
        for p in ("amp-fp16", "amp-bf16")
    }
    kept = {p: _kept_from_first_iteration(r.events) for p, r in runs.items()}
    assert kept["amp-fp16"] == sorted([*kept["amp-bf16"], 4, 4])
    in_optimizer = {
        p: sorted(e.nbytes for e in r.events if e.action == "alloc" and e.phase == "optimizer" and e.iteration == 1)
        for p, r in runs.items()
    }
    extra = list(in_optimizer["amp-fp16"])
    for nbytes in in_optimizer["amp-bf16"]:
        extra.remove(nbytes)
    assert sorted(extra) == [4, 4, 8, 8]


def _kept_from_first_iteration(events: list) -> list[int]:
    """Sizes of the storages born in the first iteration that are still alive when the step ends."""
    last_alloc = max(i for i, e in enumerate(events) if e.action == "alloc")
    freed_at = {e.storage: i for i, e in enumerate(events) if e.action == "free"}
    return sorted(
        e.nbytes
        for e in events
        if e.action == "alloc" and e.iteration == 1 and freed_at.get(e.storage, len(events)) > last_alloc
    )


def test_foreach_optimizer_on_cuda_holds_temporaries_for_all_parameters_at_once() -> None:
    """torch.optim defaults to foreach on CUDA: one op over every parameter allocates them all."""
    with torch.device("meta"):
        deep = nn.Sequential(*(nn.Linear(256, 256) for _ in range(8)))  # eight equal parameters
    w = Workload("deep", deep, (InputSpec((256,)),))
    cuda = estimate(w, batch_size=1, device="cuda", optimizer="adam")
    cpu = estimate(w, batch_size=1, device="cpu", optimizer="adam")
    params = cpu.breakdown["parameters"]
    assert cuda.peak_phase == "optimizer"
    assert cuda.breakdown["temporaries"] >= params  # e.g. sqrt(exp_avg_sq) for all parameters
    assert _most_optimizer_temporaries(cpu.events) < params  # single-tensor loop: one parameter at a time


def _most_optimizer_temporaries(events: list) -> int:
    live = most = 0
    for e in events:
        if e.category == "temporaries" and e.phase == "optimizer":
            live += e.nbytes if e.action == "alloc" else -e.nbytes
            most = max(most, live)
    return most


def test_cuda_rounds_to_512_bytes_and_holds_two_cublas_workspaces() -> None:
    r = estimate("mlp", dataset="mnist", batch_size=64, device="cuda", gpu="h100")
    assert r.peak_allocated_bytes % 512 == 0
    # one cuBLAS workspace for the forward (calling thread), one for autograd's device thread
    assert r.breakdown["workspaces"] == 2 * H100.cublas_workspace_bytes == 2 * 32 * 2**20
    cpu = estimate("mlp", dataset="mnist", batch_size=64, device="cpu")
    assert r.peak_allocated_bytes - r.breakdown["workspaces"] >= cpu.peak_allocated_bytes


def test_the_cpu_step_counters_of_adam_are_not_gpu_memory() -> None:
    r = estimate("mlp", dataset="mnist", batch_size=64, device="cuda", optimizer="adam")
    # exp_avg and exp_avg_sq per parameter (4 tensors x 2), rounded to 512 B; no 4-byte step tensors
    sizes = sorted(e.nbytes for e in r.events if e.category == "optimizer_state" and e.action == "alloc")
    assert len(sizes) == 8 and min(sizes) == 40


@pytest.mark.parametrize(
    "name", ["reused", "tied_lm", "frozen", "two_inputs", "dict_input", "transformer_encoder", "llama_tiny", "lstm"]
)
def test_allocated_le_reserved_le_total(name: str) -> None:
    w = zoo_workload(name)
    r = estimate(w, batch_size=8, device="cuda", optimizer="adamw")
    assert r.peak_reserved_bytes is not None and r.total_bytes is not None
    assert r.peak_allocated_bytes <= r.peak_reserved_bytes <= r.total_bytes
    assert sum(r.breakdown.values()) == r.peak_allocated_bytes
    if name == "lstm":
        assert any("cuDNN" in n for n in r.notes)


def test_json_schema_keys() -> None:
    from batchfit._estimate import EstimateReport

    rep = estimate("mlp", dataset="mnist", batch_size=[64, 256])
    assert isinstance(rep, EstimateReport)
    d = rep.to_dict()
    assert d["schema_version"] == 1
    for item in d["results"]:
        assert set(item["breakdown"]) >= {
            "parameters",
            "buffers",
            "gradients",
            "optimizer_state",
            "inputs",
            "activations",
            "temporaries",
            "workspaces",
        }
        for key in ("batch_size", "peak_allocated_bytes", "device", "card", "peak_phase", "peak_module"):
            assert key in item
        for key in ("peak_reserved_bytes", "total_bytes", "budget_bytes"):
            assert isinstance(item[key], int)
