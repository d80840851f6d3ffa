"""bitsandbytes: its 8-bit and paged AdamW run on fake tensors; QLoRA's 4-bit base, modelled.

The optimizer state is the library's own (its code runs on fake tensors); each size is also
checked against the rule read in its source (bitsandbytes/optim/optimizer.py
``Optimizer2State.init_state``), computed here independently. The 4-bit stand-in's storage is
checked against a real ``bitsandbytes.functional.quantize_4bit`` on the CPU.
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
from batchfit._quantize import Linear4bitModel, QuantSpec, storage_4bit
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
    with pytest.raises(BatchfitError, match="not modelled yet"):
        QuantSpec.parse("8bit")
    with pytest.raises(BatchfitError, match="unknown quantisation"):
        QuantSpec.parse("3bit")


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
    assert result.exit_code != 0 and "not modelled yet" in result.output
