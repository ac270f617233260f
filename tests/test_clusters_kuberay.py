"""The KubeRay manifests in clusters/kuberay carry what KubeRay needs (autoscaling, GPU groups
from zero, a pinned image, an `elsa` entrypoint); broken copies fail the validator.

Fast and offline: nothing is started, no cloud is called.
"""

from __future__ import annotations

import pytest
from clusters_helpers import RAYJOBS, V
from clusters_helpers import one_doc as _one


# --------------------------------------------------------------------- KubeRay
def _cluster_specs():
    yield "kuberay/raycluster.yaml", _one("kuberay/raycluster.yaml")["spec"]
    for rel in RAYJOBS:
        yield rel, _one(rel)["spec"]["rayClusterSpec"]


def test_kuberay_manifests_carry_what_kuberay_needs():
    for rel, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, rel
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", rel
        assert head["template"]["spec"]["containers"][0]["image"], rel
        groups = spec["workerGroupSpecs"]
        assert groups, rel
        for g in groups:
            assert g["groupName"] and isinstance(g["rayStartParams"], dict), rel
            assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, (rel, g["groupName"])
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, (rel, g["groupName"])
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), (rel, g["groupName"])
    for rel in ["kuberay/raycluster.yaml", *RAYJOBS]:
        doc = _one(rel)
        assert doc["apiVersion"] == "ray.io/v1", rel
    gpus = sorted(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in _one("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
    )
    assert gpus == [1, 1, 8]


@pytest.mark.parametrize("rel,command", sorted(RAYJOBS.items()))
def test_rayjob_entrypoint_runs_elsa(rel, command):
    import shlex

    doc = _one(rel)
    assert doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["elsa", command]
    assert "--model" in argv and "--sparsity" in argv and "--storage-path" in argv
    assert argv[argv.index("--storage-path") + 1].startswith(("s3://", "gs://"))
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert V.kuberay_errors(doc, expect_command=command) == []


def _rayjob(rel="kuberay/rayjob-tune.yaml"):
    return _one(rel)


BROKEN_KUBERAY = {
    "missing headGroupSpec": (lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec is missing"),
    "missing workerGroupSpecs": (
        lambda d: d["spec"]["rayClusterSpec"].pop("workerGroupSpecs"),
        "workerGroupSpecs is missing",
    ),
    "rayStartParams value not a string": (
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "must be a string",
    ),
    "minReplicas > maxReplicas": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=1),
        "minReplicas <= replicas <= maxReplicas",
    ),
    "GPU group without a GPU limit": (
        lambda d: [
            c["resources"]["limits"].pop("nvidia.com/gpu")
            for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        ],
        "no worker group has an nvidia.com/gpu limit",
    ),
    "GPU group without the toleration": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"].pop("tolerations"),
        "toleration",
    ),
    "autoscaling off": (
        lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
        "enableInTreeAutoscaling",
    ),
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    "entrypoint is not elsa": (lambda d: d["spec"].update(entrypoint="python train.py"), "elsa <command>"),
    "entrypoint runs the wrong command": (
        lambda d: d["spec"].update(entrypoint="elsa prune --model m --sparsity 0.5"),
        "expected `elsa tune`",
    ),
    "entrypoint relies on a variable": (
        lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --output $OUT"),
        "$VARIABLES",
    ),
    "cluster kept after the job": (
        lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
        "shutdownAfterJobFinishes",
    ),
    "no job deadline": (lambda d: d["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds"),
    "unpinned image": (
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            image="rayproject/ray:latest"
        ),
        "pinned tag",
    ),
    "jobs lack the MLflow URI": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            env=[]
        ),
        "MLFLOW_TRACKING_URI",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_KUBERAY))
def test_broken_kuberay_copies_fail(case):
    doc = _rayjob()
    assert V.kuberay_errors(doc, expect_command="tune") == []
    mutate, expected = BROKEN_KUBERAY[case]
    mutate(doc)
    errors = V.kuberay_errors(doc, expect_command="tune")
    assert any(expected in e for e in errors), (case, errors)


def test_broken_raycluster_fails():
    doc = _one("kuberay/raycluster.yaml")
    del doc["spec"]["headGroupSpec"]
    assert any("headGroupSpec is missing" in e for e in V.kuberay_errors(doc))
