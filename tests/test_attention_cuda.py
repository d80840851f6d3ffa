"""Fused attention on fake CUDA: every path into scaled_dot_product_attention gets the kernel an
sm80+ GPU would run (PyTorch's sdp_utils rules), not the math path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from batchfit import estimate
from batchfit._cuda_kernels import _efficient_supports_gqa, cuda_kernel_choices, sdp_backend
from batchfit._models import InputSpec, Workload

FLASH = "aten._scaled_dot_product_flash_attention.default"
EFFICIENT = "aten._scaled_dot_product_efficient_attention.default"
MATH = "aten._softmax.default"  # the math path's softmax over the T x T scores


class Direct(nn.Module):
    """Self-attention written with F.scaled_dot_product_attention (nn.MultiheadAttention's layers)."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.in_proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class MHA(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


PATHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (build, input shape, attention calls per forward)
    "sdpa": (Direct, (2, 64, 64), 1),
    "multihead_attention": (MHA, (2, 64, 64), 1),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(64, 4, batch_first=True), (2, 64, 64), 1),
    "encoder": (
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(64, 4, batch_first=True), 2, enable_nested_tensor=False
        ),
        (2, 64, 64),
        2,
    ),
    "vit": (_vit, (2, 3, 32, 32), 2),
}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of_a_training_forward(build: Callable[[], nn.Module], shape: tuple[int, ...], dtype: torch.dtype) -> list[str]:
    with torch.device("meta"):
        model = build().to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_kernel_choices([]):
        model = model.to_empty(device="cuda").train()
        x = torch.empty(shape, device="cuda", dtype=dtype)
        ops = _Ops()
        with ops:
            out = model(x)
            out.sum().backward  # noqa: B018  (a graph exists)
    return ops.ops


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize(("dtype", "kernel"), [(torch.float32, EFFICIENT), (torch.bfloat16, FLASH)])
def test_every_path_into_sdpa_runs_the_fused_kernel(name: str, dtype: torch.dtype, kernel: str) -> None:
    build, shape, calls = PATHS[name]
    ops = _ops_of_a_training_forward(build, shape, dtype)
    assert ops.count(kernel) == calls
    assert MATH not in ops and "aten._safe_softmax.default" not in ops


def test_without_the_choice_the_math_path_runs() -> None:
    """The check above can fail: fake CUDA alone takes the math path (the issue's defect)."""
    with torch.device("meta"):
        model = MHA()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cuda")
        ops = _Ops()
        with ops:
            model(torch.empty(2, 64, 64, device="cuda"))
    assert EFFICIENT not in ops.ops


def _attention_workload(cls: type[nn.Module], seq: int) -> Workload:
    with torch.device("meta"):
        model = cls()
    return Workload(cls.__name__, model, (InputSpec((seq, 64)),))


def test_multihead_attention_saves_what_the_direct_call_saves() -> None:
    """nn.MultiheadAttention (the issue's table, scaled down) saves the fused kernel's tensors, as
    the same attention written with F.scaled_dot_product_attention does. The one difference is
    MHA's own: with batch_first it runs its projection on the transposed input, and F.linear saves
    a contiguous copy of it (batch x tokens x width fp32)."""
    batch, seq, dim, heads = 2, 512, 64, 4
    direct = estimate(_attention_workload(Direct, seq), batch_size=batch, device="cuda", loss="mse")
    mha = estimate(_attention_workload(MHA, seq), batch_size=batch, device="cuda", loss="mse")
    quadratic = batch * heads * seq * seq * 4
    for r in (direct, mha):
        assert max(e.nbytes for e in r.events if e.category != "workspaces") < quadratic
        # the memory-efficient kernel's log-sum-exp, float32 per query row, saved for backward
        lse = {e.nbytes for e in r.events if e.category == "activations" and e.iteration == 1}
        assert batch * heads * seq * 4 in lse
    extra = mha.breakdown["activations"] - direct.breakdown["activations"]
    assert extra == batch * seq * dim * 4


def test_sdp_backend_follows_pytorch_rules() -> None:
    def t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    with FakeTensorMode(), torch.device("cuda"):
        q = t(2, 8, 128, 64)
        assert sdp_backend(q, q, q) == "flash"
        assert sdp_backend(q.float(), q.float(), q.float()) == "efficient"  # flash: fp16/bf16 only
        assert sdp_backend(q.double(), q.double(), q.double()) == "math"
        mask = torch.ones(128, 128, dtype=torch.bool)
        assert sdp_backend(q, q, q, attn_mask=mask) == "efficient"  # flash: no mask
        wide = t(2, 8, 128, 512)
        assert sdp_backend(wide, wide, wide) == "efficient"  # flash: head dim <= 256
        odd = t(2, 8, 128, 12)
        assert sdp_backend(odd, odd, odd) == "flash"  # padded to 16 by attention.cpp
        assert sdp_backend(odd.float(), odd.float(), odd.float()) == "efficient"  # fp32: multiple of 4
        six = t(2, 8, 128, 6, dtype=torch.float32)
        assert sdp_backend(six, six, six) == "math"
        short = t(2, 8, 64, 64)
        assert sdp_backend(short, q, q, is_causal=True) == "efficient"  # flash: causal needs L == S
        kv = t(2, 2, 128, 64)
        assert sdp_backend(q, kv, kv) == "math"
        assert sdp_backend(q, kv, kv, enable_gqa=True) == "flash"
        strided = t(2, 8, 64, 128).transpose(-1, -2)
        assert sdp_backend(strided, strided, strided) == "math"  # last dim stride must be 1
        shifted = t(2 * 8 * 128 * 64 + 2, dtype=torch.float32)[2:].view(2, 8, 128, 64)
        assert sdp_backend(shifted, shifted, shifted) == "math"  # efficient: offsets aligned
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            assert sdp_backend(q, q, q) == "efficient"


class GQA(nn.Module):
    """Grouped-query self-attention (4 query heads, 2 key/value heads), as Llama calls it."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, t, d)


def test_grouped_query_attention_in_float32_takes_the_kernel_this_torch_has() -> None:
    """Memory-efficient attention took fewer key/value heads only from pytorch#191085 on: torch 2.11
    (sdp_utils.cpp, check_batch_size_and_num_heads_dense<false>) runs fp32 GQA on the math path,
    and its efficient kernel's backward gives the key query-many heads (the step failed there)."""
    known = {(2, 11): False, (2, 14): True, (2, 15): True}  # read from each release's source
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version in known:
        assert _efficient_supports_gqa() is known[version]
    ops = _ops_of_a_training_forward(GQA, (2, 32, 64), torch.float32)
    if _efficient_supports_gqa():
        assert ops.count(EFFICIENT) == 1
    else:  # the math path's softmax over the scores (_safe_softmax where rows may be all masked)
        assert EFFICIENT not in ops and ops.count(MATH) + ops.count("aten._safe_softmax.default") == 1
    with torch.device("meta"):
        model = GQA()
    est = estimate(Workload("gqa", model, (InputSpec((32, 64)),)), batch_size=2, device="cuda", loss="mse")
    saved = {e.nbytes for e in est.events if e.category == "activations" and e.iteration == 1}
    # the efficient kernel's float32 log-sum-exp per query row, or the math path's T x T scores
    assert (2 * 4 * 32 * 4 if _efficient_supports_gqa() else 2 * 4 * 32 * 32 * 4) in saved


def test_flash_pads_the_head_dim_as_attention_cpp_does() -> None:
    with FakeTensorMode(), torch.device("cuda"), cuda_kernel_choices([]):
        q = torch.empty(2, 4, 32, 12, dtype=torch.bfloat16, requires_grad=True)
        ops = _Ops()
        with ops:
            out = F.scaled_dot_product_attention(q, q, q)
        assert out.shape == (2, 4, 32, 12)
        assert "aten.constant_pad_nd.default" in ops.ops and FLASH in ops.ops


def test_the_choice_ends_with_the_trace() -> None:
    with FakeTensorMode(), torch.device("cuda"):
        q = torch.empty(2, 4, 32, 64)
        with cuda_kernel_choices([]):
            pass
        ops = _Ops()
        with ops:
            F.scaled_dot_product_attention(q, q, q)
    assert EFFICIENT not in ops.ops
