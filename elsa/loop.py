"""The x-update loop: base optimiser, LR schedule, batches, and the step itself.

One loop serves the single-process API, notebooks and the Ray Train worker: the worker only
adds FSDP sharding, a rank's slice of each batch, and reporting/checkpoint hooks. A step is:
forward/backward over ``grad_accum`` micro-batches, clip, ``admm.step()`` (which adds the
penalty, steps the base optimiser and, every ``interval`` steps, updates z and u), LR step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from elsa.config import PruneConfig
from elsa.distill import training_loss
from elsa.optim.admm import ADMM, ADMMSettings
from elsa.perplexity import mean_nll
from elsa.targets import config_targets
from elsa.text.data import calibration_blocks


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the message says at which step and what to change."""


class DivergedError(NonFiniteLossError):
    """The loss exploded while finite, or the z-update's numbers are not finite (see DivergenceGuard)."""


@dataclass
class DivergenceGuard:
    """Stops a run whose finite loss explodes, before its diverged weights are exported.

    Why: with too large an lr the loss can grow from 6 to 1e8 and stay finite, so the NaN check
    never fires and the wrecked model would be exported as if fine. The loss counts as exploded
    when it stays above ``factor`` x the first step's loss for ``patience`` consecutive steps (one
    spike is forgiven). A non-finite primal residual means the projection scores were not finite.
    """

    factor: float = 10.0
    patience: int = 3
    first: float | None = None
    above: int = 0

    @property
    def healthy(self) -> bool:
        """No loss above the limit right now: a checkpoint written now is a good one to keep."""
        return self.above == 0

    def check(self, step: int, loss: float, split_metrics: dict | None = None) -> None:
        if self.first is None:
            self.first = loss
        self.above = self.above + 1 if loss > self.factor * abs(self.first) else 0
        if self.above >= self.patience:
            raise DivergedError(
                f"training diverged at step {step}: loss {loss:.4g} above {self.factor:g}x its first value "
                f"{self.first:.4g} for {self.above} steps: lower --lr or --rho; checkpoints written so far are kept"
            )
        bad = {k: v for k, v in (split_metrics or {}).items() if not math.isfinite(v)}
        if bad:
            raise DivergedError(
                f"training diverged at step {step}: non-finite projection ({bad}) with loss {loss:.4g}: "
                "lower --lr or --rho; checkpoints written so far are kept"
            )


def build_base_optimizer(params, cfg: PruneConfig) -> torch.optim.Optimizer:
    """The base optimiser of the x-update (Adam by default, as the paper)."""
    if cfg.lr is None:  # the rule's lr is scaled to the dense weights (elsa.weight_scale.resolve_on_dense)
        raise ValueError("lr is unset: resolve it on the dense model (elsa.weight_scale.resolve_on_dense) or pass --lr")
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam8bit":
        return _adam8bit(params, cfg)
    raise ValueError(f"optimizer {cfg.optimizer!r} is unknown")


def _adam8bit(params, cfg: PruneConfig) -> torch.optim.Optimizer:
    """8-bit Adam: bitsandbytes on plain tensors, torchao's AdamW8bit on FSDP2 DTensors.

    bitsandbytes' Adam8bit refuses DTensor parameters ("mixed torch.Tensor and DTensor"), so
    sharded runs use torchao, whose 8-bit states are DTensor-aware.
    """
    from elsa.distributed import is_dtensor

    if any(is_dtensor(p) for p in params):
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    return bnb.optim.Adam8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: PruneConfig) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to 0 at ``steps`` (or constant)."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (cfg.steps - step) / max(cfg.steps - cfg.warmup_steps, 1))

    return factor


def build_admm(model: torch.nn.Module, cfg: PruneConfig) -> tuple[ADMM, torch.optim.lr_scheduler.LambdaLR]:
    """Targets, base optimiser, ADMM wrapper and LR schedule for ``model`` (after sharding)."""
    targets = config_targets(model, cfg)
    if not cfg.train_embeddings:
        freeze_embeddings(model)
    admm = ADMM(build_base_optimizer(model.parameters(), cfg), targets, ADMMSettings.from_config(cfg))
    return admm, torch.optim.lr_scheduler.LambdaLR(admm, lr_factor(cfg))


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Keep the token embedding and the output head (one matrix when tied) at their start values.

    Neither is pruned, and training them on a few hundred steps of narrow calibration text pulls
    down the logits of every token that text lacks: on SmolLM2 at 90% the evaluation perplexity
    rose while the held-out calibration loss fell (elsa/budget.py). FSDP2 carries the flag from
    the sharded to the gathered parameter, so this works before or after sharding.
    """
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


@dataclass
class BatchSampler:
    """Training batches drawn reproducibly from (seed, step, micro-step) alone.

    So a resumed run sees exactly the batches it would have seen, and with ``world`` ranks
    each takes its contiguous slice of the same global batch: results do not depend on the
    number of workers.
    """

    tokenizer: object
    cfg: PruneConfig
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.cfg.batch_size % self.world:
            raise ValueError(f"batch_size={self.cfg.batch_size} must be a multiple of the {self.world} workers")

    def __call__(self, step: int, micro: int) -> torch.Tensor:
        seed = (self.cfg.seed * 1_000_003 + step * 1009 + micro) % (2**31 - 1)
        blocks = calibration_blocks(
            self.tokenizer, self.cfg.data, self.cfg.batch_size, self.cfg.seqlen, seed, windows=self.cfg.windows
        )
        per_rank = self.cfg.batch_size // self.world
        return blocks[self.rank * per_rank : (self.rank + 1) * per_rank]

    def validation(self) -> torch.Tensor:
        """Held-out blocks for the projected loss: the calibration text's validation split, then
        each ``val_data`` source's (never the evaluation splits), ``val_blocks`` of each."""
        sources = list(dict.fromkeys([self.cfg.data, *self.cfg.val_data]))
        return torch.cat(
            [
                calibration_blocks(
                    self.tokenizer,
                    source,
                    self.cfg.val_blocks,
                    self.cfg.seqlen,
                    self.cfg.seed + 1,
                    split="validation",
                    windows=self.cfg.windows,
                )
                for source in sources
            ]
        )


@dataclass
class LoopHooks:
    """What the caller wants to hear: metrics every ``log_interval`` steps, checkpoints."""

    on_metrics: Callable[[dict, int], None] = lambda metrics, step: None
    on_checkpoint: Callable[[int], None] | None = None
    validation_loss: Callable[[], float] | None = None  # default: mean NLL of val blocks
    history: list = field(default_factory=list)


def use_bf16(cfg: PruneConfig, device: torch.device) -> bool:
    """``cfg.bf16``, or where unset: bf16 autocast on a GPU and on a CPU with native bf16 units.

    Measured on SmolLM2-135M at 80%, 16 steps from the warm start on the 2-core reference CPU
    (avx512_bf16): 2.45 s a step against 3.86 in fp32, held-out loss 5.7616 against 5.7619.
    A CPU without bf16 instructions would emulate it, slower than fp32: there it stays off.
    """
    if cfg.bf16 is not None:
        return cfg.bf16
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(amx() or avx512_bf16())


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accumulate_gradients(model, batches, step: int, cfg: PruneConfig, teacher, device) -> tuple[float, int]:
    """The x-update's gradient of one step, over ``cfg.grad_accum`` micro-batches: (loss, tokens)."""
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for micro in range(cfg.grad_accum):
        ids = batches(step, micro).to(device)
        tokens += ids.numel()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device)):
            loss = training_loss(model, ids, cfg, teacher) / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    return float(loss_sum), tokens


def train(
    model: torch.nn.Module,
    admm: ADMM,
    scheduler,
    batches: Callable[[int, int], torch.Tensor],
    cfg: PruneConfig,
    hooks: LoopHooks,
    start_step: int = 0,
    val_blocks: torch.Tensor | None = None,
    teacher: torch.nn.Module | None = None,
) -> list[dict]:
    """Run steps ``start_step .. cfg.steps - 1``; returns the logged metrics.

    ``teacher``: the frozen dense model, for ``cfg.loss`` kd and ntp+kd (elsa/distill.py).
    """
    device = _device_of(model)
    model.train()
    guard = DivergenceGuard()
    for step in range(start_step, cfg.steps):
        started = time.perf_counter()
        loss_value, tokens = _accumulate_gradients(model, batches, step, cfg, teacher, device)
        if not math.isfinite(loss_value):
            admm.zero_grad()
            raise NonFiniteLossError(
                f"training loss is {loss_value} at step {step + 1} (lr={scheduler.get_last_lr()[0]:.3g}, "
                f"lambda={admm.lmda:.3g}): lower --lr or --lmda; checkpoints written so far are kept"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]
        updated = admm.settings.splits_after(admm.admm_step + 1)  # the z/u-update runs inside this step
        admm.step()
        scheduler.step()
        admm.zero_grad()
        done = step + 1
        metrics = {"train_loss": loss_value, "lr": lr, "lmda": admm.lmda}
        metrics["tokens_per_s"] = tokens / (time.perf_counter() - started)
        if admm.rho is not None:
            metrics["rho"] = admm.rho
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if updated:
            metrics.update(admm.last_metrics)
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            metrics["val_loss_projected"] = _projected_validation(model, admm, hooks, val_blocks)
        if done % cfg.log_interval == 0 or done == cfg.steps or "val_loss_projected" in metrics:
            hooks.on_metrics(metrics, done)
            hooks.history.append({"step": done, **metrics})
        guard.check(done, loss_value, admm.last_metrics if updated else None)  # after logging: the step is seen
        due = cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done < cfg.steps
        if guard.healthy and hooks.on_checkpoint and due:
            hooks.on_checkpoint(done)
    return hooks.history


def _projected_validation(model, admm: ADMM, hooks: LoopHooks, val_blocks) -> float:
    """Validation loss of the model as the final projection would leave it now."""
    was_training = model.training
    with admm.projected():
        if hooks.validation_loss is not None:
            value = hooks.validation_loss()
        else:
            value = mean_nll(model, val_blocks) if val_blocks is not None else float("nan")
    model.train(was_training)
    return value
