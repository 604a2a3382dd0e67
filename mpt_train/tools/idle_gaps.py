"""Where a profiled GPU step sits idle, and what the host was doing meanwhile.

A step that keeps the GPU 94% busy loses its last 6% in gaps between kernels: a device-to-host
read that drains the queue, Python between two launches, a data copy. The kernel table says
nothing about them; the timeline does. :func:`idle_gaps` walks the kernels of a
``torch.profiler`` run in time order, finds the gaps, and names the kernels on either side
(where in the step it is) and the host ops that ran inside it (why): a gap full of ops is the
host doing work the GPU waits for; a gap without ops is the host in Python (trainer,
callbacks) or waiting (a DataLoader worker, another thread), named by the profiler's annotated
ranges around it when there are any.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Gap", "format_gaps", "gaps_from_profile", "idle_gaps", "is_annotation"]

Span = tuple[float, float, str]  # start us, end us, name


@dataclass
class Gap:
    start: float
    duration: float
    before: str  # the kernel that ran last
    after: str  # the kernel that ended the gap
    host: dict[str, float] = field(default_factory=dict)  # outermost host op -> us inside
    # With no host op inside: the annotated ranges around it (DataLoader next, zero_grad, ...),
    # innermost first, with how long each lasts (us).
    ranges: dict[str, float] = field(default_factory=dict)


def _overlaps(spans: Sequence[Span]) -> Callable[[float, float], list[tuple[str, float, float]]]:
    """A function (lo, hi) -> [(name, us of overlap, us the span lasts)] over ``spans``,
    without a full scan per query: spans sorted by start, and a running maximum of their ends
    to know when no earlier span can reach back into the query."""
    ordered = sorted(spans)
    starts = [s for s, _, _ in ordered]
    reach = list(itertools.accumulate((e for _, e, _ in ordered), max))

    def query(lo: float, hi: float) -> list[tuple[str, float, float]]:
        found = []
        i = bisect.bisect_left(starts, hi) - 1
        while i >= 0 and reach[i] > lo:
            start, end, name = ordered[i]
            overlap = min(end, hi) - max(start, lo)
            if overlap > 0:
                found.append((name, overlap, end - start))
            i -= 1
        return found

    return query


def idle_gaps(
    kernels: Sequence[Span],
    host_ops: Sequence[Span],
    min_us: float = 20.0,
    ranges: Sequence[Span] = (),
) -> list[Gap]:
    """Gaps of at least ``min_us`` between device kernels (overlapping kernels merged), each
    with the host ops overlapping it (and, when there are none, the ``ranges`` around it)."""
    gaps: list[Gap] = []
    ordered = sorted(kernels)
    if not ordered:
        return gaps
    busy_until, last = ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start - busy_until >= min_us:
            gaps.append(Gap(busy_until, start - busy_until, last, name))
        if end >= busy_until:
            busy_until, last = end, name
    ops_in, ranges_in = _overlaps(host_ops), _overlaps(ranges)
    for gap in gaps:
        lo, hi = gap.start, gap.start + gap.duration
        for name, overlap, _ in ops_in(lo, hi):
            gap.host[name] = gap.host.get(name, 0.0) + overlap
        if not gap.host:  # innermost (shortest) range first
            for name, _, length in sorted(ranges_in(lo, hi), key=lambda r: r[2]):
                gap.ranges.setdefault(name, length)
    return gaps


def is_annotation(e: Any) -> bool:
    """A range that annotates other ops (user ranges, ``Optimizer.step#...``,
    ``ProfilerStep#N``) rather than doing work itself."""
    return bool(getattr(e, "is_user_annotation", False)) or "#" in e.name


def _outermost_op(e: Any) -> bool:
    parent = e.cpu_parent
    while parent is not None:
        if not is_annotation(parent):
            return False
        parent = parent.cpu_parent
    return not is_annotation(e)


def gaps_from_profile(events: Sequence[Any], min_us: float = 20.0) -> list[Gap]:
    """:func:`idle_gaps` of ``torch.profiler.profile().events()``: device kernels against
    the host's outermost ops (on every thread: backward launches from autograd's thread)."""
    from torch.autograd import DeviceType

    kernels, host, ranges = [], [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end, e.name)
        if e.device_type == DeviceType.CUDA and not is_annotation(e):
            kernels.append(span)
        elif e.device_type == DeviceType.CPU and is_annotation(e):
            ranges.append(span)
        elif e.device_type == DeviceType.CPU and _outermost_op(e):
            host.append(span)
    return idle_gaps(kernels, host, min_us, ranges)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_gaps(gaps: Sequence[Gap], steps: int, wall_ms: float, top: int = 8) -> str:
    """The idle time per step, then the largest gap kinds (same kernels on either side),
    each with the host ops inside it."""
    if not gaps:
        return "GPU idle: no gap between kernels"
    kinds: dict[tuple[str, str], list[Gap]] = defaultdict(list)
    for g in gaps:
        kinds[(g.before, g.after)].append(g)
    total_ms = sum(g.duration for g in gaps) / 1e3 / steps
    lines = [
        f"GPU idle between kernels {total_ms:.1f} ms/step ({100 * total_ms / wall_ms:.0f}% of "
        f"the step), {len(gaps)} gaps in {steps} profiled step(s); the largest kinds:"
    ]
    ranked = sorted(kinds.items(), key=lambda kv: -sum(g.duration for g in kv[1]))
    for (before, after), group in ranked[:top]:
        ms = sum(g.duration for g in group) / 1e3 / steps
        host: dict[str, float] = defaultdict(float)
        for g in group:
            for name, us in g.host.items():
                host[name] += us
        in_ops = sum(host.values()) / 1e3 / steps
        parts = [
            f"{_short(n, 40)} {us / 1e3 / steps:.2f}"
            for n, us in sorted(host.items(), key=lambda kv: -kv[1])[:4]
        ]
        around: dict[str, float] = {}
        for g in group:
            for name, length in g.ranges.items():
                around[name] = min(length, around.get(name, length))
        if around:
            inner = sorted(around, key=lambda n: around[n])[:2]
            parts.append("inside " + ", ".join(_short(n, 40) for n in inner))
        ops = "; ".join(parts)
        each = sum(g.duration for g in group) / 1e3 / len(group)
        lines.append(
            f"  {ms:6.2f} ms/step ({len(group)} x {each:.2f} ms) after {_short(before)} -> "
            f"{_short(after)}; host ops {in_ops:.2f} ms/step{': ' + ops if ops else ''}"
        )
    return "\n".join(lines)
