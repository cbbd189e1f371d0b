"""Train one model per attention variant (same config, data and seed) and compare FP ppl, W8A8 ppl,
kurtosis and infinity norms.

    python -m launcher.study --config configs/opt_tiny.yaml --variants softmax,softmax1,clipped_softmax,gated \\
        [--steps 150] [--set key=value ...] [--out DIR]

Each variant is one `python -m launcher.pretrain` run under DIR (default `<logging.run_dir>/study-<time>/`,
one sub-directory per variant); the outlier/W8A8 figures are those of the run's last periodic evaluation
(outliers/). Writes DIR/study.md (table), DIR/study.png (bars + trajectories), DIR/emergence.png (the
statistics over training steps per variant: inf norm, kurtosis, W8A8 gap, BOS sink share, first-token residual
norm; on the bigram_backcopy source the task-aware sink numbers of outliers/backcopy.py instead) and
DIR/study.json. --jobs N trains N variants at a time; --resume continues a study in --out from each run's
latest checkpoint.

Variant names: a softmax variant (`softmax`, `softmax1`, `clipped_softmax`, `clipped_softmax1`,
`learnable_sink`), `gated` (vanilla softmax with the per-head gate, the QC paper's gated attention) or
`<variant>+gated`. Clipped variants use the QC paper's recipes unless --set gives attention.alpha/gamma:
for OPT alpha = 12 (gamma = -12 / seq_length), for BERT (model.family=bert, e.g. configs/bert_tiny.yaml,
where the perplexities are MLM perplexities) gamma = -0.025, the config default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import load_config
from launcher.distributed import RENDEZVOUS_ENV
from model import variants
from model.config import SOFTMAX_VARIANTS
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from model.family import Metric, family_of, spec_for
from outliers.backcopy import BACKCOPY_KEYS

# Read from each evaluation besides the family's headline metric (val_<m>, w8a8_val_<m>: `metric_keys`).
OUTLIER_METRICS = ("avg_kurtosis", "max_kurtosis", "max_inf_norm", "ffn_max_inf_norm", "layer_max_inf_norm",
                   "avg_kurtosis_rest", "max_inf_norm_rest", "sink_head_share", "bos_mass_mean",
                   "max_residual_norm_ratio", "nothing_mass_mean") + BACKCOPY_KEYS
PPL = Metric("ppl", "ppl")  # the text families' headline metric (perplexity)


def metric_keys(metric: Metric = PPL) -> tuple[str, ...]:
    return (f"val_{metric.name}", f"w8a8_val_{metric.name}") + OUTLIER_METRICS


METRICS = metric_keys()
# The emergence plot: (metric, title) per panel, each over training steps, one line per variant.
EMERGENCE = (("max_inf_norm", "max inf norm"), ("avg_kurtosis", "avg kurtosis"),
             ("gap", "W8A8 / FP - 1 (%)"), ("sink_head_share", "share of heads with BOS mass > 0.3"),
             ("max_residual_norm_ratio", "first token's residual norm / median (max over layers)"),
             ("max_inf_norm_rest", "max inf norm without position 0"))
# The emergence plot of a bigram_backcopy study (outliers/backcopy.py: the sink head's numbers).
BACKCOPY_EMERGENCE = (("bos_mass_non_trigger", "BOS attention from non-trigger queries (sink head)"),
                      ("bos_mass_trigger", "BOS attention from trigger queries (sink head)"),
                      ("bos_value_norm", "BOS value norm (sink head)"),
                      ("bos_residual_norm", "BOS residual norm (max over layers)"),
                      ("nothing_mass_non_trigger", "mass to nothing, non-trigger queries"),
                      ("gate_non_trigger", "gate value, non-trigger queries"),
                      ("backcopy_loss", "backcopy loss (after a trigger)"),
                      ("bigram_loss", "bigram loss (other characters)"),
                      ("bos_residual_norm_ratio", "BOS residual norm / median token's"),
                      ("ffn_max_inf_norm", "FFN (fc2) max inf norm"),
                      ("max_inf_norm_rest", "max inf norm without position 0"),
                      ("gap", "W8A8 / FP - 1 (%)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/opt_tiny.yaml")
    parser.add_argument("--variants", default="softmax,softmax1,clipped_softmax,gated",
                        help="comma-separated variant names (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps for every variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every variant (repeatable)")
    parser.add_argument("--out", default=None, help="output directory (default: <logging.run_dir>/study-<time>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants trained at the same time, as separate processes (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study in --out: each variant resumes from its latest checkpoint "
                             "(launcher.pretrain --resume auto; a finished run is only re-read)")
    return parser.parse_args(argv)


def _is_variant(name: str) -> bool:
    """A registered attention variant, or the import path of one (model/variants.py)."""
    try:
        variants.get(name)
    except ProjectError:
        return False
    return True


def variant_overrides(name: str, user_overrides: list[str], family: str = "opt") -> list[str]:
    """Config overrides that select one study variant; raises ProjectError for an unknown name."""
    base, _, suffix = name.partition("+")
    if name == "gated":
        base, suffix = "softmax", "gated"
    if not _is_variant(base) or suffix not in ("", "gated"):
        raise ProjectError(f"unknown study variant {name!r} (use one of {', '.join(SOFTMAX_VARIANTS)}, "
                           f"package.module:NAME, 'gated' or '<variant>+gated')")
    overrides = [f"attention.variant={base}", f"attention.gated={str(bool(suffix)).lower()}"]
    user_attention = any(o.split("=", 1)[0].strip() in ("attention.alpha", "attention.gamma") for o in user_overrides)
    alpha = spec_for(family).clipped_softmax_alpha  # e.g. QC's OPT recipe: gamma = -12 / seq_length
    if base.startswith("clipped") and not user_attention and alpha is not None:
        overrides.append(f"attention.alpha={alpha:g}")
    return overrides


def variant_command(config: str, name: str, overrides: list[str], out: Path, resume: bool = False) -> list[str]:
    """The `launcher.pretrain` command line of one variant (its run is `out/name`)."""
    args = [sys.executable, "-m", "launcher.pretrain", "--config", config] + (["--resume", "auto"] if resume else [])
    for override in overrides + [f"logging.run_dir={out}", f"logging.run_name={name}", "logging.progress=false"]:
        args += ["--set", override]
    return args


def start_variant(config: str, name: str, overrides: list[str], out: Path, resume: bool = False) -> subprocess.Popen:
    """Start one variant's training in a subprocess logging to out/<name>.log (appended to on resume)."""
    with open(out / f"{name}.log", "a" if resume else "w") as log:
        return subprocess.Popen(variant_command(config, name, overrides, out, resume), stdout=log,
                                stderr=subprocess.STDOUT, env=variant_env())


def variant_env() -> dict[str, str]:
    """A variant is a world of its own: an inherited rendezvous (a launcher's or an allocation's MASTER_PORT)
    would make variants trained side by side (--jobs) listen on one port; without it each picks a free port."""
    return {key: value for key, value in os.environ.items() if key not in RENDEZVOUS_ENV}


def read_variant(name: str, overrides: list[str], out: Path, code: int, wall_time_s: float,
                 metric: Metric = PPL) -> dict[str, Any]:
    """A finished variant's summary.json plus its last outlier evaluation and the trajectory of all of them."""
    log_path = out / f"{name}.log"
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        raise ProjectError(f"variant {name!r} failed (exit {code}): {tail[0]} (log: {log_path})")
    run = out / name
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if r["kind"] == "outliers"}  # a resumed run may repeat a step
    evals = [by_step[step] for step in sorted(by_step)]
    if not evals:
        raise ProjectError(f"variant {name!r} logged no outlier evaluation (is eval.outlier_interval null?)")
    last = evals[-1]
    return {
        "overrides": overrides, "steps": summary["steps"], "wall_time_s": wall_time_s,
        **{key: last.get(key) for key in metric_keys(metric)}, "worst_module": last.get("worst_module"),
        "trajectory": [{"step": r["step"], **{key: r.get(key) for key in metric_keys(metric)},
                        **({"backcopy_layers": _layer_summary(r["backcopy"])} if r.get("backcopy") else {})}
                       for r in evals],
    }


def _layer_summary(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer of a bigram_backcopy evaluation: the per-head BOS masses and value norms, the residual norms."""
    keys = ("bos_mass_non_trigger", "bos_mass_trigger", "nothing_mass_non_trigger", "gate_non_trigger",
            "bos_value_norm", "median_value_norm", "bos_residual_norm", "median_residual_norm")
    return [{"layer": layer["layer"], **{key: layer.get(key) for key in keys}} for layer in layers]


def check_variants(configs: dict[str, Any], out: Path, resume: bool = False) -> None:
    """What launcher.pretrain's preflight checks, for every variant as it will run (under `out`/<name>): a
    variant that cannot run here (e.g. attention.backend=sdpa with a clipped softmax) stops the study before any
    variant trains, not after the earlier ones did. The error names the variant."""
    from dataclasses import replace

    from checkpoint.resume import resume_point
    from data_pipeline.writable import check_writable_dir
    from launcher.preflight import preflight

    check_writable_dir(out, "--out")
    for name, cfg in configs.items():
        cfg = replace(cfg, logging=replace(cfg.logging, run_dir=str(out), run_name=name))
        try:
            preflight(cfg)
            if not resume:  # a folder of an earlier study with checkpoints is not reused (--resume continues it)
                resume_point(cfg.run_path, "none", 1)
        except ProjectError as error:
            raise ProjectError(f"variant {name!r}: {error}") from None


def run_variant(config: str, name: str, overrides: list[str], out: Path, metric: Metric = PPL,
                resume: bool = False) -> dict[str, Any]:
    """Train one variant in a subprocess; return its summary.json plus its last outlier evaluation."""
    start = time.perf_counter()
    code = start_variant(config, name, overrides, out, resume).wait()
    return read_variant(name, overrides, out, code, time.perf_counter() - start, metric)


def run_variants(config: str, plans: dict[str, list[str]], out: Path, metric: Metric, jobs: int,
                 resume: bool = False) -> Any:
    """Train the variants, at most `jobs` at a time; yields (name, result) in the order they finish."""
    pending = list(plans)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    try:
        yield from _schedule(config, plans, out, metric, jobs, resume, pending, running)
    finally:  # a failed variant (or an interrupt) stops the others: their checkpoints let --resume continue
        for process, _ in running.values():
            process.terminate()
            process.wait()


def _schedule(config: str, plans: dict[str, list[str]], out: Path, metric: Metric, jobs: int, resume: bool,
              pending: list[str], running: dict[str, tuple[subprocess.Popen, float]]) -> Any:
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            print(f"[study] training {name} ({' '.join(plans[name][:3])}) -> {out / name}", flush=True)
            running[name] = (start_variant(config, name, plans[name], out, resume), time.perf_counter())
        for name, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                yield name, read_variant(name, plans[name], out, process.returncode, time.perf_counter() - started,
                                         metric)
        if running:
            time.sleep(1.0)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _gap(point: dict[str, Any], metric: Metric) -> float | None:
    """W8A8 / FP - 1 in percent of the headline metric (None where W8A8 was not evaluated)."""
    fp, w8a8 = point.get(f"val_{metric.name}"), point.get(f"w8a8_val_{metric.name}")
    return 100 * (w8a8 / fp - 1) if w8a8 is not None and fp else None


def markdown_table(results: dict[str, dict[str, Any]], metric: Metric = PPL) -> str:
    header = (f"| variant | FP {metric.label} | W8A8 {metric.label} | W8A8 - FP | avg kurtosis | max kurtosis | "
              "max inf norm | FFN max inf norm | layer max inf norm |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, r in results.items():
        gap = _gap(r, metric)
        lines.append(f"| {name} | {_fmt(r[f'val_{metric.name}'])} | {_fmt(r[f'w8a8_val_{metric.name}'])} | "
                     f"{'-' if gap is None else f'{gap:+.2f}%'} | "
                     f"{_fmt(r['avg_kurtosis'])} | {_fmt(r['max_kurtosis'])} | {_fmt(r['max_inf_norm'])} | "
                     f"{_fmt(r['ffn_max_inf_norm'])} | {_fmt(r['layer_max_inf_norm'])} |")
    if any(r.get("bos_mass_non_trigger") is not None for r in results.values()):
        lines += ["", backcopy_table(results)]
    return "\n".join(lines)


def backcopy_table(results: dict[str, dict[str, Any]]) -> str:
    """The bigram_backcopy sink numbers of the last evaluation (outliers/backcopy.py; the sink head's)."""
    header = ("| variant | BOS attn non-trigger | BOS attn trigger | mass to nothing non-trigger / trigger | "
              "gate non-trigger / trigger | BOS value norm (/ median) | BOS residual norm (/ median) | "
              "backcopy loss | bigram loss |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, r in results.items():
        lines.append(f"| {name} | {_fmt(r.get('bos_mass_non_trigger'), 3)} | {_fmt(r.get('bos_mass_trigger'), 3)} | "
                     f"{_fmt(r.get('nothing_mass_non_trigger'), 3)} / {_fmt(r.get('nothing_mass_trigger'), 3)} | "
                     f"{_fmt(r.get('gate_non_trigger'), 3)} / {_fmt(r.get('gate_trigger'), 3)} | "
                     f"{_fmt(r.get('bos_value_norm'))} ({_fmt(r.get('bos_value_norm_ratio'))}) | "
                     f"{_fmt(r.get('bos_residual_norm'))} ({_fmt(r.get('bos_residual_norm_ratio'))}) | "
                     f"{_fmt(r.get('backcopy_loss'), 3)} | {_fmt(r.get('bigram_loss'), 3)} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path, metric: Metric = PPL) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    xs = range(len(names))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    ax = axes[0][0]
    ax.bar([x - 0.2 for x in xs], [results[n][f"val_{metric.name}"] for n in names], width=0.4, label="FP")
    ax.bar([x + 0.2 for x in xs], [results[n][f"w8a8_val_{metric.name}"] or 0 for n in names], width=0.4,
           label="W8A8")
    ax.set_title(f"validation {metric.label}")
    ax.legend()
    for ax, key, title in ((axes[0][1], "avg_kurtosis", "avg kurtosis (over modules)"),
                           (axes[0][2], "max_inf_norm", "max inf norm (over modules)")):
        ax.bar(xs, [results[n][key] for n in names], color="tab:red" if "kurtosis" in key else "tab:purple")
        ax.set_title(title)
    for ax in axes[0]:
        ax.set_xticks(list(xs), names, rotation=20)
    for ax, key, title in ((axes[1][0], "gap", f"W8A8 {metric.label} / FP {metric.label} - 1 (%) over training"),
                           (axes[1][1], "avg_kurtosis", "avg kurtosis over training"),
                           (axes[1][2], "max_inf_norm", "max inf norm over training")):
        for name in names:
            points = results[name]["trajectory"]
            steps = [p["step"] for p in points]
            values = _series(points, key, metric)
            ax.plot(steps, values, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"attention variants: {', '.join(names)}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(points: list[dict[str, Any]], key: str, metric: Metric = PPL) -> list[float]:
    """One metric over the evaluations of a run (NaN where it is missing, e.g. runs from before a metric existed)."""
    if key == "gap":
        return [float("nan") if (gap := _gap(p, metric)) is None else gap for p in points]
    return [float("nan") if p.get(key) is None else float(p[key]) for p in points]


def plot_emergence(results: dict[str, dict[str, Any]], path: Path, metric: Metric = PPL) -> None:
    """The emergence curves: every EMERGENCE statistic over training steps, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backcopy = any(r.get("bos_mass_non_trigger") is not None for r in results.values())
    panels = BACKCOPY_EMERGENCE if backcopy else EMERGENCE
    fig, axes = plt.subplots(4 if backcopy else 2, 3, figsize=(15, 15 if backcopy else 8), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for name, result in results.items():
            points = result["trajectory"]
            ax.plot([p["step"] for p in points], _series(points, key, metric), marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("emergence of the dormant BOS sink (bigram-backcopy)" if backcopy
                 else "emergence of outliers and attention sinks over training")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.study", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ProjectError(f"--variants must name distinct variants, got {args.variants!r}")
    if args.steps is not None and args.steps <= 0:
        raise ProjectError(f"--steps must be positive, got {args.steps}")
    if args.jobs <= 0:
        raise ProjectError(f"--jobs must be positive, got {args.jobs}")
    if args.resume and not args.out:
        raise ProjectError("--resume needs --out (the study directory to continue)")
    common = args.overrides + ([f"train.steps={args.steps}"] if args.steps else [])
    family = load_config(args.config, args.overrides).model.family
    plans = {name: variant_overrides(name, args.overrides, family) + common for name in names}
    configs = {name: load_config(args.config, overrides) for name, overrides in plans.items()}  # validate all first
    first = next(iter(configs.values()))
    spec = family_of(first.model)
    metric = spec.metrics[0] if spec.metrics else Metric("loss", "loss")
    if first.eval.outlier_interval is None:
        raise ProjectError("the study compares outlier/W8A8 figures: eval.outlier_interval must not be null")
    out = Path(args.out) if args.out else Path(first.logging.run_dir) / f"study-{time.strftime('%Y%m%d-%H%M%S')}"
    check_variants(configs, out, args.resume)  # every variant, before the first one trains
    out.mkdir(parents=True, exist_ok=True)
    finished = {}
    for name, r in run_variants(args.config, plans, out, metric, args.jobs, args.resume):
        finished[name] = r
        print(f"[study] {name}: FP {metric.label} {_fmt(r[f'val_{metric.name}'])}, W8A8 {metric.label} "
              f"{_fmt(r[f'w8a8_val_{metric.name}'])}, avg kurtosis "
              f"{_fmt(r['avg_kurtosis'])}, max inf norm {_fmt(r['max_inf_norm'])} "
              f"({r['wall_time_s']:.0f}s)", flush=True)
    results = {name: finished[name] for name in names}  # in the order the user named them
    table = markdown_table(results, metric)
    steps = first.train.steps if args.steps is None else args.steps
    header = (f"# Attention-variant study ({first.model.family}"
              f"{', ' + metric.description if metric.description else ''})\n\n"
              f"config `{args.config}`, {steps} steps, seed {first.train.seed}, "
              f"data `{getattr(first.data, 'source', '-')}`; numbers from each run's last periodic evaluation "
              f"({first.eval.max_blocks or 'all'} validation examples of {spec.example_length(first)} positions; W8A8 "
              f"calibrated on {first.eval.calibration_batches} x {first.eval.calibration_batch_size} training "
              f"sequences).\n\n")
    (out / "study.md").write_text(header + table + "\n")
    (out / "study.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides, "steps": steps,
                                                "variants": results}, indent=2) + "\n")
    plot(results, out / "study.png", metric)
    plot_emergence(results, out / "emergence.png", metric)
    print(table)
    print(f"[study] wrote {out / 'study.md'}, {out / 'study.png'}, {out / 'emergence.png'}, {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
