"""The budget rule's lr, scaled to the dense model's weights (elsa/weight_scale.py, elsa/budget.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elsa import budget
from elsa.budget import scaled_lr
from elsa.config import make_config
from elsa.weight_scale import read_weight_scale, resolve_lr, resolve_on_dense, write_weight_scale


def test_scaled_lr_is_the_rule_lr_at_smollm2s_scale_and_proportional_elsewhere():
    assert scaled_lr(budget.LR_REFERENCE_RMS) == budget.LR
    assert scaled_lr(0.19019603729248047) == 6e-4  # SmolLM2-135M's measured median: its figures stand
    assert scaled_lr(0.039544492959976196) == 1.2e-4  # Gemma-3-270M: the best rate of the probes
    assert scaled_lr(0.095) == pytest.approx(budget.LR / 2)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--lr"):
            scaled_lr(bad)


def test_an_unset_lr_is_left_for_the_dense_model_and_a_set_one_is_kept(tmp_path):
    assert make_config({"sparsity": 0.8}).lr is None
    assert make_config({"sparsity": 0.8, "penalty": "coupled"}).lr == budget.COUPLED_LR
    mine = make_config({"sparsity": 0.8, "lr": 3e-4})
    assert resolve_lr(mine, 0.01).lr == 3e-4
    with pytest.raises(ValueError, match="the warm start at s3://b/run/init .*--lr"):
        resolve_lr(make_config({"sparsity": 0.8}), read_weight_scale(tmp_path), "the warm start at s3://b/run/init")
    write_weight_scale(tmp_path, 0.0395)
    assert resolve_lr(make_config({"sparsity": 0.8}), read_weight_scale(tmp_path)).lr == 1.2e-4


def _median_rms_by_numpy(model, names: list[str]) -> float:
    """Independent of elsa: numpy's median of each named matrix's RMS."""
    weights = dict(model.named_parameters())
    return float(np.median([np.sqrt(np.mean(weights[n].detach().double().numpy() ** 2)) for n in names]))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_prune_model_trains_at_the_lr_of_its_dense_weights(tiny_model_dir, scale):
    """Single-process ELSA resolves the lr before pruning: from the dense weights (numpy's median), and
    four times larger weights give a four times larger lr (to the rule's two digits)."""
    from elsa.api import prune_model
    from elsa.model_io.models import load_model, load_tokenizer
    from elsa.targets import config_targets

    cfg = make_config(
        {"model": str(tiny_model_dir), "sparsity": 0.7, "steps": 2, "seqlen": 32, "batch_size": 1, "val_blocks": 1}
    )
    cfg = cfg.model_copy(update={"init": "none", "allocation": "uniform", "calib_blocks": 4})
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    names = [t.name for t in config_targets(model, cfg)]
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).mul_(scale)
    median = _median_rms_by_numpy(model, names)
    result = prune_model(cfg, model=model, tokenizer=tokenizer)
    assert result.weight_rms == pytest.approx(median, rel=1e-12)
    assert result.cfg.lr == float(f"{budget.LR * median / budget.LR_REFERENCE_RMS:.2g}")
    assert result.report["overall_sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_resolve_on_dense_measures_before_pruning(tiny_model_dir):
    from elsa.model_io.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    cfg = make_config({"model": str(tiny_model_dir), "sparsity": 0.7, "allocation": "uniform"})
    resolved, median = resolve_on_dense(model, tokenizer, cfg)
    assert resolved.lr == scaled_lr(median) and cfg.lr is None  # the caller's config is not changed
