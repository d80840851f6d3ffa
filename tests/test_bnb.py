"""bitsandbytes: its 8-bit and paged AdamW run on fake tensors; QLoRA's 4-bit and LLM.int8's 8-bit base, modelled.

The optimizer state is the library's own (its code runs on fake tensors); each size is also
checked against the rule read in its source (bitsandbytes/optim/optimizer.py
``Optimizer2State.init_state``), computed here independently. The 4-bit stand-in's storage is
checked against a real ``bitsandbytes.functional.quantize_4bit`` on the CPU; the 8-bit one's
against a real ``Linear8bitLt`` quantised on the CPU, and its CPU training path allocation by
allocation against that layer's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from batchfit import BatchfitError, estimate, load_workload
from batchfit._measure import measure_step
from batchfit._quantize import Linear4bitModel, Linear8bitModel, QuantSpec, storage_4bit, storage_8bit
from batchfit._step import make_spec

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # 131072 and 5120 elements: 8-bit state; 512 and 10: below min_8bit_size (4096), 32-bit state;
    # only the first weight reaches the paged optimizer's 1e5 elements
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))


def _state_bytes_by_rule(model: nn.Module, round_to: int = 1, paged: bool = False) -> int:
    """AdamW8bit's state as its source says: uint8 state1/state2 and a float32 absmax per block of
    256 for >= 4096 elements, float32 state1/state2 below; plus the two 256-entry float32 maps."""

    def alloc(nbytes: int) -> int:
        return -(nbytes // -round_to) * round_to

    total = 2 * alloc(256 * 4)
    for p in model.parameters():
        n = p.numel()
        if n >= 4096:
            blocks = -(n // -256)
            total += 2 * alloc(4 * blocks) + (0 if paged and n >= 100_000 else 2 * alloc(n))
        else:
            total += 2 * alloc(4 * n)
    return total


def test_adamw8bit_state_is_the_librarys_own() -> None:
    model = _mlp()
    w = load_workload(model, (256,))
    est = estimate(w, batch_size=4, optimizer="adamw8bit", device="cpu")
    real = bnb.optim.AdamW8bit(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    real.step()
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for state in real.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    }
    assert est.breakdown["optimizer_state"] == sum(storages.values()) == _state_bytes_by_rule(model)
    assert any("temporaries not modelled" in n for n in est.notes)  # the CPU kernels' scratch, said


def test_adamw8bit_on_cuda_matches_its_source() -> None:
    model = _mlp()
    est = estimate(model, (256,), batch_size=4, optimizer="adamw8bit", device="cuda")
    # the caching allocator rounds every block up to 512 bytes
    assert est.breakdown["optimizer_state"] == _state_bytes_by_rule(model, round_to=512)
    adam = estimate(model, (256,), batch_size=4, optimizer="adamw", device="cuda")
    assert est.breakdown["optimizer_state"] < adam.breakdown["optimizer_state"] / 3


def test_paged_state_is_outside_the_allocator_and_said() -> None:
    model = _mlp()
    est = estimate(model, (256,), batch_size=4, optimizer="paged-adamw8bit", device="cuda")
    assert est.breakdown["optimizer_state"] == _state_bytes_by_rule(model, round_to=512, paged=True)
    (note,) = [n for n in est.notes if "managed memory" in n]
    assert note.startswith("256.00 KiB")  # the 512x256 weight's two uint8 states
    assert "max_memory_allocated" in note and "nvidia-smi" in note


def test_without_bitsandbytes_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(BatchfitError) as info:
        estimate(_mlp(), (256,), batch_size=2, optimizer="adamw8bit", device="cpu")
    assert "pip install bitsandbytes" in (info.value.hint or "")


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_storage_is_bitsandbytes_own(double_quant: bool) -> None:
    # an odd element count: the last byte holds one code, the last block is partial
    weight = torch.randn(301, 999)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant)
    real = {"weight": packed, "code": state.code, "absmax": state.absmax}
    if double_quant:
        real |= {"offset": state.offset, "nested_absmax": state.state2.absmax, "nested_code": state.state2.code}
    spec = QuantSpec(double_quant=double_quant)
    model = {name: (shape, dtype) for name, shape, dtype in storage_4bit(weight.numel(), spec)}
    assert model == {name: (tuple(t.shape), t.dtype) for name, t in real.items()}


def _tiny_llama(tmp_path: Path) -> str:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 500, "max_position_embeddings": 128}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return f"hf:{tmp_path}"


def test_qlora_base_as_transformers_quantises_it(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    plain = load_workload(_tiny_llama(tmp_path), seq_len=16)
    w = load_workload(_tiny_llama(tmp_path), seq_len=16, quantize="4bit")
    linears = {n: m for n, m in plain.model.named_modules() if isinstance(m, nn.Linear)}
    quantised = {n for n, m in w.model.named_modules() if isinstance(m, Linear4bitModel)}
    assert quantised == set(linears) - {"lm_head"}  # the output head stays, as in transformers
    # bytes of the base: each weight's packed codes and quantisation state, the rest as before
    expected = sum(b.numel() * 4 for b in plain.model.buffers())  # rotary embeddings' inv_freq
    for name, p in plain.model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in quantised and name.endswith("weight"):
            n, blocks = p.numel(), -(p.numel() // -64)
            expected += (n + 1) // 2 + 16 * 4 + blocks + 4 + 4 * -(blocks // -256) + 256 * 4
        else:
            expected += p.numel() * 4
    est = estimate(w, batch_size=1, device="cpu", mode="inference")
    assert est.breakdown["parameters"] + est.breakdown["buffers"] == expected
    # bf16: the rest follows the model's dtype, the quantisation state stays float32
    bf16 = estimate(w, batch_size=1, device="cpu", mode="inference", precision="bf16")
    rest = sum(p.numel() for n, p in plain.model.named_parameters() if n.rsplit(".", 1)[0] not in quantised)
    rest += sum(b.numel() for b in plain.model.buffers())
    assert bf16.breakdown["parameters"] + bf16.breakdown["buffers"] == expected - 2 * rest
    assert any("modelled" in n for n in est.notes)


# adamw8bit: the real run's count includes the maps its constructor allocates (measure.py counted
# only parameters, inputs and labels before the window: 2 KiB short)
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_qlora_step_equals_a_real_cpu_run_of_the_model(tmp_path: Path, optimizer: str) -> None:
    pytest.importorskip("peft")
    w = load_workload(_tiny_llama(tmp_path), seq_len=16, quantize="4bit", lora=4)
    wrappers = {type(m).__module__ for n, m in w.model.named_modules() if n.endswith("q_proj")}
    assert wrappers == {"peft.tuners.lora.bnb"}  # peft's own QLoRA layer wraps the 4-bit base
    est = estimate(w, batch_size=2, optimizer=optimizer, device="cpu")
    real = measure_step(w, 2, make_spec("cpu", optimizer))
    assert est.peak_phase != "optimizer"  # bitsandbytes' CPU optimizer temporaries are not modelled
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
    assert all("lora_" in n for n, p in w.model.named_parameters() if p.requires_grad)  # the base is frozen


def test_4bit_forward_dequantises_the_weight() -> None:
    # bitsandbytes/backends/cuda/ops.py _dequant_linear_fallback: the nested absmax dequantised
    # (float32 per block of 64) and offset (a second one), the weight in the input's dtype, then linear
    model = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.Linear(1024, 2))
    w = load_workload(model, (512,), quantize="4bit")
    assert isinstance(w.model[0], Linear4bitModel) and type(w.model[1]) is nn.Linear  # the head stays
    assert isinstance(model[0], nn.Linear) and type(model[0]) is nn.Linear  # the user's model is unchanged
    est = estimate(w, batch_size=1, device="cuda", mode="inference")
    blocks = 512 * 1024 // 64
    assert est.peak_phase == "forward"
    assert est.breakdown["temporaries"] == 2 * blocks * 4 + 512 * 1024 * 4 + 1024 * 4


def test_quantize_errors() -> None:
    with pytest.raises(BatchfitError, match="unknown quantisation") as info:
        QuantSpec.parse("3bit")
    assert "8bit" in (info.value.hint or "")


def _real_int8_layer(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' own ``Linear8bitLt`` as transformers builds it for ``load_in_8bit=True``
    (``has_fp16_weights=False``, ``threshold=6.0``), quantised on the CPU (``Int8Params.to``)."""
    real = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False, threshold=6.0
    )
    real.load_state_dict(linear.state_dict())
    return real.to("cpu")


def test_8bit_storage_is_bitsandbytes_own() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(999, 301)
    real = _real_int8_layer(linear)
    real_tensors = {"weight": real.weight.data, "SCB": real.weight.SCB}
    assert real_tensors["weight"].data_ptr() == real.weight.CB.data_ptr()  # CB is the weight's storage
    model = {name: (shape, dtype) for name, shape, dtype in storage_8bit(301, 999)}
    assert model == {name: (tuple(t.shape), t.dtype) for name, t in real_tensors.items()}
    stand_in = Linear8bitModel(linear, QuantSpec.parse("8bit"))
    assert {n: (tuple(t.shape), t.dtype) for n, t in [*stand_in.named_parameters(), *stand_in.named_buffers()]} == {
        **model,
        "bias": ((301,), torch.float32),
    }


def _allocations(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[int]:
    """The sizes of every allocation and free (negative) one training forward and backward make."""
    from torch.profiler import ProfilerActivity, profile

    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = layer(x)
        out.backward(grad)
        del out
    x.grad = None
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_cpu_training_allocates_as_bitsandbytes(dtype: torch.dtype) -> None:
    # bnb.matmul in training on the CPU: MatMul8bitFp (dequantise + linear; ctx.A keeps the input)
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=False)
    real = _real_int8_layer(linear).train()
    stand_in = Linear8bitModel(linear, QuantSpec.parse("8bit")).train()
    stand_in.load_state_dict({"weight": real.weight.data, "SCB": real.weight.SCB})
    x = torch.randn(2, 7, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 7, 160, dtype=dtype)
    assert _allocations(stand_in, x, grad) == _allocations(real, x, grad)
    assert torch.equal(stand_in(x), real(x))  # the same numbers too: the same ops


def test_8bit_base_as_transformers_quantises_it(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    plain = load_workload(_tiny_llama(tmp_path), seq_len=16)
    w = load_workload(_tiny_llama(tmp_path), seq_len=16, quantize="8bit")
    quantised = {n for n, m in w.model.named_modules() if isinstance(m, Linear8bitModel)}
    assert quantised == {n for n, m in plain.model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    expected = sum(b.numel() * 4 for b in plain.model.buffers())
    for name, p in plain.model.named_parameters():
        module = name.rsplit(".", 1)[0]
        quantised_weight = module in quantised and name.endswith("weight")
        expected += p.numel() + 4 * p.shape[0] if quantised_weight else p.numel() * 4  # int8 + SCB
    est = estimate(w, batch_size=1, device="cpu", mode="inference")
    assert est.breakdown["parameters"] + est.breakdown["buffers"] == expected
    assert any("LLM.int8" in n and "modelled" in n for n in est.notes)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_8bit_lora_step_equals_a_real_cpu_run_of_the_model(tmp_path: Path, optimizer: str) -> None:
    pytest.importorskip("peft")
    w = load_workload(_tiny_llama(tmp_path), seq_len=16, quantize="8bit", lora=4)
    wrappers = {type(m).__qualname__ for n, m in w.model.named_modules() if n.endswith("q_proj")}
    assert wrappers == {"Linear8bitLt"}  # peft's own layer for an 8-bit base
    est = estimate(w, batch_size=2, optimizer=optimizer, device="cpu")
    real = measure_step(w, 2, make_spec("cpu", optimizer))
    assert est.peak_allocated_bytes == real.peak_allocated_bytes


def test_8bit_gpu_forward_temporaries_from_the_source() -> None:
    # MatMul8bitLt's fast path on CUDA (bitsandbytes/autograd/_functions.py, backends/cuda/ops.py,
    # backends/default/ops.py), M rows: A.to(float16), then int8_vectorwise_quant's row_stats
    # (float32[M]) and out_row (int8[M, K]) with the outlier test (A.abs(): fp16, >= 6.0: bool,
    # .any(): one bool), then int8_scaled_mm: int32[M, N], its fp16 dequantised [M, N], .to(float32)
    model = nn.Sequential(nn.Linear(512, 1024, bias=False), nn.Linear(1024, 2))
    w = load_workload(model, (512,), quantize="8bit")
    est = estimate(w, batch_size=3, device="cuda", mode="inference")
    m, k, n = 3, 512, 1024
    ours = [e for e in est.events if e.module == "0" and e.category == "temporaries" and e.nbytes > 0]
    allocs = [e.nbytes for e in ours if e.action == "alloc"]
    assert allocs == [2 * m * k, 4 * m, m * k, 2 * m * k, m * k, 1, 4 * m * n, 2 * m * n, 4 * m * n]
    live = peak = 0
    for e in ours:
        live += e.nbytes if e.action == "alloc" else -e.nbytes
        peak = max(peak, live)
    # at the peak: CA, SCA, the int32, fp16 and fp32 products (the last one is the layer's output)
    assert peak == m * k + 4 * m + 4 * m * n + 2 * m * n + 4 * m * n
    # int8 weight and SCB (float32[N]); the head's weight and bias, each block rounded to 512 bytes
    assert est.breakdown["parameters"] + est.breakdown["buffers"] == k * n + 4 * n + 2 * 1024 * 4 + 512


def test_cli_quantize_and_8bit_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from typer.testing import CliRunner

    from batchfit.cli import app

    runner = CliRunner()
    args = ["estimate", _tiny_llama(tmp_path), "--seq-len", "16", "-b", "1", "--lora", "4", "--device", "cuda"]
    result = runner.invoke(app, [*args, "--quantize", "4bit", "--optimizer", "paged-adamw8bit"])
    assert result.exit_code == 0, result.output
    assert "modelled" in result.output
    result = runner.invoke(app, [*args, "--quantize", "8bit"])
    assert result.exit_code == 0, result.output
    assert "LLM.int8" in result.output
