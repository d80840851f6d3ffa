"""``batchfit models``: what the model registry knows."""

from __future__ import annotations

import json

from rich.console import Console

from ..models import BUILTIN_MODELS, torchvision_model_names
from ._app import command
from ._common import JsonOpt


@command("models")
def models(as_json: JsonOpt = False) -> None:
    """List the registered model names (timm:NAME and your own files come on top)."""
    names = {"builtin": list(BUILTIN_MODELS), "torchvision": list(torchvision_model_names())}
    if as_json:
        print(json.dumps(names, indent=2))
        return
    console = Console()
    for name, entry in BUILTIN_MODELS.items():
        console.print(f"[bold]{name}[/]  {entry.description}")
    console.print("[bold]torchvision:[/] " + ", ".join(names["torchvision"]), soft_wrap=False)
    console.print("Also: timm:NAME (if timm is installed), path/to/file.py:NAME, package.module:NAME")
