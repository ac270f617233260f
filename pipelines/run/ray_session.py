"""The Ray session of one command: start a local Ray (loopback only) or join a cluster, and size tasks.

Shared by ``elsa prune``, ``elsa eval`` and ``elsa tune``, so none of them imports another's
orchestrator for these few functions.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start Ray locally."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {
        "env_vars": {
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
            "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0"),
        }
    }
    from pipelines.run.quiet import ray_init_kwargs

    if address:
        ray.init(address=address, runtime_env=env, **ray_init_kwargs())
        pin_train_coordinator()
    else:
        loopback_only(ray)
        ray.init(
            num_cpus=num_cpus,
            runtime_env={**env, "worker_process_setup_hook": "pipelines.run.ray_session.no_state_api_warnings"},
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **ray_init_kwargs(),
        )


def loopback_only(ray) -> None:
    """Make a Ray started here listen on 127.0.0.1 only (GCS, raylet, object manager, workers).

    Why: Ray's servers bind to all interfaces unless the node's address is the loopback one, and
    on Linux ``ray.init`` replaces 127.0.0.1 by the machine's outward address, so the GCS and
    every worker's gRPC port would be open to the network, unauthenticated. The constant below
    (read at each call) and the environment variable (for Ray's child processes) turn that off;
    the dashboard is not started. A joined cluster (``--address``) is configured by its owner.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


# Ray Train's placement-group cleaner asks the state API, served by the dashboard, once a second
# whether its controller lives; a local Ray here runs without a dashboard, so every ask warns
STATE_API_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def no_state_api_warnings() -> None:
    """Every worker of a local Ray at its start: quiet the loggers that can only warn that the
    dashboard's state API is absent (a search printed 211 such lines in its first 4 minutes)."""
    for name in STATE_API_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def pin_train_coordinator() -> None:
    """Create Ray Train's autoscaling coordinator on this driver's node before any trainer runs.

    Why: every Ray Train (V2) controller calls Ray's ``get_or_create_autoscaling_coordinator``,
    which creates a *detached* actor pinned (hard node affinity) to the caller's node. A Tune
    trial's controller runs on an autoscaled worker node, so the actor lands there and that node
    is never idle again: the autoscaler cannot remove it after the search (measured with the fake
    multi-node provider: one worker stayed up indefinitely, with all its resources free and only
    this actor alive on it). Created first from the driver, the actor lives on the driver's node
    (the head, under ``ray job submit``), and the controllers reuse it (``get_if_exists``).
    The function is Ray-internal: on a Ray without it this does nothing.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        log.debug("this Ray has no autoscaling coordinator; nothing to pin")
        return
    get_or_create_autoscaling_coordinator()


def local_cores_per_task(address: str | None, gpu: bool, tasks: int) -> int | None:
    """On a Ray this command started itself, the machine's cores shared among ``tasks`` workers.

    Why: Ray limits a task's threads (OMP_NUM_THREADS) to the CPUs it asked for, 1 by default,
    so one CPU worker on a many-core machine would run at a fraction of a bare process's speed
    (measured: see bench/results/pipeline_overhead.json). On a joined cluster (``address``,
    RAY_ADDRESS) or with a GPU, None: Ray's default stands (size workers with --cpus-per-worker).
    """
    import ray

    if gpu or address or os.environ.get("RAY_ADDRESS"):
        return None
    total = min(int(ray.cluster_resources().get("CPU", 0)), os.cpu_count() or 1)
    return max(1, total // max(tasks, 1)) if total else None
