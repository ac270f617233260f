"""Keep the lines that importing transformers' model code prints, and no one can act on, off the terminal.

Why: transformers' modeling code imports torchao when it is installed, and torchao logs a "Failed
to load ... .so" warning for each of its CUDA kernel libraries this machine cannot load (every
CPU; GPUs it was not built for); torch's pytree then logs deprecation notes for the enums torchao
registers. ELSA uses none of those kernels, yet a user densifying an export with
``elsa.model_io.export.load_checkpoint`` (the README's snippet) saw half a dozen warnings. They come once
per process, at that import, so the import is done here with those loggers lowered. Its
"Loading weights" bar over weights already in memory says nothing either.
:mod:`pipelines.run.quiet` lowers the same loggers for the whole of a quiet CLI run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...] = IMPORT_NOISE_LOGGERS, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers to ``level`` for the block, then restore them; a logger someone set a
    level on (``elsa prune --verbose``, or the user's own logging setup) is left as it is."""
    unset = [logger for logger in map(logging.getLogger, names) if logger.level == logging.NOTSET]
    for logger in unset:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger in unset:
            logger.setLevel(logging.NOTSET)


def import_model_code() -> None:
    """Import transformers' modeling code (and torchao with it) without its import-time warnings;
    a no-op once it is imported. Called before any model is built."""
    with quiet_loggers():
        import transformers.modeling_utils  # noqa: F401


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the block and back on after (if they were on)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
