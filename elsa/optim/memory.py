"""Bytes per pruned parameter: what the analysis says (ELSA.md) and what a live optimiser holds.

Analytic (:func:`state_bytes_per_param`), per entry of a pruned matrix:

* weight 4 and grad 4 (fp32 master weights and gradients; optional),
* the base optimiser's moments: Adam m and v 4 + 4; 8-bit Adam 1 + 1 plus one fp32 absmax per
  block of 256 entries for each (bitsandbytes' and torchao's block size); SGD (no momentum) none,
* z and u at their storage formats (ELSA-L); a sparse z is a bitmask (1/8 byte) plus the
  surviving ``1 - sparsity`` fraction of values,
* with ``loss_fisher`` (coupled mode, ``fisher_source="loss"``) the fp32 EMA of squared loss
  gradients, 4.

Per-tensor constants (the fp32 scale of z and u, Adam's step counter, the 256-entry quantisation
maps of 8-bit Adam) are left out: they vanish per parameter for real matrices. Note that 8-bit
optimisers keep fp32 moments for tensors below their minimum size (4096 entries in
bitsandbytes and torchao), so the 8-bit figure holds for matrices at least that large.

Measured (:func:`measured_state_bytes_per_param`): the bytes of every tensor a live
:class:`elsa.optim.admm.ADMM` holds for its pruned parameters (the base optimiser's state and the z/u
entries), divided by the number of pruned entries. Tensors shared between parameters (e.g.
bitsandbytes' quantisation map) are counted once; quantised tensor subclasses (torchao's 8-bit
state) and DTensors are counted by the plain tensors they hold on this rank.
"""

from __future__ import annotations

import torch

from elsa.optim.states import FORMATS

BLOCKSIZE_8BIT = 256  # entries per fp32 absmax in bitsandbytes' and torchao's 8-bit Adam
_ABSMAX_BYTES = 4
OPTIMIZER_KINDS = ("adam", "adamw", "adam8bit", "sgd")

# base-optimiser state keys by what they hold (torch Adam/AdamW/SGD, bitsandbytes, torchao)
_FIRST_MOMENT_KEYS = {"exp_avg", "state1", "absmax1", "momentum_buffer"}
_SECOND_MOMENT_KEYS = {"exp_avg_sq", "state2", "absmax2", "max_exp_avg_sq"}


def _format_bytes(name: str) -> int:
    if name not in FORMATS:
        raise ValueError(f"state dtype {name!r} is unknown; choose one of {', '.join(FORMATS)}")
    return FORMATS[name].itemsize


def state_bytes_per_param(
    optimizer: str = "adam",
    z_dtype: str = "fp32",
    u_dtype: str = "fp32",
    z_sparse: bool = False,
    sparsity: float = 0.0,
    include_weight_and_grad: bool = True,
    loss_fisher: bool = False,
) -> dict[str, float]:
    """Analytic bytes per pruned parameter, broken down.

    Keys: ``weight``, ``grad`` (0 unless ``include_weight_and_grad``), ``m``, ``v``, ``z``, ``u``,
    ``fisher``, ``optimizer_states`` (m + v), ``admm_states`` (z + u + fisher), ``states`` (all
    states) and ``total`` (everything).
    """
    if optimizer not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer {optimizer!r} is unknown; choose one of {', '.join(OPTIMIZER_KINDS)}")
    if z_sparse and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1) for a sparse z")
    if optimizer in ("adam", "adamw"):
        m = v = 4.0
    elif optimizer == "adam8bit":
        m = v = 1.0 + _ABSMAX_BYTES / BLOCKSIZE_8BIT
    else:  # plain SGD keeps no state
        m = v = 0.0
    z_bytes = float(_format_bytes(z_dtype))
    z = 1.0 / 8.0 + (1.0 - sparsity) * z_bytes if z_sparse else z_bytes
    u = float(_format_bytes(u_dtype))
    weight = grad = 4.0 if include_weight_and_grad else 0.0
    fisher = 4.0 if loss_fisher else 0.0
    out = {"weight": weight, "grad": grad, "m": m, "v": v, "z": z, "u": u, "fisher": fisher}
    out["optimizer_states"] = m + v
    out["admm_states"] = z + u + fisher
    out["states"] = m + v + out["admm_states"]
    out["total"] = weight + grad + out["states"]
    return out


def _plain_tensors(t: torch.Tensor):
    """The plain tensors that hold ``t``'s data on this rank."""
    if hasattr(t, "_local_tensor"):  # DTensor
        yield from _plain_tensors(t._local_tensor)
        return
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(t, name))
        return
    yield t


def _bucket(key: str) -> str:
    if key.startswith("admm_z_"):
        return "z"
    if key.startswith("admm_u_"):
        return "u"
    if key == "admm_f":
        return "fisher"
    if key in _FIRST_MOMENT_KEYS:
        return "m"
    if key in _SECOND_MOMENT_KEYS:
        return "v"
    return "other"  # step counters, quantisation maps


def measured_state_bytes_per_param(admm) -> dict[str, float]:
    """Bytes actually held per pruned parameter by a live ADMM optimiser (this rank's shards).

    Keys: ``m``, ``v``, ``other`` (step counters, quantisation maps...), ``z``, ``u``, ``fisher``,
    ``optimizer_states`` (m + v + other), ``admm_states`` (z + u + fisher), ``states`` (all of them),
    ``weight`` and ``grad`` (what the pruned parameters and their gradients hold now; grad is 0
    after ``zero_grad(set_to_none=True)``), ``total`` and ``params`` (pruned entries counted).
    """
    seen: set[tuple[int, int, torch.dtype]] = set()
    sums = {"m": 0, "v": 0, "other": 0, "z": 0, "u": 0, "fisher": 0, "weight": 0, "grad": 0}

    def add(bucket: str, tensor) -> None:
        if not torch.is_tensor(tensor):
            return
        for plain in _plain_tensors(tensor):
            key = (plain.data_ptr(), plain.numel(), plain.dtype)
            if plain.numel() == 0 or key in seen:
                continue
            seen.add(key)
            sums[bucket] += plain.numel() * plain.element_size()

    params = 0
    for target in admm.targets:
        param = target.param
        local_param = param._local_tensor if hasattr(param, "_local_tensor") else param
        params += local_param.numel()
        for key, value in admm.base.state.get(param, {}).items():
            add(_bucket(key), value)
        for key, value in admm._admm.get(param, {}).items():
            add(_bucket(key), value)
        add("weight", param)
        if param.grad is not None:
            add("grad", param.grad)
    per = {key: value / max(params, 1) for key, value in sums.items()}
    per["optimizer_states"] = per["m"] + per["v"] + per["other"]
    per["admm_states"] = per["z"] + per["u"] + per["fisher"]
    per["states"] = per["optimizer_states"] + per["admm_states"]
    per["total"] = per["states"] + per["weight"] + per["grad"]
    per["params"] = float(params)
    return per
