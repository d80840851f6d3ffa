"""The event timeline: every storage's birth and death during one traced step.

See docs/architecture.md ("The event timeline"). The tracer writes these; the allocator model,
the reports and the plots read them.

>>> ev = Event(0, "alloc", storage=7, nbytes=3136, category="inputs", module="", phase="setup", iteration=0)
>>> ev.is_alloc
True
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Action = Literal["alloc", "free"]
Phase = Literal["setup", "forward", "backward", "optimizer", "eval"]

CATEGORIES: tuple[str, ...] = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "inputs",
    "activations",
    "temporaries",
)
PHASES: tuple[str, ...] = ("setup", "forward", "backward", "optimizer", "eval")


class Event(NamedTuple):
    """One storage's birth or death (a named tuple: cheap to make by the hundred thousand)."""

    seq: int
    action: Action
    storage: int
    nbytes: int
    category: str
    module: str
    phase: str
    iteration: int

    @property
    def is_alloc(self) -> bool:
        return self.action == "alloc"
