"""Typed settings of the one-shot methods: the ``method_args`` block of a config.

``method_args`` maps a method's name to its settings, so they apply wherever the method runs
(``--method sparsegpt`` or as ELSA's warm start, ``--init sparsegpt``)::

    method_args:
      sparsegpt: {damp: 0.05, blocksize: 64}

On the command line each setting is a flag ``--<method>-<setting>`` (``--sparsegpt-damp 0.05``).
Pure pydantic, no torch: validating a config stays cheap. ELSA's own settings are the fields
of :class:`elsa.config.PruneConfig` itself.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MagnitudeSettings(_Settings):
    """Magnitude pruning has nothing to set: per matrix, the largest |W| stay."""


class WandaSettings(_Settings):
    # the paper's choice; False: over the whole matrix
    per_row: bool = Field(True, description="compare |W| * ||X|| within each output row")


class SparseGPTSettings(_Settings):
    blocksize: int = Field(128, ge=1, description="columns per lazy-batch update (and per mask choice, unstructured)")
    damp: float = Field(0.01, gt=0, description="added to the Hessian's diagonal, times its mean")


SETTINGS: dict[str, type[_Settings]] = {
    "magnitude": MagnitudeSettings,
    "wanda": WandaSettings,
    "sparsegpt": SparseGPTSettings,
}


def method_settings(name: str, args: dict | None = None) -> _Settings:
    """The validated settings of method ``name`` (ValueError naming the bad key otherwise)."""
    if name not in SETTINGS:
        if name == "elsa":
            raise ValueError("elsa: ELSA's settings are config fields (e.g. --lr, --rho), not method_args")
        raise ValueError(f"{name}: no such method; one of {', '.join(SETTINGS)}")
    return SETTINGS[name](**(args or {}))
