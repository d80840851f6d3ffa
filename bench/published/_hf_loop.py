"""The training-memory loop of Hugging Face's SDPA benchmark tables, run through batchfit's API.

The docs pages quoted in the files beside this one (``model_doc/gpt_neox``, ``model_doc/opt``) give
the figures; the loop, as issue 11 section 5 describes the published benchmark, is::

    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float16, attn_implementation=a).cuda()
    for _ in range(10):                      # warm-up, then reset_peak_memory_stats() + empty_cache()
        model.zero_grad()                    # and the same loop again, measured
        outputs = model(**inputs)
        loss = outputs.logits.sum()
        loss.backward()
    print(torch.cuda.max_memory_allocated() * 1e-6)   # "MB" = 10^6 bytes

What batchfit runs for it (``estimate(..., device="cuda")``): the model built from its config on
the meta device with the dtypes ``from_pretrained(torch_dtype=torch.float16)`` gives
(:func:`from_pretrained_dtypes`: fp16 parameters, fp32 buffers where the model makes them so); the reference step's two iterations with the
loss ``outputs.logits.sum()``; SGD with lr=0 as the "optimizer" (no momentum: its CUDA foreach step
works in place and allocates nothing), whose ``zero_grad(set_to_none=True)`` frees the gradients
where the loop's next ``model.zero_grad()`` would, before the next forward. The loop's variable
``outputs`` (logits and the returned key/value cache) stays alive until it is rebound after the
next forward, as in the loop: the loss function keeps it (:class:`KeepOutputs`). ``--loop step`` runs the loop's
body itself as a ``--step`` function instead (:class:`PublishedLoop`: ``model.zero_grad()``,
``outputs = model(**inputs)``, ``loss = outputs.logits.sum()``, ``loss.backward()``), which needs
batchfit's routing of user backward calls under CUDA semantics (issue 11 section 2, in main since
the lead14 merge); both give the same figures where both were run. The second iteration is the measured one: the peak counter
covers both, and the first already runs with the previous iteration's outputs alive.

Not known from the page (each choice is stated in the output): whether ``inputs`` held an
attention mask (an all-ones mask is passed here; with all ones transformers drops it for SDPA, so
memory is the same either way up to the B x T mask itself), and whether the model was put in train
mode (``from_pretrained`` returns it in eval mode; OPT's dropout of 0.1 only acts in train mode):
``--mode`` choices are run both ways where they differ, and the larger is the estimate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchfit import estimate
from batchfit._models import InputSpec, Workload
from batchfit._training import LossSpec


class KeepOutputs:
    """The loss ``outputs.logits.sum()``; keeps ``outputs`` until the next call, as the loop's variable."""

    def __init__(self) -> None:
        self.outputs: Any = None

    def loss(self, outputs: Any, labels: Any) -> torch.Tensor:
        self.outputs = outputs  # the previous outputs die here: the name is rebound
        return outputs.logits.sum()  # type: ignore[no-any-return]


class PublishedLoop:
    """The published loop's body as a ``--step`` function; ``outputs`` and ``loss`` live on between
    calls, as the loop's variables do (until rebound)."""

    def __init__(self) -> None:
        self.outputs: Any = None
        self.loss: Any = None

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any, optimizer: Any) -> None:
        model.zero_grad()
        self.outputs = model(*inputs)
        self.loss = self.outputs.logits.sum()
        self.loss.backward()


class CallsWithMask(nn.Module):
    """``model(**inputs)`` with ``input_ids`` and an all-ones ``attention_mask`` (none if ``mask``
    is False: a benchmark whose inputs hold only ``input_ids``); eval mode if asked."""

    def __init__(self, model: nn.Module, eval_mode: bool, mask: bool = True) -> None:
        super().__init__()
        self.model = model
        self.eval_mode = eval_mode
        self.mask = mask

    def forward(self, input_ids: torch.Tensor) -> Any:
        if self.eval_mode:
            for m in self.model.modules():
                m.training = False  # from_pretrained's mode; batchfit restores modes afterwards
        if not self.mask:
            return self.model(input_ids=input_ids)
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def from_pretrained_dtypes(build: Any, attention: str) -> nn.Module:
    """The model on meta with the dtypes ``from_pretrained(torch_dtype=torch.float16)`` gives it.

    from_pretrained builds the model under ``torch.set_default_dtype(torch.float16)``
    (transformers/modeling_utils.py, ``PreTrainedModel._set_default_torch_dtype``) and loads the
    checkpoint's fp16 weights: parameters are fp16, but buffers the model computes in fp32 on
    purpose stay fp32 (GPT-NeoX's rotary ``inv_freq``, and ``cos_cached``/``sin_cached`` in 4.4x,
    made with ``.float()``). batchfit's ``precision="fp16"`` converts every floating tensor, as
    ``model.half()`` would; with fp32 rotary tables a real run computes the rotated query and key
    in fp32 (type promotion), which the 4.4x code says it does on purpose.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            return build(attention)  # type: ignore[no-any-return]
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    attention: str  # "eager" or "sdpa"
    published_mb: float  # max_memory_allocated() * 1e-6 as printed


def run(
    name: str,
    build: Any,
    cases: list[Case],
    gpu: str,
    modes: tuple[str, ...],
    argv: list[str] | None = None,
    mask: bool = True,
) -> list[dict[str, Any]]:
    """Estimate every case with ``build(attention) -> nn.Module`` (on meta) and print the errors."""
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only", help="attention=eager|sdpa only")
    parser.add_argument("--modes", help="comma-separated: train,eval (default: the file's)")
    parser.add_argument("--cases", help="only these, e.g. 4x1024,1x2048")
    parser.add_argument(
        "--loop",
        choices=("loss", "step"),
        default="loss",
        help="step: the published loop body as a --step function (needs backward in user steps on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.modes:
        modes = tuple(args.modes.split(","))
    rows = []
    for case in cases:
        if args.only and case.attention != args.only:
            continue
        if args.cases and f"{case.batch}x{case.seq}" not in args.cases.split(","):
            continue
        figures = {}
        for mode in modes:
            model = CallsWithMask(from_pretrained_dtypes(build, case.attention), eval_mode=mode == "eval", mask=mask)
            keep = KeepOutputs()
            loop = PublishedLoop() if args.loop == "step" else None
            workload = Workload(name, model, inputs=(InputSpec((case.seq,), torch.long),))
            est = estimate(
                workload,
                batch_size=case.batch,
                optimizer="SGD(lr=0.0)",
                precision="fp32",  # no conversion: the model's own dtypes, as from_pretrained leaves them
                device="cuda",
                gpu=gpu,
                loss=LossSpec("outputs.logits.sum()", keep.loss, lambda logits: None),
                step=loop,
            )
            keep.outputs = loop = None
            figures[mode] = est
        mode, est = max(figures.items(), key=lambda kv: kv[1].peak_allocated_bytes)
        ours = est.peak_allocated_bytes / 1e6
        row = {
            "model": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "batch": case.batch,
            "seq": case.seq,
            "attention": case.attention,
            "published_mb": case.published_mb,
            "batchfit_mb": round(ours, 1),
            "error": round((ours - case.published_mb) / case.published_mb, 4),
            "mode": mode,
            "loop": args.loop,
            "by_mode_mb": {m: round(e.peak_allocated_bytes / 1e6, 1) for m, e in figures.items()},
            "peak_phase": est.peak_phase,
            "breakdown_mb": {k: round(v / 1e6, 1) for k, v in est.breakdown.items() if v},
            "notes": est.notes,
        }
        rows.append(row)
        print(
            f"{name} tf {row['transformers']} {case.batch}x{case.seq} {case.attention:5s} "
            f"published {case.published_mb:>9.1f} MB  batchfit {ours:>9.1f} MB  error {row['error']:+.1%} "
            f"({mode}; {row['by_mode_mb']}) peak in {est.peak_phase}",
            flush=True,
        )
    if rows:
        errors = [abs(r["error"]) for r in rows]
        print(f"median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit("run gpt_neox_pythia410m.py or opt_350m.py")
