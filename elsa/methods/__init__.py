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


_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a method available as ``--method name``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str) -> PruningMethod:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"method {name!r} is unknown; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    import importlib

    for module in ("elsa.methods.admm_method", "elsa.methods.magnitude", "elsa.methods.wanda", "elsa.methods.sparsegpt"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a method module not written yet must not hide the others
            if err.name != module:
                raise
