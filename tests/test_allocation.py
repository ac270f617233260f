"""OWL's non-uniform allocation: the arithmetic, an independent count, and the runs that use it."""

from __future__ import annotations

import json

import pytest
import torch

from elsa.allocation import block_outlier_ratios, input_norms, owl_block_sparsities, resolve_allocation
from elsa.config import ConfigError, make_config
from elsa.targets import config_targets, decoder_blocks, keep_count


def _tiny_cfg(tiny_model_dir, **overrides):
    fields = {"model": str(tiny_model_dir), "sparsity": 0.7, "steps": 4, "seqlen": 64, "calib_blocks": 8}
    return make_config({**fields, **overrides})


def test_owl_levels_have_mean_s_the_band_2_lambda_and_more_outliers_less_sparsity():
    ratios = [0.010, 0.030, 0.020, 0.050, 0.015]
    levels = owl_block_sparsities(ratios, 0.8, 0.08)
    assert 0.8 <= sum(levels) / len(levels) <= 0.8 + 1e-4  # rounded up: never below S
    assert max(levels) - min(levels) == pytest.approx(0.16, abs=2e-4)
    assert sorted(range(5), key=lambda i: levels[i]) == sorted(range(5), key=lambda i: -ratios[i])
    assert owl_block_sparsities([0.02] * 4, 0.8, 0.08) == [0.8] * 4  # nothing to tell the blocks apart
    with pytest.raises(ValueError, match="lambda=0.08 at sparsity 0.95"):
        owl_block_sparsities(ratios, 0.95, 0.08)


def test_outlier_ratios_match_an_independent_count(tiny_model_dir):
    """Hooks + per-feature norms against the inputs kept whole and a per-entry count in Python."""
    from elsa.model_io.models import load_model

    model = load_model(str(tiny_model_dir))
    cfg = _tiny_cfg(tiny_model_dir)
    targets = config_targets(model, cfg)
    calib = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    handles = [
        model.get_submodule(t.name.rsplit(".", 1)[0]).register_forward_pre_hook(
            lambda module, args, name=t.name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for t in targets
    ]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    head_calls = []  # the forward stops at the last target's inputs: the output head never runs
    watch = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    norms = input_norms(model, targets, calib)
    watch.remove()
    assert head_calls == []
    prefix, blocks = decoder_blocks(model)
    expected = []
    for index in range(len(blocks)):
        scores = []
        for t in (t for t in targets if t.name.startswith(f"{prefix}.{index}.")):
            inputs = torch.cat(seen[t.name]).double()
            feature_norm = inputs.pow(2).sum(dim=0).sqrt()
            torch.testing.assert_close(norms[t.name].double(), feature_norm, rtol=1e-4, atol=1e-6)
            weight = t.param.detach().double()
            scores += [
                abs(float(weight[r, c])) * float(feature_norm[c])
                for r in range(weight.shape[0])
                for c in range(weight.shape[1])
            ]
        mean = sum(scores) / len(scores)
        expected.append(sum(s > 3.0 * mean for s in scores) / len(scores))
    got = block_outlier_ratios(model, targets, norms, 3.0)
    assert got == pytest.approx(expected, abs=2.0 / len(scores))
    assert len(set(round(r, 6) for r in got)) > 1  # the blocks differ: the test can tell them apart


def test_the_rule_gives_elsa_owl_and_keeps_uniform_where_sparsities_are_fixed(tmp_path):
    from elsa.presets import paper_preset

    assert make_config({"sparsity": 0.8}).allocation == "owl"
    for sparsity, lam in ((0.7, 0.08), (0.8, 0.08), (0.9, 0.05), (0.95, 0.025)):  # the spread narrows at high S
        assert make_config({"sparsity": sparsity}).owl_lambda == pytest.approx(lam)
    assert make_config({"sparsity": 0.9, "owl_lambda": 0.02}).owl_lambda == 0.02
    assert make_config({"sparsity": 0.8, "method": "sparsegpt"}).allocation == "uniform"
    assert make_config({"pattern": "2:4"}).allocation == "uniform"
    smap = tmp_path / "map.json"
    smap.write_text(json.dumps({"*": 0.6}))
    assert make_config({"sparsity_map": str(smap)}).allocation == "uniform"
    assert make_config(paper_preset("smollm2-135m", 0.7), {"sparsity": 0.7}).allocation == "uniform"
    with pytest.raises(ConfigError, match="allocation=owl sets each block's sparsity itself"):
        make_config({"pattern": "2:4", "allocation": "owl"})
    with pytest.raises(ConfigError, match="owl_lambda=0.6"):
        make_config({"sparsity": 0.8, "owl_lambda": 0.6})


def test_a_one_shot_run_with_owl_prunes_every_matrix_to_its_block_level(tiny_model_dir):
    from elsa.api import prune_model
    from elsa.model_io.models import load_model

    cfg = _tiny_cfg(tiny_model_dir, method="sparsegpt", allocation="owl", owl_lambda=0.1)
    result = prune_model(cfg, model=load_model(str(tiny_model_dir)))
    smap = result.cfg.sparsity_map
    targets = config_targets(result.model, result.cfg)
    assert set(smap) == {t.name for t in targets}
    assert max(smap.values()) - min(smap.values()) == pytest.approx(0.2, abs=2e-4)
    for t in targets:
        assert int((t.param != 0).sum()) == keep_count(t.numel, smap[t.name]), t.name
    total = sum(t.numel for t in targets)
    assert 0.7 <= sum(t.numel * smap[t.name] for t in targets) / total <= 0.7 + 1e-4
    assert 0.7 - 1e-3 < result.report["overall_sparsity"] < 0.7 + 1e-3  # whole entries per matrix


def test_resolving_leaves_uniform_and_resolved_configs_alone(tiny_model_dir):
    from elsa.model_io.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    uniform = _tiny_cfg(tiny_model_dir, allocation="uniform")
    assert resolve_allocation(model, tokenizer, uniform) is uniform
    resolved = resolve_allocation(model, tokenizer, _tiny_cfg(tiny_model_dir))
    assert isinstance(resolved.sparsity_map, dict)
    assert resolve_allocation(model, tokenizer, resolved) is resolved
