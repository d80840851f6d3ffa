"""EleutherAI/pythia-410m-deduped training memory, Hugging Face docs, model_doc/gpt_neox.

    PYTHONPATH=src:bench/published python3 bench/published/gpt_neox_pythia410m.py [--json out.json]

Source: https://huggingface.co/docs/transformers/model_doc/gpt_neox, section "Using Scaled Dot
Product Attention (SDPA)" (docs/source/en/model_doc/gpt_neox.md in huggingface/transformers, read
at commit dea03ed0 of a fork). Quote: "On a local benchmark (rtx3080ti-16GB, PyTorch 2.2.1, OS
Ubuntu 22.04) using `float16` with pythia-410m-deduped, we saw the following speedups during
training and inference." Training table, columns "Eager peak mem (MB)" and "SDPA peak mem (MB)";
MB = max_memory_allocated() * 1e-6 (10^6 bytes). The transformers release of the benchmark: the
SDPA support for GPT-NeoX it documents arrived in 4.40/4.41 (run here with 4.41.2 and the current
release). The card: an RTX 3080 Ti (sm86, Ampere); batchfit's catalogue has no 3080 Ti, and the
RTX 3090 (same architecture, so the same cuBLAS workspace rule) stands in: only library
workspaces depend on the card in the allocated peak.

The model: GPTNeoXForCausalLM from the public config.json of EleutherAI/pythia-410m-deduped
(values below; not downloaded here: no network).
"""

from __future__ import annotations

from _hf_loop import Case, run
from torch import nn

CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}

# (batch, seq, attention, published MB): every training row of the table with a figure
CASES = [
    Case(1, 128, "eager", 1789.95), Case(1, 128, "sdpa", 1789.95),
    Case(1, 256, "eager", 1845.83), Case(1, 256, "sdpa", 1844.84),
    Case(1, 512, "eager", 2278.38), Case(1, 512, "sdpa", 1953.76),
    Case(1, 1024, "eager", 4772.36), Case(1, 1024, "sdpa", 2408.35),
    Case(1, 2048, "eager", 13484.1), Case(1, 2048, "sdpa", 3882.01),
    Case(2, 128, "eager", 1843.86), Case(2, 128, "sdpa", 1844.78),
    Case(2, 256, "eager", 1999.72), Case(2, 256, "sdpa", 1951.67),
    Case(2, 512, "eager", 3613.16), Case(2, 512, "sdpa", 2406.77),
    Case(2, 1024, "eager", 8707.55), Case(2, 1024, "sdpa", 3878.86),
    Case(2, 2048, "sdpa", 6825.13),  # eager: OOM
    Case(4, 128, "eager", 1947.6), Case(4, 128, "sdpa", 1952.06),
    Case(4, 256, "eager", 3008.39), Case(4, 256, "sdpa", 2405.99),
    Case(4, 512, "eager", 6290.58), Case(4, 512, "sdpa", 3877.29),
    Case(4, 1024, "sdpa", 6821.98),  # eager: OOM
    Case(4, 2048, "sdpa", 12705.1),  # eager: OOM
]  # fmt: skip


def build(attention: str) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = attention
    return GPTNeoXForCausalLM(config)


if __name__ == "__main__":
    run("pythia-410m-deduped", build, CASES, gpu="NVIDIA GeForce RTX 3090", modes=("train",))
