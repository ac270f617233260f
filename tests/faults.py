"""Faults the tests inject into Ray Train workers through the worker's ``after_checkpoint`` callbacks.

Ray pickles these by value (``ray.cloudpickle.register_pickle_by_value``), so the workers need
not import the tests folder; production code carries only the generic callback list.
"""

from __future__ import annotations

from pathlib import Path


class FailOnceAfterCheckpoint:
    """Raise once, right after the checkpoint of ``step``; ``marker`` records that it happened."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def __call__(self, step: int) -> None:
        marker = Path(self.marker)
        if step == self.step and not marker.exists():
            marker.write_text(str(step))
            raise RuntimeError(f"injected worker failure after the checkpoint of step {step}")


def by_value(callback):
    """``callback``, its module registered to travel by value to Ray workers."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[type(callback).__module__])
    return callback
