"""Where ELSA keeps what it can rebuild: assembled models, dequantised GGUF copies, compiled kernels.

One root, ``ELSA_CACHE`` (default ``~/.cache/elsa``), with one folder per kind; each kind's own
variable (``ELSA_MODEL_CACHE``, ``ELSA_DEQUANTIZED_CACHE``, ``ELSA_KERNEL_CACHE``) moves that folder
alone, and ``off`` (or 0, none, false) switches a cache off where the kind can do without one.
Everything in it can be deleted at any time; it is only rebuilt, at the cost of time.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "ELSA_CACHE"
OFF = {"off", "0", "none", "false"}


def cache_dir(kind: str, env: str) -> Path | None:
    """The folder for ``kind`` (``$env``, else ``$ELSA_CACHE/kind``, else ``~/.cache/elsa/kind``); None if off."""
    value = os.environ.get(env, "")
    if value.lower() in OFF:
        return None
    if value:
        return Path(value)
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "elsa") / kind
