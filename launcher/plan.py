"""Will a layout fit? Per-rank memory, FLOPs and step time of a run config, and the layouts that fit N GPUs.

    python -m launcher.plan --config configs/opt_125m.yaml [--gpus 8] [--gpu H100] [--mfu 0.4] [--set k=v ...]

Prints, for the configured layout (parallel.tensor/pipeline/zero_stage/activation_checkpointing,
train.micro_batch_size, train.precision) on --gpus ranks, the busiest rank's parameters, gradients, optimizer
states and activations against the device memory, the model FLOPs per step and the step time at --mfu, then
the layouts that fit (launcher/planner.py has the formulas; docs/planner.md explains them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from launcher.planner import (GIB, GPUS, LayoutChoice, Plan, data_line, default_network, device_named, layout_of,
                              plan_layout, suggest)
from common.cli import ArgumentParser, finite_number, positive_int, run_command
from common.errors import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/opt_125m.yaml")
    parser.add_argument("--gpus", type=int, default=None,
                        help="ranks to plan for (default: the smallest count the configured layout needs)")
    parser.add_argument("--gpu", default="H100", help=f"device: {', '.join(GPUS)} or cpu (default H100)")
    parser.add_argument("--memory-gib", type=float, default=None, help="override the device memory (GiB)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="override the device's peak (default: logging.peak_tflops, else the datasheet value)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="assumed model FLOPs utilisation of the compute alone (default 0.4); communication and "
                             "the pipeline bubble are added to the step time")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node: groups spanning more use InfiniBand, the rest NVLink/PCIe (default 8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set parallel.zero_stage=2 (repeatable)")
    parser.add_argument("--measure", action="store_true",
                        help="also measure one forward+backward's activation peak on this CPU (fp32, one process) "
                             "and compare it with the plan for --gpu cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def describe(plan: Plan) -> list[str]:
    lay, dev = plan.layout, plan.device
    where = f"pipeline stage {plan.stage} ({plan.in_flight} micro-batch(es) in flight)" if lay.pipeline > 1 else "every rank"
    lines = [f"layout: {lay.describe()}, {plan.precision}; {plan.total_params / 1e6:.1f}M parameters, "
             f"{plan.params / 1e6:.1f}M on the busiest rank ({where})"]
    for name, value in plan.bytes.items():
        lines.append(f"  {name:<12}{_gib(value)}")
    share = plan.total / (dev.memory_gib * GIB) if dev.memory_gib else float("nan")
    lines.append(f"  {'total':<12}{_gib(plan.total)} of {dev.memory_gib:.0f} GiB {dev.name} ({share:.0%}): "
                 f"{'fits' if plan.fits else 'does NOT fit'}")
    step = (f"{plan.step_time_s:.3f} s (compute at MFU {plan.mfu:.0%} of {dev.peak_tflops:.0f} TFLOP/s, "
            f"communication and bubble added)" if plan.step_time_s is not None
            else "n/a (no peak FLOP/s for this device)")
    lines.append(f"FLOPs per step: {plan.flops_per_step:.3e} (model FLOPs); expected step time {step}")
    if plan.time and plan.network is not None:
        lines.append("  " + ", ".join(f"{name} {value:.3f} s" for name, value in plan.time.items()))
        lines.append(f"  links: {plan.network.describe()}")
    return lines


def to_json(plan: Plan) -> dict[str, Any]:
    return {"layout": vars(plan.layout), "precision": plan.precision, "stage": plan.stage,
            "params_per_rank": plan.params, "total_params": plan.total_params,
            "bytes": plan.bytes, "total_bytes": plan.total, "device": vars(plan.device), "fits": plan.fits,
            "flops_per_step": plan.flops_per_step, "step_time_s": plan.step_time_s, "step_time_terms_s": plan.time,
            "mfu": plan.mfu}


def configured_layout(cfg: Any, gpus: int) -> tuple[LayoutChoice, str | None]:
    """The config's layout on `gpus` ranks (ConfigError when TP/PP/ZeRO cannot run there). A micro-batch that
    does not divide the global batch over the data-parallel ranks is lowered to the largest one that does
    (with a note), so a config written for one GPU count can be planned for another."""
    from parallel.layout import validate_layout

    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    data = gpus // (cfg.parallel.tensor * cfg.parallel.pipeline) or 1
    fitting = next((m for m in range(micro, 0, -1) if global_batch % (m * data) == 0), None)
    validate_layout(cfg.model, tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                    zero_stage=cfg.parallel.zero_stage, world_size=gpus, micro_batch_size=fitting or micro,
                    global_batch_size=global_batch)
    layout = layout_of(cfg, gpus)
    if fitting == micro:
        return layout, None
    note = (f"note: train.micro_batch_size={micro} x {data} data-parallel ranks does not divide "
            f"train.global_batch_size={global_batch}; planned with micro-batch {fitting}")
    return replace(layout, micro_batch_size=fitting), note


def measured_line(cfg: Any) -> str:
    """Planned vs measured activation peak of one micro-batch in one CPU process (fp32)."""
    from launcher.memory_probe import measure_activation_peak

    cpu_cfg = replace(cfg, train=replace(cfg.train, precision="fp32"))
    single = LayoutChoice(micro_batch_size=cfg.train.micro_batch_size)
    planned = plan_layout(cpu_cfg, single, device_named("cpu")).bytes["activations"]
    measured = measure_activation_peak(cfg)
    return (f"activations on this CPU (1 process, fp32, micro-batch {single.micro_batch_size}): planned "
            f"{planned / 2**20:.1f} MiB, measured peak {measured / 2**20:.1f} MiB ({planned / measured - 1:+.1%})")


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.plan", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed (its ZeRO estimators) would warn about it on stdout, in --json too
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Every check before any output; common/cli.py prints the one error line.
    from launcher.config import load_config

    cfg = load_config(args.config, args.overrides)
    positive_int("--gpus", args.gpus)
    positive_int("--gpus-per-node", args.gpus_per_node, allow_none=False)
    finite_number("--mfu", args.mfu, low=0, high=1, low_open=True)
    finite_number("--memory-gib", args.memory_gib, low=0, low_open=True)
    finite_number("--peak-tflops", args.peak_tflops, low=0, low_open=True)
    try:
        device = device_named(args.gpu, args.memory_gib, args.peak_tflops or cfg.logging.peak_tflops)
    except KeyError:
        raise ConfigError("--gpu", args.gpu, f"unknown device (one of {', '.join(GPUS)}, cpu)") from None
    minimum = cfg.parallel.tensor * cfg.parallel.pipeline
    gpus = args.gpus or minimum
    layout, note = configured_layout(cfg, gpus)
    network = default_network(device, args.gpus_per_node)
    plan = plan_layout(cfg, layout, device, args.mfu, network)
    options = suggest(cfg, gpus, device, args.mfu, network=network)
    data = data_line(cfg, plan)
    if args.json:
        print(json.dumps({"plan": to_json(plan), "suggestions": [to_json(p) for p in options], "data": data},
                         indent=2))
        return 0
    print(f"== {args.config} on {gpus} x {device.name} ==")
    if note:
        print(note)
    print("\n".join(describe(plan)))
    print(f"\nlayouts that fit on {gpus} x {device.name} (fastest first; global batch "
          f"{cfg.train.global_batch_size} x {cfg.data.seq_length} tokens):")
    if not options:
        print("  none: use more GPUs, a smaller micro-batch or a shorter sequence")
    for option in options:
        t = f"{option.step_time_s:.3f} s/step" if option.step_time_s is not None else ""
        print(f"  {option.layout.describe():<58} {option.total / GIB:7.2f} GiB  {t}")
    if args.measure:
        print(measured_line(cfg))
    if data:
        print(data)
    print(plan.one_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
