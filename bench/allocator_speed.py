"""How fast the caching-allocator model replays a timeline (events per second).

    PYTHONPATH=src python bench/allocator_speed.py [--events 20000] [--repeat 5] [--history]

``--history`` also times the replay that records every action with its addresses (what
``--snapshot`` runs once); fit's searches never record.

The trace is synthetic but shaped like a ResNet-50 training step: parameters and buffers at
setup, activations kept through the forward pass and released in reverse during backward,
short-lived temporaries everywhere, gradients born in backward, then an optimizer phase.
"""

from __future__ import annotations

import argparse
import random
import time

from batchfit._allocator import AllocatorConfig, simulate
from batchfit._events import Event


def synthetic_step(n_events: int, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    next_id = 0

    def alloc(nbytes: int, category: str, phase: str) -> int:
        nonlocal next_id
        next_id += 1
        events.append(Event(len(events), "alloc", next_id, nbytes, category, "", phase, 0 if phase == "setup" else 1))
        return next_id

    def free(storage: int, category: str, phase: str) -> None:
        events.append(Event(len(events), "free", storage, 0, category, "", phase, 1))

    def size() -> int:
        # a spread like a CNN's: many small tensors, activations from 100 KiB to ~100 MiB
        return int(rng.choice([rng.uniform(256, 65_536), rng.uniform(1e5, 1e6), rng.uniform(1e6, 1.2e8)]))

    layers = max(1, n_events // 12)
    params = [alloc(size() // 4, "parameters", "setup") for _ in range(layers)]
    saved: list[int] = []
    for _ in range(layers):  # forward: 1 saved activation + 2 temporaries per layer
        saved.append(alloc(size(), "activations", "forward"))
        t1 = alloc(size(), "temporaries", "forward")
        t2 = alloc(size(), "temporaries", "forward")
        free(t2, "temporaries", "forward")
        free(t1, "temporaries", "forward")
    grads = []
    for act in reversed(saved):  # backward: grad input, grad weight, release the saved activation
        g_in = alloc(size(), "temporaries", "backward")
        grads.append(alloc(size() // 4, "gradients", "backward"))
        free(act, "activations", "backward")
        free(g_in, "temporaries", "backward")
    for g in grads:  # optimizer step then zero_grad(set_to_none=True)
        t = alloc(size() // 4, "temporaries", "optimizer")
        free(t, "temporaries", "optimizer")
        free(g, "gradients", "optimizer")
    del params
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--history", action="store_true", help="also time replays that record the history")
    args = parser.parse_args()
    events = synthetic_step(args.events)
    for name, config in [
        ("default", AllocatorConfig()),
        ("expandable_segments", AllocatorConfig(expandable_segments=True)),
        ("max_split_size_mb:128", AllocatorConfig.parse("max_split_size_mb:128")),
    ]:
        for history in (False, True) if args.history else (False,):
            _time(events, f"{name}{' +history' if history else ''}", config, history, args.repeat)


def _time(events: list[Event], name: str, config: AllocatorConfig, history: bool, repeat: int) -> None:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = simulate(events, config, record_series=False, history=history)
        best = min(best, time.perf_counter() - start)
    print(
        f"{name:<32} {len(events):>7,} events  best {best * 1e3:7.1f} ms  "
        f"{len(events) / best:>12,.0f} events/s  peak reserved {result.peak_reserved_bytes:,} B"
    )


if __name__ == "__main__":
    main()
