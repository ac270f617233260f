"""The one line a user reads when a run fails: the root cause, not Ray's wrapper.

Why: Ray Train reports a worker's exception as ``Training failed due to worker errors:`` followed
by every rank's traceback, and a Ray task's as a ``RayTaskError`` whose first line is the task's
name. The terminal shows one line, so it must be the worker's own message (``rank 0:
NonFiniteLossError: training loss is nan at step 3 ...``). Found by duck typing (the attributes
Ray's exceptions carry), so nothing here imports Ray. Credentials in URIs are masked.
"""

from __future__ import annotations

from pipelines.records.redact import redact


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def root_cause(err: BaseException) -> tuple[BaseException, int | None]:
    """The innermost user exception under Ray's wrappers, and the worker rank it came from."""
    rank = None
    for _ in range(8):  # wrappers nest a few levels at most
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            err = failures[rank]
            continue
        for attribute in ("controller_failure", "_base_exc", "cause"):
            inner = getattr(err, attribute, None)
            if isinstance(inner, BaseException) and inner is not err:
                err = inner
                break
        else:
            break
    return err, rank


def one_line(err: BaseException) -> str:
    """``[rank R: ]Type: first line of the message``, credentials masked (the type is left out of
    the usage errors this project raises itself, whose text already names the option)."""
    cause, rank = root_cause(err)
    message = _first_line(str(cause))
    if cause is err and rank is None and message:
        text = message
    else:
        text = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    if rank is not None:
        text = f"worker rank {rank}: {text}"
    return redact(text)
