"""The Ray pipeline for real: TorchTrainer + FSDP2 on gloo, MLflow stores, downstream eval tasks.

Every test here starts real components (a local Ray, sqlite MLflow stores, a real ``mlflow
server`` on 127.0.0.1, lm-eval's harness) on a tiny Llama built locally.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from elsa.budget import scaled_lr
from elsa.config import make_config
from elsa.model_io.models import load_model
from elsa.provenance import text_sha256
from elsa.targets import find_targets
from elsa.weight_scale import median_weight_rms
from run_levels import assert_matrix_sparsity, run_levels

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUDGET = [
    "--steps",
    "4",
    "--seqlen",
    "64",
    "--batch-size",
    "2",
    "--interval",
    "2",
    "--eval-interval",
    "2",
    "--lr",
    "1e-3",
    "--val-blocks",
    "2",
    "--eval-seqlen",
    "64",
    "--eval-max-windows",
    "4",
]


UNSET_LR = BUDGET[: BUDGET.index("--lr")] + BUDGET[BUDGET.index("--lr") + 2 :]  # lr left to the rule


def _cli(args: list[str]) -> int:
    from cli.main import main

    return main(args)


def _load(directory: Path):
    from elsa.model_io.export import load_checkpoint

    return load_checkpoint(directory)[0]  # reads the compressed export (the default at >= 50%)


def _masks(model) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach() != 0 for t in find_targets(model, 0.7)}


def _write_mc_task(directory: Path) -> Path:
    """A local multiple-choice lm-eval task over a JSONL written here."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": "The capital of France is", "choices": [" Paris", " a dog", " blue"], "label": 0},
        {"question": "Water is made of hydrogen and", "choices": [" oxygen", " music", " wood"], "label": 0},
        {"question": "The sun rises in the", "choices": [" east", " spoon", " nine"], "label": 0},
        {"question": "A week has seven", "choices": [" days", " cars", " rivers"], "label": 0},
    ]
    data = directory / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / "elsa_local_mc.yaml").write_text(
        "task: elsa_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return directory


def test_prune_two_fsdp_workers_end_to_end(tmp_path, tiny_model_dir, ray_session, mlflow_server, monkeypatch):
    """2 gloo workers with FSDP2 logging to a real ``mlflow server``: exact sparsity, loadable
    checkpoint, MLflow run complete, eval metrics, ``elsa eval`` from the run's artifacts. (The
    embedded sqlite store is what the other pipeline tests and tests/test_publish.py use.)"""
    import mlflow

    monkeypatch.chdir(tmp_path)
    tasks = _write_mc_task(tmp_path / "tasks")
    out = tmp_path / "pruned"
    code = _cli(
        [
            "prune",
            "--model",
            str(tiny_model_dir),
            "--sparsity",
            "0.7",
            *UNSET_LR,
            "--workers",
            "2",
            "--cpus-per-worker",
            "0.5",
            "--output",
            str(out),
            "--experiment",
            "pipeline-test",
            "--tracking-uri",
            mlflow_server,
            "--lm-eval-tasks",
            "elsa_local_mc",
            "--lm-eval-include",
            str(tasks),
            "--checkpoint-interval",
            "2",
        ]
    )
    assert code == 0
    model = _load(out)
    levels = run_levels(tiny_model_dir, sparsity=0.7, seqlen=64)  # OWL, the default: read from the warm start
    assert len(set(levels.values())) > 1
    assert_matrix_sparsity(model, levels)
    assert (out / "model.sparse.safetensors").is_file() and not list(out.glob("*.bin"))
    # the lr the rule scales to the dense weights, read by both workers beside the warm start
    dense = load_model(str(tiny_model_dir))
    expected_lr = scaled_lr(median_weight_rms(find_targets(dense, 0.7)))
    assert json.loads((out / "elsa_metadata.json").read_text())["config"]["lr"] == expected_lr

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
    experiment = client.get_experiment_by_name("pipeline-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["sparsity"] == "0.7" and run.data.params["method"] == "elsa"
    assert run.data.tags["git_commit"] and run.data.tags["workers"] == "2"
    tags = run.data.tags  # the run's record (elsa/provenance.py), as the Train worker saw it
    assert tags["version.torch"] == torch.__version__ and tags["version.ray"] == ray.__version__
    assert tags["machine.cores"].isdigit() and tags["machine.gpu_count"] == "0"
    assert tags["windows.protocol"] == "no-bos" and tags["windows.eval_max_windows"]
    assert run.data.params["lr"] == "None" and float(tags["lr_resolved"]) == expected_lr  # left to the rule
    assert tags["eval_sha256.wikitext2-bundled"] == text_sha256("wikitext2-bundled", "test")
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and f"| version.torch | {torch.__version__} |" in card
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "primal_residual")
    assert 1.0 < run.data.metrics["ppl_wikitext2-bundled"] < 1e6
    assert 0.0 <= run.data.metrics["acc_elsa_local_mc"] <= 1.0
    assert abs(run.data.metrics["overall_sparsity"] - 0.7) < 1e-3
    assert (run.data.metrics["sparsity_min"], run.data.metrics["sparsity_max"]) == (
        min(levels.values()),
        max(levels.values()),
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "layer_sparsity.png", "sparsity_report.json"} <= artifacts
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/model.sparse.safetensors" in logged

    # elsa eval: the checkpoint comes back from the run's artifacts, the result goes to the run
    evaluate = ["eval", "--run", run.info.run_id, "--tracking-uri", mlflow_server]
    assert _cli([*evaluate, "--eval-seqlen", "64", "--eval-max-windows", "4"]) == 0
    history = client.get_metric_history(run.info.run_id, "ppl_wikitext2-bundled")
    assert len(history) == 2 and history[0].value == pytest.approx(history[1].value, rel=1e-6)


def _train(tmp_path: Path, name: str, workers: int, **overrides):
    from pipelines.run.train_job import run_training

    cfg = make_config(
        {
            "model": str(overrides.pop("model")),
            "sparsity": 0.7,
            "steps": 6,
            "seqlen": 64,
            "batch_size": 2,
            "interval": 2,
            "eval_interval": 3,
            "lr": 1e-3,
            "val_blocks": 2,
            "init": "none",
            "bf16": False,
            **overrides,
        }
    )
    result = run_training(
        cfg, None, workers=workers, storage_path=str(tmp_path / "ray"), name=name, resources_per_worker={"CPU": 0.5}
    )
    assert result.error is None, result.error
    return _load(result.checkpoint.path)


@pytest.mark.parametrize("loss", ["ntp+kd", "ntp"])
def test_one_and_two_workers_give_the_same_masks(tmp_path, tiny_model_dir, ray_session, loss):
    """Sharded training and projection (FSDP2, 2 gloo workers) versus one process: same masks.

    One run covers both sharded paths that a single process does not have: the paper's coupled
    penalty (its objective-aware projection reads Adam's sharded second moment) and distillation
    from the frozen dense teacher, sharded like the student (fp32: the 1- and 2-worker sums differ
    only by reduction order), with the student's embedding frozen inside FSDP's root unit (the
    budget rule's default). The decoupled penalty shares the coupled one's sharded projection.
    Both losses take the chunked frozen-head path (elsa/head_loss.py) through FSDP's root, the
    teacher's head gathered by its own forward."""
    from elsa.model_io.models import load_model

    distil = {"penalty": "coupled", "loss": loss, "kd_temperature": 2.0, "train_embeddings": False}
    single = _train(tmp_path, "one", 1, model=tiny_model_dir, **distil)
    sharded = _train(tmp_path, "two", 2, model=tiny_model_dir, **distil)
    masks_one, masks_two = _masks(single), _masks(sharded)
    for name, mask in masks_one.items():
        assert torch.equal(mask, masks_two[name]), name
    for (name, a), b in zip(single.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    start = load_model(str(tiny_model_dir)).get_input_embeddings().weight
    assert torch.equal(sharded.get_input_embeddings().weight, start)


def test_a_workers_teacher_is_lean_only_alone_under_bf16_autocast(tiny_model_dir):
    """One worker under bf16 autocast stores the teacher's linear layers in bf16 (the same logits,
    half their memory: tests/test_head_loss.py); in fp32, or for no teacher at all, nothing changes."""
    from pipelines.run.train_job import _teacher

    def dtypes(**overrides) -> set:
        cfg = make_config({"model": str(tiny_model_dir), "sparsity": 0.7, "steps": 4, "loss": "ntp+kd", **overrides})
        teacher = _teacher(cfg, torch.device("cpu"), 1)
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        return {m.weight.dtype for m in teacher.modules() if isinstance(m, torch.nn.Linear)}

    assert dtypes(bf16=True) == {torch.bfloat16}  # this tiny model's head is not tied
    assert dtypes(bf16=False) == {torch.float32}
    assert _teacher(make_config({"model": str(tiny_model_dir), "sparsity": 0.7, "loss": "ntp"}), "cpu", 1) is None


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "0.7", "--pattern", "2:4"], "2:4"),
        (["--sparsity", "0.7", "--z-dtype", "fp4"], "fp4"),
        (["--sparsity", "0.7", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--sparsity", "0.7", "--model", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_input_fails_early_with_one_line(tmp_path, args, needle):
    """Bad input: non-zero exit, one line naming the problem, and no Ray started, no run opened."""
    result = _run_cli(["prune", *args, "--steps", "1"], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("elsa: error")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "elsa-runs").exists()


@pytest.mark.parametrize(
    "options, cores, expected",
    [
        ({"workers": 1}, 2, 2),  # one worker gets both cores of this machine, not Ray's default 1
        ({"workers": 2}, 2, 1),
        ({"workers": 1}, 64, 4),  # never more than the local Ray offers (the fixture's 4 CPUs)
        ({"workers": 1, "address": "10.0.0.1:6379"}, 2, None),  # a cluster: Ray's default stands
        ({"workers": 1, "gpu": True}, 2, None),
    ],
)
def test_local_runs_give_workers_the_machines_cores(ray_session, monkeypatch, options, cores, expected):
    from pipelines.run.ray_session import local_cores_per_task

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert local_cores_per_task(options.get("address"), options.get("gpu", False), options["workers"]) == expected
