"""Retrieval capacity of modern Hopfield memories: softmax vs softmax1 (OutEffHop) separation.

For each pattern dimension d and number of stored patterns N, `--trials` independent memories of random
binary patterns (entries +-1/sqrt(d), unit norm) are built, and each is asked two kinds of query:

  * a retrieval query: a stored pattern with a fraction `--noise` of its signs flipped. Correct when the
    output after `--steps` updates lies within min(0.5, half the distance to the nearest other pattern) of
    the stored pattern (the separated-ball criterion of Ramsauer et al.);
  * a no-op query: the minimum-norm x with beta <xi_i, x> = -margin for every stored pattern (least squares
    once N > d, where no such x exists). Correct when the output is ~0 (norm < 0.1; patterns have norm 1).

"acc" counts retrieval queries only; "acc+noop" counts both kinds, half each. softmax always returns a
unit-mass mixture, so it cannot answer a no-op query; softmax1 can. "noop norm" is the mean output norm
for no-op queries; "noop max logit" the median over memories of max_i beta <xi_i, x> for the no-op query
(-margin while such a query exists, positive once N > d: then no query is dissimilar to every pattern).

    python -m benchmarks.hopfield_capacity [--dims 16 32 64] [--patterns 4 16 64 256 1024] [--json] [--out DIR]

Prints a table (or JSON with --json) and writes hopfield_capacity.png and hopfield_capacity.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.cli import ArgumentParser, finite_number, positive_int, run_command
from data_pipeline.writable import check_writable_dir
from model.hopfield import retrieve

SEPARATIONS = ("softmax", "softmax1")
NOOP_TOLERANCE = 0.1


def random_memories(trials: int, num: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """[trials, num, dim] binary patterns of unit norm."""
    signs = torch.randint(0, 2, (trials, num, dim), generator=gen, dtype=torch.float64) * 2 - 1
    return signs / math.sqrt(dim)


def noop_queries(patterns: torch.Tensor, target: float) -> torch.Tensor:
    """Minimum-norm x with <xi_i, x> = target for all i (least squares when infeasible) -> [trials, dim].

    Normal equations with a tiny ridge instead of a batched pinv (an SVD per memory: 100x slower); the ridge
    keeps duplicate patterns (singular Gram matrices) finite.
    """
    trials, num, dim = patterns.shape
    rhs = torch.full((trials, num, 1), target, dtype=patterns.dtype)
    if num <= dim:  # x = Xi^T (Xi Xi^T)^-1 c: exact, minimum norm
        gram = patterns @ patterns.transpose(1, 2) + 1e-6 * torch.eye(num, dtype=patterns.dtype)
        return (patterns.transpose(1, 2) @ torch.linalg.solve(gram, rhs)).squeeze(-1)
    gram = patterns.transpose(1, 2) @ patterns + 1e-6 * torch.eye(dim, dtype=patterns.dtype)  # least squares
    return torch.linalg.solve(gram, patterns.transpose(1, 2) @ rhs).squeeze(-1)


def run_setting(dim: int, num: int, *, trials: int, beta: float, noise: float, steps: int, margin: float,
                gen: torch.Generator) -> dict[str, Any]:
    patterns = random_memories(trials, num, dim, gen)
    rows = torch.arange(trials)
    targets = torch.randint(0, num, (trials,), generator=gen)
    stored = patterns[rows, targets]
    flips = torch.rand(trials, dim, generator=gen) < noise
    queries = torch.where(flips, -stored, stored)
    noop = noop_queries(patterns, -margin / beta)

    # Ball radius around the target: half the distance to its nearest other pattern, at most 0.5.
    dists = (patterns - stored[:, None]).norm(dim=-1)
    dists[rows, targets] = float("inf")
    radius = (0.5 * dists.min(dim=-1).values).clamp(max=0.5)

    result: dict[str, Any] = {"dim": dim, "patterns": num, "retrieval_acc": {}, "acc_with_noop": {},
                              "noop_out_norm": {},
                              "noop_max_logit": float((beta * torch.einsum("td,tnd->tn", noop, patterns))
                                                      .max(dim=-1).values.median())}
    for sep in SEPARATIONS:
        out = retrieve(queries, patterns, beta, steps=steps, separation=sep)
        retrieved = (out - stored).norm(dim=-1) < radius
        out_noop = retrieve(noop, patterns, beta, steps=steps, separation=sep)
        noop_ok = out_noop.norm(dim=-1) < NOOP_TOLERANCE
        result["retrieval_acc"][sep] = float(retrieved.double().mean())
        result["acc_with_noop"][sep] = float((retrieved.double().sum() + noop_ok.double().sum()) / (2 * trials))
        result["noop_out_norm"][sep] = float(out_noop.norm(dim=-1).mean())
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("| d | N | acc softmax | acc softmax1 | acc+noop softmax | acc+noop softmax1 "
              "| noop norm softmax | noop norm softmax1 | noop max logit |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['patterns']} | {r['retrieval_acc']['softmax']:.3f} | "
                     f"{r['retrieval_acc']['softmax1']:.3f} | {r['acc_with_noop']['softmax']:.3f} | "
                     f"{r['acc_with_noop']['softmax1']:.3f} | {r['noop_out_norm']['softmax']:.3f} | "
                     f"{r['noop_out_norm']['softmax1']:.3f} | {r['noop_max_logit']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    dims = sorted({r["dim"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in ((axes[0], "retrieval_acc", "retrieval queries"),
                           (axes[1], "acc_with_noop", "retrieval + no-op queries")):
        for i, dim in enumerate(dims):
            sub = [r for r in rows if r["dim"] == dim]
            ns = [r["patterns"] for r in sub]
            for sep, style in (("softmax1", "-"), ("softmax", "--")):
                ax.plot(ns, [r[key][sep] for r in sub], style, marker="o", color=colors[i % len(colors)],
                        label=f"d={dim} {sep}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stored patterns N")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64], help="pattern dimensions d")
    p.add_argument("--patterns", type=int, nargs="+", default=[4, 16, 64, 256, 1024], help="stored patterns N")
    p.add_argument("--trials", type=int, default=256, help="independent memories (and queries) per setting")
    p.add_argument("--beta", type=float, default=16.0, help="inverse temperature (patterns have unit norm)")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of signs flipped in retrieval queries")
    p.add_argument("--steps", type=int, default=1, help="retrieval updates (1 = one attention step)")
    p.add_argument("--margin", type=float, default=10.0, help="no-op queries have logits beta*<xi,x> = -margin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, default=Path("runs/hopfield_capacity"), help="folder for PNG and JSON")
    args = p.parse_args(argv)
    for name in ("trials", "steps"):
        positive_int(f"--{name}", getattr(args, name), allow_none=False)
    finite_number("--beta", args.beta, low=0, low_open=True)
    finite_number("--margin", args.margin, low=0)
    finite_number("--noise", args.noise, low=0, high=1)
    for name in ("dims", "patterns"):
        for value in getattr(args, name):
            positive_int(f"--{name}", value, allow_none=False)
    check_writable_dir(args.out, "--out")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.hopfield_capacity", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    rows = [run_setting(dim, num, trials=args.trials, beta=args.beta, noise=args.noise, steps=args.steps,
                        margin=args.margin, gen=gen)
            for dim in args.dims for num in args.patterns]
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "out")}
    report = {"settings": settings, "rows": rows, "seconds": round(time.perf_counter() - start, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hopfield_capacity.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.out / "hopfield_capacity.png",
         f"beta={args.beta}, noise={args.noise}, steps={args.steps}, no-op margin={args.margin}, "
         f"trials={args.trials}")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"Hopfield retrieval capacity ({', '.join(f'{k}={v}' for k, v in settings.items())})")
        print(format_table(rows))
        print(f"{report['seconds']} s; plot and JSON in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
