"""Measure, on a real GPU, the figures the catalogue can only assume without one.

``calibrate()`` measures the cuBLAS workspace (forward thread and autograd thread), the cuDNN
convolution workspace for a few shapes, and the memory the caching allocator never sees after a
warm training step; it returns them as a catalogue entry whose provenance names the card, driver,
torch version and date. Without CUDA it is a dry run that lists what it would measure.

    PYTHONPATH=src python -m batchfit._calibrate          # JSON on stdout

>>> plan = calibrate(dry_run=True)
>>> plan["dry_run"], [m["name"] for m in plan["planned"]][:2]
(True, ['cublas_workspace_forward', 'cublas_workspace_backward'])
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from ._allocator import AllocatorConfig
from ._errors import BatchfitError, ExitCode
from ._i18n import tr

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ConvShape:
    """One convolution to measure: NCHW input, square kernel, padding = kernel // 2."""

    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    stride: int = 1

    @property
    def label(self) -> str:
        return (
            f"{self.batch}x{self.in_channels}x{self.size}x{self.size} -> {self.out_channels}ch "
            f"k{self.kernel} s{self.stride}"
        )


DEFAULT_CONV_SHAPES: tuple[ConvShape, ...] = (
    ConvShape(32, 3, 64, 224, 7, 2),  # a ResNet stem
    ConvShape(32, 64, 64, 56, 3),  # ResNet stage 1
    ConvShape(32, 256, 256, 14, 3),  # ResNet stage 3
)

PLANNED: tuple[dict[str, str], ...] = (
    {
        "name": "cublas_workspace_forward",
        "how": "torch.cuda.memory_allocated() across the process's first matmul (main thread), less the output's block",
    },
    {
        "name": "cublas_workspace_backward",
        "how": "memory_allocated() across a backward pass whose matmul runs on the autograd device thread, "
        "less the gradient's block",
    },
    {
        "name": "conv_workspace",
        "how": "per shape: max_memory_allocated() during a cuDNN convolution forward / backward, "
        "less the blocks of the tensors it leaves behind",
    },
    {
        "name": "non_allocator",
        "how": "after two warm training steps of a small MLP: (total - free) from torch.cuda.mem_get_info() "
        "less torch.cuda.memory_reserved(); also NVML's figure for this process when pynvml is importable",
    },
)


class Calibration(TypedDict, total=False):
    """What :func:`calibrate` returns, JSON-ready: the first six keys always; ``reason`` and
    ``planned`` in a dry run; the card, its ``measurements`` and a ``catalogue_update`` otherwise."""

    schema_version: int
    dry_run: bool
    device: str
    torch: str
    cuda: str | None
    date: str
    reason: str
    planned: list[dict[str, Any]]
    card: str
    compute_capability: list[int]
    total_memory_bytes: int
    driver: str | None
    cudnn: int | None
    measurements: dict[str, Any]
    catalogue_update: dict[str, Any]


def calibrate(
    device: str = "cuda",
    *,
    conv_shapes: tuple[ConvShape, ...] = DEFAULT_CONV_SHAPES,
    dry_run: bool | None = None,
) -> Calibration:
    """Measure the catalogue's figures on ``device``; a dry run (``"dry_run": True``) without CUDA.

    Call it first in a fresh process: the cuBLAS workspaces exist once per thread and are only
    seen when they are created.
    """
    if not device.startswith("cuda"):
        raise BatchfitError(
            tr("calibration measures a CUDA device, not {device!r}", device=device),
            hint=tr("use device='cuda' or 'cuda:N'"),
        )
    import torch

    if dry_run is None:
        dry_run = not torch.cuda.is_available()
    head: Calibration = {
        "schema_version": SCHEMA_VERSION,
        "dry_run": dry_run,
        "device": device,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "date": _dt.date.today().isoformat(),
    }
    if dry_run:
        planned: list[dict[str, Any]] = [dict(m) for m in PLANNED]
        planned[2] = {**planned[2], "shapes": [s.label for s in conv_shapes]}
        return {
            **head,
            "reason": "torch.cuda.is_available() is False" if not torch.cuda.is_available() else "dry_run=True",
            "planned": planned,
        }
    if not torch.cuda.is_available():
        raise BatchfitError(
            tr("calibration needs a CUDA GPU and torch.cuda.is_available() is False"),
            hint=tr("run it on a GPU machine, or call calibrate(dry_run=True) to see the plan"),
            exit_code=ExitCode.NO_DEVICE,
        )
    return _measure(torch, torch.device(device), conv_shapes, head)


def _measure(torch: Any, dev: Any, conv_shapes: tuple[ConvShape, ...], head: Calibration) -> Calibration:
    cuda = torch.cuda
    torch.cuda.set_device(dev)
    round_size = AllocatorConfig.from_env().round_size

    def block(t: Any) -> int:
        return round_size(int(t.untyped_storage().nbytes()))

    def sync() -> None:
        cuda.synchronize(dev)

    props = cuda.get_device_properties(dev)
    measurements: dict[str, Any] = {}

    # 1. cuBLAS workspace of the main thread: created at the process's first matmul.
    a = torch.randn(256, 256, device=dev)
    b = torch.randn(256, 256, device=dev)
    sync()
    before = cuda.memory_allocated(dev)
    c = a @ b
    sync()
    measurements["cublas_workspace_forward_bytes"] = cuda.memory_allocated(dev) - before - block(c)

    # 2. The autograd engine runs backward on its own device thread, which gets its own workspace.
    w = torch.randn(256, 256, device=dev, requires_grad=True)
    loss = (a @ w).sum()
    sync()
    before = cuda.memory_allocated(dev)
    loss.backward()
    sync()
    measurements["cublas_workspace_backward_bytes"] = cuda.memory_allocated(dev) - before - block(w.grad)
    del a, b, c, w, loss

    # 3. cuDNN convolution workspaces: transient, so peak minus what stays.
    convs = []
    for shape in conv_shapes:
        conv = torch.nn.Conv2d(
            shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.kernel // 2, bias=False
        ).to(dev)
        x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, device=dev, requires_grad=True)
        sync()
        cuda.reset_peak_memory_stats(dev)
        base = cuda.memory_allocated(dev)
        y = conv(x)
        sync()
        forward = cuda.max_memory_allocated(dev) - base - block(y)
        grad = torch.ones_like(y)
        sync()
        cuda.reset_peak_memory_stats(dev)
        base = cuda.memory_allocated(dev)
        y.backward(grad)
        sync()
        backward = cuda.max_memory_allocated(dev) - cuda.memory_allocated(dev)
        convs.append(
            {"shape": asdict(shape), "label": shape.label, "forward_bytes": forward, "backward_bytes": backward}
        )
        del conv, x, y, grad
    measurements["conv_workspace"] = convs

    # 4. What the allocator never sees, after warm training steps (context, kernels, handles).
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 784, device=dev)
    labels = torch.zeros(64, dtype=torch.long, device=dev)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    free, total = cuda.mem_get_info(dev)
    reserved = cuda.memory_reserved(dev)
    measurements["device_used_bytes"] = int(total - free)
    measurements["memory_reserved_bytes"] = int(reserved)
    measurements["non_allocator_bytes"] = int(total - free - reserved)
    process_bytes = _nvml_process_bytes(props)
    if process_bytes is not None:
        measurements["nvml_process_bytes"] = process_bytes
        measurements["non_allocator_nvml_bytes"] = process_bytes - int(reserved)

    driver = _driver_version()
    cc = (int(props.major), int(props.minor))
    provenance = {"card": props.name, "driver": driver, "torch": head["torch"], "date": head["date"]}
    conv_max = max((max(c["forward_bytes"], c["backward_bytes"]) for c in convs), default=0)
    cublas = measurements["cublas_workspace_forward_bytes"] or measurements["cublas_workspace_backward_bytes"]
    update = make_catalogue_update(
        name=props.name,
        compute_capability=cc,
        memory_bytes=int(props.total_memory),
        cublas_workspace_bytes=int(cublas),
        non_allocator_bytes=int(measurements.get("non_allocator_nvml_bytes", measurements["non_allocator_bytes"])),
        conv_workspace_bytes=int(conv_max),
        provenance=provenance,
    )
    return {
        **head,
        "card": props.name,
        "compute_capability": list(cc),
        "total_memory_bytes": int(props.total_memory),
        "driver": driver,
        "cudnn": torch.backends.cudnn.version(),
        "measurements": measurements,
        "catalogue_update": update,
    }


def make_catalogue_update(
    *,
    name: str,
    compute_capability: tuple[int, int],
    memory_bytes: int,
    cublas_workspace_bytes: int,
    non_allocator_bytes: int,
    conv_workspace_bytes: int,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """A catalogue entry (the form of ``_resources/gpus.json``'s cards) whose figures are all measured."""
    from ._gpus import load_catalogue

    known = load_catalogue().by_torch_name(name)
    sources = {
        "memory": "torch.cuda.get_device_properties().total_memory",
        "cublas_workspace": "memory_allocated() across the first matmul (calibrate)",
        "non_allocator": "mem_get_info used (or NVML process memory) less memory_reserved() after warm steps",
        "conv_workspace": "largest cuDNN convolution workspace over the calibration shapes",
    }
    values = {
        "memory": memory_bytes,
        "cublas_workspace": cublas_workspace_bytes,
        "non_allocator": non_allocator_bytes,
        "conv_workspace": conv_workspace_bytes,
    }
    entry: dict[str, Any] = {
        "key": known.key if known else _slug(name),
        "name": known.name if known else name,
        "torch_names": sorted({name, *(known.torch_names if known else ())}),
        "aliases": list(known.aliases) if known else [],
        "compute_capability": list(compute_capability),
    }
    for figure, value in values.items():
        entry[figure] = {"bytes": int(value), "status": "measured", "source": sources[figure], **provenance}
    return entry


def _slug(name: str) -> str:
    words = name.lower().replace("nvidia", "").replace("geforce", "").split()
    return "-".join(words) or "gpu"


def _driver_version() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml_process_bytes(props: Any) -> int | None:
    """This process's memory on the card as NVML (nvidia-smi) reports it, if pynvml is importable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(
            f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        )
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory)
    except Exception:
        return None
    return None


def main() -> None:
    print(json.dumps(calibrate(), indent=2))


if __name__ == "__main__":
    main()


__all__ = ["DEFAULT_CONV_SHAPES", "ConvShape", "calibrate", "make_catalogue_update"]
