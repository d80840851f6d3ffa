"""A full trace at another batch size from a full trace and a forward/backward-only one.

Of the reference step's two iterations, only the forward and backward depend on the batch size:

* the optimizer's steps (its state, its temporaries, zero_grad) see parameters and gradients,
  whose shapes do not change with the batch; their events are taken from the full trace as is;
* iteration 2's forward and backward repeat iteration 1's, less what iteration 1 made once for
  good (a library workspace, the loss scaler's state). That is checked on the full trace itself:
  when its second window is not the first one repeated, nothing is composed.

So ``fit`` traces the whole step once (batch size 1) and, at the other sizes it needs, only the
first iteration's forward and backward (``window_only``), about half the work. :func:`compose`
lines the short trace up with the full one event by event (same actions, same storages in the
same roles, same categories and layers: only sizes may differ) and returns the full trace with
the batch-dependent sizes replaced, or None when they do not line up (then the caller traces in
full). ``tests/test_compose.py`` checks composed traces against full traces at the same size.
"""

from __future__ import annotations

from ._events import Event
from ._trace import Trace


def _structure(e: Event, storage: int) -> tuple[object, ...]:
    return (e.action, storage, e.category, e.module, e.phase, e.iteration)


def _roles(events: list[Event]) -> dict[int, int]:
    """Each storage's role: the order of its birth."""
    roles: dict[int, int] = {}
    for e in events:
        if e.action == "alloc" and e.storage not in roles:
            roles[e.storage] = len(roles)
    return roles


def _same_shape(a: list[Event], b: list[Event]) -> dict[int, int] | None:
    """Storage ids of ``a`` -> those of ``b`` when the two runs of events differ only in sizes."""
    if len(a) != len(b):
        return None
    roles_a, roles_b = _roles(a), _roles(b)
    pairs: dict[int, int] = {}
    for ea, eb in zip(a, b):
        ra, rb = roles_a.get(ea.storage, -1 - ea.storage), roles_b.get(eb.storage, -1 - eb.storage)
        if _structure(ea, ra) != _structure(eb, rb):
            return None
        pairs[ea.storage] = eb.storage
    return pairs


def _repeats(full: Trace) -> dict[int, int] | None:
    """Iteration 2's window in ``full`` as iteration 1's repeated: its storages -> their first-iteration twins."""
    f1, o1 = full.mark_index("forward", 1), full.mark_index("optimizer", 1)
    f2, o2 = full.mark_index("forward", 2), full.mark_index("optimizer", 2)
    if None in (f1, o1, f2, o2):
        return None
    assert f1 is not None and o1 is not None and f2 is not None and o2 is not None
    events = full.events
    born_in_window = {e.storage for e in events[f1:o1] if e.action == "alloc"}
    alive = set()
    for e in events[:f2]:
        if e.action == "alloc":
            alive.add(e.storage)
        else:
            alive.discard(e.storage)
    kept_for_good = born_in_window & alive  # e.g. a cuBLAS workspace: made in iteration 1 only
    first = [e for e in events[f1:o1] if e.storage in born_in_window and e.storage not in kept_for_good]
    second = events[f2:o2]
    if len(first) != len(second):
        return None
    twins: dict[int, int] = {}
    roles_1, roles_2 = _roles(first), _roles(second)
    for e1, e2 in zip(first, second):
        if e2.storage not in roles_2 or roles_1.get(e1.storage) != roles_2[e2.storage]:
            return None  # the second window frees or reuses something the first did not make
        if (e1.action, e1.nbytes, e1.category, e1.module, e1.phase) != (
            e2.action,
            e2.nbytes,
            e2.category,
            e2.module,
            e2.phase,
        ):
            return None
        twins[e2.storage] = e1.storage
    return twins


def compose(full: Trace, short: Trace) -> Trace | None:
    """``full`` (every phase, one batch size) with sizes from ``short`` (window only, another size)."""
    if full.window_only or not short.window_only:
        raise ValueError("compose needs a full trace and a window-only one")
    o1, end = full.mark_index("optimizer", 1), short.mark_index("end")
    if o1 is None or end is None:
        return None
    pairs = _same_shape(full.events[:o1], short.events[:end])
    twins = _repeats(full)
    if pairs is None or twins is None:
        return None
    sizes = {e.storage: e.nbytes for e in short.events[:end] if e.action == "alloc"}

    def counterpart(storage: int) -> int | None:
        return pairs.get(twins.get(storage, storage))

    # the kernels' buffers (_cuda_scratch): each call of the full trace with its arguments at
    # the short trace's size, found through its first buffer's counterpart
    short_calls = {call[1][0]: call for call in short.kernel_calls if call[1]}
    calls = []
    for call in full.kernel_calls:
        twin = counterpart(call[1][0]) if call[1] else None
        match = short_calls.get(twin) if twin is not None else None
        calls.append((call[0], call[1], match[2], match[3]) if match is not None else call)

    events = []
    numels = dict(full.numels)
    for e in full.events:
        other = counterpart(e.storage)
        if other is not None:
            e = e._replace(nbytes=sizes.get(other, e.nbytes))
            if other in short.numels:
                numels[e.storage] = short.numels[other]
        events.append(e)
    return Trace(
        short.batch_size,
        full.device,
        events,
        dict(short.activation_bytes_by_module),
        list(dict.fromkeys([*full.notes, *short.notes])),
        numels,
        full.module_types,
        list(full.marks),
        False,
        calls,
        full.compute_capability,
        full.loss,
    )
