"""Penalty schedules: the value of lambda (or rho) at a given step.

The paper's default rises from lambda_0 to lambda_final along a half cosine; linear and
exponential are the other common shapes. ``constant`` ignores ``end``.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine", "exponential")


def schedule_value(kind: str, start: float, end: float | None, step: int, total: int) -> float:
    """Value at ``step`` of ``total`` (t/T clipped to [0, 1])."""
    if kind == "constant" or end is None:
        return float(start)
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return start + (end - start) * (1.0 - math.cos(math.pi * t)) / 2.0
    if kind == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError(f"exponential schedule needs start > 0 and end > 0, got {start}, {end}")
        return start * (end / start) ** t
    raise ValueError(f"schedule {kind!r} is unknown; choose one of {', '.join(SCHEDULES)}")


def dual_rescale_factor(old: float, new: float) -> float:
    """Factor for the scaled dual u = y / lambda when lambda moves from ``old`` to ``new``.

    Keeps lambda * u (the unscaled dual y) invariant. When either value is zero the dual is
    kept as it is: dividing by zero is meaningless and multiplying by zero would wipe it (the
    authors' code does the latter when a schedule starts at 0).
    """
    if old == new or old == 0.0 or new == 0.0:
        return 1.0
    return old / new
