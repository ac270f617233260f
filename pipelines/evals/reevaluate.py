"""``elsa eval``: evaluate an existing checkpoint directory or MLflow run the way ``prune`` does.

For a run id, the checkpoint is downloaded from the run's artifacts and the results are logged
back to that run; for a directory, they are printed (and logged nowhere).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from elsa.config import EvalSettings, make_eval_settings
from pipelines.records import tracking


def _checkpoint_from_run(uri: str, run_id: str, into: Path) -> str:
    client = tracking.client(uri)
    try:
        client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types
        raise ValueError(f"--run {run_id!r} is neither a checkpoint directory nor a run id in {uri} ({err})") from None
    path = client.download_artifacts(run_id, "checkpoint", str(into))
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"run {run_id} has no logged checkpoint (artifact 'checkpoint/config.json' missing)")
    return path


def reevaluate(args) -> str:
    from pipelines.evals.evaluation import run_evaluation
    from pipelines.run.ray_session import init_ray

    settings = make_eval_settings({name: getattr(args, name, None) for name in EvalSettings.model_fields})
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory() as scratch:
        run_id = None
        if Path(args.run).is_dir():
            checkpoint = str(Path(args.run).resolve())
        else:
            tracking.check_reachable(uri)
            run_id = args.run
            checkpoint = _checkpoint_from_run(uri, run_id, Path(scratch))
        init_ray(args.address)
        metrics, errors = run_evaluation(checkpoint, settings, use_gpu=args.gpu, echo=print)
        if run_id:
            tracking.log_metrics(uri, run_id, metrics)
    lines = [f"{'checkpoint' if run_id is None else 'run'}  {args.run}"]
    lines += [f"{key:<28}{value:.6g}" for key, value in sorted(metrics.items())]
    lines += [f"{key:<28}FAILED: {error}" for key, error in errors.items()]
    return "\n".join(lines)
