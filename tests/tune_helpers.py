"""What the `elsa tune` tests share: the tiny budget, a space file, a search run as the command line
builds it (on the tiny model, with a sqlite MLflow store in tmp_path), its MLflow runs, and the
check that stopped trials released their CPUs."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from cli.main import make_parser

BUDGET = ["--seqlen", "32", "--batch-size", "2", "--val-blocks", "2"]


def write_space(path: Path, space: dict) -> str:
    path.write_text(yaml.safe_dump(space))
    return str(path)


def tiny_search(tmp_path, tiny_model_dir, argv: list[str], **kwargs):
    from tune.cli import request_from_args
    from tune.runner import run_search

    args = make_parser().parse_args(
        [
            "tune",
            "--model",
            str(tiny_model_dir),
            *BUDGET,
            "--storage-path",
            str(tmp_path / "storage"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            *argv,
        ]
    )
    request, where = request_from_args(args)
    return run_search(request, where, **kwargs)


def tune_runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("elsa-tune")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def no_leaked_actors(ray, timeout: float = 20.0) -> bool:
    """Stopped trials must take their Ray Train controller and workers with them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(0.5)
    print(
        "still held:",
        {k: v for k, v in ray.available_resources().items() if k == "CPU"},
        "of",
        ray.cluster_resources().get("CPU"),
    )
    return False
