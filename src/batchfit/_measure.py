"""Ground truth: the reference step run for real on this machine's device, and measured.

On CPU the profiler's memory events give the peak (bytes alive before the window + the highest
running sum of allocations inside it); on CUDA the caching allocator's own counters do
(``max_memory_allocated`` / ``max_memory_reserved``) and the driver tells what the process holds.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import BatchfitError, ExitCode
from ._i18n import tr
from ._models import Workload, real_state, state_in_place
from ._step import (
    Batch,
    StepSpec,
    batch_inputs,
    batch_maker,
    cpu_threads,
    label_choice,
    run_step,
    tail_sizes,
    train_mode,
    unique_trainable,
)


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
    # the last steady iteration alone (the first one also pays for cuBLAS handles, cuDNN's
    # algorithm search and the optimizer's state): the time to use for throughput; None with one iteration
    steady_seconds: float | None = None
    timeline: list[tuple[int, int]] = field(default_factory=list)  # (running bytes, delta), CPU only
    threads: int | None = None  # CPU: torch's intra-op threads the step ran with
    loss: str | None = None  # which loss the step trained on, in words (None: inference)

    @property
    def samples_per_second(self) -> float:
        """Of the steady iteration when it was timed, else of the whole two-iteration window."""
        if self.steady_seconds:
            return self.batch_size / self.steady_seconds
        return self.batch_size * 2 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values (``batchfit measure --json``'s results)."""
        return {
            "batch_size": self.batch_size,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_used_bytes": self.device_used_bytes,
            "device": self.device,
            "seconds": self.seconds,
            "steady_seconds": self.steady_seconds,
            "samples_per_second": self.samples_per_second,
        }

    def _repr_html_(self) -> str:
        from ._html import fragment, measurement_html

        return fragment(measurement_html(self))


class _SteadyClock:
    """Times the last steady iteration (the window's iteration ``last`` >= 2), synchronising a CUDA
    device at its ends so that the queued kernels are inside the time."""

    def __init__(self, device: torch.device, last: int) -> None:
        self.device, self.last = device, last
        self.begin: float | None = None
        self.end: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_phase(self, iteration: int) -> None:
        if self.last >= 2 and iteration == self.last and self.begin is None:
            self.begin = self._now()
        elif self.begin is not None and iteration > self.last and self.end is None:
            self.end = self._now()  # a training run's tail follows: not part of the steady step

    def stop(self) -> None:
        if self.begin is not None and self.end is None:
            self.end = self._now()

    @property
    def seconds(self) -> float | None:
        return self.end - self.begin if self.begin is not None and self.end is not None else None


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
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    on_phase: Callable[[str, int], None] | None = None,
) -> Measurement:
    """Run the reference step for real on ``spec.device`` and measure its peak memory.

    The model runs on the values of the workload's ``example_inputs`` (a model may read them:
    detection targets, sequence lengths). An exception raised while the step runs (the model's
    own code, the loss, the optimizer) becomes a :class:`BatchfitError` (exit code 3) carrying its
    message; ``explain_errors=False`` lets it through as raised (``probe`` tells out-of-memory from
    other failures by the exception). ``wrap(model)`` gives the module the loop calls (the
    distributed probe's ``DistributedDataParallel``), made after the set-up, with ``on_phase("setup", 0)``
    before it; ``on_phase(phase, iteration)`` is also called as each phase of the loop begins.
    """
    where = ["setting up"]  # the phase running, for the message when the step fails
    try:
        with cpu_threads(spec.threads if spec.device == "cpu" else None):
            return _measure_step(workload, batch_size, spec, keep_timeline, where, wrap, on_phase)
    except BatchfitError:
        raise
    except Exception as exc:
        if not explain_errors:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BatchfitError(
            tr(
                "a real training step of {model!r} failed ({where}, batch size {batch_size}): {error}{detail}",
                model=workload.name,
                where=where[0],
                batch_size=batch_size,
                error=type(exc).__name__,
                detail=": " + text if text else "",
            ),
            hint=tr(
                "a real run uses your example_inputs' values (noise and zeros for `input_size` shapes): check them and the model; rerun with --debug for the traceback"
            ),
        ) from exc


def _measure_step(
    workload: Workload,
    batch_size: int,
    spec: StepSpec,
    keep_timeline: bool,
    where: list[str],
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    on_phase: Callable[[str, int], None] | None = None,
) -> Measurement:
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BatchfitError(
            tr("measuring on CUDA needs a GPU, and this machine has none"),
            hint=tr("use `batchfit estimate` (no GPU needed), or `device='cpu'` to measure a CPU run"),
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
        runner = _CudaWindow(device) if device.type == "cuda" else _CpuWindow(_storage_bytes(list(state.values())))
        stack.enter_context(runner.recording())  # CPU: from here, so that the batch's death is seen too
        inputs = batch_inputs(workload, batch_size, device, param_dtype, values=True)
        stack.enter_context(state_in_place(model, state))
        optimizer = None
        if spec.mode == "train":
            params = unique_trainable(model)
            if not params:
                raise BatchfitError(tr("the model has no trainable parameters"), hint=tr("use `mode='inference'`"))
            optimizer = spec.optimizer.build(params, device_type=device.type)
        labels = None
        if spec.mode == "train":
            where[0] = "in the forward that shapes the labels"
            choice = label_choice(model, inputs, spec)
            labels = choice.labels()
            del choice
        scaler = None
        if spec.precision.grad_scaler and spec.mode == "train":
            # from its module: torch 2.11's torch.amp does not re-export GradScaler (mypy)
            scaler = torch.amp.grad_scaler.GradScaler(device.type)
        # and what the optimizer's constructor allocated (bitsandbytes' quantisation maps)
        held = [v for v in vars(optimizer).values() if isinstance(v, dict)] if optimizer is not None else []
        before = _storage_bytes([*state.values(), *inputs.tensors(), labels, *held])
        batch = Batch(inputs, labels)
        del inputs, labels  # the loop owns the batch: a new one can replace it
        dataset_size = workload.dataset.train_size if workload.dataset is not None else None
        clock = _SteadyClock(device, spec.iterations if spec.mode == "train" else 0)

        def phase(name: str, iteration: int) -> None:
            where[0] = f"in {name}, iteration {iteration}"
            clock.on_phase(iteration)
            if on_phase is not None:
                on_phase(name, iteration)

        step_model = model
        if wrap is not None:
            where[0] = "wrapping the model"
            phase("setup", 0)
            step_model = wrap(model)
        gc.collect()
        start = time.perf_counter()
        with runner:
            loss = run_step(
                step_model,
                batch,
                spec,
                optimizer,
                backward=lambda loss: loss.backward(),
                new_batch=batch_maker(workload, device, param_dtype, values=True),
                tail=tail_sizes(spec, batch_size, dataset_size),
                scaler=scaler,
                on_phase=phase,
            )
            clock.stop()
            del batch
        seconds = time.perf_counter() - start
        stack.close()  # the profiler stops
        result = runner.result(batch_size, spec.device, seconds, keep_timeline)
        if result.before_window_bytes == 0:
            result.before_window_bytes = before
        result.loss = loss
        result.steady_seconds = clock.seconds
        result.threads = torch.get_num_threads() if device.type == "cpu" else None
        del state, optimizer, scaler, step_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


class _CpuWindow:
    """Peak host memory of the window from the profiler's allocation events.

    The profiler runs from before the batch is made, so that the batch's death inside the window
    (a training run's tail replaces it) is an event too: the profiler does not report freeing
    memory allocated before it started. What is alive when the window opens is the parameters'
    bytes plus the running sum of the events until then.
    """

    def __init__(self, state_bytes: int) -> None:
        self.state_bytes = state_bytes
        self.prof: Any = None
        self.mark: Any = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as self.prof:
            yield

    def __enter__(self) -> None:
        self.mark = torch.profiler.record_function("batchfit::window")
        self.mark.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mark.__exit__(*exc)

    def result(self, batch_size: int, device: str, seconds: float, keep_timeline: bool) -> Measurement:
        events = list(self.prof.profiler.kineto_results.events())
        window = next(e for e in events if e.name() == "batchfit::window")
        begin, end = window.start_ns(), window.start_ns() + window.duration_ns()
        memory = sorted((e for e in events if e.name() == "[memory]" and _on_cpu(e)), key=lambda e: e.start_ns())
        alive = sum(e.nbytes() for e in memory if e.start_ns() < begin)
        running = peak = 0
        timeline = []
        for e in memory:
            if not begin <= e.start_ns() <= end:
                continue
            running += e.nbytes()
            peak = max(peak, running)
            if keep_timeline:
                timeline.append((running, e.nbytes()))
        before = self.state_bytes + alive
        m = Measurement(batch_size, device, before + peak, seconds=seconds, timeline=timeline)
        m.before_window_bytes = before
        return m


def _on_cpu(event: Any) -> bool:
    return bool(event.device_type() == torch.device("cpu").type or str(event.device_type()) == "DeviceType.CPU")


class _CudaWindow:
    """Peak device memory from the caching allocator's counters and the driver."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.used_peak = 0

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

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
