"""The one-shot baselines (magnitude, Wanda, SparseGPT) against independent references.

- Wanda's mask is compared with a brute-force computation written with plain Python loops.
- SparseGPT's update is checked against the least-squares optimum where OBS is exact (one pruned
  column), and its reconstruction error against magnitude's and Wanda's on correlated inputs.
- Every method on tiny Llama, OPT and GPT-2: exact per-matrix sparsity, 2:4, untouched
  non-target parameters, finite loss.

The layer-by-layer pass they share: test_layerwise_pass.py.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from baseline_helpers import VOCAB
from baseline_helpers import calib_ids as _calib
from baseline_helpers import method_cfg as _cfg

from elsa.config import ConfigError, make_config
from elsa.methods import get_method
from elsa.methods.layerwise import module_of, rows_view
from elsa.methods.magnitude import Magnitude
from elsa.methods.sparsegpt import SparseGPT, sparsegpt_prune
from elsa.methods.wanda import Wanda, wanda_mask
from elsa.optim.projection import nm_mask, topk_mask
from elsa.targets import Target, config_targets, find_targets, nm_satisfied, verify_sparsity
from elsa.tiny import tiny_model

METHODS = ("magnitude", "wanda", "sparsegpt")


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a random, far-from-identity covariance and uneven feature scales (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / math.sqrt(features)
    scales = torch.exp(torch.randn(features, generator=g))
    noise = 0.1 * torch.randn(tokens, features, generator=g)
    return (torch.randn(tokens, features, generator=g) @ mix + noise) * scales


def _target(weight: torch.Tensor, sparsity: float, nm=None, input_dim: int = 1) -> Target:
    return Target("layer.weight", torch.nn.Parameter(weight.clone()), sparsity, nm, input_dim)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_returns_the_baselines():
    assert isinstance(get_method("magnitude"), Magnitude)
    assert isinstance(get_method("wanda"), Wanda)
    assert isinstance(get_method("sparsegpt"), SparseGPT)
    for name in METHODS:
        assert get_method(name).one_shot is True
        assert get_method(name).name == name


def test_unknown_method_names_the_value():
    with pytest.raises(ValueError, match="'obs-magic'"):
        get_method("obs-magic")


# ---------------------------------------------------------------------------------------------
# Wanda against brute force


def _brute_force_wanda(weight: torch.Tensor, x: torch.Tensor, keep: int, input_dim: int, nm=None) -> torch.Tensor:
    """Loops only: per output row, score |W_ij| * ||X_j||, sort (score desc, index asc), keep the top."""
    w = weight.tolist() if input_dim == 1 else weight.t().tolist()
    rows, cols = len(w), len(w[0])
    norms = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(cols)]
    mask = [[False] * cols for _ in range(rows)]
    for i in range(rows):
        scores = [abs(w[i][j]) * norms[j] for j in range(cols)]
        if nm is None:
            row_keep = keep // rows + (1 if i < keep % rows else 0)
            groups = [list(range(cols))]
        else:
            row_keep = nm[0]
            groups = [list(range(g, g + nm[1])) for g in range(0, cols, nm[1])]
        for group in groups:
            for j in sorted(group, key=lambda j: (-scores[j], j))[:row_keep]:
                mask[i][j] = True
    result = torch.tensor(mask)
    return result if input_dim == 1 else result.t()


@pytest.mark.parametrize("input_dim", [1, 0], ids=["linear", "conv1d"])
@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_wanda_mask_matches_brute_force(input_dim, pattern):
    g = torch.Generator().manual_seed(1)
    out_features, in_features = 7, 12  # 84 entries at 70%: 26 kept, not a multiple of 7 rows
    weight = torch.randn(out_features, in_features, generator=g)
    weight[0, :4] = 0.5  # exact ties inside a row: the lower index must win
    x = torch.randn(20, in_features, generator=g)
    x[:, 1] = x[:, 0]
    stored = weight if input_dim == 1 else weight.t().contiguous()
    target = _target(stored, 0.7 if pattern is None else 0.5, pattern, input_dim)
    norms = x.pow(2).sum(0).sqrt()
    mask = wanda_mask(target, norms)
    expected = _brute_force_wanda(stored, x, target.keep, input_dim, pattern)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == target.keep


def test_wanda_on_a_model_uses_the_layer_inputs():
    """The mask of block 0's q_proj equals brute force over that layer's inputs in a plain forward."""
    model = tiny_model("llama", VOCAB, seed=0)
    calib = _calib(2, 16)
    layer = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    x = torch.cat(seen)
    dense = layer.weight.detach().clone()
    cfg = _cfg("wanda", sparsity=0.6)
    get_method("wanda").run(model, None, cfg, calib, lambda metrics, step: None)
    target = next(t for t in config_targets(model, cfg) if t.name == "model.layers.0.self_attn.q_proj.weight")
    expected = _brute_force_wanda(dense, x, target.keep, 1)
    assert torch.equal(layer.weight != 0, expected)
    assert torch.equal(layer.weight[expected], dense[expected])  # Wanda masks, never updates


# ---------------------------------------------------------------------------------------------
# SparseGPT


def test_sparsegpt_keeps_a_dense_layer_unchanged():
    x = _correlated_inputs(256, 32)
    weight = torch.randn(8, 32)
    new, mask = sparsegpt_prune(weight, 2 * x.t() @ x / 256, keep=weight.numel())
    assert mask.all()
    assert torch.allclose(new, weight, atol=1e-5)


def test_sparsegpt_update_is_the_least_squares_optimum_for_one_pruned_column():
    """Removing one input, OBS is exact: the result must be the best fit of W X without it."""
    x = _correlated_inputs(512, 24, seed=3)
    weight = torch.randn(6, 24, dtype=torch.float64)
    weight[:, 5] = 1e-4  # the lowest saliency by far: pruned in every row
    hessian = 2 * x.t().double() @ x.double() / 512
    new, mask = sparsegpt_prune(weight, hessian, keep=weight.numel() - 6, damp=1e-9)
    assert not mask[:, 5].any() and int(mask.sum()) == weight.numel() - 6
    keep = [j for j in range(24) if j != 5]
    xd = x.double()
    optimum = torch.linalg.lstsq(xd[:, keep], xd @ weight.t()).solution.t()
    assert torch.allclose(new[:, keep].double(), optimum, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "pattern,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5)], ids=["unstructured-0.5", "unstructured-0.7", "2:4"]
)  # N:M fixes 50%
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern, sparsity):
    x = _correlated_inputs(1024, 256, seed=4)
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(5))
    target = _target(weight, sparsity, pattern)
    norms = x.pow(2).sum(0).sqrt()

    def error(pruned: torch.Tensor) -> float:
        return float(torch.linalg.norm(x @ weight.t() - x @ pruned.t()))

    def masked(score):
        return weight * (nm_mask(score, *pattern) if pattern else topk_mask(score, target.keep))

    new, mask = sparsegpt_prune(weight, 2 * x.t() @ x / x.shape[0], target.keep, pattern, blocksize=64)
    if pattern is None:
        assert int((new != 0).sum()) == target.keep
    else:
        assert nm_satisfied(new, *pattern)
    sparsegpt, magnitude, wanda = error(new), error(masked(weight.abs())), error(masked(weight.abs() * norms))
    assert sparsegpt < 0.9 * min(magnitude, wanda), (sparsegpt, magnitude, wanda)


def test_sparsegpt_refuses_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="Hessian shape"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(6), keep=16)


# ---------------------------------------------------------------------------------------------
# every method on tiny models


def _loss(model, tokens) -> float:
    with torch.no_grad():
        return float(model(input_ids=tokens, labels=tokens, use_cache=False).loss)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_method_prunes_tiny_model_exactly(arch, method, pattern):
    model = tiny_model(arch, VOCAB, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(method, pattern, sparsity=0.7)
    logged = []
    summary = get_method(method).run(model, None, cfg, _calib(), lambda metrics, step: logged.append(step))
    assert summary["wall_s"] >= 0 and logged

    targets = find_targets(model, cfg.sparsity, cfg.nm)
    verify_sparsity(targets)
    for target in targets:
        if cfg.nm is None:
            assert int((target.param != 0).sum()) == target.keep, target.name
        else:
            assert nm_satisfied(target.param, *cfg.nm, input_dim=target.input_dim), target.name
            assert int((target.param != 0).sum()) == target.numel // 2, target.name
    target_names = {t.name for t in targets}
    after = model.state_dict()
    for name, value in before.items():
        if name not in target_names:  # embeddings, lm_head, norms, biases
            assert torch.equal(after[name], value), name
    assert math.isfinite(_loss(model, _calib(2, 32, seed=9)))


def test_sparsity_map_gives_each_matrix_its_own_sparsity(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"*.mlp.*": 0.8, "*": 0.3}))
    for method in METHODS:
        model = tiny_model("llama", VOCAB, seed=0)
        cfg = make_config({"method": method, "sparsity_map": str(path)})
        get_method(method).run(model, None, cfg, _calib(2, 16), lambda m, s: None)
        for target in config_targets(model, cfg):
            assert target.sparsity == (0.8 if ".mlp." in target.name else 0.3)
            assert int((target.param != 0).sum()) == target.keep, (method, target.name)


def test_sparsegpt_output_stays_closer_to_dense_than_magnitude():
    """On the same calibration tokens, SparseGPT's pruned tiny model stays closer to the dense
    model's outputs than magnitude's (layer-wise reconstruction shows through to the logits)."""
    calib = _calib(8, 32)
    dense = tiny_model("llama", VOCAB, seed=0)
    with torch.no_grad():
        reference = dense(input_ids=calib).logits
    drift = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        get_method(method).run(model, None, _cfg(method, sparsity=0.5), calib, lambda m, s: None)
        with torch.no_grad():
            drift[method] = float(torch.linalg.norm(model(input_ids=calib).logits - reference))
    assert drift["sparsegpt"] < drift["magnitude"], drift


def test_conv1d_rows_view_is_out_by_in():
    model = tiny_model("gpt2", VOCAB, seed=0)
    target = find_targets(model, 0.5)[0]
    assert target.input_dim == 0
    layer = module_of(model, target)
    assert rows_view(target.param, target).shape == (layer.nf, target.shape[0])


def _pruned(cfg, name: str | None = None) -> dict:
    from elsa.methods import method_for

    model = tiny_model("llama", VOCAB, seed=0)
    method_for(cfg, name).run(model, None, cfg, _calib(), lambda m, s: None)
    return model.state_dict()


def test_method_settings_reach_the_method_from_the_command_line():
    """--sparsegpt-damp and --no-wanda-per-row travel flag -> config -> registry -> method, and change the result."""
    from cli.main import make_parser
    from pipelines.cli import build_config

    args = make_parser().parse_args(
        ["prune", "--method", "sparsegpt", "--sparsity", "0.7", "--sparsegpt-damp", "10", "--no-wanda-per-row"]
    )
    cfg = build_config(args)
    assert cfg.method_args == {"sparsegpt": {"damp": 10.0}, "wanda": {"per_row": False}}
    default, damped = _pruned(_cfg("sparsegpt")), _pruned(cfg)
    assert _pruned(_cfg("sparsegpt", method_args={"sparsegpt": {"damp": 0.01}})).keys() == default.keys()
    for name, value in _pruned(_cfg("sparsegpt", method_args={"sparsegpt": {"damp": 0.01}})).items():
        assert torch.equal(value, default[name]), name  # the default, stated once, is 0.01
    assert any(not torch.equal(damped[k], default[k]) for k in default)
    # a heavily damped Hessian is nearly the identity: SparseGPT's mask tends to magnitude's
    model = tiny_model("llama", VOCAB, seed=0)
    for target in find_targets(model, 0.7):
        magnitude = target.param.abs() >= target.param.abs().flatten().kthvalue(target.numel - target.keep).values
        agreement = ((damped[target.name] != 0) == magnitude).float().mean()
        default_agreement = ((default[target.name] != 0) == magnitude).float().mean()
        assert agreement >= default_agreement - 1e-6, target.name


def test_wanda_per_row_false_compares_over_the_whole_matrix():
    whole = _pruned(_cfg("wanda", method_args={"wanda": {"per_row": False}}))
    per_row = _pruned(_cfg("wanda"))
    differs = 0
    for target in find_targets(tiny_model("llama", VOCAB, seed=0), 0.7):
        rows = (whole[target.name] != 0).sum(dim=1)
        differs += int(rows.max() != rows.min())  # whole-matrix masks need not share a row's count
        assert int((whole[target.name] != 0).sum()) == target.keep
        assert int((per_row[target.name] != 0).sum()) == target.keep
    assert differs > 0


@pytest.mark.parametrize(
    "args, words",
    [
        ({"sparsegpt": {"damp": 0}}, ["sparsegpt.damp", "--sparsegpt-damp"]),
        ({"sparsegpt": {"blocksize": 0}}, ["sparsegpt.blocksize", "--sparsegpt-blocksize"]),
        ({"sparsegpt": {"dampening": 1}}, ["sparsegpt.dampening"]),
        ({"obs": {}}, ["obs", "no such method"]),
        ({"elsa": {"lr": 1}}, ["elsa", "config fields"]),
    ],
)
def test_bad_method_args_are_refused_by_name(args, words):
    with pytest.raises(ConfigError) as err:
        make_config({"method": "sparsegpt", "sparsity": 0.7, "method_args": args})
    for word in words:
        assert word in str(err.value)
