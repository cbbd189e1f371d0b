"""Forward+backward time and peak memory of softmax1 attention backends against vanilla SDPA.

    python -m benchmarks.attention [--seq 512 1024 2048 4096] [--batch 1] [--heads 12] [--head-dim 64]
                                   [--dtype fp32|bf16|fp16] [--reps 5] [--eager-max-seq 2048] [--json]

Methods (causal self-attention on [batch, heads, seq, head_dim]):
  softmax (sdpa)            vanilla attention, torch's fused SDPA (FlashAttention on GPU): the baseline
  softmax1 (auto)           what `backend="auto"` runs: triton on CUDA; on CPU torch's flash kernel rescaled
                            by its log-sum-exp (model/kernels/sdpa_sink.py)
  softmax1 (sdpa zero key)  SDPA with one extra all-zero key/value and a lower-right causal mask
  softmax1 (triton)         the fused Triton kernel (CUDA only; CPU would need the interpreter)
  learnable_sink (triton)   the same kernel with a learnable per-head sink logit (CUDA only)
  softmax1 (eager)          the reference code's approach: materialised [T, T] logits and probabilities

Timing: every repetition runs each method once in turn (interleaved, so machine noise hits all of them
alike) after one warm-up each; the table gives medians and each median's ratio to vanilla SDPA's. The JSON
rows also give TFLOP/s: FlashAttention's benchmark convention, forward 4 * B * H * T^2 * d (QK^T and PV,
halved when causal) and backward 2.5x the forward, so one fwd+bwd counts 3.5x the forward.
Peak memory, measured in a separate untimed pass: on CUDA torch.cuda.max_memory_allocated; on CPU (no
allocator statistics) the peak total size of live tensor storages across the ops of one forward+backward,
tracked with a TorchDispatchMode and storage weak references (inputs excluded; scratch buffers internal to
one kernel are not seen, and for the fused kernels they are O(threads x tile), independent of T). The
"growth" rows give log2(peak(2T) / peak(T)): 1 for linear memory, 2 for quadratic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from common.cli import ArgumentParser, positive_int, run_command
from common.errors import ConfigError
from launcher.memory_probe import LiveTensorMemory
from model import kernels
from model.attention import resolve_backend, scaled_dot_product

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE = "softmax (sdpa)"


_BIASES: dict[tuple[int, int], Any] = {}


def _zero_key_softmax1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    zeros = q.new_zeros(*k.shape[:-2], 1, k.shape[-1])
    k, v = torch.cat([zeros, k], dim=-2), torch.cat([zeros, v], dim=-2)
    # CausalBias is a tensor subclass that cannot be created under the memory-tracking dispatch mode:
    # build it on the (untracked) warm-up call; it holds no data until SDPA materialises it.
    key = (q.shape[-2], k.shape[-2])
    if key not in _BIASES:
        _BIASES[key] = causal_lower_right(*key)
    bias = _BIASES[key]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


_SINKS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _sink_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    key = (q.shape[1], q.device)
    if key not in _SINKS:  # one learnable logit per head, at its initial value 0 (its gradient is computed)
        _SINKS[key] = torch.zeros(q.shape[1], device=q.device, requires_grad=True)
    return scaled_dot_product(q, k, v, variant="learnable_sink", backend="triton", sink_logit=_SINKS[key])


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool = True) -> float:
    """FLOPs of one forward+backward (FlashAttention's benchmark convention, see the module docstring)."""
    forward = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return 3.5 * forward


def methods(device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    table: dict[str, Callable[..., torch.Tensor]] = {
        BASELINE: lambda q, k, v: scaled_dot_product(q, k, v, variant="softmax", backend="sdpa"),
        "softmax1 (auto)": lambda q, k, v: scaled_dot_product(q, k, v, variant="softmax1", backend="auto"),
        "softmax1 (sdpa zero key)": _zero_key_softmax1,
    }
    if device.type == "cuda" and kernels.runnable_on("cuda"):
        table["softmax1 (triton)"] = lambda q, k, v: scaled_dot_product(q, k, v, variant="softmax1", backend="triton")
        table["learnable_sink (triton)"] = _sink_triton
    table["softmax1 (eager)"] = lambda q, k, v: scaled_dot_product(q, k, v, variant="softmax1", backend="eager")
    return table


def _inputs(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qkv = [torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    return qkv, torch.randn(batch, heads, seq, head_dim, generator=gen).to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], upstream: torch.Tensor) -> None:
    for x in qkv:
        x.grad = None
    fn(*qkv).backward(upstream)


def time_once(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], upstream: torch.Tensor,
              device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    _fwd_bwd(fn, qkv, upstream)
    _sync(device)
    return time.perf_counter() - start


def peak_memory(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], upstream: torch.Tensor,
                device: torch.device) -> int:
    """Peak bytes allocated by one forward+backward beyond the inputs (gradients included)."""
    for x in qkv:
        x.grad = None
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _fwd_bwd(fn, qkv, upstream)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorMemory() as tracker:
        _fwd_bwd(fn, qkv, upstream)
    return tracker.peak


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    table = methods(device)
    if args.methods:
        table = {name: fn for name, fn in table.items() if name == BASELINE or any(m in name for m in args.methods)}
    rows: list[dict[str, Any]] = []
    for seq in args.seq:
        active = {name: fn for name, fn in table.items() if not ("eager" in name and seq > args.eager_max_seq)}
        qkv, upstream = _inputs(args.batch, args.heads, seq, args.head_dim, dtype, device, seed=seq)
        for fn in active.values():  # warm-up
            for _ in range(args.warmup):
                time_once(fn, qkv, upstream, device)
        times: dict[str, list[float]] = {name: [] for name in active}
        for _ in range(args.reps):
            for name, fn in active.items():
                times[name].append(time_once(fn, qkv, upstream, device))
        memory = {name: peak_memory(fn, qkv, upstream, device) for name, fn in active.items()} if args.memory else {}
        base = statistics.median(times[BASELINE])
        flops = attention_flops(args.batch, args.heads, seq, args.head_dim)
        for name in table:
            row: dict[str, Any] = {"seq": seq, "method": name}
            if name in active:
                med = statistics.median(times[name])
                row.update(time_ms=med * 1e3, times_ms=[t * 1e3 for t in times[name]], ratio=med / base,
                           tflops=flops / med / 1e12)
                if name in memory:
                    row["peak_mib"] = memory[name] / 2**20
            else:
                row["skipped"] = f"seq > --eager-max-seq {args.eager_max_seq}"
            rows.append(row)
        if args.progress:
            print(f"seq {seq} done", file=sys.stderr, flush=True)
    auto = resolve_backend("auto", "softmax1", device)
    return {"benchmark": "attention", "machine": machine(device),
            "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                       "causal": True, "reps": args.reps, "warmup": args.warmup, "seq": args.seq},
            "auto_backend": auto, "results": rows}


def memory_growth(rows: list[dict[str, Any]], method: str) -> list[float | None]:
    """log2(peak(T2) / peak(T1)) / log2(T2 / T1) between consecutive sequence lengths."""
    peaks = [(r["seq"], r.get("peak_mib")) for r in rows if r["method"] == method]
    out: list[float | None] = []
    for (t1, m1), (t2, m2) in zip(peaks, peaks[1:]):
        out.append(math.log(m2 / m1) / math.log(t2 / t1) if m1 and m2 else None)
    return out


def format_table(result: dict[str, Any]) -> str:
    rows, cfg = result["results"], result["config"]
    names = list(dict.fromkeys(r["method"] for r in rows))
    seqs = cfg["seq"]
    lines = [f"causal attention fwd+bwd, batch {cfg['batch']}, heads {cfg['heads']}, head_dim {cfg['head_dim']}, "
             f"{cfg['dtype']}, median of {cfg['reps']} interleaved reps; machine: {_machine_line(result['machine'])}; "
             f"auto -> {result['auto_backend']}", ""]
    width = max(len(n) for n in names) + 2
    header = "method".ljust(width) + "".join(f"T={t}".rjust(22) for t in seqs)
    lines += ["time ms (ratio to softmax sdpa)", header]
    cell = {(r["seq"], r["method"]): r for r in rows}
    for name in names:
        parts = []
        for t in seqs:
            r = cell[(t, name)]
            parts.append((f"{r['time_ms']:.1f} ({r['ratio']:.2f}x)" if "time_ms" in r else "skipped").rjust(22))
        lines.append(name.ljust(width) + "".join(parts))
    if any("peak_mib" in r for r in rows):
        lines += ["", "peak memory MiB (growth exponent vs previous T: 1 = linear, 2 = quadratic)", header]
        for name in names:
            growth = [None] + memory_growth(rows, name)
            parts = []
            for t, g in zip(seqs, growth):
                r = cell[(t, name)]
                text = f"{r['peak_mib']:.4g}" if "peak_mib" in r else "skipped"
                text += f" (^{g:.2f})" if g is not None else ""
                parts.append(text.rjust(22))
            lines.append(name.ljust(width) + "".join(parts))
    return "\n".join(lines)


def _machine_line(info: dict[str, Any]) -> str:
    text = f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}"
    return f"{info['gpu']}; " + text if "gpu" in info else text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the machine resolved (also used by gpu_check)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eager-max-seq", type=int, default=2048,
                        help="skip the materialised reference above this length (its memory is quadratic; 0: always)")
    parser.add_argument("--methods", nargs="*", help="substrings of method names to run (the baseline always runs)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--progress", action="store_true", help="report each finished length on stderr")
    args = parser.parse_args(argv)
    for length in args.seq:
        positive_int("--seq", length, allow_none=False)
    for flag in ("batch", "heads", "head_dim", "reps"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag), allow_none=False)
    positive_int("--threads", args.threads)
    for flag in ("warmup", "eager_max_seq"):  # 0 is meaningful: no warm-up pass; never the materialised reference
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')}", getattr(args, flag), "must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda", "this machine has no CUDA device (use cpu or auto)")
    if args.dtype is None:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.dtype = "bf16" if cuda else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.attention", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
