"""The planner's step time against measured CPU step times: DP2, TP2 and PP2 over gloo.

    python -m benchmarks.planner_check [--layers 4 --hidden 256 --ffn 1024 --heads 4 --vocab 2048 --seq 128]
                                       [--micro 2 --global-batch 8] [--steps 6] [--json]

What goes in is measured on this machine, in this run, one thread per rank (OMP_NUM_THREADS=1):
  - the matmul rate (the best of square fp32 matmuls): the planner's "peak";
  - the rate of each of a layer's GEMMs at the full shapes and at a TP2 rank's shards (launcher.planner's
    layer_gemms; Device.gemm_rates): how much slower a TP rank's half-width matmuls run;
  - the host's time to issue one layer's forward and backward for one micro-batch (Device.layer_issue_s): a
    one-rank run of the same depth, micro-batches and sequence at width 8 per head, less its FLOPs at the peak,
    over its layers x micro-batches (its optimizer step and embeddings counted in, a slight overestimate);
  - gloo's all-reduce time over a sweep of sizes between 2 ranks (each after a matmul, as in a TP layer),
    fitted (Theil-Sen) to 2 a + S / B
    (launcher/comm_model.py): latency a and bandwidth B, the planner's link (which, running on the cores that
    compute, hides nothing behind a GEMM);
  - the compute efficiency (the planner's MFU: model FLOP/s over the matmul rate, the issue time taken out) of two
    independent one-rank runs of half the global batch each, side by side: what each of two ranks computes at
    while the other runs too (on a shared machine that is not one rank's rate alone; DP1, one rank alone, is
    shown too).
Then each 2-rank layout trains the same model through parallel/engine.py (launcher.pretrain's path) and its
median step time is compared with launcher.planner.plan_layout's prediction for that layout. The table shows
predicted, measured, their ratio and the prediction's terms; TP2's all-reduces per step are counted and shown
against the planner's count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.cli import ArgumentParser, positive_int, run_command

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"DP1": (1, 1), "DP2": (1, 1), "TP2": (2, 1), "PP2": (1, 2)}  # (tensor, pipeline); DP fills the world
SWEEP = [2**k for k in range(10, 23, 2)]  # all-reduce sizes in bytes, 1 KiB .. 4 MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout (after 2 warm-up steps)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", choices=["train", "bandwidth"], help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="1,1", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "micro", "global_batch", "steps"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag), allow_none=False)
    return args


def run_config(args: argparse.Namespace) -> Any:
    from launcher.config import config_from_dict

    return config_from_dict({
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "num_heads": args.heads,
                  "ffn_hidden_size": args.ffn, "max_position_embeddings": args.seq, "vocab_size": args.vocab,
                  "dropout": 0.0},
        "attention": {"variant": "softmax1", "backend": "auto"},
        "data": {"seq_length": args.seq, "vocab_size": args.vocab},
        "train": {"micro_batch_size": args.micro, "global_batch_size": args.global_batch, "precision": "fp32"}})


# ------------------------------------------------------------------------------------------------ workers

def train_worker(args: argparse.Namespace) -> None:
    """Under torch.distributed.run: train the model in --layout for warm-up + --steps steps, write step times."""
    import torch.distributed as dist

    from launcher.distributed import init_process_group
    from launcher.schedule import build_scheduler
    from parallel.engine import build_parallel_model, train_step
    from parallel.layout import validate_layout

    device = init_process_group()
    cfg = run_config(args)
    tp, pp = (int(x) for x in args.layout.split(","))
    layout = validate_layout(cfg.model, tensor=tp, pipeline=pp, zero_stage=0, world_size=dist.get_world_size(),
                             micro_batch_size=args.micro, global_batch_size=args.global_batch)
    accumulation = args.global_batch // (args.micro * layout.data)
    ds_config = {"train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": args.micro,
                 "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    pm = build_parallel_model(cfg.model, layout, seq_length=args.seq, seed=0, ds_config=ds_config,
                              make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                              make_scheduler=lambda o: build_scheduler(o, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                                                                       total_steps=100, schedule="cosine"))
    generator = torch.Generator().manual_seed(1)

    def batches():
        while True:
            yield pm.family.collate(list(torch.randint(0, args.vocab, (args.micro, args.seq), generator=generator)))

    stream, times, issued = batches(), [], [0]
    all_reduce = dist.all_reduce

    def counted(*a: Any, **k: Any) -> Any:  # megatron-core and DeepSpeed look the function up at each call
        issued[0] += 1
        return all_reduce(*a, **k)

    for step in range(2 + args.steps):
        dist.barrier()
        start, before = time.perf_counter(), issued[0]
        dist.all_reduce = counted
        try:
            train_step(pm, stream, accumulation, device)
        finally:
            dist.all_reduce = all_reduce
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank does
        if step >= 2:
            times.append(float(elapsed))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"times": times, "all_reduces_per_step": issued[0] - before}))
    dist.barrier()


def bandwidth_worker(args: argparse.Namespace) -> None:
    """Under torch.distributed.run (2 ranks): the median time of gloo all-reduces of each size in SWEEP, each
    issued right after a matmul on both ranks, as a tensor-parallel layer issues its all-reduces between GEMMs
    (started from idle ranks instead, as after a barrier, a collective also pays for waking the ranks' threads:
    on this VM that doubled the latency)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    for _ in range(20):
        dist.all_reduce(torch.ones(SWEEP[-1] // 4))
    medians = {}
    for size in SWEEP:
        tensor = torch.ones(size // 4)
        times = []
        dist.barrier()
        for i in range(32):
            torch.mm(a, b)
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if i >= 2:
                times.append(time.perf_counter() - start)
        medians[size] = statistics.median(times)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(medians))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ measuring

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_worker(args: argparse.Namespace, worker: str, ranks: int, layout: tuple[int, int] = (1, 1)) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        shape = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                 ("layers", "hidden", "ffn", "heads", "vocab", "seq", "micro", "global-batch", "steps")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(_free_port()), "-m", "benchmarks.planner_check", "--worker", worker,
               "--layout", ",".join(map(str, layout)), "--out", str(out), *shape]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"{worker} {layout} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_side_by_side(args: argparse.Namespace) -> float:
    """The median step time of two independent one-rank runs (of `args`) started together."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_worker(args, "train", 1), range(2)))
    return statistics.median(t for result in results for t in result["times"])


def matmul_rate(size: int = 512, reps: int = 20) -> float:
    """FLOP/s of the best fp32 square matmul on one thread (what each rank gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        best = float("inf")
        for _ in range(reps + 1):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best


def gemm_rates(shapes: list[tuple[int, int, int]], rounds: int = 12) -> dict[tuple[int, int, int], float]:
    """FLOP/s of each (M, K, N) fp32 matmul on one thread: the best of `rounds` rounds over all shapes (rounds
    interleave them, so a busy moment slows every shape alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {shape: float("inf") for shape in shapes}
    operands = {shape: (torch.randn(shape[0], shape[1]), torch.randn(shape[1], shape[2])) for shape in shapes}
    try:
        for _ in range(rounds):
            for shape, (a, b) in operands.items():
                start = time.perf_counter()
                torch.mm(a, b)
                best[shape] = min(best[shape], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {shape: 2 * shape[0] * shape[1] * shape[2] / seconds for shape, seconds in best.items()}


def fit_link(medians: dict[str, float]) -> tuple[float, float]:
    """(latency per ring step, bytes/s) from 2-rank all-reduce times t(S) = 2 a + S / B, fitted by Theil-Sen:
    1 / B the median of the slopes between every pair of sizes, 2a the median of t - S / B. Robust to a few
    slow outliers (a busy or waking machine), which a least-squares fit is not."""
    points = sorted((float(s), t) for s, t in medians.items())
    slopes = sorted((t2 - t1) / (s2 - s1) for i, (s1, t1) in enumerate(points) for s2, t2 in points[i + 1:])
    slope = max(statistics.median(slopes), 1e-15)
    latency = max(statistics.median(t - s * slope for s, t in points) / 2, 0.0)
    return latency, 1 / slope


def narrow(args: argparse.Namespace) -> argparse.Namespace:
    """The same depth, sequence and batches at 8 dimensions per head: what a step costs beyond its FLOPs."""
    return argparse.Namespace(**{**vars(args), "hidden": 8 * args.heads, "ffn": 32 * args.heads, "vocab": 512})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from launcher.comm_model import Link, Network
    from launcher.planner import Device, LayoutChoice, layer_gemms, plan_layout, shard_slowdown, tp_all_reduces

    from tqdm.auto import tqdm

    cfg = run_config(args)
    progress = tqdm(total=4 + len(LAYOUTS), desc="planner check", disable=args.json)
    peak = matmul_rate()
    tokens = args.micro * args.seq
    rates = gemm_rates(sorted(set(layer_gemms(cfg.model, tokens, 1) + layer_gemms(cfg.model, tokens, 2))))
    medians = run_worker(args, "bandwidth", 2)
    progress.update()
    latency, bytes_per_s = fit_link(medians)
    gloo = Link("gloo (measured)", bytes_per_s / 1e9, latency, "this run's all-reduce sweep", efficiency=1.0,
                overlaps_compute=False)
    network = Network(gloo, gloo, gpus_per_node=2)
    thin = narrow(args)
    narrow_s = statistics.median(run_worker(thin, "train", 1)["times"])
    progress.update()
    measured: dict[str, float] = {}
    issued: dict[str, int] = {}
    for name, (tp, pp) in LAYOUTS.items():
        ranks = 1 if name == "DP1" else 2
        result = run_worker(args, "train", ranks, (tp, pp))
        measured[name], issued[name] = statistics.median(result["times"]), result["all_reduces_per_step"]
        progress.update()
    half = argparse.Namespace(**{**vars(args), "global_batch": args.global_batch // 2})
    side_by_side = run_side_by_side(half)
    progress.update()
    progress.close()
    device = Device("cpu (1 thread per rank)", 1e6, peak / 1e12, kind="cpu",
                    gemm_rates=tuple(sorted(rates.items())))
    micro_batches = args.global_batch // args.micro
    at_peak = plan_layout(run_config(thin), LayoutChoice(micro_batch_size=args.micro), device, mfu=1.0)
    issue_s = max(0.0, narrow_s - at_peak.time["compute"]) / (micro_batches * args.layers)
    device = replace(device, layer_issue_s=issue_s)

    def one_rank(config: Any) -> Any:
        return plan_layout(config, LayoutChoice(micro_batch_size=args.micro), device, mfu=1.0, network=network)

    single, halved = one_rank(cfg), one_rank(run_config(half))
    alone = single.time["compute"] / (measured["DP1"] - single.time["host"])  # one rank alone on the machine
    efficiency = halved.time["compute"] / (side_by_side - halved.time["host"])  # each of two ranks at once
    rows = []
    for name, (tp, pp) in LAYOUTS.items():
        data = (1 if name == "DP1" else 2) // (tp * pp)
        plan = plan_layout(cfg, LayoutChoice(tp, pp, data, 0, args.micro), device,
                           mfu=alone if name == "DP1" else efficiency, network=network)
        rows.append({"layout": name, "predicted_s": plan.step_time_s, "measured_s": measured[name],
                     "ratio": plan.step_time_s / measured[name], "terms_s": plan.time,
                     "all_reduces_per_step": issued[name]})
    accumulation = args.global_batch // args.micro
    planned_tp = accumulation * sum(tp_all_reduces(args.layers, "none"))
    return {"matmul_tflops": peak / 1e12, "gloo": {"latency_s": latency, "bandwidth_gbs": bytes_per_s / 1e9,
                                                    "allreduce_medians_s": medians},
            "layer_issue_s": issue_s, "narrow_step_s": narrow_s,
            "gemm_rates_gflops": {"x".join(map(str, k)): v / 1e9 for k, v in rates.items()},
            "tp2_shard_slowdown": shard_slowdown(device, cfg.model, tokens, 2),
            "tp2_all_reduces_per_step": {"issued": issued["TP2"], "planned": planned_tp},
            "compute_efficiency": efficiency, "compute_efficiency_alone": alone,
            "side_by_side_half_batch_s": side_by_side, "rows": rows,
            "shape": {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "micro",
                                                    "global_batch")}}


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.planner_check", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.worker == "train":
        train_worker(args)
        return 0
    if args.worker == "bandwidth":
        bandwidth_worker(args)
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gloo = result["gloo"]
    print(f"inputs: matmul {result['matmul_tflops'] * 1e3:.1f} GFLOP/s per thread (TP2 shards "
          f"{result['tp2_shard_slowdown']:.2f}x the full shapes' time); host {result['layer_issue_s'] * 1e3:.2f} ms "
          f"per layer and micro-batch; gloo {gloo['bandwidth_gbs']:.2f} GB/s, {gloo['latency_s'] * 1e6:.0f} us per "
          f"ring step; compute efficiency {result['compute_efficiency']:.0%} per rank with two ranks computing "
          f"({result['compute_efficiency_alone']:.0%} for one rank alone)")
    counts = result["tp2_all_reduces_per_step"]
    print(f"TP2 all-reduces per step: {counts['issued']} issued, {counts['planned']} planned "
          f"(the rest: the step's loss and gradient-norm reductions)")
    print(f"{'layout':<7}{'predicted':>11}{'measured':>10}{'ratio':>7}  terms")
    for row in result["rows"]:
        terms = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["terms_s"].items() if v)
        print(f"{row['layout']:<7}{row['predicted_s']:>10.3f}s{row['measured_s']:>9.3f}s{row['ratio']:>7.2f}  {terms}")
    worst = max(abs(row["ratio"] - 1) for row in result["rows"])
    print(f"largest difference between predicted and measured: {worst:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
