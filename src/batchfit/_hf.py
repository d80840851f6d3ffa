"""Hugging Face transformers models from their configs: ``hf:ID_OR_PATH``, built-in configs, tasks.

Nothing is downloaded and no weights are read: the model is built from its ``config.json`` on the
``meta`` device, exactly as ``AutoModelFor*.from_config`` builds it, and batchfit's fake tensors
stand in for the weights. The config comes from (in this order)

* a built-in copy of the public ``config.json`` of a model people fine-tune often (``batchfit models``),
* a path: a directory holding ``config.json`` (a checkout, a cache snapshot) or the file itself,
* a Hugging Face ID found in the local Hugging Face cache (never fetched).

The inputs are what a ``transformers`` training step gets: ``input_ids`` of ``seq_len`` tokens per
sample and ``labels`` (shifted inside the model for causal LMs), passed by keyword; the model
returns its own loss.

>>> builtin_names()[:3]
['bert-base-uncased', 'google/gemma-2-2b', 'gpt2']
>>> resolve_config("hf:gpt2").values["n_layer"]
12
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import BatchfitError
from ._i18n import tr

# The public config.json of each model (the fields that shape the network; the rest take
# transformers' defaults, as they would for the real file). The parameter count each config builds
# is checked in tests/test_hf.py against the count the model's Hub page publishes.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    },
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    },
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Qwen/Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 24,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "Qwen/Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "max_window_layers": 28,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "google/gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    "microsoft/Phi-3-mini-4k-instruct": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "pad_token_id": 32000,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "torch_dtype": "bfloat16",
    },
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "n_ctx": 1024,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-05,
    },
    "bert-base-uncased": {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
}

# Short names: the part after the organisation, lower case (``llama-3.1-8b``).
_ALIASES = {name.rsplit("/", 1)[-1].lower(): name for name in BUILTIN_CONFIGS}

# --task -> the Auto class transformers builds for it
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
}
ATTENTION = ("eager", "sdpa", "flash_attention_2")
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class HFConfig:
    """A model's ``config.json`` values and where they came from."""

    name: str
    values: dict[str, Any]
    source: str  # "built-in", a path, or "local cache: PATH"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise BatchfitError(
            tr("hf: models need the transformers package, which is not installed"),
            hint=tr("pip install transformers (and peft for `lora`)"),
        ) from exc
    return transformers


def resolve_config(ref: str) -> HFConfig:
    """``hf:ID_OR_PATH`` (or without the prefix) -> its config values; reads only local files."""
    name = ref.removeprefix("hf:").strip()
    if not name:
        raise BatchfitError(tr("hf: needs a model ID or a path"), hint=tr("e.g. hf:gpt2 or hf:path/to/checkout"))
    builtin = BUILTIN_CONFIGS.get(name) or BUILTIN_CONFIGS.get(_ALIASES.get(name.lower(), ""))
    if builtin is not None:
        canonical = name if name in BUILTIN_CONFIGS else _ALIASES[name.lower()]
        return HFConfig(canonical, dict(builtin), "built-in (the model's public config.json)")
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise BatchfitError(
                tr("{name!r} is a directory without a config.json", name=name),
                hint=tr("point hf: at the model's folder"),
            )
    if path.is_file():
        return HFConfig(name, _read_json(path), str(path))
    if name.startswith((".", "/", "~")) or name.endswith(".json"):
        raise BatchfitError(tr("no such file or directory: {name!r}", name=name), hint=tr("check the path after hf:"))
    cached = _from_cache(name)
    if cached is not None:
        return HFConfig(name, _read_json(cached), f"local Hugging Face cache: {cached}")
    close = difflib.get_close_matches(name.lower(), [*_ALIASES, *(n.lower() for n in BUILTIN_CONFIGS)], n=3)
    raise BatchfitError(
        tr("{name!r} is neither a built-in config, a path, nor in the local Hugging Face cache", name=name),
        hint=(
            tr("did you mean {names}?", names=", ".join("hf:" + _ALIASES.get(c, c) for c in close)) + " "
            if close
            else ""
        )
        + tr(
            "batchfit never downloads: fetch the config first (`huggingface-cli download {name} config.json`), "
            "or give a path to a folder or config.json; `batchfit models` lists the built-ins",
            name=name,
        ),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BatchfitError(
            tr("cannot read {path!r} as JSON: {exc}", path=str(path), exc=exc), hint=tr("give the model's config.json")
        ) from exc
    if not isinstance(values, dict) or "model_type" not in values:
        raise BatchfitError(
            tr("{path!r} is not a transformers config (no model_type)", path=str(path)),
            hint=tr("give the model's config.json"),
        )
    return values


def _from_cache(repo_id: str) -> Path | None:
    """The cached config.json of ``repo_id``, looked up in the local cache only."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an ID huggingface_hub cannot parse is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def build_config(cfg: HFConfig, *, num_labels: int | None = None) -> Any:
    transformers = _transformers()
    values = dict(cfg.values)
    model_type = values.pop("model_type")
    if num_labels is not None:
        values["num_labels"] = num_labels
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise BatchfitError(
            tr(
                "transformers {version} does not know model_type {model_type!r}: {exc}",
                version=transformers.__version__,
                model_type=model_type,
                exc=exc,
            ),
            hint=tr("upgrade transformers (pip install -U transformers)"),
        ) from exc


def model_class(config: Any, task: str | None) -> tuple[Any, str]:
    """The class to build and the task it trains: ``--task`` if given, else the config's architecture."""
    transformers = _transformers()
    if task is not None:
        key = task.strip().lower().replace("_", "-")
        if key not in TASKS:
            raise BatchfitError(
                tr("unknown task {task!r}", task=task), hint=tr("use one of {names}", names=", ".join(TASKS))
            )
        return getattr(transformers, TASKS[key]), key
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, _task_of(arch)
    return transformers.AutoModelForCausalLM, "causal-lm"


def _task_of(arch: str) -> str:
    if arch.endswith("ForSequenceClassification"):
        return "seq-cls"
    if arch.endswith("ForMaskedLM") or arch.endswith("ForPreTraining"):
        return "masked-lm"
    return "causal-lm"


@dataclass
class HFModel:
    """A transformers model built on ``meta`` and how to feed it one batch."""

    name: str
    model: nn.Module
    task: str
    seq_len: int
    notes: list[str] = field(default_factory=list)

    def example_inputs(self) -> Callable[[int], dict[str, torch.Tensor]]:
        seq_len, task = self.seq_len, self.task

        def make(batch_size: int) -> dict[str, torch.Tensor]:
            ids = torch.zeros(batch_size, seq_len, dtype=torch.int64)
            labels = torch.zeros(batch_size if task == "seq-cls" else (batch_size, seq_len), dtype=torch.int64)
            return {"input_ids": ids, "labels": labels}

        return make


def build_hf_model(
    ref: str,
    *,
    seq_len: int | None = None,
    task: str | None = None,
    attn: str | None = None,
    num_classes: int | None = None,
    gradient_checkpointing: bool | str = False,
) -> HFModel:
    """Build ``hf:ID_OR_PATH`` on the meta device, as transformers builds it from its config.

    ``gradient_checkpointing``: ``True`` (or ``"full"``) recomputes each layer's forward in the
    backward; ``"selective"`` recomputes it but keeps what torchtitan's per-op policy saves
    (:func:`torchtitan_sac_context`)."""
    policy = checkpointing_policy(gradient_checkpointing)
    cfg = resolve_config(ref)
    config = build_config(cfg, num_labels=num_classes)
    cls, task_key = model_class(config, task)
    notes = [f"config: {cfg.source}"]
    implementation = attn
    if attn is not None:
        if attn not in ATTENTION:
            raise BatchfitError(
                tr("unknown attention {attn!r}", attn=attn), hint=tr("use one of {names}", names=", ".join(ATTENTION))
            )
        if attn == "flash_attention_2":
            # flash-attn needs a GPU to install; its kernel saves what SDPA's flash kernel saves
            # (the output and the log-sum-exp), which the CUDA trace runs for SDPA on sm80+
            implementation = "sdpa"
            notes.append("flash_attention_2 simulated with SDPA's flash kernel (the same saved tensors)")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
        notes.append(f"{seq_len} tokens per sample (default; set --seq-len)")
    if seq_len < 1 or (limit is not None and seq_len > limit):
        raise BatchfitError(
            tr(
                "sequence length {seq_len} is outside 1..{limit} for {name}",
                seq_len=seq_len,
                limit=limit,
                name=cfg.name,
            ),
            hint=tr("use `seq_len` up to the model's max_position_embeddings ({limit})", limit=limit),
        )
    # float32 whatever the config's torch_dtype says (transformers' _from_config defaults to
    # config.dtype, bfloat16 for most built-ins): --precision decides the weights' dtype, so that
    # fp32 / amp-bf16 (fp32 master weights) and bf16 stay different answers
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if implementation is not None:
        kwargs["attn_implementation"] = implementation
    try:
        with torch.device("meta"):
            model = (
                cls.from_config(config, **kwargs)
                if cls.__name__.startswith("Auto")
                else cls._from_config(config, **kwargs)
            )
    except (ValueError, ImportError) as exc:
        raise BatchfitError(
            tr("building {name} failed: {exc}", name=cfg.name, exc=exc), hint=tr("check `attn` and `task`")
        ) from exc
    if policy is not None:
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
            raise BatchfitError(
                tr("{name} does not support gradient checkpointing", name=type(model).__name__),
                hint=tr("drop `gradient_checkpointing`"),
            )
        if policy == "full":
            enable()
            notes.append("gradient checkpointing on (the model's gradient_checkpointing_enable())")
        else:
            # the kwargs go to torch.utils.checkpoint.checkpoint for each layer; SAC needs the
            # non-reentrant checkpoint (transformers 4 defaulted to the reentrant one)
            enable({"use_reentrant": False, "context_fn": torchtitan_sac_context})
            notes.append(
                "selective checkpointing (torchtitan's per-op policy: matmul and attention outputs kept, "
                "except every second matmul of a layer)"
            )
    return HFModel(cfg.name, model, task_key, seq_len, notes)


CHECKPOINTING = ("full", "selective")


def checkpointing_policy(value: bool | str) -> str | None:
    """``gradient_checkpointing`` as one of :data:`CHECKPOINTING`, or None when off.

    >>> checkpointing_policy(True), checkpointing_policy("selective"), checkpointing_policy(False)
    ('full', 'selective', None)
    """
    if value is False or value is None:
        return None
    if value is True:
        return "full"
    if isinstance(value, str) and value in CHECKPOINTING:
        return value
    raise BatchfitError(
        tr("unknown gradient checkpointing {value!r}", value=value),
        hint=tr("use `gradient_checkpointing=True` (full), or one of {names}", names=", ".join(CHECKPOINTING)),
    )


# torchtitan's per-op selective activation checkpointing ("op" mode), as of the commit its published
# Llama 3.1 benchmarks ran (pytorch/torchtitan 9dec370, torchtitan/parallelisms/parallelize_llama.py:
# ``_save_list`` and ``_apply_ac_to_transformer_block``'s ``_custom_policy``): the outputs of these
# ops are saved, except every second matmul's, counted per checkpointed call (forward and
# recomputation each); everything else is recomputed in the backward.
TORCHTITAN_SAVE_LIST = (
    "aten.mm.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_flash_attention.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    # torchtitan: "for low precision training, it's useful to always save the result of max(abs(tensor))"
    "aten.abs.default",
    "aten.max.default",
)


def torchtitan_sac_context() -> tuple[Any, Any]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that
    applies torchtitan's per-op policy (:data:`TORCHTITAN_SAVE_LIST`), a fresh count per call.

    >>> import torch
    >>> from torch.utils.checkpoint import checkpoint
    >>> w = torch.ones(4, 4, requires_grad=True)
    >>> y = checkpoint(lambda x: (x @ w).relu() @ w, torch.ones(2, 4), use_reentrant=False,
    ...                context_fn=torchtitan_sac_context)
    >>> y.sum().backward(); w.grad.shape
    torch.Size([4, 4])
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    counts = {False: 0, True: 0}  # matmuls seen in the forward and in the recomputation

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(func)
        if name == "aten.mm.default":
            counts[ctx.is_recompute] += 1
            if counts[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if name in TORCHTITAN_SAVE_LIST else CheckpointPolicy.PREFER_RECOMPUTE

    contexts: tuple[Any, Any] = create_selective_checkpoint_contexts(policy)
    return contexts


def builtin_names() -> list[str]:
    return sorted(BUILTIN_CONFIGS, key=str.lower)
