"""The budget rule: what an ELSA run uses for the settings its user left unset.

Why a rule and not fixed defaults: the best penalty, learning rate and its warm-up, interval,
loss and start depend on how many steps the run has. The paper's settings assume 4096 steps of
8 x 2048 tokens; on a few hundred steps Adam cannot move weights far enough for the coupled
penalty to prune them, and on a few dozen steps ADMM from the dense model loses to a
three-minute one-shot method. So, for every budget:

* ``init`` SparseGPT: ADMM starts from its mask and reconstructed weights (x0 = z0, u0 = 0) and
  the run keeps the better of (its final projection, that start) by held-out loss;
* penalty ``decoupled``, rho rising linearly from ``RHO`` to ``RHO_FINAL`` (the exact proximal
  pull, independent of the gradient's scale);
* loss ``ntp`` below ``KD_STEPS`` steps, ``ntp+kd`` (distillation from the dense model, weight
  0.5) from there on. Within an hour on SmolLM2-135M (2026-12-07, bench/results-hour/
  smollm2-135m-intel-kd) distillation beat next-token at every sparsity in less wall time: 70%
  1,100 steps WikiText-2 72.43 against next-token's best 84.36 (600 steps; 1,300 gave 87.13), 80%
  125.46 against 134.36 (1,700 steps), 90% 1,500 steps 282.96 against 312.10 (1,700): next-token
  past a few hundred steps drifts towards the calibration text, the teacher anchors it; on this
  rule 1,600 steps at 90% reach 277.61 (9.87x dense). A step costs 1.25-1.3x (1.5x on
  Gemma-3-270M's 262k vocabulary) and holds the dense teacher (+0.5-0.85 GB in fp32; under bf16
  autocast on one worker its linear layers are held in bf16, elsa/distill.py lean_teacher). At 300
  steps it is a tie per second (SmolLM2 80%, seeds 0 and 1, bench/results-kd300: 300 KD steps
  152.40 / sotu 127.93 against 375 ntp steps' 151.32 / 134.62 in the same time; Gemma before the
  chunked head: ntp needs 1.2x KD's time to tie), so short runs keep next-token;
* the token embedding and output head (tied in SmolLM2, never pruned) frozen: trained on the
  calibration text, the run's held-out loss falls less and its evaluation perplexity is higher.
  300 steps from the OWL SparseGPT start, frozen against trained: at 90% 5.589 against 5.769
  (WikiText-2 557.6 against 699.8), at 80% 4.504 against 4.650 (167.1 against 201.9); 1.78 s a
  step against 2.0-2.4 and 0.4 GB less memory (no Adam state for the 28M-entry embedding);
* allocation ``owl`` (elsa/allocation.py): each decoder block's sparsity from its share of
  Wanda-score outliers on the dense model (m 3, lambda 0.08 but at most (1 - S) / 2), mean S. At
  80%, the SparseGPT start's held-out loss (8 blocks) is 6.726 uniform, 6.589 / 6.505 with m 5 and
  lambda 0.04 / 0.08, 6.389 with m 3, lambda 0.08; after 300 steps from it 4.650 against 4.777
  uniform. At 90% lambda 0.08 (blocks 0.80-0.96) starts at 9.821, lambda 0.05 at 8.371, uniform 8.489;

lr ``LR`` at every budget, scaled to the model's weights (``scaled_lr``), and by the number of steps
N: up to ``SHORT_STEPS`` steps a z/u-update every ``INTERVAL`` steps (the mask must move several
times within the run), above it every ``INTERVAL_LONG``. Longer runs used lr 3e-4 until the
embedding was frozen; frozen, 300 steps from the OWL SparseGPT starts, 6e-4 against 3e-4: at 70%
3.748 against 3.821, at 80% 4.379 against 4.504, at 90% 5.428 against 5.589 (WikiText-2 89.9 / 157.3
/ 467.3 against 90.5 / 167.1 / 557.6).
Under Adam a weight moves by about lr a step whatever its size, so the lr that suits SmolLM2
(median RMS of its pruned matrices ``LR_REFERENCE_RMS``) moves Gemma-3-270M's weights (median RMS
0.0395) 4.8x further relative to their size: at 80%, 32 steps from its SparseGPT start, lr 6e-4 /
2e-4 / 1.2e-4 / 6e-5 gave held-out 5.807 / 5.040 / 4.990 / 5.037 and WikiText-2 706.8 / 229.0 /
206.7 / 210.6, where the ratio predicts 1.25e-4. So an unset lr is resolved on the dense model
(elsa/weight_scale.py) as LR x its median RMS / ``LR_REFERENCE_RMS``, to two digits.
Above ``SHORT_STEPS`` the lr rises linearly over the first ``WARMUP_FRACTION`` of the steps.
Without it, Adam's first full-size steps knock the SparseGPT start about (the loss jumps 1-2 nats
at the first z/u-updates), and at 90% the outcome hung on rounding: 300 steps gave WikiText-2
505.9 or 2,190 at the same seed after a rounding-level change of the loss (bench/results/NOTES.md,
2026-12-06). With 30 steps of warm-up, 300 steps on SmolLM2-135M (WikiText-2, held-out loss,
seeds 0 / 1 / 2; bench/results-warmup): at 90% 486.3 / 476.7 against 2,190 / 519.6 (5.625 / 5.706
against 7.478 / 5.760), at 80% 161.9 / 153.6 / 168.7 against 166.3 / 155.9 / 170.1 (held-out
loss lower at each), at 70% a tie (88.1 against 87.4, sotu 76.1 against 76.3, seed 0). Runs of
100 steps or fewer keep none (not measured there; a 32-step run would spend 3 steps on it).

Chosen on SmolLM2-135M at 80% on the projected model's loss on held-out calibration text
(8 blocks of 256 tokens, never the evaluation text), bench/results/NOTES.md "The budget rule";
from SparseGPT's start (held-out 6.744), 32 steps: interval 32 / 8 / 4 / 2 at lr 3e-4 gave
5.779 / 5.446 / 5.395 / 5.358, and at interval 2 lr 6e-4 5.317; from the dense model instead
7.959. Each value is stated once, here. Only fields the user left unset (None) are filled; the
rho fields as a group (setting any of them keeps the user's own rho, e.g. ``rho_schedule:
constant`` without rho is the derived rho). The coupled penalty gets the paper's interval 32,
lr, constant rho, next-token loss, trained embeddings and no lr warm-up (it keeps the SparseGPT
start and OWL); one-shot methods get those and no warm start, uniform allocation.
"""

from __future__ import annotations

PENALTY = "decoupled"
INTERVAL, INTERVAL_LONG = 2, 4  # steps between z/u-updates from the warm start, short / long runs
PAPER_INTERVAL = 32  # the paper's, for the coupled penalty
RHO, RHO_FINAL, RHO_SCHEDULE = 0.005, 0.05, "linear"
INIT = "sparsegpt"
LOSS, LOSS_LONG = "ntp", "ntp+kd"  # next-token; distillation added from KD_STEPS steps on
KD_STEPS = 1000  # measured wins at 1,100-1,500 steps, a tie at 300; between them not measured
TRAIN_EMBEDDINGS = False
ALLOCATION = "owl"  # ELSA's per-block sparsity; one-shot methods stay uniform (the papers' protocol)
OWL_LAMBDA = 0.08  # half-width of OWL's band of block sparsities, narrowed at high sparsity
LR = 6e-4  # for weights of median RMS LR_REFERENCE_RMS; other models get it scaled (scaled_lr)
LR_REFERENCE_RMS = 0.190  # SmolLM2-135M's median RMS over its 210 pruned matrices (0.19020)
SHORT_STEPS = 100  # above it, INTERVAL_LONG and an lr warm-up
WARMUP_FRACTION = 0.1  # of a long run's steps: linear lr warm-up from the warm start
COUPLED_LR = 1e-4  # lr when the user asks for the coupled penalty (the paper's OPT-125M @ 70%)
EVALS_PER_RUN = 4  # projected validation losses a run logs (the last at its end): a curve, not a point


def eval_interval(steps: int) -> int:
    """Steps between projected validation losses: ``EVALS_PER_RUN`` of them in any run."""
    return max(1, -(-steps // EVALS_PER_RUN))


def budget_settings(steps: int, sparsity: float | None, method: str, penalty: str | None) -> dict:
    """The rule's value for every field it governs (the caller keeps what the user set)."""
    if method != "elsa":
        return {
            "eval_interval": eval_interval(steps),
            "init": "none",
            "loss": LOSS,
            "train_embeddings": True,
            "allocation": "uniform",
            "penalty": "coupled",
            "lr": COUPLED_LR,
            "rho_schedule": "constant",
            "interval": PAPER_INTERVAL,
            "warmup_steps": 0,
        }
    loss = LOSS_LONG if steps >= KD_STEPS else LOSS
    chosen: dict = {"init": INIT, "loss": loss, "penalty": PENALTY, "allocation": ALLOCATION}
    chosen["eval_interval"] = eval_interval(steps)
    if (penalty or PENALTY) == "coupled":  # the paper's settings: every weight trained
        coupled = {
            "lr": COUPLED_LR,
            "loss": LOSS,
            "rho_schedule": "constant",
            "interval": PAPER_INTERVAL,
            "train_embeddings": True,
            "warmup_steps": 0,
        }
        return {**chosen, **coupled}
    short = steps <= SHORT_STEPS
    return {
        **chosen,
        "train_embeddings": TRAIN_EMBEDDINGS,  # lr: left unset, resolved on the dense model (scaled_lr)
        "interval": INTERVAL if short else INTERVAL_LONG,
        "warmup_steps": 0 if short else round(WARMUP_FRACTION * steps),
        "rho_group": (RHO, RHO_FINAL, RHO_SCHEDULE),
    }


def scaled_lr(median_rms: float) -> float:
    """``LR`` scaled by the model's median weight RMS against SmolLM2's, to two significant digits
    (SmolLM2-135M: 6.0e-4, Gemma-3-270M: 1.2e-4)."""
    if not (median_rms > 0 and median_rms != float("inf")):
        raise ValueError(f"median weight RMS {median_rms} cannot scale the lr (all-zero weights?): pass --lr")
    return float(f"{LR * median_rms / LR_REFERENCE_RMS:.2g}")


def owl_lambda(sparsity: float) -> float:
    """OWL's lambda (block levels spread over 2 lambda, mean S): 0.08, at most (1 - S) / 2 so that
    the spread narrows at high sparsity (90%: 0.05; SmolLM2's blocks then span 0.84-0.94, not 0.80-0.96)."""
    return min(OWL_LAMBDA, (1.0 - sparsity) / 2)
