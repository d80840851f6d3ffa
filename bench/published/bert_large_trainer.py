"""bert-large-uncased fine-tuned with the Trainer on a V100: the memory figures of transformers'
"Efficient Training on a Single GPU" page, rebuilt with batchfit.

    PYTHONPATH=src python3 bench/published/bert_large_trainer.py [--json out.json] [--cases vanilla,ga4]
        [--loop pytorch|trainer2022] [--softmax-saves-input]
    python3 bench/published/bert_large_trainer.py --table bench/published/results/bert_large_trainer_*.json

Source: transformers' docs, "Efficient Training on a Single GPU" (docs/source/en/perf_train_gpu_one.mdx
in huggingface/transformers, 2022, e.g. commit 0016acf7ef421c7fe8eff7945de52c71896c3b01; published
as https://huggingface.co/docs/transformers/v4.20.0/en/perf_train_gpu_one). The vanilla run is still
quoted in today's https://huggingface.co/docs/transformers/model_memory_anatomy. The workload, as the
page writes it:

* data: 512 sequences of 512 random token ids (``input_ids`` only: no attention mask, no
  ``token_type_ids``) and a label each (``np.random.randint(0, 1, ...)``: all 0);
* model: ``AutoModelForSequenceClassification.from_pretrained("bert-large-uncased").to("cuda")``
  (BertForSequenceClassification, 2 labels: the config's default), fp32 weights;
* ``Trainer`` with ``TrainingArguments(output_dir="tmp", evaluation_strategy="steps",
  num_train_epochs=1, log_level="error", report_to="none", ...)`` and the case's arguments below
  (no eval dataset; 128 optimizer steps at most, so the evaluation at step 500 never runs);
* the GPU: "Tesla V100-SXM2... 16160MiB" (the page's nvidia-smi printout, driver 460.91.03, CUDA 11.2);
* what is measured: ``pynvml.nvmlDeviceGetMemoryInfo(handle).used // 1024**2`` printed as "MB"
  (MiB, the whole card as nvidia-smi sees it) after ``trainer.train()`` returned: the CUDA context,
  the kernels loaded, and what PyTorch's caching allocator still holds (its reserved memory: nothing
  calls ``empty_cache``). The page measures the context and kernels alone: ``torch.ones((1, 1)).to("cuda")``
  -> "GPU memory occupied: 1343 MB."; with the model's weights loaded: 2631 MB.

The page does not say its torch or transformers version (early 2022: transformers 4.16-4.18, torch
1.10-1.11). Then the Trainer's default optimizer was ``adamw_hf`` (transformers' own ``AdamW``, a
loop over parameters whose largest temporary is one parameter's ``denom``); here that is torch's
``AdamW(foreach=False)``, the same state (two fp32 moments) and the same one-parameter-at-a-time
temporaries. ``optim="adafactor"`` is the Trainer's Adafactor (``scale_parameter=False,
relative_step=False``, as batchfit's ``adafactor``); the 8-bit rows pass ``bnb.optim.Adam8bit``,
whose state is ``AdamW8bit``'s (bitsandbytes' ``Optimizer2State``; weight decay changes no memory).

batchfit's figure: ``total_bytes`` of ``estimate(..., device="cuda", gpu="v100-16gb",
context_bytes=1343 MiB)``: its peak reserved (the caching allocator's high-water mark) plus the
page's own measured context, in MiB, against the page's figure. The loop is batchfit's ``pytorch``
loop (K micro-batches of ``per_device_train_batch_size``, the loss divided by K, one optimizer step);
``--loop trainer2022`` runs the same as a ``step`` function with what that Trainer did differently:
``clip_grad_norm_(max_norm=1.0)`` (torch 1.10's, one norm per parameter, foreach=False) and
``model.zero_grad()`` with torch 1.x's default ``set_to_none=False`` (gradients stay allocated,
zeroed in place, through the next forward); for ``fp16=True`` the forward under autocast, without
the GradScaler (a few scalars; its ``unscale_`` works in place).

``--softmax-saves-input`` adds what torch 1.10 (the release of January 2022) saved that today's
does not: softmax's *input* for its backward, besides its output (derivatives.yaml then read
``self: _softmax_backward_data(grad, result, dim, self)``; pytorch/pytorch#64000, "Softmax/logsoftmax
use more memory for backward than needed", fixed by pytorch/pytorch#65242, "Avoid saving self for
softmax and log_softmax", relanded as #66018 on 2021-10-01, three weeks before torch 1.10.0 was
released from its branch: taken as first in 1.11). In BERT's eager attention that input is the B x H x S x S
fp32 score tensor of every layer. Here ``torch.nn.functional.softmax`` (which transformers' BERT calls
at run time) is swapped, while the estimate runs, for an autograd Function that saves both.

Beside it, accelerate's ``estimate-memory`` for the same model (its "Training using Adam" figure,
``max(estimate_training_usage(size, dtype).values())``: the ``float32`` row for fp32 cases, the
``float16`` row for ``fp16=True``), run through accelerate's own functions on this config as
bench/peers/accelerate_estimate.py does (its command line asks the Hub first and cannot run offline).
It does not depend on the batch, accumulation, checkpointing or optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchfit import estimate
from batchfit._models import load_workload

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from accelerate_estimate import accelerate_figures

# bert-large-uncased's public config.json (huggingface.co/bert-large-uncased/resolve/main/config.json)
CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 30522,
}
CONTEXT_MIB = 1343  # the page: torch.ones((1, 1)).to("cuda") -> "GPU memory occupied: 1343 MB."
SEQ = 512


@dataclass(frozen=True)
class Case:
    name: str
    batch: int  # per_device_train_batch_size
    grad_accum: int  # gradient_accumulation_steps
    checkpointing: bool
    precision: str  # fp32, or amp-fp16 for fp16=True
    optimizer: str
    published_mib: int  # "GPU memory occupied: N MB." (N = used // 1024**2)
    arguments: str  # the page's TrainingArguments / optimizer, in short


ADAMW_HF = "AdamW(foreach=False)"
CASES = [
    Case("vanilla", 4, 1, False, "fp32", ADAMW_HF, 14949, "batch 4"),
    Case("ga4", 1, 4, False, "fp32", ADAMW_HF, 8681, "batch 1, accum 4"),
    Case("ga4-gc", 1, 4, True, "fp32", ADAMW_HF, 6775, "batch 1, accum 4, checkpointing"),
    Case("fp16", 4, 1, False, "amp-fp16", ADAMW_HF, 13939, "batch 4, fp16"),
    Case("ga4-gc-fp16", 1, 4, True, "amp-fp16", ADAMW_HF, 7275, "batch 1, accum 4, checkpointing, fp16"),
    Case("adafactor", 4, 1, False, "fp32", "adafactor", 12295, "batch 4, adafactor"),
    Case(
        "ga4-gc-fp16-adafactor",
        1,
        4,
        True,
        "amp-fp16",
        "adafactor",
        4847,
        "batch 1, accum 4, checkpointing, fp16, adafactor",
    ),
    Case("adam8bit", 4, 1, False, "fp32", "adamw8bit", 13085, "batch 4, bnb Adam8bit"),
    Case(
        "ga4-gc-fp16-adam8bit",
        1,
        4,
        True,
        "amp-fp16",
        "adamw8bit",
        5363,
        "batch 1, accum 4, checkpointing, fp16, bnb Adam8bit",
    ),
]


class _SoftmaxSavingInput(torch.autograd.Function):
    """softmax as torch 1.10's autograd ran it: the input is saved beside the output (see above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = torch.softmax(x, dim)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, out = ctx.saved_tensors
        return torch._softmax_backward_data(grad, out, ctx.dim, x.dtype), None


@contextlib.contextmanager
def softmax_saves_input(on: bool) -> Iterator[None]:
    """``torch.nn.functional.softmax`` saves its input while the estimate runs (``on``)."""
    if not on:
        yield
        return
    original = torch.nn.functional.softmax

    def softmax(x: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> torch.Tensor:
        if dtype is not None:
            x = x.to(dtype)
        elif torch.is_autocast_enabled("cuda") and x.dtype == torch.float16:
            x = x.float()  # autocast runs softmax in fp32: 1.10 saved the fp32 copy it made
        assert dim is not None
        return _SoftmaxSavingInput.apply(x, dim) if x.requires_grad else original(x, dim)  # type: ignore[no-any-return]

    torch.nn.functional.softmax = softmax  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


class Trainer2022Step:
    """The Trainer's step of early 2022 with torch 1.x's defaults, as a batchfit ``step`` function
    (fp32 only): K micro-batches, ``clip_grad_norm_``, ``optimizer.step()``, and ``model.zero_grad()``,
    which then zeroed the gradients in place (``set_to_none=False``) instead of freeing them."""

    def __init__(self, grad_accum: int, fp16: bool) -> None:
        self.grad_accum = grad_accum
        self.fp16 = fp16

    def __call__(self, model: torch.nn.Module, inputs: Any, labels: Any, optimizer: Any) -> None:
        for _ in range(self.grad_accum):
            # fp16=True: the forward under autocast (torch.cuda.amp then); its GradScaler is left out (a
            # few scalars; its unscale_ works in place)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
                loss = model(**inputs).loss
            if self.grad_accum > 1:
                loss = loss / self.grad_accum
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        optimizer.step()
        model.zero_grad(set_to_none=False)


def run_case(case: Case, config_path: str, loop: str, accelerate: dict[str, int], old_softmax: bool) -> dict[str, Any]:
    import transformers

    step = Trainer2022Step(case.grad_accum, case.precision == "amp-fp16") if loop == "trainer2022" else None
    workload = load_workload(
        f"hf:{config_path}",
        seq_len=SEQ,
        task="seq-cls",
        num_classes=2,
        attn="eager",  # 2022's BertSelfAttention: the explicit softmax(QK^T) path
        gradient_checkpointing=case.checkpointing,
    )
    with softmax_saves_input(old_softmax):
        est = estimate(
            workload,
            batch_size=case.batch,
            optimizer=case.optimizer,
            precision=case.precision,
            device="cuda",
            gpu="v100-16gb",
            context_bytes=CONTEXT_MIB * 2**20,
            grad_accum=1 if step is not None else case.grad_accum,
            step=step,
        )
    assert est.total_bytes is not None and est.peak_reserved_bytes is not None
    ours = est.total_bytes / 2**20
    acc = accelerate["float32" if case.precision == "fp32" else "float16"] / 2**20
    row = {
        "source": "transformers docs, perf_train_gpu_one (2022)",
        "model": "bert-large-uncased",
        "case": case.name,
        "arguments": case.arguments,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "loop": loop,
        "softmax_saves_input": old_softmax,
        "batch": case.batch,
        "grad_accum": case.grad_accum,
        "seq": SEQ,
        "checkpointing": case.checkpointing,
        "precision": case.precision,
        "optimizer": case.optimizer,
        "published_mib": case.published_mib,
        "published_measures": "nvidia-smi used (pynvml) after trainer.train(), MiB",
        "batchfit_total_mib": round(ours, 1),
        "batchfit_reserved_mib": round(est.peak_reserved_bytes / 2**20, 1),
        "batchfit_allocated_mib": round(est.peak_allocated_bytes / 2**20, 1),
        "context_mib": CONTEXT_MIB,
        "error": round((ours - case.published_mib) / case.published_mib, 4),
        "accelerate_mib": round(acc, 1),
        "accelerate_error": round((acc - case.published_mib) / case.published_mib, 4),
        "fits_v100_16gb": est.fits,
        "peak_phase": est.peak_phase,
        "breakdown_mib": {k: round(v / 2**20, 1) for k, v in est.breakdown.items() if v},
        "notes": est.notes,
    }
    print(
        f"{case.name:24s} {loop:11s}{' 1.10-softmax' if old_softmax else ''} published {case.published_mib:>6} MiB  batchfit {ours:>8.1f} MiB "
        f"(reserved {row['batchfit_reserved_mib']:.1f}, allocated {row['batchfit_allocated_mib']:.1f}) "
        f"error {row['error']:+.1%}  peak in {est.peak_phase}; accelerate {acc:.1f} MiB ({row['accelerate_error']:+.1%})",
        flush=True,
    )
    return row


def table(paths: list[str]) -> None:
    """docs/finetuning.md's table from the JSON rows: one line per case, a column per rebuild."""
    columns: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        with open(path) as fh:
            for r in json.load(fh):
                # today: batchfit's own loop as a user runs it; 2022: the published stack's differences
                if r["loop"] == "pytorch" and not r.get("softmax_saves_input"):  # absent: written before the option
                    columns.setdefault(r["case"], {})["today"] = r
                elif r.get("softmax_saves_input") and r["loop"] == "trainer2022":
                    columns.setdefault(r["case"], {})["2022"] = r
    print(
        "| case | the page's arguments | published MiB | batchfit, today's loop | batchfit, the 2022 stack | accelerate |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for case in CASES:
        got = columns.get(case.name, {})
        cells = []
        for key in ("today", "2022"):
            r = got.get(key)
            cells.append(f"{r['batchfit_total_mib']:,.0f} ({r['error']:+.1%})" if r else "-")
        any_row = got.get("today") or got.get("2022")
        acc = f"{any_row['accelerate_mib']:,.0f} ({any_row['accelerate_error']:+.1%})" if any_row else "-"
        print(f"| {case.name} | {case.arguments} | {case.published_mib:,} | {cells[0]} | {cells[1]} | {acc} |")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--table"]:
        table(argv[1:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cases", help="only these, e.g. vanilla,ga4")
    parser.add_argument("--loop", choices=("pytorch", "trainer2022"), default="pytorch")
    parser.add_argument("--softmax-saves-input", action="store_true", help="torch 1.10's softmax backward (see above)")
    args = parser.parse_args(argv)
    rows = []
    _size, accelerate = accelerate_figures(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "config.json")
        Path(path).write_text(json.dumps(CONFIG))
        for case in CASES:
            if args.cases and case.name not in args.cases.split(","):
                continue
            rows.append(run_case(case, path, args.loop, accelerate, args.softmax_saves_input))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
