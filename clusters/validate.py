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
import importlib.util
import logging
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _rules(name: str):
    """A sibling module of rules, by path (this file runs as a script, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"elsa_clusters_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_kube = _rules("kube_rules")
kuberay_errors, mlflow_errors, REQUIRED_ENV = _kube.kuberay_errors, _kube.mlflow_errors, _kube.REQUIRED_ENV

PINNED_INSTALL = "elsa-prune[pipeline,lowbit] @ git+"
UNPINNED_REFS = {"", "main", "master", "head", "latest", "develop", "trunk"}
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}


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
    errors += _head_errors(config)
    type_errors, gpu_counts, spot_types = _worker_type_errors(config, provider)
    errors += type_errors
    idle = config.get("idle_timeout_minutes")
    if provider.startswith("fake"):
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
    return errors + _command_errors(config) + _mount_errors(config, provider, base_dir)


def _head_errors(config: dict) -> list[str]:
    head_name = config.get("head_node_type")
    head = (config.get("available_node_types") or {}).get(head_name) or {}
    errors = []
    if (head.get("resources") or {}).get("CPU") != 0:
        errors.append(f"head type {head_name!r} must advertise resources: {{CPU: 0}} so no work lands on it")
    if head.get("max_workers", 0) not in (0, None):
        errors.append("the head type must not be scaled (max_workers 0)")
    return errors


def _worker_type_errors(config: dict, provider: str) -> tuple[list[str], list, list[str]]:
    """Errors of the worker types, their GPU counts, and the spot / preemptible ones."""
    errors, gpu_counts, spot_types = [], [], []
    global_max = config.get("max_workers")
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == config.get("head_node_type"):
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
    return errors, gpu_counts, spot_types


def _command_errors(config: dict) -> list[str]:
    """The head starts Ray with no CPUs and a loopback dashboard; nodes install a pinned ELSA."""
    errors = []
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
    if "elsa.env" not in setup:
        errors.append("setup commands never load ~/elsa.env into the environment")
    return errors


def _mount_errors(config: dict, provider: str, base_dir: Path | None) -> list[str]:
    """The auth token and the job environment (with a complete example file) reach every node."""
    errors = []
    mounts = config.get("file_mounts") or {}
    if "~/.ray/auth_token" not in mounts:
        errors.append("file_mounts: ship the Ray auth token (~/.ray/auth_token) to every node")
    env_local = mounts.get("~/elsa.env")
    if env_local is None:
        return errors + ["file_mounts: mount the job environment file at ~/elsa.env"]
    example = (base_dir or Path.cwd()) / (str(env_local) + ".example")
    if not example.is_file():
        return errors + [f"no example env file {example} for ~/elsa.env"]
    env = read_env_file(example)
    for key in REQUIRED_ENV:
        if not env.get(key):
            errors.append(f"{example.name}: {key} is not set")
    scheme = STORAGE_SCHEME.get(provider)
    if scheme and not env.get("ELSA_STORAGE", "").startswith(scheme):
        errors.append(f"{example.name}: ELSA_STORAGE must be a {scheme} URI on {provider}")
    if env.get("RAY_AUTH_MODE") != "token":
        errors.append(f"{example.name}: set RAY_AUTH_MODE=token")
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
