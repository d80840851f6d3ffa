"""distilbert-base-uncased (MaskedLM head) training memory, Hugging Face docs, model_doc/distilbert.

    PYTHONPATH=src:bench/published python3 bench/published/distilbert_base_uncased.py [--json out.json]

Source: https://huggingface.co/docs/transformers/model_doc/distilbert, section "Using Scaled Dot
Product Attention (SDPA)" (docs/source/en/model_doc/distilbert.md in huggingface/transformers).
Quote: "On a local benchmark (NVIDIA GeForce RTX 2060-8GB, PyTorch 2.3.1, OS Ubuntu 20.04) with
`float16` and the `distilbert-base-uncased` model with a MaskedLM head, we saw the following
speedups during training and inference." Training table, columns "Eager peak mem (MB)" and "sdpa
peak mem (MB)" (the "is cuda" column reads False, but the figures are ``max_memory_allocated``,
a CUDA counter). MB = max_memory_allocated() * 1e-6.

The loop: a training benchmark script of the same family as the other two pages' (read in the
search tool's code corpus, an unnamed excerpt: ``AutoModelForMaskedLM.from_pretrained(name,
torch_dtype=torch.float16, attn_implementation=...)``, ``model.train()``, 10 warm-up steps of
``model.zero_grad()``, ``outputs = model(**inputs)``, ``loss = outputs.logits.sum()``,
``loss.backward()``, then ``reset_peak_memory_stats()``, ``empty_cache()`` and 100 such steps,
measured), with ``inputs = {"input_ids": ...}`` only: the attention-mask line is commented out,
so no mask is passed here either (``run(..., mask=False)``), and train mode only.

The release: DistilBERT's SDPA attention is in transformers 4.46.3 and not in 4.42.4 (no
``DistilBertSdpaAttention``); the page's PyTorch 2.3.1 dates it to mid-2024. Eager rows run with
4.41.2 and 4.46.3, SDPA rows with 4.46.3, then the current release.

The card: an RTX 2060 (sm75, Turing); the Tesla T4 (sm75, the same cuBLAS workspace rule and
the same SDPA kernel choices by compute capability: no flash attention below sm80) stands in.

The model: DistilBertForMaskedLM from the public config.json of distilbert-base-uncased (values
below; they equal DistilBertConfig's defaults).
"""

from __future__ import annotations

from _hf_loop import Case, run
from torch import nn

CONFIG = {
    "activation": "gelu",
    "architectures": ["DistilBertForMaskedLM"],
    "attention_dropout": 0.1,
    "dim": 768,
    "dropout": 0.1,
    "hidden_dim": 3072,
    "initializer_range": 0.02,
    "max_position_embeddings": 512,
    "model_type": "distilbert",
    "n_heads": 12,
    "n_layers": 6,
    "pad_token_id": 0,
    "qa_dropout": 0.1,
    "seq_classif_dropout": 0.2,
    "sinusoidal_pos_embds": False,
    "tie_weights_": True,
    "vocab_size": 30522,
}

# (batch, seq, attention, published MB): every training row of the table
CASES = [
    Case(1, 128, "eager", 397.038), Case(1, 128, "sdpa", 399.629),
    Case(1, 256, "eager", 412.505), Case(1, 256, "sdpa", 412.606),
    Case(2, 128, "eager", 412.213), Case(2, 128, "sdpa", 412.606),
    Case(2, 256, "eager", 427.491), Case(2, 256, "sdpa", 425.787),
    Case(4, 128, "eager", 427.491), Case(4, 128, "sdpa", 425.787),
    Case(4, 256, "eager", 594.156), Case(4, 256, "sdpa", 502.745),
    Case(8, 128, "eager", 545.922), Case(8, 128, "sdpa", 502.745),
    Case(8, 256, "eager", 983.450), Case(8, 256, "sdpa", 798.480),
]  # fmt: skip


def build(attention: str) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    config = DistilBertConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = attention
    return DistilBertForMaskedLM(config)


if __name__ == "__main__":
    import sys

    run("distilbert-base-uncased", build, CASES, gpu="Tesla T4", modes=("train",), argv=sys.argv[1:], mask=False)
