"""Custom steps and checkpointing: every backward goes through the tracer's replay of the engine.

On CPU the estimate must equal a real step measured by the profiler (``measure_step``), to the
byte; on CUDA semantics (no GPU here) the same runs must succeed and keep their structure.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchfit import estimate, load_workload
from batchfit._errors import BatchfitError
from batchfit._measure import measure_step
from batchfit._models import InputSpec, Workload
from batchfit._step import make_spec
from batchfit._trace import _frame_inputs

# ---------------------------------------------------------------------------------------------
# user steps: fn(model, inputs, labels, optimizer)


def _loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), labels)


def plain(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def accumulate(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    """Two micro-batches, gradients summed in .grad, one optimizer step."""
    half = inputs[0].shape[0] // 2
    for part in (slice(0, half), slice(half, None)):
        loss = _loss(model, inputs[0][part], labels[part]) / 2
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clipped(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def two_optimizers(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    head = list(model.parameters())[-2:]
    extra = torch.optim.SGD(head, lr=0.1)  # a second optimizer (SGD: no state)
    loss = _loss(model, *inputs, labels)
    torch.autograd.backward(loss)
    optimizer.step()
    extra.step()
    optimizer.zero_grad(set_to_none=True)
    extra.zero_grad(set_to_none=True)


def with_autograd_grad(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    del loss
    for p, g in zip(params, grads):
        p.grad = g
    del grads
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def retained(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    """retain_graph=True, then a second backward through the same graph (gradients add up)."""
    loss = _loss(model, *inputs, labels)
    loss.backward(retain_graph=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def head_only(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    """backward(inputs=...): only the head's parameters get gradients."""
    loss = _loss(model, *inputs, labels)
    loss.backward(inputs=list(model.parameters())[-2:])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


STEPS = [plain, accumulate, clipped, two_optimizers, with_autograd_grad, retained]


def _both(workload: Workload, batch_size: int, step: Any = None, optimizer: str = "sgd") -> tuple[Any, int]:
    est = estimate(workload, batch_size=batch_size, optimizer=optimizer, device="cpu", step=step)
    real = measure_step(workload, batch_size, make_spec("cpu", optimizer, step=step))
    return est, real.peak_allocated_bytes


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
def test_user_steps_equal_a_real_cpu_step(step: Any) -> None:
    est, real = _both(load_workload("mlp", dataset="mnist"), 64, step)
    assert est.peak_allocated_bytes == real


def test_backward_to_some_inputs_is_not_below_a_real_step() -> None:
    """backward(inputs=...) on part of the graph: the engine skips a node's gradients that lead
    nowhere needed (Node::task_should_compute_output reads the running graph task, which a replay
    from Python does not have); the replay computes and drops them at once, so it can only be
    higher than the real step, by transients."""
    w = load_workload("mlp", dataset="mnist")
    est, real = _both(w, 64, head_only)
    assert real <= est.peak_allocated_bytes < 1.1 * real
    head = list(w.model.parameters())[-2:]
    grads = [e.nbytes for e in est.events if e.category == "gradients" and e.action == "alloc" and e.iteration == 1]
    assert sorted(grads) == sorted(p.numel() * 4 for p in head)  # only the head's weight and bias


def test_the_steps_differ_from_each_other() -> None:
    """The comparisons above can fail: accumulation and a retained graph change the peak."""
    w = load_workload("mlp", dataset="mnist")
    peaks = {f.__name__: estimate(w, batch_size=64, device="cpu", step=f).peak_allocated_bytes for f in STEPS[:2]}
    assert peaks["accumulate"] != peaks["plain"]


# ---------------------------------------------------------------------------------------------
# checkpointing


class ResMLP(nn.Module):
    """A residual MLP whose blocks run under torch.utils.checkpoint."""

    def __init__(self, width: int = 64, blocks: int = 3, reentrant: bool | None = False) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)  # so that the blocks' inputs require grad (reentrant)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + (block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant))
        return self.head(x)


def _resmlp(reentrant: bool | None) -> Workload:
    with torch.device("meta"):
        model = ResMLP(reentrant=reentrant)
    return Workload("resmlp", model, (InputSpec((64,)),))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("batch_size", [2, 64])
def test_checkpointed_residual_mlp_equals_a_real_cpu_step(reentrant: bool, batch_size: int) -> None:
    est, real = _both(_resmlp(reentrant), batch_size)
    assert est.peak_allocated_bytes == real
    # the same checkpointed model under a user's step (which, unlike the reference loop, keeps no
    # outputs): equal to a real run of that step
    with_steps, real_step = _both(_resmlp(reentrant), batch_size, step=plain)
    assert with_steps.peak_allocated_bytes == real_step


class _SaveInputs(torch.autograd.Function):
    """Like torch 2.11's checkpoint._NoopSaveInputs: saves its inputs, returns an empty tensor."""

    @staticmethod
    def forward(ctx: Any, *args: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*args)
        return torch.empty((0,))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> None:
        raise AssertionError("never run, like _NoopSaveInputs")


def test_checkpoint_inputs_are_found_in_both_torch_layouts() -> None:
    """A dead checkpoint frame's inputs are freed on every supported torch: 2.11 keeps them in a
    no-op node's saved tensors (``frame.input_saver``), later releases in ``frame.saved_args``;
    missing the first overestimated 2.11's checkpointed MLP by its inputs and RNG states."""
    marks: list[object] = []

    def pack(t: torch.Tensor) -> object:
        marks.append(object())
        return marks[-1]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h):
        saver = _SaveInputs.apply(torch.empty((0,), requires_grad=True), torch.ones(3, requires_grad=True))
    saved = saver.grad_fn._raw_saved_tensors
    for frame in (SimpleNamespace(input_saver=saver), SimpleNamespace(saved_args=list(saved))):
        assert [s.data for s in _frame_inputs(frame)] == marks
    assert _frame_inputs(SimpleNamespace()) == ()


def test_checkpointing_saves_activations_on_cuda() -> None:
    """CUDA semantics: the checkpointed runs succeed and save less than the plain model."""
    plain_run = estimate(_resmlp(None), batch_size=256, device="cuda")
    acts = {}
    for reentrant in (False, True):
        r = estimate(_resmlp(reentrant), batch_size=256, device="cuda")
        assert r.peak_phase == "backward"
        acts[reentrant] = r.activation_bytes_by_module
    # each block's hidden (256 x 256 fp32 before and after GELU) is no longer kept by the forward
    block_saved = sum(v for k, v in plain_run.activation_bytes_by_module.items() if k.startswith("blocks."))
    assert block_saved >= 3 * 2 * 256 * 256 * 4
    for reentrant in (False, True):
        assert sum(v for k, v in acts[reentrant].items() if k.startswith("blocks.")) == 0


def test_transformers_gradient_checkpointing_matches_a_real_step() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    w = Workload("gpt2", model, (InputSpec((32,), torch.int64),))
    base, base_real = _both(w, 4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    est, real = _both(w, 4)
    assert real < base_real  # checkpointing did something in the real step
    # exact, with the 0-dim tensors Python numbers become (_cpu_scalars), also those the
    # recomputed graph keeps until it is dropped
    assert est.peak_allocated_bytes == real
    assert base.peak_allocated_bytes == base_real
    cuda = estimate(w, batch_size=4, device="cuda")
    assert cuda.activation_bytes_by_module.get("transformer.h.0.attn", 0) == 0


# ---------------------------------------------------------------------------------------------
# CUDA semantics and messages


@pytest.mark.parametrize("step", STEPS, ids=lambda f: f.__name__)
def test_user_steps_run_with_cuda_semantics(step: Any) -> None:
    r = estimate("mlp", dataset="mnist", batch_size=64, device="cuda", step=step)
    # a backward on the autograd thread: a second cuBLAS workspace, as in the reference step
    ref = estimate("mlp", dataset="mnist", batch_size=64, device="cuda")
    assert r.breakdown["workspaces"] == ref.breakdown["workspaces"]
    assert r.peak_phase in ("forward", "backward", "optimizer")


def test_a_user_step_reports_its_phases() -> None:
    from batchfit._step import make_spec as spec_for
    from batchfit._trace import trace_step

    w = load_workload("mlp", dataset="mnist")
    trace = trace_step(w, 8, spec_for("cuda", "adam", step=accumulate))
    phases = [(p, it) for p, it, _ in trace.marks]
    per_iteration = [p for p, it in phases if it == 1]
    assert per_iteration == ["forward", "backward", "forward", "backward", "optimizer"]
    assert any(e.phase == "optimizer" and e.category == "optimizer_state" for e in trace.events)


def _second_order(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()


def _fails_in_backward(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    loss.backward()
    loss.backward()  # the graph was freed: PyTorch's own error


def _asks_the_driver(model: nn.Module, inputs: Any, labels: Any, optimizer: torch.optim.Optimizer) -> None:
    loss = _loss(model, *inputs, labels)
    loss.backward()
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_messages_name_the_problem_and_the_phase(device: str) -> None:
    with pytest.raises(BatchfitError, match="create_graph=True"):
        estimate("mlp", dataset="mnist", batch_size=8, device=device, step=_second_order)
    with pytest.raises(BatchfitError, match=r"step function's backward.*backward through the graph a second time"):
        estimate("mlp", dataset="mnist", batch_size=8, device=device, step=_fails_in_backward)


def test_a_step_that_asks_the_cuda_driver_gets_a_hint() -> None:
    with pytest.raises(BatchfitError) as info:
        estimate("mlp", dataset="mnist", batch_size=8, device="cuda", step=_asks_the_driver)
    assert "step function's backward" in info.value.message
    assert info.value.hint is not None and "torch.cuda.is_available()" in info.value.hint


# ---------------------------------------------------------------------------------------------
# gradient hooks on non-leaf tensors (FSDP2's pre-backward hook), replayed before their node


class HookedResidual(nn.Module):
    """Residual blocks whose outputs carry a gradient hook that returns the gradient unchanged."""

    def __init__(self, hooked: bool, width: int = 29, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 61), nn.ReLU(), nn.Linear(61, width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 7)
        self.hooked = hooked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
            if self.hooked and x.requires_grad:
                x.register_hook(lambda grad: grad)
        return self.head(x)


def test_a_gradient_hook_that_returns_its_input_changes_no_byte() -> None:
    """The engine keeps a hook's result in the input buffer only; a reference the replay kept
    would make the next accumulation into that buffer a copy (input_buffer.cpp accumulates in
    place only when it holds the last reference), a whole gradient too many."""
    import contextlib
    from collections.abc import Iterator

    from batchfit._models import fake_state, state_in_place
    from batchfit._trace import Placed, trace_step

    @contextlib.contextmanager
    def placement(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[Placed]:
        # a placement turns on the replay of tensor hooks (what FSDP2's placement relies on)
        with state_in_place(model, fake_state(model, device, dtype=dtype)):
            yield Placed()

    def allocs(hooked: bool) -> list[int]:
        with torch.device("meta"):
            model = HookedResidual(hooked)
        workload = Workload("hooked", model, (InputSpec((29,)),))
        trace = trace_step(workload, 8, make_spec("cpu", "adam"), placement=placement)
        return [e.nbytes for e in trace.events if e.action == "alloc"]

    assert allocs(True) == allocs(False)


def test_a_bias_gradient_is_reduced_before_the_node_releases_its_saved_input() -> None:
    """engine.cpp: call_function runs validate_outputs (the bias gradient's sum_to_size) before
    evaluate_function releases the node's saved tensors. Here the head's saved input (the GELU's
    output, which nothing else keeps) is still alive when the head's bias gradient is made, at the
    step's peak (SGD: no optimizer state; a wide head: its gradients are the largest tensors)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 29), nn.GELU(), nn.Linear(29, 1000))
    workload = Workload("wide_head", model, (InputSpec((12,)),))
    est = estimate(workload, batch_size=8, optimizer="sgd", device="cpu", threads=1)
    real = measure_step(workload, 8, make_spec("cpu", "sgd", threads=1))
    assert est.peak_allocated_bytes == real.peak_allocated_bytes
