"""Whether a joined Ray cluster can hold a run's workers, and a bounded wait while it scales up.

Why: Ray queues a task whose resources no node has and waits forever, silently; on a cluster
with an autoscaler that wait is how nodes get added, so refusing at once would be wrong too. A run
on a joined cluster therefore asks the autoscaler for its workers' bundles
(``ray.autoscaler.sdk.request_resources``, a no-op without one), says what it waits for, and
gives up after ``--resource-timeout`` seconds with the numbers, before an MLflow run is opened.
The request is sent again at every poll: it is one key that the last writer owns, and Ray Train's
own AutoscalingCoordinator actor (detached, started by any earlier Train run on the cluster)
rewrites that key every 20 s with the requests of the Train runs it knows, which do not include
ours. Asked once, the autoscaler could miss it for good (CI saw a 300 s wait with no node launched).
A local Ray is sized before it starts (pipelines.run.preflight.check_resources).
"""

from __future__ import annotations

import math
import time

POLL_S = 2.0
RESOURCE_TIMEOUT_S = 600.0  # --resource-timeout's default: a cloud node boots in a few minutes


class CapacityError(RuntimeError):
    """The cluster did not provide the run's workers in time; the message says what it has."""


def timeout_problem(timeout_s: float) -> str | None:
    """Why ``--resource-timeout`` is unusable (checked by ``elsa prune`` and ``elsa tune``), or None."""
    if math.isfinite(timeout_s) and timeout_s > 0:
        return None
    return f"--resource-timeout {timeout_s} must be a number of seconds > 0"


def run_bundles(workers: int, cpus_per_worker: float | None, gpu: bool) -> list[dict]:
    """One resource bundle per Ray task the run places at once (Ray's default: 1 CPU a worker)."""
    bundle = {"GPU": 1.0} if gpu else {"CPU": float(cpus_per_worker or 1.0)}
    return [dict(bundle) for _ in range(workers)]


def bundles_fit(bundles: list[dict], nodes: list[dict]) -> bool:
    """Whether every bundle fits on some node's total resources (first fit, largest bundle first)."""
    free = [dict(node) for node in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(key, 0.0) + 1e-9 >= need for key, need in bundle.items()):
                for key, need in bundle.items():
                    node[key] -= need
                break
        else:
            return False
    return True


def describe(bundles: list[dict]) -> str:
    """``2 x {CPU: 4}`` (or ``1 x {CPU: 0.5, trainer: 1} + 1 x {CPU: 0.5}``): the request in one phrase."""
    shapes: dict[str, int] = {}
    for bundle in bundles:
        shape = "{" + ", ".join(f"{key}: {value:g}" for key, value in sorted(bundle.items())) + "}"
        shapes[shape] = shapes.get(shape, 0) + 1
    return " + ".join(f"{count} x {shape}" for shape, count in shapes.items())


def describe_nodes(nodes: list[dict]) -> str:
    if not nodes:
        return "no nodes"
    shapes = ["{" + ", ".join(f"{k}: {n.get(k, 0):g}" for k in ("CPU", "GPU") if n.get(k)) + "}" for n in nodes]
    return f"{len(nodes)} node(s) " + " ".join(shapes)


def node_capacities() -> list[dict]:
    """Total resources of every live node of the joined cluster (CPU, GPU and custom ones such as a
    worker type's ``trainer``; not Ray's per-node ``node:<ip>`` markers)."""
    import ray

    return [
        {k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def _request(bundles: list[dict]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def wait_for_capacity(
    bundles: list[dict],
    timeout_s: float,
    echo,
    capacities=node_capacities,
    request=_request,
    clock=time.monotonic,
    sleep=time.sleep,
) -> float:
    """Return at once when the cluster's nodes can hold ``bundles``; else ask the autoscaler for them
    (again at every poll) until they fit (returns the seconds waited) or ``timeout_s`` passes
    (CapacityError)."""
    nodes = capacities()
    if bundles_fit(bundles, nodes):
        return 0.0
    request(bundles)
    echo(
        f"waiting up to {timeout_s:g} s (--resource-timeout) for the Ray cluster to provide {describe(bundles)}; "
        f"it has {describe_nodes(nodes)} (the autoscaler, if any, was asked for them)"
    )
    started = clock()
    try:
        while clock() - started < timeout_s:
            sleep(min(POLL_S, max(timeout_s - (clock() - started), 0.0)))
            nodes = capacities()
            if bundles_fit(bundles, nodes):
                return clock() - started
            request(bundles)
        raise CapacityError(
            f"the Ray cluster did not provide {describe(bundles)} within --resource-timeout {timeout_s:g} s "
            f"(it has {describe_nodes(nodes)}); lower --workers or --cpus-per-worker, add nodes, "
            "or raise --resource-timeout"
        )
    finally:
        request([])  # the request persists until replaced: from here the run's own tasks hold the nodes
