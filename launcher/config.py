"""Run configuration: typed sections loaded from YAML, dotted CLI overrides, validation, saving.

    cfg = load_config("configs/opt_tiny.yaml", overrides=["train.lr=3e-4", "attention.variant=softmax"])

`attention:` is its own section in YAML and on the command line, and lives at `cfg.model.attention`
(the model section is then everything needed to rebuild the model).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import DataConfig
from launcher.wandb_logging import WandbConfig
from model.config import AttentionConfig, ModelConfig
from model.family import family_of, spec_for
from common.coerce import coerce as _coerce
from common.errors import ConfigError, ProjectError
from common.plugins import is_import_path
from model.recompute import RECOMPUTE_MODES, recompute_mode
from parallel.layout import PARTITION_METHODS

LR_SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")  # what a step with an inf/NaN loss or gradient does (launcher/nonfinite.py)


@dataclass
class ParallelConfig:
    """Layout: data-parallel size = world size / (tensor x pipeline); checked against the world in prepare()."""

    tensor: int = 1  # megatron-core tensor parallelism (heads, FFN units and vocabulary split over ranks)
    pipeline: int = 1  # DeepSpeed pipeline stages (1F1B)
    # DeepSpeed ZeRO stage for data parallelism (0 = plain all-reduce); pipelines allow 0 or 1.
    zero_stage: int = 0
    partition_method: str = "layers"  # how layers are split over pipeline stages (see parallel/layout.py)
    # Recompute in backward (Megatron's names; every layout): none; full = every block from its input; selective =
    # attention's core only. true / false (the old boolean) mean full / none.
    activation_checkpointing: str | bool = "none"

    def validate(self) -> None:
        self.activation_checkpointing = recompute_mode(self.activation_checkpointing)
        if self.activation_checkpointing not in RECOMPUTE_MODES:
            raise ConfigError("parallel.activation_checkpointing", self.activation_checkpointing,
                              f"must be one of {', '.join(RECOMPUTE_MODES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("parallel.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        for key in ("tensor", "pipeline"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}", getattr(self, key), "must be a positive integer")
        if self.partition_method not in PARTITION_METHODS:
            raise ConfigError("parallel.partition_method", self.partition_method,
                              f"must be one of {', '.join(PARTITION_METHODS)}")
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ConfigError("parallel.zero_stage", self.zero_stage, "ZeRO-2/3 cannot be combined with pipeline "
                              "parallelism (DeepSpeed supports ZeRO-1 with pipelines)")


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    # Sequences per optimizer step over all data-parallel ranks; gradient accumulation fills the gap.
    global_batch_size: int = 8
    lr: float = 4e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 1234
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2  # newest N step checkpoints are kept; 0 keeps all
    # Megatron's --exit-interval: checkpoint and exit once the step is a multiple of this (for
    # time-limited jobs); the schedule still runs to `steps` over the resumed runs.
    exit_interval: int | None = None
    # Start from these weights (fresh optimizer and data stream): a weights-only checkpoint (launcher.import_hf,
    # launcher.consolidate) or a training checkpoint. Ignored when resuming. Checked in launcher.pretrain.prepare.
    init_from: str | None = None
    # torch.compile the model's blocks (model/compile.py; Inductor, CPU and CUDA); evaluation runs eagerly
    compile: bool = False
    # A step whose loss or gradient is inf/NaN is never applied; then `stop` the run (exit code 1, the last
    # checkpoint stays `latest`) or `skip` that update and go on, at most max_nonfinite_skips steps in a row.
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # Periodic components of one's own (launcher/periodic.py), by import path `package.module:NAME`: each a
    # callable taking the run config and returning a PeriodicComponent; run after the built-in ones.
    periodic: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "checkpoint_interval", "max_nonfinite_skips"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{key}", value, "must be a positive integer")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("train.global_batch_size", self.global_batch_size,
                              f"must be a multiple of train.micro_batch_size={self.micro_batch_size}")
        if self.lr <= 0:
            raise ConfigError("train.lr", self.lr, "must be positive")
        if self.eps <= 0:
            raise ConfigError("train.eps", self.eps, "must be positive (Adam divides by sqrt(v) + eps)")
        if self.seed < 0:
            raise ConfigError("train.seed", self.seed, "must be a non-negative integer")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("train.min_lr", self.min_lr, f"must lie in [0, train.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("train.lr_schedule", self.lr_schedule, f"must be one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", getattr(self, key), "must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay", self.weight_decay, "must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        if self.exit_interval is not None and self.exit_interval <= 0:
            raise ConfigError("train.exit_interval", self.exit_interval, "must be positive or null")
        if self.keep_checkpoints < 0:
            raise ConfigError("train.keep_checkpoints", self.keep_checkpoints, "must be >= 0")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError("train.nonfinite", self.nonfinite, f"must be one of {', '.join(NONFINITE_POLICIES)}")
        for index, name in enumerate(self.periodic):
            if not is_import_path(name):
                raise ConfigError(f"train.periodic[{index}]", name, "must be an import path package.module:NAME")


@dataclass
class LoggingConfig:
    run_dir: str = "runs"
    run_name: str = "run"
    log_interval: int = 10
    tensorboard: bool = True
    progress: bool = True
    # Peak dense TFLOP/s of one accelerator for MFU; null = known GPUs' datasheet value (none on CPU).
    peak_tflops: float | None = None
    # Weights & Biases (launcher/wandb_logging.py): {mode: online|offline|disabled, project, entity, tags}; off by default.
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.log_interval <= 0:
            raise ConfigError("logging.log_interval", self.log_interval, "must be a positive integer")
        if not self.run_name or "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError("logging.run_name", self.run_name, "must be a folder name inside logging.run_dir "
                              "(not empty, '.' or '..', no '/')")
        if not self.run_dir:
            raise ConfigError("logging.run_dir", self.run_dir, "must name a folder")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("logging.peak_tflops", self.peak_tflops, "must be positive or null")
        self.wandb.validate()


W8A8_WEIGHT_RANGES = ("auto", "mse", "minmax")


@dataclass
class EvalConfig:
    interval: int = 200  # validation perplexity every N steps (and always at the end)
    max_blocks: int | None = 64  # validation blocks per evaluation (None = the whole split)
    # Outlier statistics + W8A8 perplexity (outliers/) every N steps and at the end, saved next to that
    # step's checkpoint (a checkpoint is written at these steps); null = never.
    outlier_interval: int | None = 1000
    # W8A8 calibration on the first batches of the train split (OPT protocol: 4 batches x 8 sequences).
    calibration_batches: int = 4
    calibration_batch_size: int = 8
    # Symmetric per-tensor weight range: mse grid search (OPT's recipe), minmax (BERT's), or auto (by model.family).
    w8a8_weight_range: str = "auto"
    w8a8_act_percentile: float | None = 99.999  # clip each calibration batch to (100-p, p) percentiles; null = off
    # lm-evaluation-harness tasks (launcher/lm_eval.py) run on the checkpoint every lm_eval_interval steps and at
    # the end, on rank 0; [] = never. lm_eval_limit caps the examples per task (null = all).
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_interval: int | None = None
    lm_eval_limit: int | None = None

    def validate(self) -> None:
        if self.interval <= 0:
            raise ConfigError("eval.interval", self.interval, "must be a positive integer")
        if self.max_blocks is not None and self.max_blocks <= 0:
            raise ConfigError("eval.max_blocks", self.max_blocks, "must be positive or null")
        if self.outlier_interval is not None and self.outlier_interval <= 0:
            raise ConfigError("eval.outlier_interval", self.outlier_interval, "must be a positive integer or null")
        for key in ("calibration_batches", "calibration_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key}", getattr(self, key), "must be a positive integer")
        if self.w8a8_weight_range not in W8A8_WEIGHT_RANGES:
            raise ConfigError("eval.w8a8_weight_range", self.w8a8_weight_range,
                              f"must be one of {', '.join(W8A8_WEIGHT_RANGES)}")
        if self.w8a8_act_percentile is not None and not 50.0 < self.w8a8_act_percentile <= 100.0:
            raise ConfigError("eval.w8a8_act_percentile", self.w8a8_act_percentile, "must lie in (50, 100] or null")
        for key in ("lm_eval_interval", "lm_eval_limit"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key}", getattr(self, key), "must be a positive integer or null")
        if self.lm_eval_tasks and self.lm_eval_interval is None:
            raise ConfigError("eval.lm_eval_interval", None, "must be set when eval.lm_eval_tasks is not empty")
        if any(not name for name in self.lm_eval_tasks):
            raise ConfigError("eval.lm_eval_tasks", self.lm_eval_tasks, "must be lm-eval task names")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def attention(self) -> AttentionConfig:
        return self.model.attention

    @property
    def run_path(self) -> Path:
        return Path(self.logging.run_dir) / self.logging.run_name

    def validate(self) -> None:
        for section in (self.model, self.data, self.parallel, self.train, self.logging, self.eval):
            section.validate()
        spec = family_of(self.model)
        if self.eval.lm_eval_tasks and spec.causal_lm_export() is None:  # lm-eval scores an exported causal LM
            raise ConfigError("eval.lm_eval_tasks", self.eval.lm_eval_tasks,
                              f"needs a causal LM (model.family=opt), not {self.model.family}")
        mode = self.parallel.activation_checkpointing
        if (mode == "full" or self.train.compile) and not spec.block_types:
            key, value = ("train.compile", True) if self.train.compile else ("parallel.activation_checkpointing", mode)
            raise ConfigError(key, value, f"model.family={self.model.family} names no blocks to "
                              f"{'compile' if self.train.compile else 'recompute'} (FamilySpec.block_types)")
        if mode != "none" and mode not in spec.recompute_modes:
            raise ConfigError("parallel.activation_checkpointing", mode, f"model.family={self.model.family} "
                              f"recomputes {' or '.join(m for m in spec.recompute_modes if m != 'none') or 'nothing'}")
        spec.validate_run(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["attention"] = out["model"].pop("attention")
        return {key: out[key] for key in ("model", "attention", "data", "parallel", "train", "logging", "eval")}


def _build(cls: type, values: dict[str, Any], prefix: str, classes: dict[str, type] | None = None) -> Any:
    """`cls` from a mapping; `classes` replaces the declared type of some fields (a family's sections)."""
    if not isinstance(values, dict):
        raise ConfigError(prefix, values, "must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    moved = {key: why for key, why in getattr(cls, "MOVED_KEYS", {}).items() if key in values and key not in fields}
    # An older checkpoint's config.yaml carries them at their old defaults: read silently; a value someone set
    # is said in one line.
    old_defaults = getattr(cls, "MOVED_DEFAULTS", {})
    said = {key: why for key, why in moved.items() if key not in old_defaults or values[key] != old_defaults[key]}
    if said:
        print(f"note: {', '.join(f'{prefix}.{key}' for key in said)} ignored: {'; '.join(sorted(set(said.values())))}",
              file=sys.stderr)
    for key, value in values.items():
        # Users write `attention.x`, though it lives at model.attention.
        name = "attention" if (prefix, key) == ("model", "attention") else f"{prefix}.{key}" if prefix else key
        if key in moved:
            continue
        if key not in fields:
            valid = sorted(fields - {"attention"}) if prefix == "model" else sorted(fields)
            raise ConfigError(name, value, f"unknown key (valid: {', '.join(valid)})")
        hint = (classes or {}).get(key, hints[key])
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, None, "override must look like section.key=value")
    dotted, raw = text.split("=", 1)
    return dotted.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in (raw or {}).items()}
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(path), value, f"'{part}' is not a section")
        node[path[-1]] = value
    attention = raw.pop("attention", None)
    valid_sections = {f.name for f in dataclasses.fields(RunConfig)} | {"attention"}
    for key in raw:
        if key not in valid_sections:
            raise ConfigError(key, raw[key], f"unknown section (valid: {', '.join(sorted(valid_sections))})")
    if attention is not None:
        model = raw.setdefault("model", {})
        if "attention" in model:
            raise ConfigError("model.attention", model["attention"], "give attention settings in the top-level "
                              "'attention' section only")
        model["attention"] = attention
    # The family decides the classes of the `model:` and `data:` sections (model/family.py).
    model_section = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    spec = spec_for(str(model_section.get("family", ModelConfig.family)))
    cfg: RunConfig = _build(RunConfig, raw, "", {"model": spec.model_config_class, "data": spec.data_config_class})
    if "data" not in raw:  # no data section at all: the family's defaults
        cfg.data = spec.data_config_class()
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ProjectError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if raw is None:  # an empty file would silently train on defaults
        raise ProjectError(f"config file {path} is empty (want sections such as model:, data:, train:)")
    if not isinstance(raw, dict):
        raise ProjectError(f"config file {path} must contain a mapping of sections")
    return config_from_dict(raw, overrides)


def config_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))
