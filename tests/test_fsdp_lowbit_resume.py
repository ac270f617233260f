"""Resume under FSDP2 with torchao's 8-bit AdamW (what ``--optimizer adam8bit`` uses on sharded
parameters): 2N steps in one go equal N steps, the worker's checkpoint, a fresh sharded model and
optimiser restored from it, N steps; bit for bit, on two gloo processes.

The in-process resume tests (tests/test_resume_sgd.py) cover bitsandbytes' 8-bit Adam on plain
tensors; this is the sharded path, where the 8-bit states are DTensor-aware tensor subclasses
that torch.distributed.checkpoint must write and read shard by shard.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from elsa import tiny
from core_settings import RESUME_STEPS, resume_batches, resume_config
from elsa.distributed import local
from elsa.loop import LoopHooks, build_admm, train

pytest.importorskip("torchao")

N = RESUME_STEPS


def _sharded(cfg):
    from pipelines.run.train_job import shard_model

    model = shard_model(tiny.tiny_model("llama", tiny.TINY_VOCAB_SIZE, seed=0), torch.device("cpu"))
    admm, scheduler = build_admm(model, cfg)
    return model, admm, scheduler


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from pipelines.run.worker_state import load_state, save_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = resume_config(optimizer="adam8bit")
        straight, admm, scheduler = _sharded(cfg)
        train(straight, admm, scheduler, resume_batches, cfg, LoopHooks())
        admm.final_projection()
        states = [t for s in admm.base.state.values() for t in s.values() if torch.is_tensor(t)]
        kinds = sorted({type(local(t)).__name__ for t in states})  # inside the DTensor: this rank's shard
        first, admm, scheduler = _sharded(cfg)
        train(first, admm, scheduler, resume_batches, cfg.model_copy(update={"steps": N}), LoopHooks())
        checkpoint = Path(out_dir) / "ckpt"
        if rank == 0:
            checkpoint.mkdir()
        dist.barrier()
        save_state(first, admm, N, checkpoint)
        resumed, admm, scheduler = _sharded(cfg)
        step = load_state(resumed, admm, checkpoint)
        train(resumed, admm, scheduler, resume_batches, cfg, LoopHooks(), start_step=step)
        admm.final_projection()
        result = {
            "base": type(admm.base).__module__ + "." + type(admm.base).__name__,
            "state_kinds": kinds,
            "step": step,
            "straight": _full_state(straight),
            "resumed": _full_state(resumed),
        }
        if rank == 0:
            torch.save(result, Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


def test_torchao_8bit_adam_resumes_bit_identically_under_fsdp(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["base"].startswith("torchao.") and result["step"] == N
    assert any("8bit" in kind.lower() or "quant" in kind.lower() for kind in result["state_kinds"]), result
    for name, value in result["straight"].items():
        assert torch.equal(value, result["resumed"][name]), name
    pruned = [v for k, v in result["resumed"].items() if k.endswith("proj.weight")]
    assert pruned and all(float((v == 0).float().mean()) > 0.5 for v in pruned)  # the final projection pruned them
