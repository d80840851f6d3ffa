"""The lesson's answer key: what ``batchfit`` prints with no arguments.

The lesson's MNIST MLP, its hand-made memory table beside batchfit's exact figures, what the hand
count misses, and the batch size to use by the lesson's 0.8 rule, lowered where the training
effect (a short sweep on the bundled digits) stops keeping up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._datasets import get_dataset
from ._estimate import Estimator, StepEstimate
from ._fit import FitResult, fit
from ._i18n import tr
from ._models import load_workload
from ._render import Rendered, Table, cell_len
from ._step import make_spec
from ._summary import ModelSummary, summary
from ._units import format_bytes

if TYPE_CHECKING:
    from ._sweep import SweepResult

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SeedRow:
    """One row of the lesson's hand-made table, as the lesson states it (text, not bytes)."""

    batch_size: int
    data: str
    intermediates: str
    total: str


# The lesson's figures, quoted: they are its approximations, shown beside the exact values.
SEED_TABLE: tuple[SeedRow, ...] = (
    SeedRow(64, "192 KB", "32 KB", "~1 MB"),
    SeedRow(256, "768 KB", "128 KB", "~1.7 MB"),
    SeedRow(1024, "3 MB", "512 KB", "~4.5 MB"),
    SeedRow(4096, "12 MB", "2 MB", "~15 MB"),
)
SEED_PARAM_BYTES = "~403 KB"  # "101,770 x 4 B ~ 403 KB" (parameters; the same again for gradients)
SEED_MODEL_STATES = "~806 KB"  # parameters + gradients (and Adam's two states)
SEED_MODEL, SEED_DATASET, SEED_OPTIMIZER, SEED_SAFETY = "mlp", "mnist", "sgd", 0.8
# The training-effect half, run on data that ships (scikit-learn's 8x8 digits: no MNIST file ships with
# batchfit, and the no-argument run downloads nothing). SGD as in the lesson; lr 0.05 at batch 16 is a
# plain choice, not tuned; one thread, so that the numbers are the same on every run of this machine.
SEED_SWEEP: dict[str, Any] = {
    "dataset": "digits",
    "optimizer": "sgd",
    "lr": 0.05,
    "lr_scaling": "linear",
    "epochs": 10,
    "max_batch": 1024,
    "seed": 0,
    "threads": 1,
    "memory": False,
    "device": "cpu",
}


@dataclass(frozen=True)
class LinearCount:
    """A Linear layer's parameters, spelled out as the lesson does: in x out + out."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def label(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"

    @property
    def expression(self) -> str:
        bias = f" + {self.out_features}" if self.bias else ""
        return f"{self.in_features} x {self.out_features}{bias}"

    def __str__(self) -> str:
        return f"{self.label}: {self.expression} = {self.params:,}"


@dataclass
class AnswerKey(Rendered):
    """The seed's scenario end to end: summary, parameter arithmetic, its table beside batchfit, the batch size."""

    summary: ModelSummary
    linears: list[LinearCount]
    param_bytes: int
    param_tensors: int
    element_size: int
    sample_numel: int
    cpu: list[StepEstimate]
    cuda: list[StepEstimate]
    fit: FitResult
    training: SweepResult | None = None  # the training-effect half (digits); None: memory only

    @property
    def total_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def recommended_batch_size(self) -> int:
        """The batch size to use: the memory rule's, lowered to where training stops keeping up."""
        rec = self.fit.recommended_batch_size
        return min(rec, self.training.recommended_batch_size) if self.training is not None else rec

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": SEED_MODEL,
            "dataset": SEED_DATASET,
            "optimizer": SEED_OPTIMIZER,
            "total_params": self.total_params,
            "param_bytes": self.param_bytes,
            "seed_table": [
                {"batch_size": r.batch_size, "data": r.data, "intermediates": r.intermediates, "total": r.total}
                for r in SEED_TABLE
            ],
            "cpu": [e.to_dict() for e in self.cpu],
            "cuda": [e.to_dict() for e in self.cuda],
            "fit": self.fit.to_dict(),
            "training": self.training.to_dict() if self.training is not None else None,
            "recommended_batch_size": self.recommended_batch_size,
        }

    # -- sections --------------------------------------------------------------------------------

    def _arithmetic(self) -> str:
        n, size = self.total_params, self.element_size
        label_w = max(len(lin.label) for lin in self.linears)
        expr_w = max(len(lin.expression) for lin in self.linears)
        num_w = len(f"{n:,}")
        total = tr("total")
        label_w = max(label_w, cell_len(total))
        lines = [tr("The parameters, counted by hand as the lesson does:")]
        lines += [
            f"  {lin.label.ljust(label_w)}  {lin.expression.rjust(expr_w)} = {lin.params:>{num_w},}"
            for lin in self.linears
        ]
        lines.append(
            f"  {total}{' ' * (label_w - cell_len(total))}  {''.rjust(expr_w)}   {n:,}  "
            + tr("(the summary counts {n:,})", n=self.summary.total_params)
        )
        b = self.param_bytes
        exact = f"{b:,} B = {format_bytes(b, 'KiB', 1)} = {format_bytes(b, 'KB', 1)}"
        lines += [
            tr(
                "  bytes: {n:,} x {size} B = {exact}   (the lesson: {lesson})",
                n=n,
                size=size,
                exact=exact,
                lesson=SEED_PARAM_BYTES,
            ),
            tr(
                "  gradients: the same count and dtype, {b:,} B; parameters + gradients = {b2:,} B = {kib} = {kb}"
                "   (the lesson: {lesson})",
                b=b,
                b2=2 * b,
                kib=format_bytes(2 * b, "KiB", 1),
                kb=format_bytes(2 * b, "KB", 1),
                lesson=SEED_MODEL_STATES,
            ),
            tr("  optimizer state: SGD keeps none; Adam keeps two values per parameter, {b2:,} B", b2=2 * b),
            tr(
                "  one image: {n:,} B as uint8, {n4:,} B as float32",
                n=self.sample_numel,
                n4=self.sample_numel * 4,
            ),
        ]
        return "\n".join(lines)

    def seed_table(self) -> Table:
        rows: list[Sequence[str]] = []
        for seed, cpu in zip(SEED_TABLE, self.cpu):
            inter = cpu.breakdown.get("activations", 0) + cpu.breakdown.get("temporaries", 0)
            rows.append(
                [
                    f"{seed.batch_size:,}",
                    seed.data,
                    format_bytes(cpu.breakdown.get("inputs", 0)),
                    seed.intermediates,
                    format_bytes(inter),
                    seed.total,
                    f"{cpu.peak_allocated_bytes:,} B",
                    format_bytes(cpu.peak_allocated_bytes, "MB"),
                ]
            )
        return Table(
            tr("The lesson's table (SGD) as the lesson states it, beside batchfit's CPU step (exact; its peak)"),
            [
                tr("batch"),
                tr("data (lesson)"),
                tr("inputs"),
                tr("intermediates (lesson)"),
                tr("activ. + temps"),
                tr("total (lesson)"),
                tr("one CPU step"),
                tr("in MB"),
            ],
            rows,
            footer=[
                tr(
                    "inputs: the images and their int64 labels; activ. + temps: saved for backward + everything else "
                    "alive at the peak (parameters and gradients make up the rest)"
                ),
                tr(
                    "KiB = 1024 B, MiB = 1024^2 B; MB = 10^6 B. A real CPU training step measures the same, to the byte."
                ),
            ],
        )

    def cuda_table(self) -> Table:
        rows: list[Sequence[str]] = []
        for e in self.cuda:
            reserved = e.peak_reserved_bytes or 0
            total = e.total_bytes or 0
            rows.append(
                [
                    f"{e.batch_size:,}",
                    format_bytes(e.peak_allocated_bytes, "MiB"),
                    format_bytes(e.breakdown.get("workspaces", 0), "MiB"),
                    format_bytes(reserved, "MiB"),
                    format_bytes(total - reserved, "MiB"),
                    format_bytes(total, "MiB"),
                ]
            )
        return Table(
            tr("The same steps on a GPU: {card} (simulated)", card=self.fit.card),
            [
                tr("batch"),
                tr("allocated (max_memory_allocated)"),
                tr("of which cuBLAS"),
                tr("reserved (max_memory_reserved)"),
                tr("CUDA context"),
                tr("total (nvidia-smi)"),
            ],
            rows,
            footer=[tr("card: {card}", card=self.fit.budget_description)],
        )

    def _misses(self) -> str:
        first_cpu, last_cpu = self.cpu[0], self.cpu[-1]
        first_cuda, last_cuda = self.cuda[0], self.cuda[-1]
        budget = self.fit.budget
        card = budget.card if budget is not None else None
        params_cpu = first_cpu.breakdown["parameters"]
        params_cuda = first_cuda.breakdown["parameters"]
        lines = [tr("What the hand count misses:")]

        def temps(e: StepEstimate) -> str:
            return format_bytes(e.breakdown.get("temporaries", 0))

        lines.append(
            tr(
                "  1. The backward pass's temporaries. The step's peak is in the backward pass, where the gradients "
                "of the activations and the weight gradient being computed are alive while the saved activations "
                "still are: at batch {b1:,} the peak is {where1} ({temps1} of temporaries, {grads1} of gradients); "
                "at batch {b2:,} it is {where2} ({temps2} of temporaries beside {acts2} of saved activations).",
                b1=first_cpu.batch_size,
                where1=first_cpu.peak_where,
                temps1=temps(first_cpu),
                grads1=format_bytes(first_cpu.breakdown["gradients"]),
                b2=last_cpu.batch_size,
                where2=last_cpu.peak_where,
                temps2=temps(last_cpu),
                acts2=format_bytes(last_cpu.breakdown["activations"]),
            )
        )
        reserve = (last_cuda.peak_reserved_bytes or 0) - last_cuda.peak_allocated_bytes
        lines.append(
            tr(
                "  2. The caching allocator (CUDA). Every block is rounded up to 512 B (the {tensors} parameter "
                "tensors take {cuda:,} B instead of {cpu:,} B) and blocks come from cached segments (2 MiB for "
                "requests up to 1 MiB, 20 MiB for 1-10 MiB): at batch {batch:,} the allocator reserves {reserve} "
                "more than the tensors need.",
                tensors=self.param_tensors,
                cuda=params_cuda,
                cpu=params_cpu,
                batch=last_cuda.batch_size,
                reserve=format_bytes(reserve, "MiB"),
            )
        )
        if card is not None:
            workspaces = first_cuda.breakdown.get("workspaces", 0)
            lines.append(
                tr(
                    "  3. The cuBLAS workspaces: {each} per cuBLAS handle on this card, taken through the allocator "
                    "({total} in this step, the forward runs on the calling thread and the backward on autograd's, "
                    "each with its own handle), at every batch size.",
                    each=format_bytes(card.cublas_workspace_bytes, "MiB"),
                    total=format_bytes(workspaces, "MiB"),
                )
            )
            lines.append(
                tr(
                    "  4. The CUDA context: {size} that PyTorch's allocator never sees (kernels, driver state) but "
                    "nvidia-smi shows: torch.cuda.max_memory_allocated() leaves it out [the catalogue's figure: "
                    "{status}].",
                    size=format_bytes(card.non_allocator_bytes, "MiB"),
                    status=card.provenance.get("non_allocator", "?"),
                )
            )
        return "\n".join(lines)

    def _batch_size(self) -> str:
        f = self.fit
        raw = math.floor(f.safety * f.max_batch_size)
        lines = [
            tr(
                "The batch size to use (the lesson's rule: about {safety:g} x the largest batch that fits):",
                safety=f.safety,
            ),
            "  " + tr("card: {card}", card=f.budget_description),
            tr(
                "  largest batch that fits: {max:,}; {safety:g} x {max:,} = {raw:,}",
                max=f.max_batch_size,
                safety=f.safety,
                raw=raw,
            ),
        ]
        rec = f.estimate_at_recommended
        at = (
            tr(" ({size} on the card, GiB = 1024^3 B)", size=format_bytes(rec.total_bytes, "GiB"))
            if rec and rec.total_bytes
            else ""
        )
        lines += [tr("  note: {note}", note=n) for n in f.notes]
        if self.training is None:
            lines.append(tr("  => use batch size {batch:,}{at}", batch=f.recommended_batch_size, at=at))
        else:
            lines.append(tr("  => memory allows batch size {batch:,}{at}", batch=f.recommended_batch_size, at=at))
        return "\n".join(lines)

    def training_table(self) -> Table:
        t = self.training
        assert t is not None
        return t.runs_table(
            tr(
                "Training by batch size: {samples:,} samples ({budget}) each, {optimizer}, lr {lr:g} at batch {batch} "
                "scaled {scaling} with warm-up, seed {seed}, on this machine's {device}",
                samples=t.samples,
                budget=t.budget_text,
                optimizer=t.optimizer,
                lr=t.base_lr,
                batch=t.base_batch,
                scaling=t.lr_scaling,
                seed=t.seed,
                device=t.device,
            ),
            speed=False,
        )

    def _training_intro(self) -> str:
        t = self.training
        assert t is not None
        f = self.fit
        return "\n".join(
            [
                tr(
                    "The other half of the lesson's rule: raise the batch size until memory runs out OR until the "
                    "training effect drops, and check the choice by the training effect."
                ),
                (
                    tr(
                        "  The memory rule alone gives {batch:,} - the whole MNIST training set in one step, one "
                        "update per epoch.",
                        batch=f.recommended_batch_size,
                    )
                    if f.dataset_size and f.recommended_batch_size >= f.dataset_size
                    else tr("  The memory rule alone gives {batch:,}.", batch=f.recommended_batch_size)
                ),
                tr(
                    "  What was computed, and on what: real training runs on scikit-learn's bundled 8x8 digits "
                    "({train:,} training and 360 validation images; no MNIST files ship with batchfit and "
                    "nothing is downloaded), with the lesson's MLP adapted to 8x8 inputs: Flatten -> Linear(64, 128) "
                    "-> ReLU -> Linear(128, 10), {params:,} parameters. Each batch size trains from the same "
                    "initialisation on the same samples; the learning rate grows with the batch "
                    "(linear rule, Goyal et al. 2017).",
                    train=t.train_size,
                    params=64 * 128 + 128 + 128 * 10 + 10,
                ),
            ]
        )

    def _training_answer(self) -> str:
        t = self.training
        assert t is not None
        f = self.fit
        lines = [
            tr("  gradient noise scale (McCandlish et al. 2018), {n:,} examples:", n=t.noise[0].samples)
            if t.noise
            else ""
        ]
        for n in t.noise:
            value = f"{n.b_simple:,.0f}" if n.resolved else tr("not resolved")
            lines.append(f"    B_simple = {value} {n.when}")
        if t.noise:
            lines.append(
                tr(
                    "    (batches much larger than B_simple mostly average away noise that is already small: "
                    "more samples per step, little more progress per step)"
                )
            )
        lines.append(tr("  the sweep: {reason}", reason=t.reason))
        final = self.recommended_batch_size
        if final < f.recommended_batch_size:
            why = tr(
                "memory allows {memory:,}, but with a fixed budget of samples a larger batch means fewer updates, "
                "and on the digits the validation accuracy holds up to {final:,} only",
                memory=f.recommended_batch_size,
                final=final,
            )
        else:
            why = tr("memory, not the training effect, sets the limit here")
        lines.append(tr("  => use batch size {batch:,}: {why}.", batch=final, why=why))
        mnist, digits = get_dataset(SEED_DATASET), get_dataset(t.dataset)
        pixels = math.prod(mnist.shape) / math.prod(digits.shape)
        lines.append(
            tr(
                "  Limits: the digits stand in for MNIST (handwritten digits too, with {pixels:.0f} times fewer "
                "pixels and {images:.0f} times fewer training images); MNIST's own answer may differ - check it "
                "with `batchfit sweep mlp --dataset mnist --root DIR`. The best size also moves with the learning "
                "rate and the budget (see docs/sweep.md).",
                pixels=pixels,
                images=mnist.train_size / t.train_size,
            )
        )
        return "\n".join(line for line in lines if line)

    def _title(self) -> str:
        return tr(
            "batchfit: the lesson's answer key - the MNIST MLP (Flatten -> Linear(784, 128) -> ReLU -> "
            "Linear(128, 10)), one training step with SGD, fp32"
        )

    def sections(self) -> list[Table | str]:
        """The parts in order: text blocks and :class:`Table` objects."""
        parts: list[Table | str] = [
            self._title(),
            str(self.summary.classic),
            self._arithmetic(),
            self.seed_table(),
            self.cuda_table(),
            self._misses(),
            self._batch_size(),
        ]
        if self.training is not None:
            parts += [self._training_intro(), self.training_table(), self._training_answer()]
        return parts


def answer_key(
    *, gpu: str | None = None, memory: str | int | None = None, free: bool = False, training: bool = True
) -> AnswerKey:
    """The seed lesson's scenario, computed: what ``batchfit`` with no arguments prints.

    The card is the local GPU, else the catalogue's default (``gpu``/``memory``/``free`` as in fit).
    ``training``: also the training-effect half (a short sweep and the noise scale on the bundled
    digits, :data:`SEED_SWEEP`; about a second of CPU here).

    >>> key = answer_key(gpu="h100", training=False)
    >>> [e.peak_allocated_bytes for e in key.cpu]
    [1050712, 1760344, 5245528, 19745368]
    """
    from torch import nn

    workload = load_workload(SEED_MODEL, dataset=SEED_DATASET)
    classic = summary(workload, style="classic")
    linears = [
        LinearCount(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in workload.model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    params = list(workload.model.parameters())
    sizes = [r.batch_size for r in SEED_TABLE]
    on_cpu = Estimator(workload, make_spec("cpu", SEED_OPTIMIZER))
    result = fit(workload, gpu=gpu, memory=memory, free=free, optimizer=SEED_OPTIMIZER, safety=SEED_SAFETY)
    effect = None
    if training:
        from ._sweep import sweep

        effect = sweep(SEED_MODEL, **SEED_SWEEP)
    return AnswerKey(
        summary=classic,
        linears=linears,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        param_tensors=len(params),
        element_size=params[0].element_size(),
        sample_numel=workload.inputs[0].numel,
        cpu=[on_cpu.at(b) for b in sizes],
        cuda=[result.estimate_at(b) for b in sizes],
        fit=result,
        training=effect,
    )


__all__ = ["SEED_SWEEP", "SEED_TABLE", "AnswerKey", "LinearCount", "SeedRow", "answer_key"]
