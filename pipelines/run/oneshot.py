"""One-shot, layer-wise baselines (magnitude, Wanda, SparseGPT) as one Ray task.

Its per-block numbers go to the run's journal (pipelines.records.outbox: an MLflow outage costs nothing)
and to the driver's progress line (pipelines.run.progress.BlockLine).
"""

from __future__ import annotations

import json
from pathlib import Path

import ray


@ray.remote
def oneshot_task(cfg_dict: dict, location: str, tracking_info: dict | None, progress=None) -> dict:
    """Prune, verify, and put the checkpoint at ``location`` (shared storage) for the driver."""
    import tempfile

    from elsa.allocation import ALLOCATION_FILE
    from elsa.api import prune_model
    from elsa.config import PruneConfig
    from elsa.model_io.export import export_pruned
    from elsa.weight_scale import write_weight_scale
    from pipelines.records.outbox import metrics_sink
    from pipelines.run.storage import upload

    cfg = PruneConfig(**cfg_dict)
    log, journal = metrics_sink(tracking_info, progress)  # per-block numbers, journaled: an outage costs nothing
    try:
        result = prune_model(cfg, log=log)
    finally:
        if journal is not None:  # a bounded wait; what is not delivered stays for the driver's flush
            journal.close(float(tracking_info.get("flush_s", 60.0)))
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        (out / "sparsity_report.json").write_text(json.dumps(result.report, indent=1))
        if isinstance(result.cfg.sparsity_map, dict):  # an allocation this run computed: ADMM reads it
            (out / ALLOCATION_FILE).write_text(json.dumps(result.cfg.sparsity_map, indent=1))
        write_weight_scale(out, result.weight_rms)  # the dense weights' scale: ADMM's lr follows it
        export_pruned(result.model, result.tokenizer, result.cfg, out, result.report)
        upload(out, location)
    return {"overall_sparsity": result.report["overall_sparsity"], "prune_s": result.wall_s}


def run_one_shot(
    cfg_dict: dict,
    location: str,
    tracking_info: dict | None,
    *,
    address: str | None,
    gpu: bool,
    cpus: float | None,
    progress=None,
) -> dict:
    """The one-shot method of ``cfg_dict`` as one Ray task writing its model to ``location``
    (a prune run's result, or the warm start ELSA runs and Tune trials begin from); ``progress``
    receives each block's numbers for the driver's line."""
    from pipelines.run.ray_session import local_cores_per_task

    cpus = cpus or local_cores_per_task(address, gpu, 1) or 1
    resources = {"num_gpus": 1} if gpu else {"num_cpus": cpus}
    return ray.get(oneshot_task.options(**resources).remote(cfg_dict, location, tracking_info, progress))
