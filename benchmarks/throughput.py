"""Training throughput of this project's OPT against transformers' OPTForCausalLM, and model FLOP/s.

    python -m benchmarks.throughput [--layers 4 --hidden 256 --heads 4 --ffn 1024 --vocab 8192]
                                    [--seq 256 --batch 4] [--variants softmax softmax1] [--steps 5] [--json]
                                    [--compile | --no-compile] [--compile-variants softmax1]

Both models get the same shape, the same weights (this project's state dict copied into transformers'),
the same token batch and their own AdamW; one training step = zero_grad + forward with labels (mean
next-token loss) + backward + optimizer step. Steps are interleaved (ours, theirs, ours, ...) after
`--warmup` steps each, so machine noise hits all models alike; tokens/s = batch * seq / median step time,
and the ratio is ours / transformers' (sdpa attention). With --compile (the default except --quick), each
variant also runs as "ours compiled": the same model with its blocks compiled by torch.compile (train.compile,
model/compile.py), compiled during its warm-up steps; its row reports the first step's time (compilation). This project's model runs `attention.backend=auto`
(sdpa on CPU for softmax and softmax1, the Triton kernel for softmax1 on CUDA). The JSON rows also hold every
step's loss and, on CUDA, each model's peak memory: its resident parameters, gradients and AdamW state plus
the most a step allocated beyond what was allocated before it (what the model would peak at on its own).

Model FLOPs per token (nanoGPT / PaLM convention, forward + backward = 3x forward):
    6 * N + 12 * L * d * T
with N the parameters that take part in matmuls per token: all but the position embeddings (the token
embedding counts once, as the tied LM head), L layers, width d, sequence length T (the attention
score and context matmuls, counted as full, non-causal attention). Model FLOP/s = FLOPs/token * tokens/s;
utilisation is that over the machine's measured matmul peak: the best of `--peak-reps` square
`--peak-size` matmuls in the benchmark dtype.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.attention import DTYPES, machine
from common.cli import ArgumentParser, finite_number, positive_int, run_command
from common.errors import ConfigError
from model.attention import resolve_backend
from model.config import AttentionConfig, ModelConfig
from model.opt import OPTForCausalLM


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import OPTConfig
    from transformers import OPTForCausalLM as HFOPTForCausalLM

    models: dict[str, torch.nn.Module] = {}
    reference_state = None
    for variant in args.variants:
        cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                          ffn_hidden_size=args.ffn, max_position_embeddings=args.seq, vocab_size=args.vocab,
                          dropout=args.dropout, attention=AttentionConfig(variant=variant, backend="auto"))
        torch.manual_seed(0)
        with device:  # initialise on the device: a GPU draws 1.3B weights in a blink, a CPU in seconds
            model = OPTForCausalLM(cfg, seq_length=args.seq)
        if reference_state is None:
            reference_state = model.state_dict()
        else:  # every variant starts from the same weights
            model.load_state_dict(reference_state)
        models[f"ours ({variant})"] = model
        if args.compile and variant in (args.compile_variants or args.variants):
            from model.compile import compile_blocks
            from model.family import family_of

            compiled = copy.deepcopy(model)
            compile_blocks(compiled, family_of(cfg))
            models[f"ours compiled ({variant})"] = compiled
    hf_config = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          ffn_dim=args.ffn, num_attention_heads=args.heads, max_position_embeddings=args.seq,
                          dropout=args.dropout, attention_dropout=0.0, word_embed_proj_dim=args.hidden,
                          do_layer_norm_before=True, enable_bias=True, activation_function="relu",
                          attn_implementation="sdpa")
    with device:
        hf = HFOPTForCausalLM(hf_config)
    assert reference_state is not None
    state = {f"model.{key}": value for key, value in reference_state.items()}
    state["lm_head.weight"] = reference_state["decoder.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    models["transformers (sdpa)"] = hf
    dtype = DTYPES[args.dtype]
    return {name: m.to(device=device, dtype=dtype).train() for name, m in models.items()}


@dataclass
class TrainStep:
    """One training step of one model (call it); returns the loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ids: torch.Tensor
    hf: bool

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        ids = self.ids
        loss = self.model(input_ids=ids, labels=ids).loss if self.hf else self.model(ids, labels=ids)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def resident_bytes(self) -> int:
        """Parameters, gradients and optimizer state: what stays allocated between steps."""
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def train_step_fn(name: str, model: torch.nn.Module, ids: torch.Tensor, lr: float) -> TrainStep:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    return TrainStep(model, optimizer, ids, hf=name.startswith("transformers"))


@dataclass
class StepRecord:
    losses: list[float]  # every step's, warm-up included
    times: list[float]  # the timed steps' seconds
    step_peak: int = 0  # CUDA: the most one step allocated beyond what was allocated before it
    first_s: float = 0.0  # the first (untimed) step's seconds: compilation, for a compiled model


def measure_steps(steps: dict[str, Callable[[], float]], warmup: int, timed: int,
                  device: torch.device) -> dict[str, StepRecord]:
    """`warmup` untimed then `timed` timed steps of every model, interleaved (noise hits all alike)."""
    records = {name: StepRecord([], [], first_s=0.0) for name in steps}
    cuda = device.type == "cuda"
    for i in range(warmup + timed):
        for name, step in steps.items():
            record = records[name]
            if cuda:
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            record.losses.append(step())
            if cuda:
                torch.cuda.synchronize(device)
                record.step_peak = max(record.step_peak, torch.cuda.max_memory_allocated(device) - base)
            if i == 0:
                record.first_s = time.perf_counter() - start
            if i >= warmup:
                record.times.append(time.perf_counter() - start)
    return records


def matmul_peak(size: int, reps: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_token(model: OPTForCausalLM, seq: int) -> float:
    cfg = model.config
    n_matmul = model.num_parameters() - model.decoder.embed_positions.weight.numel()
    return 6 * n_matmul + 12 * cfg.num_layers * cfg.hidden_size * seq


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    models = build_models(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    steps = {name: train_step_fn(name, model, ids, args.lr) for name, model in models.items()}
    records = measure_steps(steps, args.warmup, args.steps, device)
    times = {name: record.times for name, record in records.items()}
    ours = next(m for m in models.values() if isinstance(m, OPTForCausalLM))
    fpt = flops_per_token(ours, args.seq)
    peak = matmul_peak(args.peak_size, args.peak_reps, DTYPES[args.dtype], device)
    tokens = args.batch * args.seq
    hf_name = "transformers (sdpa)"
    hf_tps = tokens / statistics.median(times[hf_name])
    rows = []
    for name, ts in times.items():
        tps = tokens / statistics.median(ts)
        losses = records[name].losses  # identical weights: identical first losses
        peak_mib = (steps[name].resident_bytes() + records[name].step_peak) / 2**20 if device.type == "cuda" else None
        rows.append({"model": name, "step_ms": statistics.median(ts) * 1e3, "steps_ms": [t * 1e3 for t in ts],
                     "tokens_per_s": tps, "ratio_to_transformers": tps / hf_tps,
                     "model_tflops": fpt * tps / 1e12, "mfu": fpt * tps / peak, "first_loss": losses[0],
                     "losses": losses, "peak_mib": peak_mib, "first_step_s": records[name].first_s})
    return {"benchmark": "throughput", "machine": machine(device),
            "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "ffn", "vocab", "seq", "batch",
                                                   "dropout", "dtype", "steps", "warmup", "variants", "lr",
                                                   "compile")},
            "attention_backend": {v: resolve_backend("auto", v, device) for v in args.variants},
            "params": ours.num_parameters(), "flops_per_token": fpt,
            "flops_formula": "6 * (params - position embeddings) + 12 * layers * hidden * seq",
            "matmul_peak_tflops": peak / 1e12, "results": rows}


def format_table(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [f"training step (fwd+bwd+AdamW), {cfg['layers']} layers, d={cfg['hidden']}, {cfg['heads']} heads, "
             f"ffn {cfg['ffn']}, vocab {cfg['vocab']}, batch {cfg['batch']} x seq {cfg['seq']}, {cfg['dtype']}, "
             f"median of {cfg['steps']} interleaved steps",
             f"machine: {m.get('gpu', m['cpu'])}, {m['threads']} threads, torch {m['torch']}; "
             f"attention backend (auto): {result['attention_backend']}",
             f"params {result['params'] / 1e6:.2f}M, FLOPs/token {result['flops_per_token'] / 1e6:.1f}M "
             f"({result['flops_formula']}); measured matmul peak {result['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s",
             "",
             f"{'model':<33}{'step ms':>10}{'tokens/s':>12}{'vs transformers':>17}{'GFLOP/s':>10}{'MFU':>8}"]
    for r in result["results"]:
        lines.append(f"{r['model']:<33}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}"
                     f"{r['ratio_to_transformers']:>16.2f}x"
                     f"{r['model_tflops'] * 1e3:>10.1f}{r['mfu'] * 100:>7.1f}%")
    compiled = [r for r in result["results"] if r["model"].startswith("ours compiled")]
    for r in compiled:  # what torch.compile cost, once
        eager = next((e for e in result["results"] if e["model"] == r["model"].replace(" compiled", "")), None)
        speedup = f", {eager['step_ms'] / r['step_ms']:.2f}x eager's speed" if eager else ""
        lines.append(f"{r['model']}: first step {r['first_step_s']:.1f}s (compiling){speedup}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with --quick applied (also used by gpu_check)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", default=["softmax", "softmax1"],
                        help="attention variants of this project's model to time")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (at least 1)")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--peak-reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each variant with its blocks torch.compile'd (default: on, off with --quick)")
    parser.add_argument("--compile-variants", nargs="+", default=None,
                        help="the variants to compile (default: every --variants)")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration for smoke tests")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.ffn, args.vocab = 1, 32, 2, 64, 128
        args.seq, args.batch, args.steps, args.warmup, args.peak_size, args.peak_reps = 16, 2, 2, 1, 128, 2
    args.warmup = max(1, args.warmup)
    if args.compile is None:
        args.compile = not args.quick
    for flag in ("layers", "hidden", "heads", "ffn", "vocab", "seq", "batch", "steps", "peak_size", "peak_reps"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag), allow_none=False)
    positive_int("--threads", args.threads)
    finite_number("--lr", args.lr, low=0, low_open=True)
    finite_number("--dropout", args.dropout, low=0, high=1)
    if args.dropout >= 1:
        raise ConfigError("--dropout", args.dropout, "must lie in [0, 1)")
    if args.hidden % args.heads:
        raise ConfigError("--heads", args.heads, f"must divide --hidden={args.hidden}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda", "this machine has no CUDA device (use cpu or auto)")
    from model import variants

    for name in args.variants:  # ProjectError naming an unknown variant
        variants.get(name)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.throughput", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
