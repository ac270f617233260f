"""Check the cluster configs in this folder before spending money on them.

    python clusters/validate.py                    # every config under clusters/
    python clusters/validate.py clusters/aws.yaml  # just one

Ray cluster launcher YAMLs go through the two steps `ray up` takes before it
talks to a cloud (``prepare_config``: merge the provider's defaults; then
``validate_config``: Ray's JSON schema in ``ray/autoscaler/ray-schema.json``
plus its cross-field checks), then through ELSA's own rules below. KubeRay
manifests get the fields KubeRay needs plus the same rules; the MLflow
manifest gets the exposure rules. Needs only pyyaml and ray (for the launcher
schema); starts nothing. Exit status 1 when anything is wrong.

ELSA's rules, in one place:
  * the head runs no training: it advertises 0 CPUs (so no task, actor or
    trial lands there) and its dashboard listens on 127.0.0.1 only;
  * every worker type scales from zero (GPU types: min_workers 0) and
    min <= max; there is a 1-GPU type (tune trials), an 8-GPU type (FSDP
    prunes) and a spot / preemptible type;
  * the project is installed from the repository at a pinned tag, never a
    branch;
  * jobs get MLFLOW_TRACKING_URI and ELSA_STORAGE (s3:// or gs://) from
    the environment, and the cluster runs with Ray token authentication;
  * RayJob entrypoints run `elsa tune` / `elsa prune` and contain no `$VAR`
    (KubeRay's submitter runs them through a shell in a pod that lacks the
    cluster's environment, so the variable would silently expand to "").
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Iterable

import yaml

HERE = Path(__file__).resolve().parent

PINNED_INSTALL = "elsa-prune[pipeline,lowbit] @ git+"
UNPINNED_REFS = {"", "main", "master", "head", "latest", "develop", "trunk"}
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "ELSA_STORAGE")
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}
GPU_KEY = "nvidia.com/gpu"


# --------------------------------------------------------------------------- io
def load_docs(path: str | Path) -> list[dict]:
    """All YAML documents in a file (empty documents dropped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of a shell env file (comments and `export ` allowed)."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if sep:
            env[key.strip()] = value.strip().strip("'\"")
    return env


# ------------------------------------------------------------ launcher configs
def ray_schema_errors(config: dict) -> list[str]:
    """What Ray itself says about a launcher config, as `ray up` would check it.

    Cloud providers: prepare_config (merge with the provider's defaults.yaml,
    fill per-type min/max) then validate_config. The fake_multinode provider's
    defaults file is missing from the wheel, and its autoscaler only runs
    validate_config, so that is all it gets here too.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)  # "setting max workers..."
    config = copy.deepcopy(config)
    try:
        if not str(config.get("provider", {}).get("type", "")).startswith("fake"):
            config = prepare_config(config)
        validate_config(config)
    except Exception as e:  # jsonschema.ValidationError, ValueError, KeyError...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return [f"Ray rejects the config: {type(e).__name__}: {first_line}"]
    return []


def _commands(config: dict, *keys: str) -> str:
    out: list[str] = []
    for key in keys:
        out += [str(c) for c in config.get(key) or []]
    for node_type in (config.get("available_node_types") or {}).values():
        for key in keys:
            out += [str(c) for c in node_type.get(key) or []]
    return "\n".join(out)


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        market = node_config.get("InstanceMarketOptions") or {}
        return str(market.get("MarketType", "")).lower() == "spot"
    if provider == "gcp":
        sched = node_config.get("scheduling") or {}
        if isinstance(sched, list):  # Ray's own examples write a one-item list
            sched = {k: v for item in sched for k, v in item.items()}
        return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True
    return False


def launcher_errors(config: dict, base_dir: Path | None = None) -> list[str]:
    """Ray's schema plus ELSA's rules for a cluster launcher YAML (see module doc)."""
    errors = ray_schema_errors(config)
    provider = str((config.get("provider") or {}).get("type", ""))
    fake = provider.startswith("fake")
    types = config.get("available_node_types") or {}
    head_name = config.get("head_node_type")
    head = types.get(head_name) or {}
    global_max = config.get("max_workers")

    if (head.get("resources") or {}).get("CPU") != 0:
        errors.append(f"head type {head_name!r} must advertise resources: {{CPU: 0}} so no work lands on it")
    if head.get("max_workers", 0) not in (0, None):
        errors.append("the head type must not be scaled (max_workers 0)")

    gpu_counts = []
    spot_types = []
    for name, node_type in types.items():
        if name == head_name:
            continue
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers")
        if not isinstance(lo, int) or not isinstance(hi, (int, type(None))):
            errors.append(f"worker type {name!r}: min_workers / max_workers must be integers")
            continue
        if hi is None:
            errors.append(f"worker type {name!r}: give max_workers explicitly")
        elif lo > hi:
            errors.append(f"worker type {name!r}: min_workers {lo} > max_workers {hi}")
        elif isinstance(global_max, int) and hi > global_max:
            errors.append(f"worker type {name!r}: max_workers {hi} > cluster max_workers {global_max}")
        if lo != 0:
            errors.append(f"worker type {name!r}: min_workers must be 0 (scale from zero), got {lo}")
        gpus = (node_type.get("resources") or {}).get("GPU", 0)
        if gpus:
            gpu_counts.append(gpus)
        if _is_spot(provider, node_type.get("node_config") or {}):
            spot_types.append(name)

    idle = config.get("idle_timeout_minutes")
    if fake:
        if not isinstance(idle, (int, float)) or not 0 < idle <= 1:
            errors.append("fake cluster: idle_timeout_minutes should be short (0 < t <= 1)")
        return errors

    if not isinstance(idle, (int, float)) or not 1 <= idle <= 30:
        errors.append(f"idle_timeout_minutes {idle!r}: use 1..30 (GPU nodes bill while idle)")
    if 1 not in gpu_counts:
        errors.append("no 1-GPU worker type (tune trials)")
    if 8 not in gpu_counts:
        errors.append("no 8-GPU worker type (FSDP prunes)")
    if not spot_types:
        errors.append("no spot / preemptible worker type")

    head_start = _commands(config, "head_start_ray_commands")
    if not re.search(r"--num-cpus[= ]0\b", head_start):
        errors.append("head_start_ray_commands: start the head with --num-cpus=0")
    if "--dashboard-host=127.0.0.1" not in head_start:
        errors.append("head_start_ray_commands: bind the dashboard to 127.0.0.1 (reach it with `ray dashboard`)")

    setup = _commands(config, "setup_commands", "head_setup_commands", "worker_setup_commands")
    if PINNED_INSTALL not in setup:
        errors.append(f"setup commands never install {PINNED_INSTALL!r}...")
    refs = re.findall(r"ELSA_REF=([^\s;'\"]*)", setup)
    if not refs:
        errors.append("setup commands: set ELSA_REF=<tag> and install @${ELSA_REF}")
    for ref in refs:
        if ref.lower() in UNPINNED_REFS:
            errors.append(f"ELSA_REF={ref!r} is not a pinned version")
    if refs and "@${ELSA_REF}" not in setup:
        errors.append("the install line must use @${ELSA_REF}")

    mounts = config.get("file_mounts") or {}
    if "~/.ray/auth_token" not in mounts:
        errors.append("file_mounts: ship the Ray auth token (~/.ray/auth_token) to every node")
    env_local = mounts.get("~/elsa.env")
    if env_local is None:
        errors.append("file_mounts: mount the job environment file at ~/elsa.env")
    else:
        example = (base_dir or Path.cwd()) / (str(env_local) + ".example")
        if not example.is_file():
            errors.append(f"no example env file {example} for ~/elsa.env")
        else:
            env = read_env_file(example)
            for key in REQUIRED_ENV:
                if not env.get(key):
                    errors.append(f"{example.name}: {key} is not set")
            scheme = STORAGE_SCHEME.get(provider)
            if scheme and not env.get("ELSA_STORAGE", "").startswith(scheme):
                errors.append(f"{example.name}: ELSA_STORAGE must be a {scheme} URI on {provider}")
            if env.get("RAY_AUTH_MODE") != "token":
                errors.append(f"{example.name}: set RAY_AUTH_MODE=token")
    if "elsa.env" not in setup:
        errors.append("setup commands never load ~/elsa.env into the environment")
    return errors


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


# ---------------------------------------------------------------- driver
def check_file(path: str | Path) -> list[str]:
    path = Path(path)
    docs = load_docs(path)
    errors: list[str] = []
    for doc in docs:
        if "available_node_types" in doc and "provider" in doc:
            errors += launcher_errors(doc, base_dir=path.resolve().parents[1])
        elif str(doc.get("apiVersion", "")).startswith("ray.io"):
            stem = path.stem
            expect = "prune" if "prune" in stem else "tune" if "tune" in stem else None
            errors += kuberay_errors(doc, expect_command=expect)
    if path.parent.name == "mlflow":
        errors += mlflow_errors(docs)
    return [f"{path.name}: {e}" for e in errors]


def all_configs() -> list[Path]:
    return sorted(p for p in HERE.rglob("*.yaml"))


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or all_configs()
    bad = 0
    for p in paths:
        errs = check_file(p)
        print(f"{'FAIL' if errs else 'ok  '} {p}")
        for e in errs:
            print(f"     {e}")
        bad += bool(errs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
