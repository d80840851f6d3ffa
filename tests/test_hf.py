"""Hugging Face models from their configs (hf:), LoRA through peft, gradient checkpointing, Adafactor.

The CPU truth: each small config, plain, with LoRA and with the model's own gradient
checkpointing, estimated on fake tensors equals the same training step run for real here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchfit import BatchfitError, estimate, load_workload
from batchfit._hf import BUILTIN_CONFIGS, resolve_config
from batchfit._measure import measure_step
from batchfit._models import Workload, count_parameters
from batchfit._step import make_spec
from batchfit.cli import app

pytest.importorskip("transformers")
pytest.importorskip("peft")

# The parameter count each model's Hugging Face Hub page publishes (from its safetensors files):
# an independent check that the built-in config values are the real ones.
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "google/gemma-2-2b": 2_614_341_888,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "gpt2": 124_439_808,
    "bert-base-uncased": 109_514_298,  # BertForMaskedLM (the 109,482,240 of BertModel + the MLM head)
}


def test_every_builtin_has_a_published_count() -> None:
    assert set(PUBLISHED_PARAMETERS) == set(BUILTIN_CONFIGS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_builtin_configs_build_the_published_models(name: str) -> None:
    w = load_workload(f"hf:{name}", seq_len=16)
    assert count_parameters(w.model) == PUBLISHED_PARAMETERS[name]
    assert all(p.is_meta for p in w.model.parameters())  # nothing allocated, nothing downloaded
    # float32 although most configs say torch_dtype bfloat16 (transformers' _from_config would follow
    # it): --precision decides, so fp32 / amp-bf16 keep fp32 master weights and bf16 halves them
    assert {p.dtype for p in w.model.parameters()} == {torch.float32}


# Small configs of the families people fine-tune (2 layers, narrow), written as config.json files:
# the path route of hf: is exercised at the same time.
TINY = {
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
             "vocab_size": 500, "n_positions": 128},
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500,
              "max_position_embeddings": 128},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 500, "max_position_embeddings": 128},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500,
              "max_position_embeddings": 128},
    "gemma": {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "vocab_size": 500, "max_position_embeddings": 128},
    "bert": {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 500, "max_position_embeddings": 128},
    "t5": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 64, "d_ff": 128, "d_kv": 16,
           "num_layers": 2, "num_heads": 4, "vocab_size": 500, "decoder_start_token_id": 0},
}  # fmt: skip


def _tiny(tmp_path: Path, family: str) -> str:
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY[family]))
    return f"hf:{folder}"


def _est_and_real(w: Workload, batch_size: int, optimizer: str = "adamw") -> tuple[int, int]:
    est = estimate(w, batch_size=batch_size, optimizer=optimizer, device="cpu")
    real = measure_step(w, batch_size, make_spec("cpu", optimizer))
    return est.peak_allocated_bytes, real.peak_allocated_bytes


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize(
    "variant",
    [
        "plain",
        "lora",
        "checkpointing",
        "selective",
    ],
)
def test_small_configs_equal_a_real_cpu_step(tmp_path: Path, family: str, variant: str) -> None:
    kwargs: dict = {"lora": 4} if variant == "lora" else {}
    if variant == "checkpointing":
        kwargs["gradient_checkpointing"] = True
    if variant == "selective":  # torchtitan's per-op policy through the model's own checkpointing
        kwargs["gradient_checkpointing"] = "selective"
    w = load_workload(_tiny(tmp_path, family), seq_len=32, **kwargs)
    est, real = _est_and_real(w, 2)
    assert est == real, (family, variant, est, real)


def test_lora_trains_only_the_adapters(tmp_path: Path) -> None:
    ref = _tiny(tmp_path, "llama")
    plain = load_workload(ref, seq_len=32)
    lora = load_workload(ref + "/config.json", seq_len=32, lora=8)
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every Linear of the decoder but the output layer (peft's all-linear): 7 per layer, 2 layers;
    # A is r x in, B is out x r
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) * 2 + (128 + 64)
    assert count_parameters(lora.model, trainable_only=True) == 8 * per_layer * 2
    assert count_parameters(lora.model) == count_parameters(plain.model) + 8 * per_layer * 2
    r_lora = estimate(lora, batch_size=2, optimizer="adamw", device="cpu")
    # gradients and Adam state (exp_avg, exp_avg_sq; 4-byte step counters) for the adapters only
    adapters = {p.numel() * 4 for n, p in lora.model.named_parameters() if p.requires_grad}
    born = [e for e in r_lora.events if e.action == "alloc" and e.iteration == 1]
    assert {e.nbytes for e in born if e.category == "gradients"} == adapters
    assert {e.nbytes for e in born if e.category == "optimizer_state"} == adapters | {4}
    assert "LoRA r=8" in " ".join(lora.notes)


def test_lora_leaves_a_users_model_unchanged() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [type(m) for m in model.modules()]
    w = load_workload(model, input_size=(8,), lora=2)
    assert [type(m) for m in model.modules()] == before
    assert count_parameters(w.model, trainable_only=True) == 2 * (8 + 8) + 2 * (8 + 2)


def test_adafactor_as_the_trainer_sets_it(tmp_path: Path) -> None:
    w = load_workload(_tiny(tmp_path, "gpt2"), seq_len=16)
    est, real = _est_and_real(w, 2, "adafactor")
    assert est == real
    adam = estimate(w, batch_size=2, optimizer="adamw", device="cpu")
    factored = estimate(w, batch_size=2, optimizer="adafactor", device="cpu")
    # factored second moments: row and column statistics instead of a full matrix per weight
    assert factored.breakdown["optimizer_state"] < adam.breakdown["optimizer_state"] / 2


def test_resolve_from_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(TINY["llama"]))
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = resolve_config("hf:acme/tiny")
    assert cfg.values["hidden_size"] == 64 and "local Hugging Face cache" in cfg.source
    with pytest.raises(BatchfitError) as info:
        resolve_config("hf:acme/not-cached")
    assert "never downloads" in (info.value.hint or "")


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BatchfitError, match="seq_len"):
        load_workload("mlp", dataset="mnist", seq_len=128)
    with pytest.raises(BatchfitError, match="outside"):
        load_workload(_tiny(tmp_path, "gpt2"), seq_len=4096)
    with pytest.raises(BatchfitError, match="unknown task"):
        load_workload("hf:gpt2", task="translation")
    with pytest.raises(BatchfitError, match="did you mean"):
        resolve_config("hf:gtp2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchfitError, match=r"without a config\.json"):
        resolve_config(f"hf:{tmp_path / 'empty'}")


def test_task_override_builds_a_classifier(tmp_path: Path) -> None:
    w = load_workload(_tiny(tmp_path, "llama"), seq_len=16, task="seq-cls", num_classes=3)
    assert type(w.model).__name__ == "LlamaForSequenceClassification"
    assert w.example_inputs is not None and tuple(w.example_inputs(4)["labels"].shape) == (4,)


def test_cli_fine_tuning_question(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["estimate", _tiny(tmp_path, "llama"), "--seq-len", "32", "-b", "1,2", "--lora", "4",
         "--gradient-checkpointing", "--precision", "bf16", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["batch_size"] for r in out["results"]] == [1, 2]
    assert out["results"][1]["peak_allocated_bytes"] > out["results"][0]["peak_allocated_bytes"]
    result = CliRunner().invoke(app, ["estimate", "mlp", "--lora-alpha", "16"])
    assert result.exit_code == 3 and "--lora" in result.output


@pytest.mark.parametrize("precision", ["amp-bf16", "amp-fp16"])
def test_checkpointing_under_autocast_on_a_simulated_gpu(tmp_path: Path, precision: str) -> None:
    # torch.utils.checkpoint re-enters the forward's autocast for its recomputation with
    # torch.amp.autocast("cuda", ...), which disables itself without CUDA: the recomputation then
    # ran in fp32 and checkpoint's metadata check failed (the Trainer's fp16=True +
    # gradient_checkpointing=True, bench/published/bert_large_trainer.py)
    path = _tiny(tmp_path, "llama")

    def peak(precision: str, checkpointing: bool) -> int:
        w = load_workload(path, seq_len=64, gradient_checkpointing=checkpointing)
        return estimate(w, batch_size=4, optimizer="adamw", precision=precision, device="cuda").peak_allocated_bytes

    checkpointed = peak(precision, True)
    assert checkpointed < peak(precision, False)  # checkpointing saves memory under autocast too
    assert checkpointed < peak("fp32", True)  # the recomputed activations are half precision, as on a GPU
    if not torch.cuda.is_available():  # the step answers as a GPU would only while it runs
        assert torch.cuda.amp.common.amp_definitely_not_available()


def test_selective_checkpointing_keeps_what_torchtitans_policy_saves(tmp_path: Path) -> None:
    """``gradient_checkpointing="selective"``: the layers are recomputed, but the outputs of the
    matmuls the policy saves (every other one of a layer) are kept; the real CPU steps order
    full < selective < plain, and each estimate is exact (test above)."""
    path = _tiny(tmp_path, "llama")
    spec = make_spec("cpu", "adamw")
    real = {
        mode: measure_step(load_workload(path, seq_len=32, gradient_checkpointing=mode), 4, spec).peak_allocated_bytes
        for mode in (False, True, "selective")
    }
    assert real[True] < real["selective"] < real[False]
    w = load_workload(path, seq_len=32, gradient_checkpointing="selective")
    assert any("torchtitan" in n for n in w.notes)
    for precision in ("amp-bf16", "bf16"):  # a simulated GPU, under autocast and in pure bf16
        peaks = [
            estimate(load_workload(path, seq_len=64, gradient_checkpointing=mode), batch_size=4, precision=precision,
                     device="cuda").peak_allocated_bytes
            for mode in (True, "selective", False)
        ]  # fmt: skip
        assert peaks[0] < peaks[1] < peaks[2], precision


def test_selective_checkpointing_from_the_cli(tmp_path: Path) -> None:
    path = _tiny(tmp_path, "llama")
    args = ["estimate", path, "--seq-len", "32", "-b", "2", "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, [*args, "--selective-checkpointing"])
    assert result.exit_code == 0, result.output
    api = estimate(load_workload(path, seq_len=32, gradient_checkpointing="selective"), batch_size=2, device="cpu")
    assert json.loads(result.output)["results"][0]["peak_allocated_bytes"] == api.peak_allocated_bytes


@pytest.mark.parametrize("value", ["partial", 2])
def test_unknown_checkpointing_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(BatchfitError, match="unknown gradient checkpointing") as info:
        load_workload(_tiny(tmp_path, "llama"), seq_len=32, gradient_checkpointing=value)  # type: ignore[arg-type]
    assert "selective" in info.value.hint
    with pytest.raises(BatchfitError, match="Hugging Face models only"):
        load_workload("mlp", gradient_checkpointing="selective")
