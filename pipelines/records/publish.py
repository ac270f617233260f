"""What happens to an exported model after pruning: one durable copy, its card, the registry.

Why: the export first lands in the run's storage (Ray Train's last checkpoint, or the one-shot
task's folder), where every node can read it. Keeping it there *and* in MLflow *and* in a local
``--output`` made three full copies per run. The durable copy is the MLflow run's artifact
``checkpoint/`` (in the artifact store of the tracking server, or ``mlruns/`` beside a local
``mlflow.db``): ``elsa eval --run``, ``--register`` and the MLflow UI all read it. ``--output``
adds a local copy on request; the run's storage folder (the export and Ray Train's intermediate
checkpoints) is removed once the export is logged and evaluated, unless ``--keep-checkpoints``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from elsa.allocation import ALLOCATION_FILE
from pipelines.records import tracking
from pipelines.run.storage import absolute, is_uri

ARTIFACT_PATH = "checkpoint"


def weights_bytes(directory: str | Path) -> int:
    """Size of the export's safetensors files."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def export_summary(directory: str | Path) -> dict:
    """``{format, dtype, weights_bytes}`` of the export in ``directory`` (from its metadata)."""
    metadata = json.loads((Path(directory) / "elsa_metadata.json").read_text(encoding="utf-8"))
    return {
        "format": metadata.get("export_format", "dense"),
        "dtype": metadata.get("export_dtype", "?"),
        "weights_bytes": weights_bytes(directory),
    }


def log_export(outbox, directory: str | Path, command: str | None) -> None:
    """Write the card (no results yet); journal the export, its sparsity report and plot as artifacts.

    Journaled (pipelines.records.outbox), so an unreachable tracking server delays them and loses nothing:
    the files they point to stay in place until delivered (the plot goes into the journal's folder).
    """
    from elsa.model_io.model_card import write_card
    from pipelines.records.plots import plot_layer_sparsity

    out = Path(directory)
    write_card(out, command)
    report = json.loads((out / "sparsity_report.json").read_text())
    outbox.artifacts(out, ARTIFACT_PATH)
    outbox.artifacts(plot_layer_sparsity(report, outbox.folder / "layer_sparsity.png"))
    outbox.artifacts(out / "sparsity_report.json")
    summary = export_summary(out)
    metadata = json.loads((out / "elsa_metadata.json").read_text(encoding="utf-8"))
    lr = metadata.get("config", {}).get("lr")  # the lr the run trained at (the rule's: scaled to the weights)
    outbox.tags(
        {
            "export_format": summary["format"],
            "export_dtype": summary["dtype"],
            **({"lr_resolved": lr} if lr is not None else {}),
            **metadata.get("provenance", {}),
        }
    )
    allocation = metadata.get("config", {}).get("sparsity_map")
    if isinstance(allocation, dict):  # the per-matrix levels this run chose (OWL): --sparsity-map reuses them
        outbox.artifacts(_write(outbox.folder / ALLOCATION_FILE, allocation))
    outbox.metrics({"export_weights_mb": summary["weights_bytes"] / 1e6}, 0)


def _write(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def update_card(outbox, directory: str | Path, command: str | None, results: dict) -> Path:
    """Rewrite the card with the evaluation results and journal it into the run's ``checkpoint``."""
    from elsa.model_io.model_card import write_card

    card = write_card(directory, command, results)
    outbox.artifacts(card, ARTIFACT_PATH)
    return card


def artifact_uri(uri: str, run_id: str) -> str:
    """Where the durable copy lives (a local path for a local store)."""
    root = tracking.client(uri).get_run(run_id).info.artifact_uri.rstrip("/")
    location = f"{root}/{ARTIFACT_PATH}"
    return location.removeprefix("file://") if location.startswith("file:///") else location


def copy_output(directory: str | Path, output: str) -> str:
    """The local copy asked for with ``--output`` (replacing what was there)."""
    target = Path(output).expanduser().resolve()
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(directory, target)
    return str(target)


def remove_run_storage(location: str, storage_root: str) -> None:
    """Delete the run's storage folder: the parent of the export (Ray Train's run directory, whose
    ``checkpoint_*`` folders are the intermediate checkpoints, or the one-shot run's folder).

    Refuses anything that is not strictly inside ``storage_root`` (never the root itself).
    """
    run_dir = location.rstrip("/").rsplit("/", 1)[0]
    root = storage_root.rstrip("/")
    if not run_dir.startswith(root + "/") or run_dir == root:
        raise RuntimeError(f"refusing to delete {run_dir}: not a run folder inside the storage path {root}")
    if not is_uri(run_dir):
        shutil.rmtree(absolute(run_dir), ignore_errors=True)
        return
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(run_dir)
    filesystem.delete_dir(path)


def register(uri: str, run_id: str, name: str, tags: dict) -> str:
    """A new version of registered model ``name`` from the run's ``checkpoint`` artifact; returns it."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(uri)
    try:
        client.create_registered_model(name, description="ELSA-pruned language models")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + f"/{ARTIFACT_PATH}"
    version = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items() if v is not None}
    )
    client.set_tag(run_id, "registered_model", f"{name}/{version.version}")
    return str(version.version)
