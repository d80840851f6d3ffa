"""Ground truth: the reference step run for real on this machine's device, and measured.

On CPU the profiler's memory events give the peak (bytes alive before the window + the highest
running sum of allocations inside it); on CUDA the caching allocator's own counters do
(``max_memory_allocated`` / ``max_memory_reserved``) and the driver tells what the process holds.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.stateless import _reparametrize_module

from ._errors import BatchfitError, ExitCode
from ._step import StepSpec, cpu_threads, label_choice, run_step, train_mode, unique_trainable
from .models import Workload, real_state


@dataclass
class Measurement:
    """What one real reference step used."""

    batch_size: int
    device: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None  # whole process on the card (mem_get_info), CUDA only
    before_window_bytes: int = 0
    seconds: float = 0.0
    timeline: list[tuple[int, int]] = field(default_factory=list)  # (running bytes, delta), CPU only
    threads: int | None = None  # CPU: torch's intra-op threads the step ran with
    loss: str | None = None  # which loss the step trained on, in words (None: inference)

    @property
    def samples_per_second(self) -> float:
        return self.batch_size * 2 / self.seconds if self.seconds > 0 else 0.0

    def _repr_html_(self) -> str:
        from ._html import fragment, measurement_html

        return fragment(measurement_html(self))


def _storage_bytes(objects: list[Any]) -> int:
    """Bytes of the distinct storages among the tensors in ``objects`` (nested containers too)."""
    from torch.utils._pytree import tree_leaves

    seen: dict[int, int] = {}
    for t in tree_leaves(objects):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure_step(
    workload: Workload,
    batch_size: int,
    spec: StepSpec,
    *,
    keep_timeline: bool = False,
    explain_errors: bool = True,
) -> Measurement:
    """Run the reference step for real on ``spec.device`` and measure its peak memory.

    The model runs on the values of the workload's ``example_inputs`` (a model may read them:
    detection targets, sequence lengths). An exception raised while the step runs (the model's
    own code, the loss, the optimizer) becomes a :class:`BatchfitError` (exit code 3) carrying its
    message; ``explain_errors=False`` lets it through as raised (``probe`` tells out-of-memory from
    other failures by the exception).
    """
    where = ["setting up"]  # the phase running, for the message when the step fails
    try:
        with cpu_threads(spec.threads if spec.device == "cpu" else None):
            return _measure_step(workload, batch_size, spec, keep_timeline, where)
    except BatchfitError:
        raise
    except Exception as exc:
        if not explain_errors:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BatchfitError(
            f"a real training step of {workload.name!r} failed ({where[0]}, batch size {batch_size}): "
            f"{type(exc).__name__}{': ' + text if text else ''}",
            hint="a real run uses your example_inputs' values (noise and zeros for --input shapes): check "
            "them and the model; rerun with --debug for the traceback",
        ) from exc


def _measure_step(
    workload: Workload, batch_size: int, spec: StepSpec, keep_timeline: bool, where: list[str]
) -> Measurement:
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            "measuring on CUDA needs a GPU, and this machine has none",
            hint="use `batchfit estimate` (no GPU needed), or `--device cpu` to measure a CPU run",
            exit_code=ExitCode.NO_DEVICE,
        )
    model = workload.model
    param_dtype = spec.precision.param_dtype if spec.precision.param_dtype != torch.float32 else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.ExitStack() as stack:
        stack.enter_context(train_mode(model, spec.mode == "train"))
        state = real_state(model, device, dtype=param_dtype)
        inputs = workload.make_inputs(batch_size, device, values=True)
        if param_dtype is not None:
            inputs = inputs.floating_to(param_dtype)
        stack.enter_context(_reparametrize_module(model, state, tie_weights=True))
        optimizer = None
        if spec.mode == "train":
            params = unique_trainable(model)
            if not params:
                raise BatchfitError("the model has no trainable parameters", hint="use --mode inference")
            optimizer = spec.optimizer.build(params, device_type=device.type)
        labels = None
        if spec.mode == "train":
            where[0] = "in the forward that shapes the labels"
            choice = label_choice(model, inputs, spec)
            labels = choice.labels()
            del choice
        scaler = None
        if spec.precision.grad_scaler and spec.mode == "train":
            scaler = torch.amp.GradScaler(device.type)
        # and what the optimizer's constructor allocated (bitsandbytes' quantisation maps)
        held = [v for v in vars(optimizer).values() if isinstance(v, dict)] if optimizer is not None else []
        before = _storage_bytes([*state.values(), *inputs.tensors(), labels, *held])
        gc.collect()
        runner = _CudaWindow(device) if device.type == "cuda" else _CpuWindow(before)
        start = time.perf_counter()
        with runner:
            loss = run_step(
                model,
                inputs,
                spec,
                optimizer,
                backward=lambda loss: loss.backward(),
                labels=labels,
                scaler=scaler,
                on_phase=lambda phase, iteration: where.__setitem__(0, f"in {phase}, iteration {iteration}"),
            )
        seconds = time.perf_counter() - start
        result = runner.result(batch_size, spec.device, seconds, keep_timeline)
        result.before_window_bytes = before
        result.loss = loss
        result.threads = torch.get_num_threads() if device.type == "cpu" else None
        del state, inputs, labels, optimizer, scaler
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


class _CpuWindow:
    """Peak host memory of the window from the profiler's allocation events."""

    def __init__(self, before: int) -> None:
        self.before = before
        self.prof: Any = None

    def __enter__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self.prof.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.prof.__exit__(*exc)

    def result(self, batch_size: int, device: str, seconds: float, keep_timeline: bool) -> Measurement:
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        running = peak = 0
        timeline = []
        for e in events:
            if e.device_type() != torch.device("cpu").type and str(e.device_type()) != "DeviceType.CPU":
                continue
            running += e.nbytes()
            peak = max(peak, running)
            if keep_timeline:
                timeline.append((running, e.nbytes()))
        return Measurement(batch_size, device, self.before + peak, seconds=seconds, timeline=timeline)


class _CudaWindow:
    """Peak device memory from the caching allocator's counters and the driver."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.used_peak = 0

    def __enter__(self) -> None:
        torch.cuda.synchronize(self.device)
        # the labels' no-grad forward left cached segments: give them back, so the window starts
        # with what the set-up tensors hold (the estimate's starting point), then reset the peaks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        self.used_peak = total - free

    def result(self, batch_size: int, device: str, seconds: float, keep_timeline: bool) -> Measurement:
        return Measurement(
            batch_size,
            device,
            torch.cuda.max_memory_allocated(self.device),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device),
            device_used_bytes=self.used_peak,
            seconds=seconds,
        )
