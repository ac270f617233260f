"""The budget rule: what an ELSA run uses for the settings its user left unset.

Why a rule and not fixed defaults: the best penalty, learning rate and start depend on how many
steps the run has (measured on SmolLM2-135M, bench/results/NOTES.md, "The budget rule"). The
paper's settings assume 4096 steps of 8 x 2048 tokens; on a few hundred steps Adam cannot move
weights far enough for the coupled penalty to prune them, and on a few dozen steps even the
decoupled penalty cannot beat a one-shot method unless it starts from one. So:

* penalty ``decoupled`` with rho rising linearly from ``RHO`` to ``RHO_FINAL`` (the exact
  proximal pull, independent of the gradient's scale), at every budget;
* ``init`` from ``INIT`` (SparseGPT's mask and reconstructed weights as z0 = x0), at every budget;
* ``lr``: ``LR`` for runs of at most ``SHORT_STEPS`` steps, ``LR_LONG`` above;
* ``loss`` ``ntp``.

Each value is stated once, here, with the held-out figure that chose it in NOTES.md. Only
fields the user left unset (None) are filled; the rho fields as a group (setting any of them
keeps the user's own rho, e.g. ``rho_schedule: constant`` without rho is the derived rho).
One-shot methods get ``init: none`` and nothing else.
"""
from __future__ import annotations

PENALTY = "decoupled"
RHO, RHO_FINAL, RHO_SCHEDULE = 0.005, 0.05, "linear"
INIT = "sparsegpt"
LOSS = "ntp"
LR = 3e-4
LR_LONG = 1.2e-3
SHORT_STEPS = 100
COUPLED_LR = 1e-4  # lr when the user asks for the coupled penalty (the paper's OPT-125M @ 70%)


def budget_settings(steps: int, sparsity: float | None, method: str, penalty: str | None) -> dict:
    """The rule's value for every field it governs (the caller keeps what the user set)."""
    if method != "elsa":
        return {"init": "none", "loss": LOSS, "penalty": "coupled", "lr": COUPLED_LR, "rho_schedule": "constant"}
    chosen: dict = {"init": INIT, "loss": LOSS, "penalty": PENALTY}
    if (penalty or PENALTY) == "coupled":
        return {**chosen, "lr": COUPLED_LR, "rho_schedule": "constant"}
    return {**chosen, "lr": LR if steps <= SHORT_STEPS else LR_LONG, "rho_group": (RHO, RHO_FINAL, RHO_SCHEDULE)}
