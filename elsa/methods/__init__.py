"""Pruning methods behind one interface, found by name.

A method is a small class registered under its name (``elsa``, ``magnitude``, ``wanda``,
``sparsegpt``) with one entry point::

    method.run(model, tokenizer, cfg, calib, log) -> dict

``calib`` is a LongTensor of calibration blocks [n, seqlen]; ``log(metrics: dict, step: int)``
receives progress metrics; the return value holds summary numbers (e.g. wall time). After
``run`` the model's target matrices are exactly sparse. ``elsa prune --method X`` differs only in
the name.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

Log = Callable[[dict, int], None]


class PruningMethod(Protocol):
    name: str
    one_shot: bool  # True: layer-wise from calibration blocks; False: trains (ELSA)

    def run(self, model: torch.nn.Module, tokenizer, cfg, calib: torch.Tensor, log: Log) -> dict: ...


class OneShotMethod:
    """A one-shot method: built from its typed settings (elsa/methods/settings.py), default if none."""

    one_shot = True
    Settings: type

    def __init__(self, settings=None):
        self.settings = settings if settings is not None else self.Settings()


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a method available as ``--method name``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str, args: dict | None = None) -> PruningMethod:
    """Method ``name``, with its typed settings from ``args`` (a one-shot method's ``method_args`` entry)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"method {name!r} is unknown; choose one of {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    if not cls.one_shot:
        return cls()
    from elsa.methods.settings import method_settings

    return cls(method_settings(name, args))


def method_for(cfg, name: str | None = None) -> PruningMethod:
    """The method ``name`` (default: ``cfg.method``) with the settings ``cfg.method_args`` gives it."""
    name = name or cfg.method
    return get_method(name, cfg.method_args.get(name))


def _load_builtin() -> None:
    import importlib

    for module in (
        "elsa.methods.admm_method",
        "elsa.methods.magnitude",
        "elsa.methods.wanda",
        "elsa.methods.sparsegpt",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a method module not written yet must not hide the others
            if err.name != module:
                raise
