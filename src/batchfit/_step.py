"""The reference loop, written once: traced on fake tensors, measured for real, probed on a GPU.

Before the window: model (train mode), optimizer (no state), one batch of inputs and labels.
Then ``iterations`` times the loop users write (``--loop pytorch``, the default; PyTorch's
quickstart tutorial, ``train()``)::

    outputs = model(*args, **kwargs)         # the previous outputs die here, when the name is rebound
    loss = loss_fn(outputs, labels)          # the previous loss likewise
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()                    # set_to_none=True, the default since torch 2.0

``--loop hf-trainer`` and ``--loop lightning`` run those libraries' loops instead (see
:data:`LOOPS`, each with its source). A training run's tail (an epoch's last, smaller batch, an
evaluation pass under ``no_grad`` and the next epoch's first step) can follow (:func:`tail_sizes`).

What differs between a trace and a real run is passed in: how backward runs (a replay of the
engine on fake tensors, or ``loss.backward()``), the grad scaler, new batches, and a callback per phase.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from ._errors import BatchfitError
from ._i18n import tr
from ._models import ModelInputs
from ._training import (
    AUTO_LOSS,
    LOSSES,
    LossChoice,
    LossLike,
    LossSpec,
    OptimizerLike,
    OptimizerSpec,
    Precision,
    StepFn,
    StepLike,
    choose_loss,
    first_tensor,
    output_is_loss,
    parse_loss,
    parse_optimizer,
    parse_precision,
    parse_step,
)

if TYPE_CHECKING:
    from ._models import Workload


DEVICES = ("cuda", "cpu")
MODES = ("train", "inference")  # a training step, or one forward under no_grad


@dataclass
class StepSpec:
    """Everything the reference step needs besides the model and its inputs."""

    device: str
    optimizer: OptimizerSpec
    precision: Precision
    loss: LossSpec
    mode: str = "train"  # or "inference" (MODES)
    step: StepFn | None = None
    iterations: int = 2
    threads: int | None = None  # CPU: torch's intra-op threads for the step (kernel scratch depends on it)
    loop: str = "pytorch"  # a key of LOOPS
    # a training run's tail after the steady iterations (see tail_sizes): the epoch's last batch
    # (a size, or "auto": the dataset's size modulo the batch size) and an evaluation pass
    last_batch: int | str | None = None
    eval_batch_size: int | None = None
    # gradient accumulation: micro-batches (of the batch size) per optimizer step (see _pytorch_loop)
    grad_accum: int = 1

    @property
    def has_tail(self) -> bool:
        return self.mode == "train" and (self.last_batch is not None or self.eval_batch_size is not None)


class Scaler(Protocol):
    def scale(self, loss: torch.Tensor) -> torch.Tensor: ...
    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...
    def update(self) -> None: ...


@contextlib.contextmanager
def autocast(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` that also works for fake CUDA tensors on a machine without a GPU.

    ``torch.autocast("cuda")`` disables itself when CUDA is unavailable (a Python-side check);
    setting the autocast state directly applies CUDA's autocast op lists to fake CUDA tensors,
    and on a real GPU does what ``torch.autocast`` does.
    """
    if dtype is None:
        yield
        return
    prev_enabled = torch.is_autocast_enabled(device_type)
    prev_dtype = torch.get_autocast_dtype(device_type)
    prev_cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.set_autocast_cache_enabled(True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev_enabled)
        torch.set_autocast_dtype(device_type, prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


@contextlib.contextmanager
def gpu_autocast_checks(device_type: str) -> Iterator[None]:
    """While a step runs on fake CUDA tensors without a GPU, ``torch.autocast("cuda")`` enables itself
    as on a GPU.

    Code batchfit does not run itself enters autocast: torch.utils.checkpoint re-enters the forward's
    state for its recomputation (checkpoint.py, ``CheckpointFunction.backward`` and
    ``_checkpoint_without_reentrant_generator``'s ``recompute_fn``: ``torch.amp.autocast(device_type,
    **device_autocast_kwargs)``), and so may a user's step. ``autocast.__init__``
    (torch/amp/autocast_mode.py) disables itself where ``torch.cuda.amp.common.amp_definitely_not_available()``
    (no CUDA) and refuses bf16 where ``torch.cuda.is_bf16_supported()`` is False (always without
    CUDA): the recomputation then ran in fp32 after an fp16/bf16 forward, and checkpoint's metadata
    check failed. Both answer as a GPU would until the step ends; nothing changes where CUDA exists.
    """
    if device_type != "cuda" or torch.cuda.is_available():
        yield
        return
    common = torch.cuda.amp.common
    saved = common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    setattr(common, "amp_definitely_not_available", lambda: False)  # noqa: B010 (a module attribute, patched)
    setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # noqa: B010
    try:
        yield
    finally:
        setattr(common, "amp_definitely_not_available", saved[0])  # noqa: B010
        setattr(torch.cuda, "is_bf16_supported", saved[1])  # noqa: B010


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` and give the previous count back (None: as it is).

    CPU kernels size their scratch by the thread count (oneDNN's convolutions keep a buffer per
    thread), so a CPU step is simulated and measured at the count the user's run will have.
    """
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def train_mode(model: nn.Module, train: bool | None) -> Iterator[None]:
    """Set train/eval (``None``: leave each module as it is) for the step or forward, and give every
    submodule its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if train is not None:
            model.train(train)  # through train() so that models overriding it behave as they would
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def unique_trainable(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def label_choice(model: nn.Module, inputs: ModelInputs, spec: StepSpec) -> LossChoice:
    """The loss the step will use, from a no-grad forward (labels are made from it before the window).

    A user's ``--step`` computes its own loss: its labels follow the output's first tensor.
    """
    with torch.no_grad(), autocast(spec.device, spec.precision.autocast_dtype):
        out = inputs.call(model)
    if spec.step is None:
        return choose_loss(out, spec.loss)
    if output_is_loss(out) is not None:
        return LossChoice("computed by your --step")
    target, _ = first_tensor(out)
    labels_like = LOSSES["token-cross-entropy"] if spec.loss is AUTO_LOSS else spec.loss
    return LossChoice("computed by your --step", labels_like, target)


@dataclass
class Batch:
    """One batch on the device; the loop owns it, so that a new batch can replace it (the old one dies)."""

    inputs: ModelInputs
    labels: Any = None

    def release(self) -> None:
        """Drop the tensors (in place: whoever holds this batch no longer keeps them alive)."""
        self.inputs, self.labels = ModelInputs(), None


LabelsLike = tuple[tuple[int, ...], torch.dtype, torch.device]


def batch_inputs(
    workload: Workload,
    batch_size: int,
    device: torch.device | str,
    param_dtype: torch.dtype | None,
    *,
    values: bool = False,
) -> ModelInputs:
    """The workload's inputs at ``batch_size``, floating ones in the parameters' dtype (pure bf16/fp16);
    ``values``: the example inputs' own values (a real run), see ``Workload.make_inputs``."""
    inputs = workload.make_inputs(batch_size, device, values=values)
    return inputs.floating_to(param_dtype) if param_dtype is not None else inputs


def batch_maker(
    workload: Workload, device: torch.device | str, param_dtype: torch.dtype | None, *, values: bool = False
) -> Callable[[int, LabelsLike | None], Batch]:
    """``new_batch(size, labels_like)`` for :func:`run_step`: inputs, and zero labels shaped like the first ones."""

    def make(size: int, like: LabelsLike | None) -> Batch:
        inputs = batch_inputs(workload, size, device, param_dtype, values=values)
        labels = None
        if like is not None:
            shape, dtype, on = like
            labels = torch.zeros((size, *shape), dtype=dtype, device=on)
        return Batch(inputs, labels)

    return make


def _label_shape(labels: Any) -> LabelsLike | None:
    """What labels for another batch size look like (their leading dimension is the batch)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
        return None
    return tuple(labels.shape[1:]), labels.dtype, labels.device


class Tail(NamedTuple):
    """What a training run adds after the steady steps (batch sizes; None: not modelled)."""

    batch_size: int  # the steady batch, which the next epoch's first step uses again
    last_batch: int | None = None
    eval_batch_size: int | None = None

    def __bool__(self) -> bool:
        return self.last_batch is not None or self.eval_batch_size is not None


def tail_sizes(spec: StepSpec, batch_size: int, dataset_size: int | None) -> Tail:
    """The tail of a training run at ``batch_size``: the epoch's last batch and the evaluation batch.

    The last batch is ``--last-batch N``, or with ``auto`` the training set's size modulo the batch
    size (``DataLoader(drop_last=False)``); None when the epoch divides evenly or it is not smaller.

    >>> tail_sizes(make_spec("cpu", last_batch="auto", eval_batch_size=256), 64, 60000)
    Tail(batch_size=64, last_batch=32, eval_batch_size=256)
    """
    if spec.mode != "train":
        return Tail(batch_size)
    last = spec.last_batch
    if last == "auto":
        last = dataset_size % batch_size if dataset_size else None
    assert last is None or isinstance(last, int)
    if last is not None and not 0 < last < batch_size:
        last = None
    return Tail(batch_size, last, spec.eval_batch_size)


@dataclass
class _Run:
    """What one loop needs; the loops below differ only in what they keep alive, and when."""

    model: nn.Module
    spec: StepSpec
    optimizer: torch.optim.Optimizer
    batch: Batch | None
    backward_fn: Callable[[torch.Tensor], None]
    make_labels: Callable[[LossChoice], Any] | None
    new_batch: Callable[[int, LabelsLike | None], Batch] | None
    scaler: Scaler | None
    on_phase: Callable[[str, int], None]
    after_step: Callable[[torch.optim.Optimizer], None]
    window_only: bool
    state: dict[str, Any]  # what a loop keeps across epochs (the Trainer's running loss)
    labels_like: LabelsLike | None = None
    described: str | None = None  # which loss ran, in words

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.spec.device, self.spec.precision.autocast_dtype)

    def forward(self) -> Any:
        assert self.batch is not None
        return self.batch.inputs.call(self.model)

    def criterion(self, outputs: Any) -> torch.Tensor:
        """The model's own loss, else ``loss_fn(outputs, labels)`` (labels made on first use)."""
        assert self.batch is not None
        choice = choose_loss(outputs, self.spec.loss)
        if self.batch.labels is None and self.make_labels is not None and choice.target is not None:
            self.batch.labels = self.make_labels(choice)
        self.described = choice.description
        loss = choice.loss(outputs, self.batch.labels)
        del choice  # the choice holds the logits: they go when the output goes
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, or ``scaler.scale(loss).backward()`` (the scaled loss dies after it)."""
        self.backward_fn(self.scaler.scale(loss) if self.scaler is not None else loss)

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.after_step(self.optimizer)

    def user_step(self) -> None:
        assert self.spec.step is not None and self.batch is not None
        self.spec.step(self.model, self.batch.inputs.as_given(), self.batch.labels, self.optimizer)

    def swap_batch(self, size: int | None, *, old_first: bool = True) -> None:
        """A new batch of ``size`` replaces the current one (None: the same batch again).

        ``old_first``: the previous batch is released before the new one reaches the device, as in
        ``for x, y in loader: x, y = x.to(device), y.to(device)`` (the ``for`` rebinds the names to
        host tensors first); else the new one arrives while the old one is still referenced.
        """
        if size is None:
            return
        assert self.new_batch is not None
        old = self.batch
        if old is not None:
            self.labels_like = _label_shape(old.labels) or self.labels_like
            if old_first:
                old.release()
        self.batch = self.new_batch(size, self.labels_like)
        if old is not None:
            old.release()

    def end_pass(self) -> None:
        """A pass (``train()``, ``test()``) returns: its batch, a local there, dies."""
        if self.batch is not None:
            self.labels_like = _label_shape(self.batch.labels) or self.labels_like
            self.batch.release()
        self.batch = None


# One iteration plan: (iteration number, the batch size it starts with, or None for the same batch).
_Plan = list[tuple[int, int | None]]
LoopFn = Callable[[_Run, _Plan, bool], None]


def _pytorch_loop(r: _Run, plan: _Plan, last: bool) -> None:
    """PyTorch's quickstart tutorial, ``train()`` (the canonical loop; see LOOPS).

    With gradient accumulation (``grad_accum`` K > 1), each iteration is K micro-batches and one
    optimizer step, as PyTorch's AMP examples write it ("Gradient accumulation",
    docs/source/notes/amp_examples.rst): ``loss = loss_fn(output, target); loss = loss / K`` under
    autocast, backward every micro-batch, the step and ``zero_grad`` after the K-th. Every
    micro-batch reuses the iteration's batch, as the steady iterations do.
    """
    it = 0
    outputs: Any = None
    loss: torch.Tensor | None = None
    accum = r.spec.grad_accum
    for it, size in plan:
        r.on_phase("forward", it)
        r.swap_batch(size)
        if r.spec.step is not None:
            r.user_step()
            continue
        for micro in range(accum):
            if micro:
                r.on_phase("forward", it)
            with r.autocast():
                outputs = r.forward()  # the previous iteration's outputs are alive until this returns
                loss = r.criterion(outputs)
                if accum > 1:
                    loss = loss / accum  # the unscaled loss dies here
            r.on_phase("backward", it)
            r.backward(loss)
        if r.window_only:
            break
        r.on_phase("optimizer", it)
        r.optimizer_step()
        r.optimizer.zero_grad(set_to_none=True)
    if last:
        r.on_phase("end", it)  # while this frame's variables are still alive


def _hf_training_step(r: _Run, it: int) -> torch.Tensor:
    """transformers' ``Trainer.training_step`` with ``Trainer.compute_loss`` (trainer.py)."""
    with r.autocast():
        loss = _hf_compute_loss(r)  # the model's outputs died with compute_loss's frame
    r.on_phase("backward", it)
    r.backward(loss)  # Accelerator.backward: loss.backward(), or scaler.scale(loss).backward()
    return loss.detach()


def _hf_compute_loss(r: _Run) -> torch.Tensor:
    outputs = r.forward()
    return r.criterion(outputs)


def _hf_trainer_loop(r: _Run, plan: _Plan, last: bool) -> None:
    """transformers' ``Trainer._run_epoch`` (trainer.py), with ``TrainingArguments`` defaults."""
    it = 0
    if "tr_loss" not in r.state:  # Trainer._inner_training_loop: self._tr_loss = torch.tensor(0.0), once
        r.state["tr_loss"] = torch.zeros((), device=r.spec.device)
    tr_loss = r.state["tr_loss"]
    tr_loss_step: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    for it, size in plan:
        r.on_phase("forward", it)
        r.swap_batch(size, old_first=False)  # accelerate's DataLoaderShard yields the next batch on the device
        tr_loss_step = _hf_training_step(r, it)
        if r.window_only:
            break
        r.on_phase("optimizer", it)  # what follows backward sees no batch-sized tensor
        # logging_nan_inf_filter=True: torch.isnan(tr_loss_step) or torch.isinf(tr_loss_step)
        _finite_checks(tr_loss_step)
        tr_loss += tr_loss_step
        # max_grad_norm=1.0: Accelerator.clip_grad_norm_ -> torch.nn.utils.clip_grad_norm_, whose
        # total norm the loop keeps in grad_norm until the next step rebinds it
        grad_norm = torch.nn.utils.clip_grad_norm_(unique_trainable(r.model), 1.0, foreach=True)
        r.optimizer_step()
        r.model.zero_grad()  # set_to_none=True
    if last:
        r.on_phase("end", it)
    del tr_loss_step, grad_norm


def _finite_checks(t: torch.Tensor) -> None:
    """``torch.isnan(t) or torch.isinf(t)`` as Python runs it on a finite value: each test's
    result dies before the next is made. (Not evaluated: a fake tensor has no value.)"""
    nan = torch.isnan(t)
    del nan
    inf = torch.isinf(t)
    del inf


def _lightning_loop(r: _Run, plan: _Plan, last: bool) -> None:
    """Lightning's automatic optimization (``_AutomaticOptimization``, ``Closure``; see LOOPS)."""
    it = 0
    for it, size in plan:
        r.on_phase("forward", it)
        r.swap_batch(size)
        if r.window_only:
            _lightning_closure(r, it, window_only=True)
            break
        batch_output = _lightning_run(r, it)
        del batch_output  # _TrainingEpochLoop.advance returns: its batch_output dies
    if last:
        r.on_phase("end", it)


def _lightning_run(r: _Run, it: int) -> dict[str, torch.Tensor]:
    """``_AutomaticOptimization.run``: ``optimizer.step(closure)``, then the result's detached loss."""
    result: dict[str, Any] = {}

    def closure() -> torch.Tensor:
        result.update(_lightning_closure(r, it, window_only=False))
        r.on_phase("optimizer", it)  # the optimizer's update follows the closure inside step()
        return result["loss"]  # type: ignore[no-any-return]

    if r.scaler is not None:  # MixedPrecision.optimizer_step: the closure first, then scaler.step
        closure()
        r.optimizer_step()
    else:
        # typed as returning a float; Lightning's closure returns the detached loss tensor
        r.optimizer.step(closure)  # type: ignore[arg-type]
        r.after_step(r.optimizer)
    return {"loss": result.pop("loss")}  # ClosureResult.asdict(); the closure loss dies with the result


def _lightning_closure(r: _Run, it: int, *, window_only: bool) -> dict[str, torch.Tensor]:
    """``Closure.closure``: training_step, ``ClosureResult`` (loss / 1, a detached clone), zero_grad, backward."""
    with r.autocast():
        closure_loss = _lightning_training_step(r) / 1  # from_training_step_output(normalize=1)
    loss = closure_loss.detach().clone()
    r.optimizer.zero_grad(set_to_none=True)  # before backward: the last step's gradients live through forward
    r.on_phase("backward", it)
    r.backward(closure_loss)
    if window_only:
        r.on_phase("end", it)
    return {"closure_loss": closure_loss, "loss": loss}


def _lightning_training_step(r: _Run) -> torch.Tensor:
    """A LightningModule's ``training_step``: the outputs are its locals, gone once it returns."""
    outputs = r.forward()
    return r.criterion(outputs)


@dataclass(frozen=True)
class Loop:
    """A training loop as a library runs it: what stays alive, and when gradients are cleared."""

    name: str
    run: LoopFn
    source: str


LOOPS: dict[str, Loop] = {
    "pytorch": Loop(
        "pytorch",
        _pytorch_loop,
        "PyTorch tutorials, Learn the Basics > Quickstart, train(): pred = model(X); loss = loss_fn(pred, y); "
        "loss.backward(); optimizer.step(); optimizer.zero_grad()",
    ),
    "hf-trainer": Loop(
        "hf-trainer",
        _hf_trainer_loop,
        "transformers 5.24 trainer.py: Trainer._run_epoch, Trainer.training_step, Trainer.compute_loss",
    ),
    "lightning": Loop(
        "lightning",
        _lightning_loop,
        "lightning/pytorch/loops/optimization/automatic.py: _AutomaticOptimization.run, Closure.closure, "
        "ClosureResult.from_training_step_output",
    ),
}


def parse_loop(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in LOOPS:
        raise BatchfitError(
            tr("unknown loop {name!r}", name=name),
            hint=tr("use one of {names}, or your own iteration as `step`", names=", ".join(LOOPS)),
        )
    return key


def make_spec(
    device: str = "cuda",
    optimizer: OptimizerLike = "sgd",
    precision: str | Precision = "fp32",
    loss: LossLike = None,
    step: StepLike = None,
    mode: str = "train",
    threads: int | None = None,
    *,
    loop: str = "pytorch",
    last_batch: int | str | None = None,
    eval_batch_size: int | None = None,
    grad_accum: int = 1,
) -> StepSpec:
    """Validate the step's settings into a :class:`StepSpec` (one place for all verbs).

    ``threads``: CPU only, torch's intra-op thread count of the run (default: this process's,
    ``torch.get_num_threads()``); CPU kernels' scratch depends on it.
    ``loop``: pytorch (the default), hf-trainer or lightning (see :data:`LOOPS`).
    ``last_batch`` (a size, or ``"auto"``: the dataset's size modulo the batch size) and
    ``eval_batch_size`` add a training run's tail to the step (docs/estimate.md). Messages name
    the parameters (`device='cpu'`); the command line shows its flags instead (cli/_app.py).
    ``grad_accum``: gradient accumulation, micro-batches of the batch size per optimizer step
    (``loop='pytorch'``; the Trainer's ``gradient_accumulation_steps``).

    >>> make_spec("cpu", "adam", threads=2).threads
    2
    """
    if device not in DEVICES:
        raise BatchfitError(
            tr("unknown device {device!r}", device=device), hint=tr("use `device='cuda'` or `device='cpu'`")
        )
    if threads is not None and device != "cpu":
        raise BatchfitError(tr("`threads` applies to `device='cpu'`"), hint=tr("drop it, or use `device='cpu'`"))
    if threads is not None and threads < 1:
        raise BatchfitError(
            tr("`threads` must be at least 1, got {threads}", threads=threads), hint=tr("e.g. `threads=4`")
        )
    if mode not in MODES:
        raise BatchfitError(tr("unknown mode {mode!r}", mode=mode), hint=tr("use `mode='train'` or `mode='inference'`"))
    prec = parse_precision(precision)
    if device == "cpu" and prec.name == "amp-fp16":
        raise BatchfitError(
            tr("amp-fp16 with a GradScaler is a CUDA recipe"), hint=tr("use `precision='amp-bf16'` on CPU")
        )
    opt: OptimizerSpec = parse_optimizer(optimizer)
    loop = parse_loop(loop)
    if step is not None and loop != "pytorch":
        raise BatchfitError(
            tr("`step` replaces the loop's iteration, so `loop='{loop}'` does not apply", loop=loop),
            hint=tr("write that library's step into your `step` function, or drop `step`"),
        )
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise BatchfitError(
            tr("`grad_accum` must be at least 1, got {grad_accum}", grad_accum=grad_accum),
            hint=tr("e.g. `grad_accum=8`"),
        )
    if grad_accum > 1 and (step is not None or loop != "pytorch" or mode != "train"):
        raise BatchfitError(
            tr("`grad_accum` is modelled for the training step of `loop='pytorch'`"),
            hint=tr("drop `step` / `loop` / `mode='inference'`, or write the accumulation into your `step` function"),
        )
    if isinstance(last_batch, str) and last_batch.strip().lower() != "auto":
        try:
            last_batch = int(last_batch)
        except ValueError:
            raise BatchfitError(
                tr("cannot read `last_batch={last_batch!r}`", last_batch=last_batch),
                hint=tr("give a batch size, or auto (needs `dataset`)"),
            ) from None
    if isinstance(last_batch, str):
        last_batch = "auto"
    for name, value in (("last_batch", last_batch), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, int) and value < 1:
            raise BatchfitError(
                tr("`{name}` must be at least 1, got {value}", name=name, value=value),
                hint=tr("e.g. `{name}=32`", name=name),
            )
    spec = StepSpec(
        device,
        opt,
        prec,
        parse_loss(loss),
        mode,
        parse_step(step),
        loop=loop,
        last_batch=last_batch,
        eval_batch_size=eval_batch_size,
        grad_accum=grad_accum,
    )
    if device == "cpu":
        spec.threads = threads or torch.get_num_threads()
    return spec


def run_step(
    model: nn.Module,
    batch: Batch,
    spec: StepSpec,
    optimizer: torch.optim.Optimizer | None,
    *,
    backward: Callable[[torch.Tensor], None],
    make_labels: Callable[[LossChoice], Any] | None = None,
    new_batch: Callable[[int, LabelsLike | None], Batch] | None = None,
    tail: Tail | None = None,
    scaler: Scaler | None = None,
    on_phase: Callable[[str, int], None] = lambda phase, iteration: None,
    after_step: Callable[[torch.optim.Optimizer], None] = lambda optimizer: None,
    window_only: bool = False,
) -> str | None:
    """Run the reference loop's window on ``batch`` (which the loop owns from here on); returns
    which loss ran, in words (None in inference).

    Labels missing from ``batch`` are made on first use by ``make_labels(choice)`` (which must
    file them as existing before the window). ``window_only``: stop after the first iteration's
    backward. ``tail`` (from :func:`tail_sizes`), when it holds a size: after the steady
    iterations, the epoch's last batch, an evaluation pass of two batches under ``no_grad`` in eval
    mode (``test()`` in the same tutorial), and the next epoch's first step; ``new_batch`` (from
    :func:`batch_maker`) makes their batches. ``on_phase(phase, iteration)`` is called as each
    phase begins, and with ``"end"`` as the step ends.
    """
    if spec.mode == "inference":
        on_phase("forward", 1)
        with torch.no_grad(), autocast(spec.device, spec.precision.autocast_dtype):
            out = batch.inputs.call(model)
        del out
        on_phase("end", 1)
        return None
    assert optimizer is not None
    r = _Run(
        model, spec, optimizer, batch, backward, make_labels, new_batch, scaler, on_phase, after_step, window_only, {}
    )
    del batch
    if spec.step is not None:
        r.described = "computed by your --step"
    with gpu_autocast_checks(spec.device):
        _run_loop(r, LOOPS[spec.loop].run, spec, window_only, tail)
    return r.described


def _run_loop(r: _Run, loop: LoopFn, spec: StepSpec, window_only: bool, tail: Tail | None) -> None:
    """The steady iterations, then the tail's passes when it holds a size (see :func:`run_step`)."""
    steady: _Plan = [(it, None) for it in range(1, spec.iterations + 1)]
    if window_only or not tail:
        loop(r, steady, True)
        return
    # the epoch: steady steps, then its last batch; each pass is a call, so its variables die with it
    n = spec.iterations
    loop(r, [*steady, *([(n + 1, tail.last_batch)] if tail.last_batch is not None else [])], False)
    r.end_pass()
    if tail.eval_batch_size is not None:
        _evaluate(r, [(n + 2, tail.eval_batch_size), (n + 3, tail.eval_batch_size)])
    loop(r, [(n + 4, tail.batch_size)], True)  # the next epoch's first step, on what the tail left behind


def _evaluate(r: _Run, plan: _Plan) -> None:
    """The quickstart's ``test()``: ``model.eval()``; under ``no_grad``, ``pred = model(X)`` and the loss as a number."""
    pred: Any = None
    with train_mode(r.model, False), torch.no_grad():
        for it, size in plan:
            r.on_phase("eval", it)
            r.swap_batch(size)
            with r.autocast():
                pred = r.forward()
                loss = r.criterion(pred)
            del loss  # test_loss += loss_fn(pred, y).item()
    del pred
    r.end_pass()
