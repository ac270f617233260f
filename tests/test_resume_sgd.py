"""The Ray Train worker's checkpoint (torch.distributed.checkpoint of model + ADMM) resumes for every base optimiser
(SGD, Adam, AdamW, bitsandbytes' 8-bit Adam).

Plain SGD keeps no state for the parameters that are not pruned, which torch's strict loader
refused ("Missing optimizer state for parameter 'model.embed_tokens.weight'"): every restart of
an ``--optimizer sgd`` run failed. Here: 2N steps in one go equal N steps, ``_save_state``, a fresh
model and optimiser, ``_load_state``, N steps, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from elsa import tiny
from core_settings import RESUME_STEPS, resume_batches, resume_config
from elsa.loop import LoopHooks, build_admm, train

N = RESUME_STEPS


def _setup(cfg):
    model = tiny.tiny_model("llama", tiny.TINY_VOCAB_SIZE, seed=0)
    admm, scheduler = build_admm(model, cfg)
    return model, admm, scheduler


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "projection": "magnitude", "lr": 1e-2},
        {"optimizer": "adam"},
        {"optimizer": "adamw", "weight_decay": 0.01},
        {"optimizer": "adam8bit"},
    ],
    ids=["sgd", "adam", "adamw", "adam8bit"],
)
def test_worker_checkpoint_resumes_bit_identically(tmp_path, overrides):
    from pipelines.run.worker_state import load_state as _load_state, save_state as _save_state

    cfg = resume_config(**overrides)
    straight, admm, scheduler = _setup(cfg)
    train(straight, admm, scheduler, resume_batches, cfg, LoopHooks())
    if cfg.optimizer == "adam8bit":  # the states really are 8-bit (bitsandbytes keeps small tensors fp32)
        codes = [t for state in admm.base.state.values() for t in state.values() if torch.is_tensor(t)]
        assert any(t.dtype == torch.uint8 for t in codes)

    first, admm, scheduler = _setup(cfg)
    train(first, admm, scheduler, resume_batches, cfg.model_copy(update={"steps": N}), LoopHooks())
    _save_state(first, admm, N, tmp_path / "ckpt")
    assert admm.admm_step == N  # saving must not step the live optimiser (it did, for SGD)
    train(first, admm, scheduler, resume_batches, cfg, LoopHooks(), start_step=N)  # the run that was checkpointed
    resumed, admm, scheduler = _setup(cfg)
    assert _load_state(resumed, admm, tmp_path / "ckpt") == N
    assert admm.admm_step == N
    train(resumed, admm, scheduler, resume_batches, cfg, LoopHooks(), start_step=N)
    pairs = zip(straight.state_dict().items(), resumed.state_dict().values(), first.state_dict().values())
    for (name, a), b, c in pairs:
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name
