"""Config validation: every invalid value raises ConfigError whose message names the field."""

from __future__ import annotations

import pytest

from elsa.config import ConfigError, make_config

BASE = {"sparsity": 0.7}

INVALID = [
    # (overrides, words the message must contain)
    ({"sparsity": 0.0}, ["sparsity"]),
    ({"sparsity": 1.0}, ["sparsity"]),
    ({"sparsity": 1.5}, ["sparsity"]),
    ({"sparsity": -0.2}, ["sparsity"]),
    ({"pattern": "2:4", "sparsity": 0.7}, ["pattern", "sparsity"]),
    ({"pattern": "4:8", "sparsity": 0.6}, ["pattern", "sparsity"]),
    ({"pattern": "4:2"}, ["pattern"]),
    ({"pattern": "two:four"}, ["pattern"]),
    ({"z_dtype": "fp16"}, ["z_dtype"]),
    ({"u_dtype": "int4"}, ["u_dtype"]),
    ({"lmda_schedule": "step"}, ["lmda_schedule"]),
    ({"rho": 0.1, "rho_schedule": "warmup"}, ["rho_schedule"]),
    ({"lmda_schedule": "cosine"}, ["lmda_final"]),  # a schedule needs its end value
    ({"lmda": 0.0, "lmda_final": 1e-2, "lmda_schedule": "exponential"}, ["lmda"]),
    ({"interval": 0}, ["interval"]),
    ({"interval": -3}, ["interval"]),
    ({"optimizer": "sgd", "projection": "fisher"}, ["projection", "optimizer"]),
    ({"optimizer": "sgd"}, ["projection", "optimizer"]),  # fisher is the default projection
    ({"optimizer": "lion"}, ["optimizer"]),
    ({"projection": "hessian"}, ["projection"]),
    ({"penalty": "soft"}, ["penalty"]),
    ({"lr": 0.0}, ["lr"]),
    ({"lmda": -1e-3}, ["lmda"]),
    ({"steps": 0}, ["steps"]),
    ({"eval_interval": 0}, ["eval_interval"]),
    ({"nonsense_field": 1}, ["nonsense_field"]),
]


@pytest.mark.parametrize("overrides,words", INVALID, ids=[str(o) for o, _ in INVALID])
def test_invalid_config_names_the_field(overrides, words):
    with pytest.raises(ConfigError) as err:
        make_config(BASE, overrides)
    message = str(err.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_nm_without_sparsity_implies_it():
    assert make_config({"pattern": "2:4"}).sparsity == pytest.approx(0.5)
    assert make_config({"pattern": "4:8", "sparsity": 0.5}).nm == (4, 8)
    assert make_config({"pattern": "1:4"}).sparsity == pytest.approx(0.75)


def test_sparsity_required_and_valid_neighbours_accepted():
    with pytest.raises(ConfigError, match="sparsity"):
        make_config({})
    make_config({"sparsity": 0.9, "optimizer": "sgd", "projection": "magnitude"})
    make_config({"sparsity": 0.9, "optimizer": "adam8bit", "z_dtype": "fp8_e4m3", "u_dtype": "bf16", "z_sparse": True})
    make_config({"sparsity": 0.5, "interval": 1, "lmda": 0.0, "lmda_final": 1e-2, "lmda_schedule": "cosine"})


def test_later_layers_win_and_none_is_skipped():
    cfg = make_config({"sparsity": 0.7, "lr": 1e-3}, {"lr": None, "interval": 8}, {"interval": 16})
    assert cfg.lr == 1e-3 and cfg.interval == 16


@pytest.mark.parametrize("steps,expected", [(1, 1), (5, 2), (32, 8), (300, 75)])
def test_eval_interval_gives_four_validations_unless_set(steps, expected):
    assert make_config(BASE, {"steps": steps}).eval_interval == expected
    assert make_config(BASE, {"steps": steps, "method": "sparsegpt"}).eval_interval == expected
    assert make_config(BASE, {"steps": steps, "eval_interval": 3}).eval_interval == 3
