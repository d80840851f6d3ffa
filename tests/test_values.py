"""Models whose Python code reads tensor values: the values are computed for real beside the fake
trace (``_values.py``), the memory is still counted on the fake tensors, and the output says so.

Each CPU estimate is checked against a real CPU step (profiler); each CUDA estimate against the
estimate of the same model with the value-dependent branch decided in advance (same ops).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchfit import estimate
from batchfit._errors import BatchfitError, ExitCode
from batchfit._measure import measure_step
from batchfit._models import InputSpec, Workload
from batchfit._step import make_spec
from batchfit._trace import trace_step


class _ReadsValues(nn.Module):
    """Reads its integer input's values twice: ``(mask == 0).all()`` and ``.item()``.

    ``decided`` takes the branches the batch's values (all-zero ids) take, without reading them.
    """

    def __init__(self, decided: bool = False) -> None:
        super().__init__()
        self.decided = decided
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        padding = ids == 0
        if self.decided or (padding == 0).all():  # all-zero ids: every position is padding
            h = h * 2
        n = ids.shape[1] if self.decided else int(padding[0].sum().item())
        return self.out(h[:, : max(n // 3, 1)])


def _workload(model_cls: type[nn.Module], **kwargs: object) -> Workload:
    with torch.device("meta"):
        model = model_cls(**kwargs)
    return Workload("reads_values", model, inputs=(InputSpec((12,), torch.long),))


def test_value_reads_are_simulated_and_exact_on_cpu() -> None:
    w = _workload(_ReadsValues)
    est = estimate(w, batch_size=3, optimizer="sgd", device="cpu")
    real = measure_step(w, 3, make_spec("cpu", "sgd"))
    assert est.method == "simulated"  # not the fallback to real runs
    assert any("computed for real on the CPU" in n and ".item()" in n for n in est.notes), est.notes
    assert est.peak_allocated_bytes == real.peak_allocated_bytes


def test_value_reads_on_cuda_equal_the_branch_decided_in_advance() -> None:
    reads = estimate(_workload(_ReadsValues), batch_size=3, optimizer="adamw", device="cuda")
    decided = estimate(_workload(_ReadsValues, decided=True), batch_size=3, optimizer="adamw", device="cuda")
    assert reads.method == "simulated"
    assert any(".item()" in n for n in reads.notes)
    assert reads.peak_allocated_bytes == decided.peak_allocated_bytes


class _MaskIndex(nn.Module):
    """Boolean indexing: the output's shape depends on the mask's values."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids[:, :5] == 0  # all-zero ids: 5 positions per row kept
        return self.out(self.emb(ids)[:, :5][keep])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_boolean_index_uses_the_masks_positions(device: str) -> None:
    w = _workload(_MaskIndex)
    trace = trace_step(w, 3, make_spec(device, "sgd"))
    assert any("aten.index" in n for n in trace.notes), trace.notes
    # the real kernels turn the mask into its nonzero() positions (n x 2 int64) around the op;
    # all-zero ids keep 3 x 5 positions -> 15 x 2 x 8 bytes, and the output has 15 rows
    forward = [e for e in trace.events if e.phase == "forward" and e.iteration == 1 and e.action == "alloc"]
    assert any(e.nbytes == 15 * 2 * 8 for e in forward)
    assert any(trace.numels[e.storage] == 15 * 5 for e in forward)  # the logits: 15 rows x 5 classes


class _ReadsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lin.weight.sum().item() > 0:  # a parameter's value: never computed for real
            return self.lin(x)
        return self.lin(x) * 2


class _StaleMask(nn.Module):
    """Overwrites an input-derived mask from activations in place, then reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).sum(-1)
        mask = ids == 0
        view = mask[:, :6]
        mask.masked_fill_(h > 0, False)  # depends on parameters: the value is unknown from here on
        if view.all():
            return h * 2
        return h


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("model_cls", [_ReadsParameter, _StaleMask])
def test_unknown_values_are_never_guessed(model_cls: type[nn.Module], device: str) -> None:
    with torch.device("meta"):
        model = model_cls()
    shape = (4,) if model_cls is _ReadsParameter else (12,)
    dtype = torch.float32 if model_cls is _ReadsParameter else torch.long
    w = Workload("unknown", model, inputs=(InputSpec(shape, dtype),))
    # the value is not known: the trace stops as before (estimate then falls back to real runs)
    with pytest.raises(BatchfitError) as info:
        trace_step(w, 2, make_spec(device, "sgd"))
    assert info.value.exit_code == ExitCode.UNSUPPORTED


class _LayerDrop(nn.Module):
    """OPT's LayerDrop (transformers 4.4x modeling_opt.py ``OPTDecoder.forward``): in training, a
    single draw ``torch.rand([])`` decides whether each layer runs."""

    def __init__(self, layerdrop: float = 0.0) -> None:
        super().__init__()
        self.layerdrop = layerdrop
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.training:
                dropout_probability = torch.rand([])
                if dropout_probability < self.layerdrop:
                    continue
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_single_random_draw_is_a_value_the_model_decides_on(device: str) -> None:
    """A 0-dim draw gets a real value (it stopped the trace: exit 6 on OPT 4.4x in train mode);
    drawing it leaves the caller's random generator as it was; a CPU estimate equals a real step."""
    w = Workload("layerdrop", _LayerDrop(), inputs=(InputSpec((8,), torch.float32),))
    state = torch.random.get_rng_state()
    est = estimate(w, batch_size=3, optimizer="sgd", device=device)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert est.method == "simulated"
    if device == "cpu":
        assert est.peak_allocated_bytes == measure_step(w, 3, make_spec("cpu", "sgd")).peak_allocated_bytes


class _PaddingCheck(nn.Module):
    """transformers 4.4x's padding check (modeling_utils.py ``warn_if_padding_and_no_attention_mask``):
    ``pad_token_id in input_ids[:, [-1, 0]]``, an index made from a Python list (a real literal)."""

    def __init__(self, checks: bool = True) -> None:
        super().__init__()
        self.checks = checks
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.checks and 0 in ids[:, [-1, 0]]:
            pass  # the library warns
        return self.out(self.emb(ids)).sum(1)  # type: ignore[no-any-return]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_literal_index_has_its_value(device: str) -> None:
    """It stopped the trace (exit 6: DistilBERT with transformers 4.46 called without a mask)."""
    w = Workload("padding", _PaddingCheck(), inputs=(InputSpec((6,), torch.long),))
    plain = Workload("plain", _PaddingCheck(checks=False), inputs=(InputSpec((6,), torch.long),))
    est = estimate(w, batch_size=2, optimizer="sgd", device=device)
    assert est.method == "simulated"
    extra = (
        est.peak_allocated_bytes - estimate(plain, batch_size=2, optimizer="sgd", device=device).peak_allocated_bytes
    )
    if device == "cpu":  # what the check adds to the peak, against real CPU steps of both models
        spec = make_spec("cpu", "sgd")
        assert (
            extra == measure_step(w, 2, spec).peak_allocated_bytes - measure_step(plain, 2, spec).peak_allocated_bytes
        )
    else:
        assert extra == 0  # a few bytes early in the forward, far below the peak


transformers = pytest.importorskip("transformers")


class _LlamaWithMask(nn.Module):
    """A 2-layer Llama from transformers called with an all-ones attention mask, as a padded-batch
    loader would pass it (transformers skips building the 4D mask when the mask is all ones)."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
        config._attn_implementation = attention
        self.lm = transformers.LlamaForCausalLM(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # type: ignore[no-any-return]


def test_transformers_takes_its_real_tensor_mask_path_at_a_long_sequence() -> None:
    # Before: the fake tensors made transformers' is_tracing() true, and it built a
    # 2 x 1 x 512 x 512 mask that the real run skips (+60% here).
    from transformers.utils import import_utils

    original = import_utils.is_fake_tensor
    with torch.device("meta"):
        model = _LlamaWithMask("sdpa")
    w = Workload("llama_mask", model, inputs=(InputSpec((512,), torch.long),))
    est = estimate(w, batch_size=2, optimizer="sgd", device="cpu")
    real = measure_step(w, 2, make_spec("cpu", "sgd"))
    assert est.method == "simulated"
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
    assert import_utils.is_fake_tensor is original  # restored after the trace
