"""One evaluation of a trained model, shared by the in-training and the standalone paths.

    model = model_from_state(cfg, state_dict)                       # fresh fp32 model of cfg.model.family
    result = evaluate_model(model, val_blocks, calib_blocks, EvalSettings.from_config(cfg))
    result.to_dict()                                                # what outliers.json / --json hold

Both `launcher.pretrain` (every `eval.outlier_interval` steps, right after that step's checkpoint) and
`launcher.evaluate` (from the checkpoint files) go through `model_from_state` and `evaluate_model` with
the same blocks, so their numbers agree exactly.

"Blocks" are the family's examples (model/family.py: FamilySpec.validation_examples, calibration_examples;
e.g. OPT token blocks [T], BERT masked-LM examples [2, T] with fixed masks), batched by the family's `collate`.
The metrics are the family's (FamilySpec.eval_sums / finish_metrics): e.g. perplexity = exp(mean loss over the
predicted tokens) for OPT and BERT, top-1 accuracy for ViT. Each is reported as `val_<name>` and, for the
quantized copy, `w8a8_val_<name>`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.compile import eager
from model.family import BackcopyTask, Batch, FamilySpec, add_sums, family_of
from outliers.backcopy import BACKCOPY_KEYS, BackcopyHooks, format_backcopy_table
from outliers.ptq import PTQSettings, calibrate, quantize_w8a8
from outliers.sinks import SINK_SUMMARY_KEYS, SinkHooks, format_sink_table, summarize_sinks
from outliers.stats import OutlierHooks, hook_activation, summarize

RESULT_FILE = "outliers.json"
# Outlier headline keys, in the order they are printed after the family's metrics (summary_keys).
# *_rest: without position 0; then the attention-sink numbers of outliers/sinks.py.
OUTLIER_KEYS = ("avg_kurtosis", "max_kurtosis", "max_inf_norm", "ffn_max_inf_norm", "layer_max_inf_norm",
                "worst_module", "avg_kurtosis_rest", "max_inf_norm_rest") + SINK_SUMMARY_KEYS
# Keys that depend on the machine's speed, not the model: never compared.
TIMING_KEYS = ("eval_time_s",)


@dataclass(frozen=True)
class EvalSettings:
    micro_batch_size: int = 8  # validation sequences per forward pass
    calibration_batch_size: int = 8  # calibration sequences per forward pass (one range update each)
    ptq: PTQSettings | None = field(default_factory=PTQSettings)  # None: FP statistics only
    # The Bigram-Backcopy task's token roles (the family's backcopy_task): the task-aware sink statistics.
    backcopy: BackcopyTask | None = None

    @classmethod
    def from_config(cls, cfg: Any, quant: bool = True) -> EvalSettings:
        """From a launcher.config.RunConfig: its eval.* W8A8 settings, train.micro_batch_size, and the
        triggers of a causal LM trained on the bigram_backcopy source alone."""
        ptq = PTQSettings(weight_range=cfg.eval.w8a8_weight_range,
                          act_percentile=cfg.eval.w8a8_act_percentile) if quant else None
        return cls(micro_batch_size=cfg.train.micro_batch_size,
                   calibration_batch_size=cfg.eval.calibration_batch_size, ptq=ptq,
                   backcopy=family_of(cfg.model).backcopy_task(cfg))


@dataclass
class Evaluation:
    values: dict[str, Any]  # summary_keys(spec) + eval_time_s
    modules: dict[str, dict[str, Any]]  # per hooked module: kind, kurtosis, inf_norm, ...
    worst_activations: torch.Tensor | None = None  # the worst module's output on the first block batch
    sinks: list[dict[str, Any]] = field(default_factory=list)  # per layer: outliers.sinks.SinkHooks.results()
    backcopy: list[dict[str, Any]] | None = None  # per layer: outliers.backcopy.BackcopyHooks.results()

    def to_dict(self) -> dict[str, Any]:
        extra = {"backcopy": self.backcopy} if self.backcopy is not None else {}
        return {**self.values, "modules": self.modules, "sinks": self.sinks, **extra}


def summary_keys(spec: FamilySpec) -> tuple[str, ...]:
    """Headline keys of an evaluation of this family, in print order; summary.json carries them too."""
    names = [m.name for m in spec.metrics]
    return ("val_loss", *(f"val_{n}" for n in names), "w8a8_val_loss", *(f"w8a8_val_{n}" for n in names)) + OUTLIER_KEYS


def _result_keys(result: dict[str, Any]) -> list[str]:
    """summary_keys of the family that produced `result` (read from its keys: results carry no spec)."""
    metric_keys = [k for k in result if k.startswith(("val_", "w8a8_val_", "test_", "w8a8_test_"))]
    return metric_keys + [k for k in OUTLIER_KEYS + BACKCOPY_KEYS if k in result]


def model_from_state(cfg: Any, state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """A fresh fp32 model of cfg.model.family in eval mode with these weights (the RNG is left untouched)."""
    spec = family_of(cfg.model)
    with torch.random.fork_rng(devices=[]):  # construction draws initial weights: keep training's RNG
        model = spec.build(cfg.model, seq_length=spec.example_length(cfg))
    model.load_state_dict(state_dict)
    return model.float().to(device).eval()


def calibration_blocks(cfg: Any) -> list[Any]:
    """The first eval.calibration_batches x eval.calibration_batch_size examples of the train split (prepared
    data: of its validation split; masked for MLM): the same examples on every call (the stream starts from its
    seeded beginning)."""
    count = cfg.eval.calibration_batches * cfg.eval.calibration_batch_size
    return family_of(cfg.model).calibration_examples(cfg, count)


def validation_examples(cfg: Any) -> list[Any]:
    """The whole validation set of an evaluation (eval.max_blocks examples; fixed MLM masks), as both the
    periodic and the standalone evaluation read it."""
    return family_of(cfg.model).validation_examples(cfg)


def block_batches(blocks: list[Any], micro_batch_size: int, spec: FamilySpec) -> Iterator[Batch]:
    """The family's batches of `blocks` (the last one may be partial)."""
    for start in range(0, len(blocks), micro_batch_size):
        yield spec.collate(blocks[start:start + micro_batch_size])


@torch.no_grad()
def family_metrics(model: nn.Module, blocks: list[Any], micro_batch_size: int) -> dict[str, float]:
    """The family's validation metrics of the examples, as launcher.pretrain's evaluation computes them
    ({"loss", "ppl", "targets"} for OPT and BERT, {"loss", "mse", "mae", "targets"} for STanHop-Net): each batch weighted by its number of targets
    (FamilySpec.eval_sums); "targets" is that number summed."""
    spec = family_of(model.config)
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for batch in block_batches(blocks, micro_batch_size, spec):
        add_sums(sums, spec.eval_sums(model, batch.to(device)))
    return {**spec.finish_metrics(sums), "targets": sums.get("targets", 0.0)}


@torch.no_grad()
def evaluate_model(model: nn.Module, val_blocks: list[torch.Tensor], calib_blocks: list[torch.Tensor] | None,
                   settings: EvalSettings) -> Evaluation:
    """The family's FP metrics (perplexity, top-1, MSE: FamilySpec.metrics) with outlier statistics, then
    (settings.ptq set) the same metrics of a W8A8 quantized copy calibrated on `calib_blocks`. `model` must be in eval mode; it is not modified."""
    if model.training:
        raise ValueError("evaluate_model needs a model in eval mode (dropout off), e.g. from model_from_state")
    # Evaluation must not shift the training run's random stream; compiled blocks (train.compile) run eagerly:
    # hooks and quantized copies would only recompile them.
    with torch.random.fork_rng(devices=[]), eager():
        return _evaluate(model, val_blocks, calib_blocks, settings)


def _evaluate(model: nn.Module, val_blocks: list[torch.Tensor], calib_blocks: list[torch.Tensor] | None,
              settings: EvalSettings) -> Evaluation:
    start = time.perf_counter()
    task = (BackcopyHooks(model, settings.backcopy.trigger_ids, settings.backcopy.first_token_id)
            if settings.backcopy else contextlib.nullcontext())
    with OutlierHooks(model) as hooks, SinkHooks(model) as sink_hooks, task:
        fp = family_metrics(model, val_blocks, settings.micro_batch_size)
    modules, sinks = hooks.results(), sink_hooks.results()
    spec = family_of(model.config)
    keys = summary_keys(spec)
    values: dict[str, Any] = {**{f"val_{k}": v for k, v in fp.items()}, **summarize(modules), **summarize_sinks(sinks)}
    worst = _capture(model, values["worst_module"], val_blocks[:settings.micro_batch_size])
    if settings.ptq is not None:
        if not calib_blocks:
            raise ValueError("W8A8 evaluation needs calibration blocks")
        qmodel = quantize_w8a8(model, settings.ptq)
        calibrate(qmodel, block_batches(calib_blocks, settings.calibration_batch_size, spec))
        w8a8 = family_metrics(qmodel, val_blocks, settings.micro_batch_size)
        values.update({f"w8a8_val_{k}": v for k, v in w8a8.items()})
    values = {key: values.get(key) for key in keys}
    backcopy = None
    if isinstance(task, BackcopyHooks):  # the task-aware headline after the generic one
        values.update(task.summary())
        backcopy = task.results()
    values["eval_time_s"] = time.perf_counter() - start
    return Evaluation(values, modules, worst, sinks, backcopy)


def _capture(model: nn.Module, name: str, blocks: list[torch.Tensor]) -> torch.Tensor:
    """One hooked activation (a statistics name of outliers.stats) on one batch (for the TensorBoard
    histogram)."""
    captured: list[torch.Tensor] = []
    handle = hook_activation(model, name, lambda x: captured.append(x.detach().float().cpu()))
    try:
        model(family_of(model.config).collate(blocks).inputs.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return captured[0]


# ---------------------------------------------------------------- files and text

def write_result(step_dir: Path, result: dict[str, Any]) -> Path:
    path = Path(step_dir) / RESULT_FILE
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys (per-module ones as `module/key`) where two results disagree; keys missing or null in either
    side are skipped (e.g. a run without W8A8)."""
    diffs = []
    for key in _result_keys(a):
        if a.get(key) is not None and b.get(key) is not None and not _same(a[key], b[key]):
            diffs.append(f"{key}: {a[key]!r} vs {b[key]!r}")
    for name, stats in a.get("modules", {}).items():
        other = b.get("modules", {}).get(name)
        if other is None:
            continue
        for key, value in stats.items():
            if key in other and not _same(other[key], value):
                diffs.append(f"{name}/{key}: {value!r} vs {other[key]!r}")
    for mine, theirs in zip(a.get("sinks") or [], b.get("sinks") or []):
        diffs.extend(f"sinks/layer {mine['layer']}/{key}: {value!r} vs {theirs[key]!r}"
                     for key, value in mine.items() if key in theirs and not _same(theirs[key], value))
    return diffs


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a statistic no module has, e.g. a family without an FFN-output kind)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """Per-module table, then the headline numbers."""
    rows = [("module", "kind", "kurtosis", "max kurtosis", "inf norm", "max inf norm")]
    for name, m in result["modules"].items():
        rows.append((name, m["kind"], _fmt(m["kurtosis"]), _fmt(m["kurtosis_max"]), _fmt(m["inf_norm"]),
                     _fmt(m["inf_norm_max"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("(kurtosis: Pearson, per sequence, averaged; inf norm: per-sequence max|x|, averaged; "
                 "max: over sequences)")
    if result.get("sinks"):
        lines += ["", "attention sinks per layer (head means; position 0 = the first token):",
                  format_sink_table(result["sinks"]), ""]
    if result.get("backcopy"):
        lines += ["bigram-backcopy sinks per layer and head (queries split by trigger / non-trigger token):",
                  format_backcopy_table(result["backcopy"]), ""]
    lines.extend(f"{key:>23}: {_fmt(result.get(key))}" for key in _result_keys(result))
    return "\n".join(lines)


def one_line(result: dict[str, Any], spec: FamilySpec) -> str:
    """FP and W8A8 headline metric, then the outlier headline numbers."""
    metric = spec.metrics[0] if spec.metrics else None
    fp = result.get(f"val_{metric.name}") if metric else result["val_loss"]
    w8a8 = result.get(f"w8a8_val_{metric.name}") if metric else result.get("w8a8_val_loss")
    label, fmt = (metric.label, metric.fmt) if metric else ("loss", ".4f")
    change = f" ({w8a8 - fp:+{fmt}})" if w8a8 is not None and fp is not None else ""  # W8A8's change from FP
    return (f"FP {label} {fp:{fmt}}" + (f", W8A8 {label} {w8a8:{fmt}}{change}" if w8a8 is not None else "")
            + f", avg kurtosis {result['avg_kurtosis']:.2f}, max kurtosis {result['max_kurtosis']:.2f}, "
              f"max inf norm {result['max_inf_norm']:.2f} ({result['worst_module']})"
            + (f"; BOS mass non-trigger {result['bos_mass_non_trigger']:.3f} / trigger {result['bos_mass_trigger']:.3f}, "
               f"backcopy loss {result['backcopy_loss']:.3f}" if result.get("bos_mass_non_trigger") is not None else ""))
