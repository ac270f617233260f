"""One cache root for everything ELSA rebuilds, each kind movable or switched off on its own."""

from __future__ import annotations

from pathlib import Path

from elsa.model_io.cache_dirs import cache_dir


def test_root_kind_override_and_off(monkeypatch, tmp_path):
    monkeypatch.delenv("ELSA_CACHE", raising=False)
    monkeypatch.delenv("ELSA_KERNEL_CACHE", raising=False)
    assert cache_dir("kernels", "ELSA_KERNEL_CACHE") == Path.home() / ".cache" / "elsa" / "kernels"
    monkeypatch.setenv("ELSA_CACHE", str(tmp_path / "root"))
    assert cache_dir("kernels", "ELSA_KERNEL_CACHE") == tmp_path / "root" / "kernels"
    monkeypatch.setenv("ELSA_KERNEL_CACHE", str(tmp_path / "mine"))
    assert cache_dir("kernels", "ELSA_KERNEL_CACHE") == tmp_path / "mine"
    for off in ("off", "OFF", "0", "false"):
        monkeypatch.setenv("ELSA_KERNEL_CACHE", off)
        assert cache_dir("kernels", "ELSA_KERNEL_CACHE") is None
    assert cache_dir("dequantized", "ELSA_DEQUANTIZED_CACHE") == tmp_path / "root" / "dequantized"
