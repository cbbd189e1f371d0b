"""Peak activation memory with and without each activation-recompute mode, measured and as planned.

    python -m benchmarks.recompute_memory [--micro 2] [--json]

One forward + backward per case in one CPU process, fp32 (launcher/memory_probe.py: live tensor storages per
op, weights and their gradients excluded), with `parallel.activation_checkpointing` none, full and selective;
the planned bytes are launcher/planner.py's activation term for the same layout. Ratios are against `none` in
the same run: the factor recompute saves, measured and planned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, positive_int, run_command  # noqa: E402

MIB = 2**20
MODES = ("none", "full", "selective")
# (name, config, overrides): fused attention (SDPA) and eager attention (materialised scores); vocabulary 512
# so the layers, not the LM head's log-probabilities, dominate
CASES = (
    ("opt_tiny sdpa", "configs/opt_tiny.yaml", ["model.vocab_size=512", "data.vocab_size=512"]),
    ("opt_tiny eager", "configs/opt_tiny.yaml", ["attention.backend=eager", "model.vocab_size=512",
                                                 "data.vocab_size=512"]),
    ("bert_tiny eager", "configs/bert_tiny.yaml", ["attention.backend=eager", "model.vocab_size=512",
                                                   "data.vocab_size=512"]),
)


def run(micro: int) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from launcher.config import load_config
    from launcher.memory_probe import measure_activation_peak
    from launcher.planner import LayoutChoice, device_named, plan_layout

    rows = []
    cpu = device_named("cpu")
    with tqdm(total=len(CASES) * len(MODES), desc="recompute memory") as progress:
        for name, config, overrides in CASES:
            base = overrides + ["train.precision=fp32", f"train.micro_batch_size={micro}",
                                f"train.global_batch_size={micro}"]
            by_mode = {}
            for mode in MODES:
                cfg = load_config(config, base + [f"parallel.activation_checkpointing={mode}"])
                planned = plan_layout(cfg, LayoutChoice(micro_batch_size=micro, activation_checkpointing=mode),
                                      cpu).bytes["activations"]
                by_mode[mode] = (planned, measure_activation_peak(cfg))
                progress.update()
            for mode, (planned, measured) in by_mode.items():
                planned_factor = by_mode["none"][0] / planned
                measured_factor = by_mode["none"][1] / measured
                rows.append({"case": name, "mode": mode, "planned_mib": planned / MIB, "measured_mib": measured / MIB,
                             "planned_factor": planned_factor, "measured_factor": measured_factor,
                             "factor_error": measured_factor / planned_factor - 1})
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.recompute_memory", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    positive_int("--micro", args.micro, allow_none=False)
    rows = run(args.micro)
    if args.json:
        print(json.dumps({"micro_batch_size": args.micro, "rows": rows}, indent=2))
        return 0
    print(f"{'case':<17}{'mode':<11}{'planned':>10}{'measured':>10}{'saved x (plan)':>16}{'saved x (meas.)':>17}")
    for r in rows:
        print(f"{r['case']:<17}{r['mode']:<11}{r['planned_mib']:>7.1f}MiB{r['measured_mib']:>7.1f}MiB"
              f"{r['planned_factor']:>16.2f}{r['measured_factor']:>17.2f}")
    worst = max(abs(r["factor_error"]) for r in rows)
    print(f"largest difference between planned and measured saving factors: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
