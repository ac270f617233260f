"""Shared by the tests of clusters/: the validator module and one-document loading."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"


def _load_validator():
    spec = importlib.util.spec_from_file_location("elsa_clusters_validate", CLUSTERS / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_validator()
LAUNCHERS = ["aws.yaml", "gcp.yaml", "fake_local.yaml"]
RAYJOBS = {"kuberay/rayjob-tune.yaml": "tune", "kuberay/rayjob-prune.yaml": "prune"}
ALL_YAML = sorted(str(p.relative_to(CLUSTERS)) for p in CLUSTERS.rglob("*.yaml"))


def one_doc(rel: str) -> dict:
    """The file's only document, or its only Ray (ray.io) document."""
    docs = V.load_docs(CLUSTERS / rel)
    if len(docs) > 1:
        docs = [d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io")]
    assert len(docs) == 1, rel
    return copy.deepcopy(docs[0])
