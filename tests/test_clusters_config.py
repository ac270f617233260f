"""The launcher configs in clusters/ are well-formed, pass Ray's own launcher schema and follow
the project's rules; broken copies fail; MLflow's manifests, versions, placeholders and the
documented commands agree with the code. (KubeRay's manifests: test_clusters_kuberay.py.)

Fast and offline: nothing is started, no cloud is called.
"""

from __future__ import annotations

import configparser
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clusters_helpers import ALL_YAML, CLUSTERS, LAUNCHERS, RAYJOBS, REPO, V
from clusters_helpers import one_doc as _one


def _launcher_errors(cfg: dict) -> list[str]:
    return V.launcher_errors(cfg, base_dir=REPO)


# ------------------------------------------------------------------ every file
def test_the_expected_configs_exist():
    for rel in [
        "aws.yaml",
        "gcp.yaml",
        "fake_local.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/rayjob-prune.yaml",
        "mlflow/k8s.yaml",
    ]:
        assert rel in ALL_YAML, rel
    for rel in ["README.md", "mlflow/vm.md", "aws.env.example", "gcp.env.example", "docker/Dockerfile"]:
        assert (CLUSTERS / rel).is_file(), rel


@pytest.mark.parametrize("rel", ALL_YAML)
def test_every_yaml_parses(rel):
    docs = V.load_docs(CLUSTERS / rel)
    assert docs and all(isinstance(d, dict) for d in docs), rel


@pytest.mark.parametrize("rel", ALL_YAML)
def test_every_yaml_passes_the_validator(rel):
    assert V.check_file(CLUSTERS / rel) == []


def test_validator_cli_exit_status(tmp_path):
    ok = subprocess.run(
        [sys.executable, str(CLUSTERS / "validate.py")], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = _one("kuberay/raycluster.yaml")
    del broken["spec"]["headGroupSpec"]
    bad_file = tmp_path / "raycluster.yaml"
    bad_file.write_text(yaml.safe_dump(broken))
    bad = subprocess.run(
        [sys.executable, str(CLUSTERS / "validate.py"), str(bad_file)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "headGroupSpec is missing" in bad.stdout, bad.stdout


# ------------------------------------------------------------- launcher configs
@pytest.mark.parametrize("rel", LAUNCHERS)
def test_launcher_config_passes_rays_own_schema(rel):
    """The checks `ray up` runs before it calls a cloud (the autoscaler itself runs
    validate_config on every config it reads)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _one(rel)
    if cfg["provider"]["type"].startswith("fake"):
        validate_config(cfg)  # the wheel lacks the fake provider's defaults file
    else:
        prepared = prepare_config(cfg)
        validate_config(prepared)
        # prepare_config merged the provider defaults without losing our node types
        assert set(prepared["available_node_types"]) == set(cfg["available_node_types"])
        assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("rel", ["aws.yaml", "gcp.yaml"])
def test_cloud_launcher_shape(rel):
    cfg = _one(rel)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 1, 8, 8]
    spot = [n for n, t in workers.items() if t["resources"].get("spot")]
    assert sorted(spot) == ["gpu_1x_spot", "gpu_8x_spot"]
    assert 1 <= cfg["idle_timeout_minutes"] <= 30
    install = "\n".join(cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert re.search(r"ELSA_REF=v\d+\.\d+\.\d+\b", install)
    assert '"elsa-prune[pipeline,lowbit] @ git+${ELSA_REPO}@${ELSA_REF}"' in install
    # torch before ELSA, on both kinds of node
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = cfg[key]
        assert cmds.index(next(c for c in cmds if "torch==" in c)) < cmds.index(
            next(c for c in cmds if "elsa-prune" in c)
        ), key
    assert cfg["file_mounts"]["~/elsa.env"] == f"clusters/{rel.split('.')[0]}.env"


def test_fake_local_matches_the_local_autoscaling_recipe():
    cfg = _one("fake_local.yaml")
    assert cfg["provider"]["type"] == "fake_multinode"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    worker = cfg["available_node_types"]["trainer_worker"]
    assert (worker["min_workers"], worker["max_workers"]) == (0, 2)
    assert worker["resources"]["trainer"] == 1 and worker["resources"]["CPU"] == 1
    assert cfg["idle_timeout_minutes"] <= 0.2


def _set_ref(cfg: dict, ref: str) -> None:
    cfg["head_setup_commands"] = [re.sub(r"ELSA_REF=\S+", f"ELSA_REF={ref}", c) for c in cfg["head_setup_commands"]]
    cfg["worker_setup_commands"] = [re.sub(r"ELSA_REF=\S+", f"ELSA_REF={ref}", c) for c in cfg["worker_setup_commands"]]


def _drop_spot(cfg: dict) -> None:
    for t in cfg["available_node_types"].values():
        t["node_config"].pop("InstanceMarketOptions", None)


BROKEN_LAUNCHERS = {
    "min_workers > max_workers": (
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=3, max_workers=2),
        "min_workers 3 > max_workers 2",
    ),
    "typo in a node type field (Ray schema)": (
        lambda c: c["available_node_types"]["gpu_1x"].update(min_worker=0),
        "Ray rejects the config",
    ),
    "head_node_type not among the types (Ray)": (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    "sum of min_workers above max_workers (Ray)": (
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=13, max_workers=13),
        "Ray rejects the config",
    ),
    "work can land on the head": (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 8}), "CPU: 0"),
    "GPU type does not scale from zero": (
        lambda c: c["available_node_types"]["gpu_8x"].update(min_workers=1),
        "min_workers must be 0",
    ),
    "no 8-GPU type": (lambda c: [c["available_node_types"].pop(k) for k in ("gpu_8x", "gpu_8x_spot")], "no 8-GPU"),
    "no spot type": (_drop_spot, "no spot"),
    "install from a branch": (lambda c: _set_ref(c, "main"), "not a pinned version"),
    "idle timeout of a day": (lambda c: c.update(idle_timeout_minutes=1440), "idle_timeout_minutes"),
    "dashboard open to the world": (
        lambda c: c.update(
            head_start_ray_commands=[x.replace("127.0.0.1", "0.0.0.0") for x in c["head_start_ray_commands"]]
        ),
        "127.0.0.1",
    ),
    "no environment file": (lambda c: c["file_mounts"].pop("~/elsa.env"), "~/elsa.env"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LAUNCHERS))
def test_broken_launcher_copies_fail(case):
    cfg = _one("aws.yaml")
    assert _launcher_errors(cfg) == []
    mutate, expected = BROKEN_LAUNCHERS[case]
    mutate(cfg)
    errors = _launcher_errors(cfg)
    assert any(expected in e for e in errors), (case, errors)


def test_rays_validate_config_itself_rejects_a_typo():
    """Not only our rules: Ray's schema (additionalProperties: false) catches it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _one("aws.yaml")
    cfg["available_node_types"]["gpu_1x"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


# ---------------------------------------------------------------------- MLflow
def test_mlflow_server_binds_locally_or_behind_auth():
    docs = V.load_docs(CLUSTERS / "mlflow/k8s.yaml")
    assert V.mlflow_errors(docs) == []
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds

    def server_args(docs):
        dep = next(d for d in docs if d["kind"] == "Deployment")
        return dep["spec"]["template"]["spec"]["containers"][0]["args"]

    no_auth = copy.deepcopy(docs)
    args = server_args(no_auth)
    args[0] = args[0].replace("--app-name basic-auth", "")
    assert any("without --app-name basic-auth" in e for e in V.mlflow_errors(no_auth))

    password_in_uri = copy.deepcopy(docs)
    args = server_args(password_in_uri)
    args[0] = args[0].replace("postgresql://mlflow@", "postgresql://mlflow:hunter2@")
    assert any("password written into the backend URI" in e for e in V.mlflow_errors(password_in_uri))

    public = copy.deepcopy(docs)
    next(d for d in public if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")["spec"]["type"] = (
        "LoadBalancer"
    )
    assert any("keep it ClusterIP" in e for e in V.mlflow_errors(public))

    sqlite = copy.deepcopy(docs)
    args = server_args(sqlite)
    args[0] = re.sub(r"--backend-store-uri \S+", "--backend-store-uri sqlite:///m.db", args[0])
    assert any("PostgreSQL" in e for e in V.mlflow_errors(sqlite))


def test_mlflow_auth_config_is_complete_and_holds_no_secret():
    docs = V.load_docs(CLUSTERS / "mlflow/k8s.yaml")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read_string(cm["data"]["basic_auth.ini"])
    for key in ("default_permission", "database_uri", "admin_username", "authorization_function"):
        assert ini["mlflow"].get(key), key
    assert "admin_password" not in ini["mlflow"]
    assert ini["mlflow"]["database_uri"].endswith("/mlflow_auth")
    # every Secret the manifests use is documented with the command that creates it
    readme = (CLUSTERS / "README.md").read_text() + (CLUSTERS / "mlflow/k8s.yaml").read_text()
    for rel in ["mlflow/k8s.yaml", "kuberay/raycluster.yaml", *RAYJOBS]:
        text = (CLUSTERS / rel).read_text()
        for name in set(re.findall(r"secretKeyRef: \{name: ([\w-]+)", text)):
            assert f"create secret generic {name}" in readme, (rel, name)


def test_mlflow_vm_recipe_binds_to_localhost_by_default():
    text = (CLUSTERS / "mlflow/vm.md").read_text()
    unit = text[text.index("[Service]") : text.index("[Install]")]
    assert "--host 127.0.0.1" in unit
    assert "--app-name basic-auth" in unit
    assert "postgresql://" in unit and "--artifacts-destination s3://" in unit
    assert "0.0.0.0" not in text


# ------------------------------------------------------- consistency, docs
def _ray_pins() -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for rel in ["aws.yaml", "gcp.yaml", "docker/Dockerfile"]:
        pins[rel] = set(re.findall(r"ray\[[\w,]+\]==([\d.]+)", (CLUSTERS / rel).read_text()))
    pins["docker/Dockerfile (base image)"] = set(
        re.findall(r"rayproject/ray:([\d.]+)-", (CLUSTERS / "docker/Dockerfile").read_text())
    )
    for rel in ["kuberay/raycluster.yaml", *RAYJOBS]:
        doc = _one(rel)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        pins[rel] = {spec["rayVersion"]}
    return pins


def test_one_ray_version_everywhere_and_it_is_the_tested_one():
    import ray

    pins = _ray_pins()
    assert all(len(v) == 1 for v in pins.values()), pins
    versions = {next(iter(v)) for v in pins.values()}
    assert len(versions) == 1, pins
    assert versions == {ray.__version__}, (
        f"cluster configs pin Ray {versions}, the tests run Ray {ray.__version__}: bump the pins"
    )


def test_one_elsa_release_and_torch_everywhere():
    refs, torches = {}, {}
    for rel in ["aws.yaml", "gcp.yaml", "docker/Dockerfile"]:
        text = (CLUSTERS / rel).read_text()
        refs[rel] = set(re.findall(r"ELSA_REF=(v[\d.]+)", text))
        torches[rel] = set(re.findall(r"(?:torch==|TORCH_VERSION=)([\d.]+)", text))
    for rel in ["kuberay/raycluster.yaml", *RAYJOBS]:
        refs[rel] = set(re.findall(r"image: YOUR_REGISTRY/elsa:(\S+)", (CLUSTERS / rel).read_text()))
    assert len(set().union(*refs.values())) == 1 and all(refs.values()), refs
    assert len(set().union(*torches.values())) == 1 and all(torches.values()), torches


def test_every_placeholder_is_documented():
    readme = (CLUSTERS / "README.md").read_text()
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", ".example", "")]
    found = set()
    for p in files:
        found |= set(re.findall(r"YOUR_[A-Z0-9_]+", p.read_text()))
    assert found, "no placeholders found at all: the scan is broken"
    missing = sorted(f for f in found if f"`{f}`" not in readme)
    assert not missing, f"placeholders not explained in clusters/README.md: {missing}"


def test_filled_in_env_files_are_git_ignored():
    ignore = (CLUSTERS / ".gitignore").read_text().split()
    assert "*.env" in ignore
    for name in ("aws.env", "gcp.env"):
        r = subprocess.run(["git", "check-ignore", "-q", f"clusters/{name}"], cwd=REPO)
        if r.returncode == 128:
            pytest.skip("not a git checkout")
        assert r.returncode == 0, f"clusters/{name} would be committed"
    r = subprocess.run(["git", "check-ignore", "-q", "clusters/aws.env.example"], cwd=REPO)
    assert r.returncode == 1, "the example env file must stay tracked"


# ------------------------------------------- the commands match the real CLI
def _readme_elsa_commands() -> list[list[str]]:
    """Every `elsa prune|tune ...` command in clusters/README.md's shell blocks, as argv."""
    import shlex

    text = (CLUSTERS / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            m = re.search(r"\belsa (prune|tune) .*", line)
            if m:
                commands.append(shlex.split(m.group(0)))
    return commands


def test_documented_commands_parse_with_the_real_cli():
    """RayJob entrypoints and README examples use flags `elsa` really has."""
    cli = pytest.importorskip("pipelines.cli")
    parser = pytest.importorskip("cli.main").make_parser()
    argvs = {rel: __import__("shlex").split(_one(rel)["spec"]["entrypoint"]) for rel in RAYJOBS}
    readme = _readme_elsa_commands()
    assert {a[1] for a in readme} == {"prune", "tune"}, readme
    for where, argv in [*argvs.items(), *(("README", a) for a in readme)]:
        assert argv[0] == "elsa", (where, argv)
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse")
        assert args.command == argv[1]
        if args.config:  # the config file the command names, as found in this checkout
            local = CLUSTERS / "configs" / Path(args.config).name
            assert local.is_file(), (where, args.config)
            args.config = str(local)
        if args.command == "prune":
            cli.build_config(args)  # validates the whole PruneConfig
        else:
            tune_cli = pytest.importorskip("tune.cli")
            request, _ = tune_cli.request_from_args(args)
            assert request.gpu and request.max_concurrent > 1, (where, "trials must use GPUs, several at once")


def test_the_prune_job_runs_the_papers_budget():
    cli = pytest.importorskip("pipelines.cli")
    import shlex

    argv = shlex.split(_one("kuberay/rayjob-prune.yaml")["spec"]["entrypoint"])
    cfg = cli.build_config(pytest.importorskip("cli.main").make_parser().parse_args(argv[1:]))
    assert cfg.steps * cfg.batch_size * cfg.seqlen == 4096 * 8 * 2048  # 67.1M tokens, README "Costs"


def test_method_configs_are_valid_prune_configs():
    config = pytest.importorskip("elsa.config")
    files = sorted((CLUSTERS / "configs").glob("*.yaml"))
    assert files
    for path in files:
        fields = yaml.safe_load(path.read_text())
        config.PruneConfig(model="meta-llama/Llama-2-7b-hf", sparsity=0.7, **fields)
    # the KubeRay tune job mounts the same ELSA-L config and passes it with --config
    docs = V.load_docs(CLUSTERS / "kuberay/rayjob-tune.yaml")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["elsa-l.yaml"]) == yaml.safe_load((CLUSTERS / "configs/elsa-l.yaml").read_text())
    job = next(d for d in docs if d["kind"] == "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"--config {mount}/elsa-l.yaml" in job["spec"]["entrypoint"]
    assert head["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
