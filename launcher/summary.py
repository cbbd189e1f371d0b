"""The run's summary as text: the family's metrics with their labels, and the lines printed at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from model.family import FamilySpec


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def number(value: float | None, spec: str) -> str:
    """A summary number, or "n/a" where none exists (no step logged yet, or a non-finite value)."""
    return format(value, spec) if value is not None and math.isfinite(value) else "n/a"


def _count(n: float) -> str:
    """Millions as text tokens have always been printed ("1.23M"); a smaller count in full."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def metric_text(spec: FamilySpec, values: dict[str, Any], prefix: str = "val") -> str:
    """The family's metrics as text, e.g. "val ppl 12.34" or "val top-1 0.912"."""
    return ", ".join(f"{prefix} {m.summary_label or m.label} {number(values.get(m.name), m.fmt)}"
                     for m in spec.metrics)


def print_summary(summary: dict[str, Any], run_path: Path, spec: FamilySpec) -> None:
    unit = spec.throughput.unit  # tokens, images, windows
    per_s = summary[f"{unit}_per_s"]
    metrics = {m.name: summary.get(f"val_{m.name}") for m in spec.metrics}
    quantized = {m.name: summary.get(f"w8a8_val_{m.name}") for m in spec.metrics}
    baseline = summary.get("uniform_ppl")
    lines = [
        f"== {summary['run_name']}: {summary['steps']} steps, {_count(summary[unit])} {unit} in "
        f"{format_duration(summary['wall_time_s'])}" + (f" ({per_s:,.0f} {unit}/s)" if per_s else "") + " ==",
        f"train loss {number(summary['train_loss'], '.4f')} | val loss {number(summary['val_loss'], '.4f')} | "
        + metric_text(spec, metrics).replace(", ", " | ") + (f" (uniform baseline {baseline:.0f})" if baseline else ""),
        *([f"{metric_text(spec, quantized, 'W8A8 val').replace(', ', ' | ')} | avg kurtosis "
           f"{summary['avg_kurtosis']:.2f} | max kurtosis {summary['max_kurtosis']:.2f} | max inf norm "
           f"{summary['max_inf_norm']:.2f} (outlier eval {summary['outlier_eval_s']:.1f}s)"]
          if summary.get("w8a8_val_loss") is not None else []),
        *([f"test loss {number(summary['test_loss'], '.4f')} | " + metric_text(
            spec, {m.name: summary.get(f"test_{m.name}") for m in spec.metrics}, "test").replace(", ", " | ")]
          if "test_loss" in summary else []),
        f"attention {summary['attention_variant']} via {summary['attention_backend']}"
        f"{' + gate' if summary['gated'] else ''}, {summary['parameters'] / 1e6:.2f}M parameters",
        f"outputs: {run_path}/ (summary.json, metrics.jsonl, tb/, checkpoints/, config.yaml)",
    ]
    print("\n".join(lines), flush=True)
