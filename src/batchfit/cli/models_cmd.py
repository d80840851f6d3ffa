"""``batchfit models``: what the model registry knows."""

from __future__ import annotations

import json

from rich.console import Console

from .._hf import BUILTIN_CONFIGS, builtin_names
from .._models import BUILTIN_MODELS, torchvision_model_names
from ._app import command
from ._common import JsonOpt


@command("models")
def models(as_json: JsonOpt = False) -> None:
    """List the registered model names (timm:NAME and your own files come on top)."""
    names = {
        "builtin": list(BUILTIN_MODELS),
        "torchvision": list(torchvision_model_names()),
        "hf": [f"hf:{name}" for name in builtin_names()],
    }
    if as_json:
        print(json.dumps(names, indent=2))
        return
    console = Console()
    for name, entry in BUILTIN_MODELS.items():
        console.print(f"[bold]{name}[/]  {entry.description}")
    console.print("[bold]torchvision:[/] " + ", ".join(names["torchvision"]), soft_wrap=False)
    console.print(
        "[bold]Hugging Face configs built in[/] (no download; any other as hf:ID from the local cache or hf:PATH):"
    )
    for name in builtin_names():
        arch = BUILTIN_CONFIGS[name]["architectures"][0]
        console.print(f"  hf:{name}  {arch}")
    console.print("Also: timm:NAME (if timm is installed), path/to/file.py:NAME, package.module:NAME")
