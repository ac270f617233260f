"""ELSA's rules for the KubeRay (RayCluster, RayJob) and MLflow-on-Kubernetes manifests.

Loaded by ``clusters/validate.py`` (the command that checks every config offline), which holds
the rules for Ray's cluster-launcher YAMLs; see its module doc for what each rule protects.
"""

from __future__ import annotations

import re
import shlex
from typing import Iterable

GPU_KEY = "nvidia.com/gpu"
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "ELSA_STORAGE")


# ---------------------------------------------------------------- KubeRay
def _containers(pod_template: dict) -> list[dict]:
    return ((pod_template or {}).get("spec") or {}).get("containers") or []


def _check_group(where: str, group: dict, errors: list[str]) -> None:
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        errors.append(f"{where}: rayStartParams missing (use {{}} for none)")
    else:
        for k, v in params.items():
            if not isinstance(v, str):
                errors.append(
                    f"{where}: rayStartParams.{k} must be a string (KubeRay's CRD is map[string]string), got {v!r}"
                )
    containers = _containers(group.get("template"))
    if not containers:
        errors.append(f"{where}: template.spec.containers is empty")
    for c in containers:
        image = str(c.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag == "latest":
            errors.append(f"{where}: image {image!r} needs a pinned tag")


def _env_names(containers: Iterable[dict]) -> set[str]:
    return {e.get("name") for c in containers for e in c.get("env") or []}


def raycluster_spec_errors(spec: dict, where: str) -> list[str]:
    errors: list[str] = []
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}: enableInTreeAutoscaling must be true")
    if not spec.get("rayVersion"):
        errors.append(f"{where}: set rayVersion (KubeRay needs >= 2.52 for token auth)")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        errors.append(f"{where}: authOptions.mode must be token")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        errors.append(f"{where}: headGroupSpec is missing")
    else:
        _check_group(f"{where}.headGroupSpec", head, errors)
        if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
            errors.append(f'{where}.headGroupSpec: rayStartParams num-cpus must be "0" (no work on the head)')
        missing = set(REQUIRED_ENV) - _env_names(_containers(head.get("template")))
        if missing:
            errors.append(f"{where}.headGroupSpec: containers lack env {sorted(missing)}")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        errors.append(f"{where}: workerGroupSpecs is missing or empty")
        return errors
    gpu_groups = 0
    for i, g in enumerate(groups):
        name = g.get("groupName") or f"#{i}"
        w = f"{where}.workerGroupSpecs[{name}]"
        if not g.get("groupName"):
            errors.append(f"{w}: groupName is missing")
        _check_group(w, g, errors)
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not isinstance(lo, int) or not isinstance(hi, int):
            errors.append(f"{w}: minReplicas and maxReplicas must be integers")
            continue
        replicas = g.get("replicas", lo)
        if not isinstance(replicas, int) or not lo <= replicas <= hi:
            errors.append(f"{w}: need minReplicas <= replicas <= maxReplicas, got {lo}, {replicas}, {hi}")
        if lo != 0:
            errors.append(f"{w}: minReplicas must be 0 (scale from zero), got {lo}")
        containers = _containers(g.get("template"))
        missing = set(REQUIRED_ENV) - _env_names(containers)
        if missing:
            errors.append(f"{w}: containers lack env {sorted(missing)}")
        limits = ((containers[0].get("resources") or {}).get("limits") or {}) if containers else {}
        requests = ((containers[0].get("resources") or {}).get("requests") or {}) if containers else {}
        if GPU_KEY in limits:
            gpu_groups += 1
            if not str(limits[GPU_KEY]).isdigit() or int(limits[GPU_KEY]) < 1:
                errors.append(f"{w}: {GPU_KEY} limit must be a whole number >= 1")
            if GPU_KEY in requests and str(requests[GPU_KEY]) != str(limits[GPU_KEY]):
                errors.append(f"{w}: {GPU_KEY} request must equal the limit")
            tolerations = ((g.get("template") or {}).get("spec") or {}).get("tolerations") or []
            if not any(t.get("key") == GPU_KEY for t in tolerations):
                errors.append(f"{w}: GPU group needs a toleration for the {GPU_KEY} taint")
    if not gpu_groups:
        errors.append(f"{where}: no worker group has an {GPU_KEY} limit")
    return errors


def kuberay_errors(doc: dict, expect_command: str | None = None) -> list[str]:
    """Fields KubeRay needs plus ELSA's rules, for a RayCluster or RayJob."""
    errors: list[str] = []
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "?")
    where = f"{kind}/{name}"
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        errors += raycluster_spec_errors(spec, where)
    elif kind == "RayJob":
        entry = str(spec.get("entrypoint") or "")
        try:
            argv = shlex.split(entry)
        except ValueError as e:
            argv = []
            errors.append(f"{where}: entrypoint does not parse: {e}")
        if argv[:1] != ["elsa"] or len(argv) < 2:
            errors.append(f"{where}: entrypoint must run `elsa <command> ...`, got {entry[:60]!r}")
        elif expect_command and argv[1] != expect_command:
            errors.append(f"{where}: entrypoint runs `elsa {argv[1]}`, expected `elsa {expect_command}`")
        if "$" in entry:
            errors.append(f"{where}: entrypoint uses $VARIABLES; the submitter pod's shell would expand them")
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append(f"{where}: shutdownAfterJobFinishes must be true")
        if not isinstance(spec.get("activeDeadlineSeconds"), int):
            errors.append(f"{where}: set activeDeadlineSeconds (a cap on what a stuck job can cost)")
        cluster = spec.get("rayClusterSpec")
        if not isinstance(cluster, dict):
            errors.append(f"{where}: rayClusterSpec is missing")
        else:
            errors += raycluster_spec_errors(cluster, f"{where}.rayClusterSpec")
    else:
        errors.append(f"{where}: kind must be RayCluster or RayJob")
    return errors


# ---------------------------------------------------------------- MLflow
def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def mlflow_errors(docs: list[dict]) -> list[str]:
    """The tracking server binds to 127.0.0.1, or listens wider only behind auth."""
    errors: list[str] = []
    servers = []
    for d in docs:
        if d.get("kind") == "Service" and (d.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
            errors.append(
                f"Service/{d['metadata']['name']}: keep it ClusterIP (reach the UI with kubectl port-forward)"
            )
        if d.get("kind") in ("Deployment", "StatefulSet"):
            for c in _containers((d.get("spec") or {}).get("template")):
                # `sh -c "<script>"` is common: look at the words of every part.
                argv = [w for a in (c.get("command") or []) + (c.get("args") or []) for w in shlex.split(str(a))]
                for i, w in enumerate(argv[:-1]):
                    if w.endswith("mlflow") and argv[i + 1] == "server":
                        servers.append((d["metadata"]["name"], argv[i + 2 :]))
                        break
    if not servers:
        errors.append("no container runs `mlflow server`")
    for name, argv in servers:
        host = _flag(argv, "--host") or "127.0.0.1"
        if host not in ("127.0.0.1", "localhost") and _flag(argv, "--app-name") != "basic-auth":
            errors.append(f"{name}: mlflow server listens on {host} without --app-name basic-auth")
        backend = _flag(argv, "--backend-store-uri") or ""
        if not backend.startswith("postgresql"):
            errors.append(f"{name}: backend store should be PostgreSQL, got {backend!r}")
        if re.search(r"postgresql(\+\w+)?://[^/@]*:[^/@]*@", backend):
            errors.append(f"{name}: password written into the backend URI; use PGPASSWORD from a Secret")
        dest = _flag(argv, "--artifacts-destination") or ""
        if not dest.startswith(("s3://", "gs://")):
            errors.append(f"{name}: --artifacts-destination should be an s3:// or gs:// URI, got {dest!r}")
    return errors
