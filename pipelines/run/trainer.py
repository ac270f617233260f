"""The one place a ``TorchTrainer`` is built, for prune runs and Tune trials alike.

What differs between the two (the worker function, its config, the Ray Train callbacks, how many
restarts and checkpoints) is a parameter; the backend (NCCL on GPU, gloo on CPU) and the shape
of the run config are decided here once.
"""

from __future__ import annotations

from typing import Callable


def build_trainer(
    worker: Callable[[dict], None],
    loop_config: dict,
    *,
    workers: int,
    use_gpu: bool,
    resources_per_worker: dict | None,
    name: str | None,
    storage_path: str,
    max_failures: int = 0,
    num_to_keep: int = 2,
    callbacks: list | None = None,
):
    """A ``TorchTrainer`` running ``worker(loop_config)`` on ``workers`` Ray Train workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )
