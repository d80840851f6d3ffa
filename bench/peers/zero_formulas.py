"""DeepSpeed's ZeRO memory estimators, as formulas: what ``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` return, for comparing with batchfit without installing DeepSpeed.

Read from deepspeedai/DeepSpeed (the code is not copied; these are its formulas restated):

* ZeRO-2: ``deepspeed/runtime/zero/stage_1_and_2.py``, ``estimate_zero2_model_states_mem_needs``
  (commit 02aa38c3a55174c87b33c4ad17a304389d037443). Without offload, per GPU: 2 bytes per parameter
  (16-bit parameters) + 18 bytes per parameter over the GPUs (16-bit and 32-bit gradients, 32-bit master
  parameters, Adam's two 32-bit moments); with the optimizer offloaded: the 16-bit parameters. Older
  releases had 4 + 16 / GPUs instead of 2 + 18 / GPUs (the same 20 bytes on one GPU).
* ZeRO-3: ``deepspeed/runtime/zero/stage3.py``, ``estimate_zero3_model_states_mem_needs``
  (commit 007cca6a2ffe3ed9d393459f4a3081bd54341ba6). Per GPU: 4 bytes per parameter of the largest
  layer (its gathered 16-bit parameters and gradients), + 18 bytes per parameter over the GPUs without
  offload, + 2 over the GPUs with the optimizer offloaded, + nothing more with the parameters offloaded.
* The parameter count (``model_to_params``): shared parameters counted once; the largest layer is
  the module with the most parameters of its own (``parameters(recurse=False)``).

Both count model states only: no activations, temporaries, communication buffers or allocator.
``additional_buffer_factor`` (1.5) is DeepSpeed's margin on the host figure.

>>> zero2(1_000_000, gpus_per_node=4).gpu_bytes  # 2 + 18 / 4 bytes per parameter
6500000
>>> zero3(1_000_000, 10_000, gpus_per_node=4).gpu_bytes  # 4 x 10k + 18 / 4 per parameter
4540000
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ZeroEstimate:
    """One row of DeepSpeed's table: host and per-GPU bytes for one choice of options."""

    stage: int
    cpu_bytes: int
    gpu_bytes: int
    offload_optimizer: bool
    offload_params: bool = False
    zero_init: bool = True

    @property
    def options(self) -> str:
        out = [f"offload_optimizer={'cpu' if self.offload_optimizer else 'none'}"]
        if self.stage == 3:
            out.insert(0, f"offload_param={'cpu' if self.offload_params else 'none'}")
            out.append(f"zero_init={int(self.zero_init)}")
        return ", ".join(out)


def model_params(model: nn.Module) -> tuple[int, int]:
    """(total parameters, shared ones once; the largest layer's own parameters), as DeepSpeed counts.

    By identity, not ``data_ptr`` (DeepSpeed's key), so that a model on the meta device counts too.

    >>> model_params(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    (58, 40)
    """
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def zero2(
    total_params: int,
    *,
    gpus_per_node: int = 1,
    nodes: int = 1,
    offload_optimizer: bool = False,
    additional_buffer_factor: float = 1.5,
) -> ZeroEstimate:
    """DeepSpeed's ZeRO-2 model-states estimate (stage_1_and_2.py)."""
    gpus = gpus_per_node * nodes
    if offload_optimizer:
        gpu = 2 * total_params
        cpu = total_params * max(4 * gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / gpus)
        cpu = total_params * 4 * gpus_per_node * additional_buffer_factor
    return ZeroEstimate(2, int(cpu), int(gpu), offload_optimizer)


def zero3(
    total_params: int,
    largest_layer_params: int,
    *,
    gpus_per_node: int = 1,
    nodes: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> ZeroEstimate:
    """DeepSpeed's ZeRO-3 model-states estimate (stage3.py); ``offload_params`` needs ``offload_optimizer``."""
    gpus = gpus_per_node * nodes
    per_node = 1 / nodes
    largest = 4 * largest_layer_params
    if offload_optimizer and offload_params:
        gpu = largest
        host_per_param = 18 * per_node
    elif offload_optimizer:
        gpu = largest + int(2 * total_params / gpus)
        host_per_param = 16 * per_node
    else:
        gpu = largest + int(18 * total_params / gpus)
        host_per_param = 0.0
    if not offload_optimizer:
        cpu = (largest_layer_params if zero_init else total_params) * 4 * gpus_per_node * additional_buffer_factor
    elif zero_init:
        cpu = total_params * host_per_param * additional_buffer_factor
    else:
        cpu = total_params * max(4 * gpus_per_node, host_per_param) * additional_buffer_factor
    return ZeroEstimate(3, int(cpu), int(gpu), offload_optimizer, offload_params, zero_init)


def zero3_table(total_params: int, largest_layer_params: int, *, gpus_per_node: int = 1, nodes: int = 1) -> list[ZeroEstimate]:
    """The six rows ``estimate_zero3_model_states_mem_needs_all_cold`` prints, in its order."""
    rows = []
    for offload_optimizer, offload_params in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            rows.append(
                zero3(
                    total_params,
                    largest_layer_params,
                    gpus_per_node=gpus_per_node,
                    nodes=nodes,
                    offload_optimizer=offload_optimizer,
                    offload_params=offload_params,
                    zero_init=zero_init,
                )
            )
    return rows


def gb(nbytes: int) -> str:
    """DeepSpeed's printed unit: bytes / 2**30 with two decimals (it labels them GB)."""
    return f"{nbytes / 2**30:.2f}"
