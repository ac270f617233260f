"""One-shot, layer-wise baselines (magnitude, Wanda, SparseGPT) as one Ray task."""

from __future__ import annotations

import json
from pathlib import Path

import ray


@ray.remote
def oneshot_task(cfg_dict: dict, location: str, tracking_info: dict | None) -> dict:
    """Prune, verify, and put the checkpoint at ``location`` (shared storage) for the driver."""
    import tempfile

    from pipelines.storage import upload

    from elsa.api import prune_model
    from elsa.config import PruneConfig
    from elsa.export import export_pruned

    cfg = PruneConfig(**cfg_dict)
    log = None
    if tracking_info:
        from pipelines.tracking import RunLogger

        log = RunLogger(tracking_info["uri"], tracking_info["run_id"])
    result = prune_model(cfg, log=log)
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        (out / "sparsity_report.json").write_text(json.dumps(result.report, indent=1))
        export_pruned(result.model, result.tokenizer, cfg, out, result.report)
        upload(out, location)
    return {"overall_sparsity": result.report["overall_sparsity"], "prune_s": result.wall_s}


def run_one_shot(
    cfg_dict: dict, location: str, tracking_info: dict | None, *, address: str | None, gpu: bool, cpus: float | None
) -> dict:
    """The one-shot method of ``cfg_dict`` as one Ray task writing its model to ``location``
    (a prune run's result, or the warm start ELSA runs and Tune trials begin from)."""
    from pipelines.ray_session import local_cores_per_task

    cpus = cpus or local_cores_per_task(address, gpu, 1) or 1
    resources = {"num_gpus": 1} if gpu else {"num_cpus": cpus}
    return ray.get(oneshot_task.options(**resources).remote(cfg_dict, location, tracking_info))
