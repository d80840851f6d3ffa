"""bitsandbytes on fake tensors: its 8-bit (and paged) AdamW, run for real.

bitsandbytes >= 0.45 declares its kernels as ``torch.library`` custom ops with fake kernels
(bitsandbytes/_ops.py: ``optimizer_update_8bit_blockwise``, ``optimizer_update_32bit``), so
its optimizer's own Python code (``Optimizer2State.init_state``/``update_step`` in
bitsandbytes/optim/optimizer.py) creates the state on fake tensors: the state sizes are the
library's. Three places ask for real values or a real GPU; each is replaced here by the same
thing on fake tensors:

* ``Optimizer8bit.fill_qmap`` builds the two 256-entry quantisation maps with ``.tolist()``
  (functional.py ``create_dynamic_map``): built outside fake mode, the same values.
* ``sync_gpu`` after each parameter (``torch.cuda.synchronize()``): nothing to do on fake tensors.
* the paged optimizer's ``get_state_buffer`` asks the CUDA driver for managed memory
  (functional.py ``get_paged``: ``cget_managed_ptr`` = ``cudaMallocManaged``, wrapped by
  ``torch.frombuffer``, so a tensor PyTorch sees on the *CPU* with ``is_paged=True``): here a fake
  CPU tensor of the same shape and dtype, marked ``is_paged`` the same way. Like the real one, it
  is outside PyTorch's CUDA caching allocator (``max_memory_allocated`` does not count it); the
  driver and nvidia-smi count its pages while they are on the GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ._errors import BatchfitError
from ._i18n import tr


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a clear error naming the fix."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise BatchfitError(
            tr("this option needs bitsandbytes, which is not installed"), hint=tr("pip install bitsandbytes")
        ) from exc
    return bnb


@functools.cache
def _dynamic_maps() -> tuple[list[float], list[float]]:
    """The values of bitsandbytes' signed and unsigned dynamic maps (functional.py ``create_dynamic_map``)."""
    from torch.utils._python_dispatch import _disable_current_modes

    functional = bitsandbytes().functional
    with _disable_current_modes():  # real tensors, unseen by the fake mode and the recorder
        return (
            functional.create_dynamic_map(signed=True).tolist(),
            functional.create_dynamic_map(signed=False).tolist(),
        )


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state in CUDA managed memory (bitsandbytes' paged tensors)."""
    return sum(
        v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and getattr(v, "is_paged", False)
    )


def is_bitsandbytes_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__module__ == __name__


def optimizer_8bit(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """bitsandbytes' ``bnb.optim.<name>`` (``AdamW8bit``, ``PagedAdamW8bit``) able to step on fake tensors."""
    bnb = bitsandbytes()
    base = getattr(bnb.optim, name)
    module = bnb.optim.optimizer

    class OnFake(base):  # type: ignore[misc, valid-type]
        def fill_qmap(self) -> None:
            signed, unsigned = _dynamic_maps()
            self.name2qmap["dynamic"] = torch.tensor(signed)
            self.name2qmap["udynamic"] = torch.tensor(unsigned)

        def get_state_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            # the real rule (Optimizer8bit.get_state_buffer): paged only on the GPU, for >= 1e5 elements
            if not (_is_fake(p) and self.is_paged and p.device.type == "cuda" and p.numel() >= 1e5):
                return super().get_state_buffer(p, dtype)  # type: ignore[no-any-return]
            buff = torch.zeros(p.shape, dtype=dtype, device="cpu")  # get_paged: frombuffer, a CPU tensor
            buff.is_paged = True  # type: ignore[attr-defined]
            buff.page_deviceid = p.device.index  # type: ignore[attr-defined]
            return buff

        def prefetch_state(self, p: torch.Tensor) -> None:
            if not _is_fake(p):  # cudaMemPrefetchAsync: moves pages, allocates nothing in PyTorch
                super().prefetch_state(p)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            sync = module.sync_gpu
            module.sync_gpu = lambda t: None if _is_fake(t) else sync(t)
            try:
                return super().step(closure)
            finally:
                module.sync_gpu = sync

    OnFake.__name__ = OnFake.__qualname__ = base.__name__
    return OnFake(params, **kwargs)  # type: ignore[no-any-return]
