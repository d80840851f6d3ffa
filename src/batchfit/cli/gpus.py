"""``batchfit gpus``: the GPU catalogue, or one card and the budget it gives."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .._gpus import GpuCard, get_gpu, list_gpus, load_catalogue
from .._render import Table, show
from .._units import format_bytes
from ._app import command
from ._common import JsonOpt

NameArg = Annotated[
    Optional[str],  # noqa: UP045
    typer.Argument(
        help="Show one card (key, alias or the name torch reports), e.g. h100 or rtx4090.", show_default=False
    ),
]


def _cc(card: GpuCard) -> str:
    return ".".join(map(str, card.compute_capability)) if card.compute_capability else "?"


def _peaks(card: GpuCard) -> tuple[str, str]:
    """Dense FP32 / BF16 TFLOP/s and memory bandwidth in GB/s (10^9 B/s), or dashes without peaks."""
    if card.peaks is None:
        return "-", "-"
    flops = card.peaks.flops_per_second
    tflops = "/".join(f"{flops[k] / 1e12:,.4g}" if k in flops else "-" for k in ("fp32", "bf16"))
    return tflops, f"{card.peaks.bandwidth_bytes_per_second / 1e9:,.0f}"


def catalogue_table(cards: tuple[GpuCard, ...]) -> Table:
    """The catalogue as a table (memory in GiB = 2^30 B, workspaces in MiB = 2^20 B)."""
    rows = [
        [
            card.key,
            card.name,
            format_bytes(card.memory_bytes, unit="GiB"),
            card.provenance["memory"].status,
            _cc(card),
            format_bytes(card.cublas_workspace_bytes, unit="MiB"),
            f"{format_bytes(card.non_allocator_bytes, unit='MiB')} ({card.provenance['non_allocator'].status})",
            *_peaks(card),
            ", ".join(a for a in card.aliases if a != card.key),
        ]
        for card in cards
    ]
    columns = [
        "key",
        "name",
        "memory",
        "source",
        "cc",
        "cuBLAS ws",
        "non-allocator",
        "TFLOP/s fp32/bf16",
        "GB/s",
        "aliases",
    ]
    right = [False, False, True, False, True, True, True, True, True, False]
    return Table("GPU catalogue (memory in GiB = 2^30 bytes)", columns, rows, right=right)


@command("gpus")
def gpus(name: NameArg = None, as_json: JsonOpt = False) -> None:
    """List the GPU catalogue: memory as torch reports it, cuBLAS workspace, CUDA context, provenance."""
    if name is not None:
        card = get_gpu(name)
        print(json.dumps(card.to_dict(), indent=2) if as_json else str(card))
        return
    if as_json:
        print(json.dumps(load_catalogue().to_dict(), indent=2))
        return
    table = catalogue_table(list_gpus())
    table.footer.append(
        f"Default card: {load_catalogue().default_key}. 'reported' = public torch printouts, 'nominal' = the "
        "marketed size, 'rule' = PyTorch's source, 'assumed' = not measured yet (docs/allocator.md). "
        "TFLOP/s: dense peaks (no sparsity), GB/s: memory bandwidth, from the vendors' datasheets "
        "(`batchfit gpus NAME --json` cites each); plan's roofline estimate uses them."
    )
    show(table)
