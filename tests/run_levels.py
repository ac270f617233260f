"""The sparsity each matrix of a tiny-model run gets, recomputed outside the run.

ELSA's default allocation (OWL) gives each decoder block its own level, computed on the dense
model from the run's calibration text; a test that checks a pruned model matrix by matrix
recomputes the levels here, the way the run does, and compares against them.
"""

from __future__ import annotations

from elsa.allocation import resolve_allocation
from elsa.config import make_config
from elsa.model_io.models import load_model, load_tokenizer
from elsa.targets import config_targets, keep_count


def run_levels(model_dir, **fields) -> dict[str, float]:
    """``{weight name: sparsity}`` of a run of ``model_dir`` with these config fields."""
    cfg = make_config({"model": str(model_dir), **fields})
    model = load_model(str(model_dir))
    cfg = resolve_allocation(model, load_tokenizer(str(model_dir)), cfg)
    return {target.name: target.sparsity for target in config_targets(model, cfg)}


def assert_matrix_sparsity(pruned, levels: dict[str, float]) -> None:
    """Every matrix of ``pruned`` has exactly the zeros its level asks for."""
    for name, level in levels.items():
        weight = pruned.get_parameter(name)
        zeros = int((weight == 0).sum())
        assert zeros == weight.numel() - keep_count(weight.numel(), level), (name, level, zeros)
