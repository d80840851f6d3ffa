"""The fake mode's cached answers reached through batchfit's memo (_fake_memo) give the same trace,
event for event, as the usual dispatch: the memo changes how fast an op is answered, never what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchfit import _fake_memo
from batchfit._distributed import DistSpec, estimate_ranks
from batchfit._models import load_workload
from batchfit._step import make_spec
from batchfit._trace import trace_step

pytest.importorskip("transformers")
pytest.importorskip("peft")

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500,
         "max_position_embeddings": 128}  # fmt: skip


def _events(trace):  # type: ignore[no-untyped-def]
    return [tuple(e) for e in trace.events], trace.numels, trace.marks, trace.activation_bytes_by_module


def _without_and_with_memo(monkeypatch: pytest.MonkeyPatch, run):  # type: ignore[no-untyped-def]
    with monkeypatch.context() as m:
        m.setattr(_fake_memo, "_AVAILABLE", False)
        plain = run()
    monkeypatch.setattr(_fake_memo, "_memo", {})
    first = run()  # fills the memo
    before = _fake_memo.answered
    second = run()  # answered from it
    assert _fake_memo.answered - before > 100  # the memo did answer most ops
    return plain, first, second


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_llama_lora_checkpointing_traces_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    w = load_workload(f"hf:{tmp_path}", seq_len=32, lora=4, gradient_checkpointing=True)
    spec = make_spec(device, "adamw", "bf16")
    extra = {"cuda_workspaces": (8 << 20, 0)} if device == "cuda" else {}
    plain, first, second = _without_and_with_memo(monkeypatch, lambda: _events(trace_step(w, 3, spec, **extra)))
    assert first == plain
    assert second == plain


def test_fsdp_ranks_trace_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    model = f"{Path(__file__).with_name('dist_models.py')}:Blocks"
    w = load_workload(model, [12])
    spec = make_spec("cpu", "adam", threads=1)

    def run():  # type: ignore[no-untyped-def]
        out = estimate_ranks(w, 4, spec, DistSpec(3, strategy="fsdp"))
        return [[tuple(e) for e in r.estimate.events] for r in out.ranks]

    plain, first, second = _without_and_with_memo(monkeypatch, run)
    assert first == plain
    assert second == plain


def test_unusual_arguments_go_the_usual_way() -> None:
    # a tensor that is not fake (here: a real one) or a value the cheap key does not cover: no key
    real = torch.ones(2)
    assert _fake_memo._cheap_key(torch.ops.aten.add.Tensor, (real, real), {}) == (None, None)
    assert _fake_memo._cheap_key(torch.ops.aten.add.Tensor, (object(),), {}) == (None, None)
