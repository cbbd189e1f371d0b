"""Tokens per second the data pipeline delivers to one data-parallel rank, against what a model consumes.

    python -m benchmarks.data [--seconds 3] [--dp 1 8 64] [--seq 512] [--json]

Rows, each measured for --seconds of CPU time of the reading thread (tokens per CPU-second: what one dedicated core
delivers, also on a busy machine) as rank 0 of a simulated data-parallel size DP:
  streaming/blocks       BlockStream, shard_by=blocks (the default before auto): every rank tokenizes the whole
                         stream, keeps 1 block in DP
  streaming/documents    BlockStream, shard_by=documents (what the default, auto, does with DP > 1): each rank
                         tokenizes only its share of the documents
  streaming/documents+prefetch  the same behind data_pipeline.prefetch's thread, while the consumer simulates the
                         opt_125m-on-H100 steps (block i due at i x the GPU time of a block, sleeping meanwhile;
                         --seconds of wall time): delivered = tokens / wall time the consumer waited in next(),
                         and the stall column is that wait over the elapsed time
  indexed                data.source: indexed (megatron-core GPTDataset over the prepared sample): rank 0 reads
                         global samples 0, DP, 2 DP, ... only
Data: the bundled English Wikipedia sample with the demo's tokenizer (configs/opt_tiny.yaml's data section, 8192
pieces), blocks of --seq tokens; the sample is prepared once under data.cache_dir/benchmark_prepared.
Consumption: launcher.plan's step time for configs/opt_125m.yaml and opt_1b3.yaml on one H100 at MFU 0.4 (global
batch x seq / step time, i.e. per rank: peak x MFU / FLOPs per token); the ratio columns are delivered / consumed
(>= 1: data keeps up; < 1: the step waits on data). Tests never assert these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, finite_number, positive_int, run_command  # noqa: E402
from common.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"opt_125m": "configs/opt_125m.yaml", "opt_1b3": "configs/opt_1b3.yaml"}


def consumption(gpu: str = "H100", mfu: float = 0.4) -> dict[str, float]:
    """Tokens/s one rank of each recipe consumes, from launcher.planner's step time (one GPU, the recipe's batch)."""
    from launcher.config import load_config
    from launcher.planner import device_named, layout_of, plan_layout

    rates = {}
    for name, path in RECIPES.items():
        cfg = load_config(REPO / path)
        plan = plan_layout(cfg, layout_of(cfg, 1), device_named(gpu), mfu)
        rates[name] = cfg.train.global_batch_size * cfg.data.seq_length / plan.step_time_s
    return rates


def measure(next_block: Callable[[], Any], seconds: float, step_s: float = 0.0) -> dict[str, float]:
    """Blocks pulled for `seconds` of this thread's CPU time (after one warm-up block): tokens per CPU-second is
    what one dedicated core delivers, also on a shared machine where wall-clock time would understate it.

    With `step_s` (a prefetching reader), the consumer instead follows a simulated training timeline, block i
    due at start + i x step_s (sleeping meanwhile, as a process does while its GPU computes), for `seconds` of
    wall time; the rate is tokens over the wall time it waited in next()."""
    next_block()
    tokens, waited, blocks = 0, 0.0, 0
    clock = time.perf_counter if step_s else time.thread_time
    start = clock()
    while clock() - start < seconds:
        if step_s:
            due = start + blocks * step_s
            time.sleep(max(0.0, due - time.perf_counter()))
        t = clock()
        block = next_block()
        waited += clock() - t
        tokens += int(block.numel())
        blocks += 1
    wall = clock() - start
    return {"tokens": tokens, "waited_s": waited, "elapsed_s": wall,
            "tokens_per_s": tokens / max(waited, 1e-9), "stall_fraction": waited / wall}


def prepared_sample(data_cfg: Any) -> Path:
    """The bundled sample prepared with the demo's tokenizer (once; reused from data.cache_dir)."""
    from data_pipeline.prepare import MANIFEST, prepare

    out = Path(data_cfg.cache_dir) / "benchmark_prepared"
    if not (out / MANIFEST).is_file() or not (out / "wiki_sample_en" / "train.bin").is_file():
        config = out.parent / "benchmark_prepare.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"data:\n  source: wiki_sample\n  language: en\n  vocab_size: {data_cfg.vocab_size}\n"
                          f"  cache_dir: {json.dumps(str(data_cfg.cache_dir))}\n")
        prepare(str(config), out, num_shards=4, progress=False)
    return out / "wiki_sample_en"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from data_pipeline.examples import train_blocks
    from data_pipeline.packing import BlockStream
    from data_pipeline.prefetch import Prefetcher
    from data_pipeline.tokenizer import load_or_train_tokenizer
    from launcher.config import load_config

    rates = consumption(args.gpu, args.mfu)
    base = replace(load_config(REPO / "configs/opt_tiny.yaml").data, seq_length=args.seq)
    tokenizer = load_or_train_tokenizer(base)
    indexed_cfg = replace(base, source="indexed", path=str(prepared_sample(base)))
    step_per_block = args.seq / rates["opt_125m"]  # the simulated GPU time of one block of opt_125m on H100
    rows: list[dict[str, Any]] = []

    def add(mode: str, dp: int, result: dict[str, float]) -> None:
        row = {"mode": mode, "dp": dp, **result, **{f"ratio_{k}": result["tokens_per_s"] / v for k, v in rates.items()}}
        rows.append(row)
        if not args.json:
            print(f"  measured {mode:<30} DP={dp:<3} {result['tokens_per_s'] / 1e3:10,.0f}k tokens/s", file=sys.stderr)

    for dp in args.dp:
        for shard_by in ("blocks", "documents"):
            stream = BlockStream(replace(base, shard_by=shard_by), tokenizer, "train", 0, dp)
            add(f"streaming/{shard_by}", dp, measure(lambda: next(stream), args.seconds))
        prefetched = Prefetcher(BlockStream(replace(base, shard_by="documents"), tokenizer, "train", 0, dp))
        add("streaming/documents+prefetch", dp, measure(lambda: next(prefetched), args.seconds, step_per_block))
        prefetched.close()
        indexed = train_blocks(indexed_cfg, tokenizer, dp_rank=0, dp_world=dp)  # what a causal LM trains on
        add("indexed", dp, measure(lambda: next(indexed), args.seconds))
    return [{**row, "consumption": rates} for row in rows]


def table(rows: list[dict[str, Any]]) -> str:
    rates = rows[0]["consumption"]
    names = list(rates)
    lines = [f"consumption per rank on H100 at MFU 0.4 (launcher.plan): " +
             ", ".join(f"{n} {rates[n] / 1e3:,.0f}k tokens/s" for n in names), "",
             f"{'mode':<30} {'DP':>4} {'delivered/rank':>16} " + " ".join(f"{'x ' + n:>12}" for n in names) +
             f" {'stall':>7}"]
    for row in rows:
        stall = f"{row['stall_fraction']:.0%}" if row["mode"].endswith("prefetch") else ""
        lines.append(f"{row['mode']:<30} {row['dp']:>4} {row['tokens_per_s'] / 1e3:>14,.0f}k " +
                     " ".join(f"{row[f'ratio_{n}']:>12.2f}" for n in names) + f" {stall:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.data", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per row")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 8, 64], help="simulated data-parallel sizes")
    parser.add_argument("--seq", type=int, default=512, help="tokens per block (opt_125m's 512)")
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    finite_number("--seconds", args.seconds, low=0, low_open=True)
    finite_number("--mfu", args.mfu, low=0, high=1, low_open=True)
    positive_int("--seq", args.seq, allow_none=False)
    for size in args.dp:
        positive_int("--dp", size, allow_none=False)
    from launcher.planner import GPUS, device_named

    try:
        device_named(args.gpu)
    except KeyError:
        raise ConfigError("--gpu", args.gpu, f"unknown device (one of {', '.join(GPUS)}, cpu)") from None
    rows = run(args)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
