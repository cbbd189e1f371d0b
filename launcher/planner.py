"""Memory and time plan of a run before launch: per-rank parameters, gradients, optimizer states and activations
for a layout (TP, PP, DP, ZeRO stage, precision, micro batch, activation checkpointing), FLOPs per step and
the expected step time at an assumed MFU, and the layouts that fit a number of GPUs.

The memory terms live in launcher/plan_memory.py; this module assembles the plan, the step time and the
suggestions. Step time (docs/planner.md states the formulas with their sources): compute at an assumed MFU (plus
what recomputation adds, slowed where a TP rank's matmul shards run below the full shapes' measured rate), the
host time to issue each layer (CPU only: there the host computes), tensor-parallel all-reduces as this code
issues them, pipeline sends and the 1F1B bubble on the critical path, the data-parallel gradient reduction /
ZeRO-3 gathers (launcher/comm_model.py costs the collectives on the layout's links).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import ConfigError
from launcher.comm_model import Network, all_gather_s, all_reduce_s, network_for, p2p_s
from launcher.plan_memory import activation_bytes, embedding_params, layer_params, model_states, stage_layers, \
    stage_params, total_params
from launcher.throughput import PEAK_TFLOPS, flops_per_token
from model.config import ModelConfig
from model.family import family_of
from model.recompute import RECOMPUTE_MODES, recompute_mode

GIB = 2**30
# Tensor-parallel degrees the suggestions try (megatron's advice: within a node).
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float | None  # dense bf16 (GPU) peak; None where unknown (CPU)
    kind: str = "cuda"  # "cuda" or "cpu": decides the attention backend and dropout-mask bytes
    # Host time to issue one layer's forward and backward for one micro-batch, whatever its width: no layout
    # divides it (a TP rank issues every op of its layers). On a CPU the host is the device, so it adds to the
    # step (benchmarks.planner_check measures it); on GPUs 0: kernels queue asynchronously, the host runs ahead.
    layer_issue_s: float = 0.0
    # Measured matmul rates, ((M, K, N), FLOP/s) pairs: where they cover a layer's GEMMs (layer_gemms), a TP
    # rank's compute is slowed by its shards' rate against the full shapes'. GPUs: none (shards at full rate).
    gemm_rates: tuple[tuple[tuple[int, int, int], float], ...] = ()


# Datasheet memory; the dense bf16 peak is launcher.throughput's (the one MFU is logged against).
GPUS = {
    "H100": Device("H100-80GB", 80.0, PEAK_TFLOPS["H100"]), "H200": Device("H200-141GB", 141.0, PEAK_TFLOPS["H200"]),
    "A100-80GB": Device("A100-80GB", 80.0, PEAK_TFLOPS["A100"]),
    "A100-40GB": Device("A100-40GB", 40.0, PEAK_TFLOPS["A100"]),
    "L40S": Device("L40S-48GB", 48.0, PEAK_TFLOPS["L40S"]), "A10G": Device("A10G-24GB", 24.0, PEAK_TFLOPS["A10G"]),
    "V100": Device("V100-32GB", 32.0, PEAK_TFLOPS["V100"]),
}


@dataclass(frozen=True)
class LayoutChoice:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 1
    activation_checkpointing: str = "none"  # RECOMPUTE_MODES

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_checkpointing", recompute_mode(self.activation_checkpointing))

    def describe(self) -> str:
        mode = self.activation_checkpointing
        ac = f", {mode} recompute" if mode != "none" else ""
        return (f"TP{self.tensor} x PP{self.pipeline} x DP{self.data}, ZeRO-{self.zero_stage}, "
                f"micro-batch {self.micro_batch_size}{ac}")


@dataclass
class Plan:
    layout: LayoutChoice
    device: Device
    precision: str  # "bf16", "fp16" or "fp32"
    params: int  # parameters held by the busiest rank (before ZeRO partitioning)
    total_params: int
    bytes: dict[str, float] = field(default_factory=dict)  # parameters, gradients, optimizer, activations
    stage: int = 0  # the busiest pipeline stage
    in_flight: int = 1  # micro-batches whose activations that stage holds at once
    flops_per_step: float = 0.0
    step_time_s: float | None = None
    mfu: float = 0.4
    time: dict[str, float] = field(default_factory=dict)  # the step time's terms (step_time_terms)
    network: Network | None = None

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.device.memory_gib * GIB

    def one_line(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.bytes.items())
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"plan: {self.total / GIB:.2f} GiB per rank of {self.device.memory_gib:.0f} GiB ({self.device.name}; "
                f"{parts} GiB) for {self.layout.describe()}, {self.precision}: {verdict}")


# ------------------------------------------------------------------------------------------------ the plan

def resolve_precision(precision: str, device_kind: str) -> str:
    """launcher.pretrain's rule: `auto` is bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device_kind == "cuda" else "fp32"
    return precision


def recompute_flops_per_token(m: ModelConfig, seq: int, mode: str, model_flops_per_token: float) -> float:
    """Hardware FLOPs per token that recomputation adds: full repeats the forward (a third of the 6N + 12Lhs
    model FLOPs), selective repeats attention's core forward (QK^T and PV: 4 h s per layer)."""
    if mode == "full":
        return model_flops_per_token / 3
    if mode == "selective":
        return 4 * m.num_layers * m.hidden_size * seq
    return 0.0


def layer_gemms(m: ModelConfig, tokens: int, tp: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of one layer's matmuls on one TP rank for `tokens` tokens, forward and backward: q, k, v and fc1
    column-parallel (outputs / tp), out and fc2 row-parallel (inputs / tp); each linear's forward x W, its input
    gradient dY W^T and its weight gradient dY^T x."""
    h, f = m.hidden_size, m.ffn_hidden_size
    linears = [(h, h // tp)] * 3 + [(h // tp, h), (h, f // tp), (f // tp, h)]  # (in, out)
    return [shape for k, n in linears for shape in ((tokens, k, n), (tokens, n, k), (n, tokens, k))]


def shard_slowdown(device: Device, m: ModelConfig, tokens: int, tp: int) -> float:
    """How much slower a TP rank computes its layers than 1/tp of the full layer: its GEMMs' time at their
    measured rates x tp over the full GEMMs' time (1.0 without rates for every shape, e.g. on GPUs)."""
    rates = dict(device.gemm_rates)
    full, shard = layer_gemms(m, tokens, 1), layer_gemms(m, tokens, tp)
    if tp == 1 or not all(shape in rates for shape in full + shard):
        return 1.0
    seconds = lambda shapes: sum(2 * a * b * c / rates[(a, b, c)] for a, b, c in shapes)  # noqa: E731
    return tp * seconds(shard) / seconds(full)


def tp_all_reduces(layers: int, recompute: str) -> tuple[int, int, int]:
    """(forward, backward, small) all-reduces per micro-batch of a TP stage with `layers` layers, as this code
    issues them: per layer the row-parallel out_proj and fc2 outputs in the forward (again in full recompute's
    re-forward) and the input gradients of the column-parallel q, k, v and fc1 in the backward (megatron-core's
    ColumnParallelLinear, one each: q, k and v are separate linears, as in OPT and BERT, where Megatron's fused
    QKV needs one); the vocab-parallel embedding's output and the LM head's input gradient; cross entropy's
    max, sum and target logit (small: a float per token)."""
    forward = layers * (2 + (2 if recompute == "full" else 0)) + 1
    return forward, layers * 4 + 1, 3


def step_time_terms(cfg: Any, layout: LayoutChoice, device: Device, network: Network, mfu: float,
                    params: int) -> dict[str, float]:
    """The step time's terms in seconds (their sum is the step time); `params` are the busiest rank's.

    Critical path: (accumulation + p - 1) 1F1B slots, each a micro-batch's forward and backward on the busiest
    stage: its compute at `mfu` of the peak (x shard_slowdown under TP), the host's issue time of its layers
    (Device.layer_issue_s, CPU), its tensor-parallel all-reduces (tp_all_reduces; synchronous, except that
    megatron-core overlaps each backward input-gradient all-reduce with the weight-gradient GEMM on links that
    compute alongside, NCCL's) and, with pipelines, one activation send and one gradient send. The data-
    parallel reduction follows the last backward: ZeRO-0/1 all-reduce the gradients once per step and ZeRO-2
    reduce-scatters them every micro-batch then all-gathers the updated weights (DeepSpeed's overlap_comm is
    off by default for both: fully exposed); ZeRO-3 gathers the weights twice (forward, backward) and
    reduce-scatters the gradients every micro-batch, prefetched and overlapped with compute (on by default):
    only what exceeds the compute is exposed, and at least the first layer's gather."""
    m, seq = cfg.model, cfg.data.seq_length
    t, p, d = layout.tensor, layout.pipeline, layout.data
    world = t * p * d
    accumulation = max(1, cfg.train.global_batch_size // (layout.micro_batch_size * d))
    precision = resolve_precision(cfg.train.precision, device.kind)
    b = 4 if precision == "fp32" else 2
    model_fpt = flops_per_token(m, seq, cfg.data)
    tokens = cfg.train.global_batch_size * seq
    hardware = (model_fpt + recompute_flops_per_token(m, seq, layout.activation_checkpointing, model_fpt)) * tokens
    assert device.peak_tflops
    flop_s = device.peak_tflops * 1e12 * mfu  # one rank's compute rate
    x = layout.micro_batch_size * seq
    compute = hardware / (world * flop_s) * shard_slowdown(device, m, x, t)
    layers = max(stage_layers(m.num_layers, p))
    host = accumulation * layers * device.layer_issue_s
    activation = x * m.hidden_size * b
    tp_per_micro = 0.0
    if t > 1:
        link = network.link(t)
        forward, backward, small = tp_all_reduces(layers, layout.activation_checkpointing)
        one = all_reduce_s(activation, t, link)
        if link.overlaps_compute:  # each hides behind its linear's weight-gradient GEMM (q, k, v: 2xh h/t; fc1: 2xh f/t)
            wgrad = [2 * x * m.hidden_size * out / t / flop_s for out in [m.hidden_size] * 3 + [m.ffn_hidden_size]]
            exposed = layers * sum(max(0.0, one - w) for w in wgrad) + one  # + the head's, not overlapped
        else:
            exposed = backward * one
        tp_per_micro = forward * one + exposed + small * all_reduce_s(4 * x, t, link)
    p2p_per_micro = 2 * p2p_s(activation, network.link(t * d * p)) if p > 1 else 0.0
    slot = (compute + host) / accumulation + tp_per_micro + p2p_per_micro
    terms = {"compute": compute, "host": host, "tensor_parallel": accumulation * tp_per_micro,
             "pipeline_p2p": accumulation * p2p_per_micro, "bubble": (p - 1) * slot}
    grads = params * b  # DeepSpeed reduces gradients in the weights' dtype
    dp = 0.0
    if d > 1:
        link = network.link(t * d)
        if layout.zero_stage <= 1:
            dp = all_reduce_s(grads, d, link)
        elif layout.zero_stage == 2:
            dp = accumulation * all_gather_s(grads, d, link) + all_gather_s(grads, d, link)
        else:
            gathers = accumulation * (3 * all_gather_s(grads, d, link))
            dp = max(gathers - compute, gathers / (accumulation * max(1, m.num_layers)))
    terms["data_parallel"] = dp
    return terms


def default_network(device: Device, gpus_per_node: int = 8) -> Network:
    key = next((k for k, d in GPUS.items() if d.name == device.name), device.name)
    return network_for(key, gpus_per_node)


def plan_layout(cfg: Any, layout: LayoutChoice, device: Device, mfu: float = 0.4,
                network: Network | None = None) -> Plan:
    """The plan of `cfg` (a RunConfig) in `layout` on `device`: the busiest rank's bytes and the step time
    (with `network`'s links; default: the device's, launcher/comm_model.py)."""
    if family_of(cfg.model).cost_model() is None:
        raise ConfigError("model.family", cfg.model.family, "has no memory model in launcher.plan (the planner "
                          "models the text transformers: opt, bert)")
    m, seq = cfg.model, cfg.data.seq_length
    precision = resolve_precision(cfg.train.precision, device.kind)
    act_bytes = 4 if precision == "fp32" else 2
    accumulation = max(1, cfg.train.global_batch_size // (layout.micro_batch_size * layout.data))
    best: Plan | None = None
    for stage in range(layout.pipeline):
        params = stage_params(m, layout.tensor, layout.pipeline, stage)
        first, _ = embedding_params(m, layout.tensor)
        largest = max(layer_params(m, layout.tensor), first)
        states = model_states(params, largest, layout.data, layout.zero_stage, precision)
        in_flight = min(layout.pipeline - stage, accumulation)
        acts = activation_bytes(m, micro_batch=layout.micro_batch_size, seq=seq, tp=layout.tensor,
                                pipeline=layout.pipeline, stage=stage, in_flight=in_flight,
                                checkpointing=layout.activation_checkpointing, act_bytes=act_bytes,
                                device_kind=device.kind, data_cfg=cfg.data)
        plan = Plan(layout, device, precision, params, total_params(m), {**states, "activations": acts},
                    stage=stage, in_flight=in_flight, mfu=mfu)
        if best is None or plan.total > best.total:
            best = plan
    assert best is not None
    best.flops_per_step = flops_per_token(m, seq, cfg.data) * cfg.train.global_batch_size * seq
    if device.peak_tflops:
        best.network = network or default_network(device)
        busiest = max(stage_params(m, layout.tensor, layout.pipeline, s) for s in range(layout.pipeline))
        best.time = step_time_terms(cfg, layout, device, best.network, mfu, busiest)
        best.step_time_s = sum(best.time.values())
    return best


def layout_of(cfg: Any, world_size: int) -> LayoutChoice:
    """The configured layout for `world_size` ranks."""
    p = cfg.parallel
    return LayoutChoice(p.tensor, p.pipeline, max(1, world_size // (p.tensor * p.pipeline)), p.zero_stage,
                        cfg.train.micro_batch_size, recompute_mode(p.activation_checkpointing))


def candidate_layouts(cfg: Any, gpus: int) -> list[LayoutChoice]:
    """Layouts the project can run on `gpus` ranks: TP dividing heads/FFN/vocab (<= 8), PP <= layers, ZeRO 0-3
    (0-1 with pipelines), the configured micro-batch or smaller halvings that still divide the global batch,
    each recompute mode."""
    m, global_batch = cfg.model, cfg.train.global_batch_size
    out: list[LayoutChoice] = []
    for tp in TP_CHOICES:
        if gpus % tp or m.num_heads % tp or m.ffn_hidden_size % tp or m.hidden_size % tp \
                or m.padded_vocab_size % tp:
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp or pp > m.num_layers:
                continue
            dp = gpus // (tp * pp)
            micro = cfg.train.micro_batch_size
            micros = []
            while micro >= 1:
                if global_batch % (micro * dp) == 0:
                    micros.append(micro)
                micro //= 2
            for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)):
                for ac in RECOMPUTE_MODES:
                    out += [LayoutChoice(tp, pp, dp, zero, mb, ac) for mb in micros]
    return out


def suggest(cfg: Any, gpus: int, device: Device, mfu: float = 0.4, limit: int = 8,
            network: Network | None = None) -> list[Plan]:
    """Layouts that fit, fastest first (step_time_terms: compute with recomputation, communication, bubble),
    then least model parallelism, largest micro-batch, lowest ZeRO stage, least recomputation; one entry per
    (TP, PP, ZeRO, recompute mode)."""
    plans = [plan_layout(cfg, layout, device, mfu, network) for layout in candidate_layouts(cfg, gpus)]
    fitting = [p for p in plans if p.fits]

    def key(p: Plan) -> tuple[Any, ...]:
        lay = p.layout
        time = round(p.step_time_s, 6) if p.step_time_s is not None else 0.0
        return (time, lay.tensor * lay.pipeline, -lay.micro_batch_size, lay.zero_stage,
                RECOMPUTE_MODES.index(lay.activation_checkpointing))

    seen: set[tuple[int, int, int, str]] = set()
    chosen: list[Plan] = []
    for plan in sorted(fitting, key=key):
        lay = plan.layout
        ident = (lay.tensor, lay.pipeline, lay.zero_stage, lay.activation_checkpointing)
        if ident not in seen:
            seen.add(ident)
            chosen.append(plan)
    return chosen[:limit]


def device_named(name: str | None, memory_gib: float | None = None, peak_tflops: float | None = None) -> Device:
    """A GPU from GPUS (by any prefix of its key, case-insensitive) with optional overrides, or `cpu`."""
    if name is not None and name.lower() == "cpu":  # host memory; no peak (MFU is not defined there)
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        base = Device("cpu", host, None, kind="cpu")
    else:
        key = (name or "H100").upper()
        matches = [k for k in GPUS if k.upper() == key] or [k for k in GPUS if k.upper().startswith(key)]
        if not matches:
            raise KeyError(name)
        base = GPUS[matches[0]]
    return replace(base, memory_gib=memory_gib if memory_gib is not None else base.memory_gib,
                   peak_tflops=peak_tflops if peak_tflops is not None else base.peak_tflops)


def run_plan_line(cfg: Any, world_size: int, device_type: str) -> str:
    """The one-line plan of a run as launched (launcher.pretrain prints it at start): the configured layout on
    `world_size` ranks, against this machine's accelerator (its total memory) or host memory."""
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        known = next((d for key, d in GPUS.items() if key.split("-")[0] in name), None)
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        device = Device(name, memory, cfg.logging.peak_tflops or (known.peak_tflops if known else None))
    else:
        device = device_named("cpu")
    return plan_layout(cfg, layout_of(cfg, world_size), device).one_line()


# ------------------------------------------------------------------------------------------------ data
# Tokens/s one core tokenizes and packs for the streamed sources (BlockStream, the bundled sample with an 8k
# SentencePiece tokenizer, measured by benchmarks/data.py; issue 26 measured 976k/s). An estimate: run
# `python -m benchmarks.data` for this machine and corpus. Prepared data (source: indexed) reads a sample in
# tens of microseconds, orders of magnitude faster than any step consumes.
STREAM_TOKENS_PER_CORE_S = 1.0e6


def data_line(cfg: Any, plan: Plan) -> str | None:
    """Whether the data pipeline keeps up with the planned step: tokens/s one data-parallel rank consumes against
    what the configured data mode delivers to it (None without a step time, e.g. on CPU)."""
    if plan.step_time_s is None:
        return None
    from data_pipeline.config import shard_mode
    from data_pipeline.prepared import is_indexed

    dp = plan.layout.data
    consumed = cfg.train.global_batch_size * cfg.data.seq_length / plan.step_time_s / dp
    if is_indexed(cfg.data):
        return (f"data: each data-parallel rank consumes {consumed / 1e3:,.0f}k tokens/s; prepared data "
                f"(source: indexed) reads only its own samples, far faster: data does not bound the step")
    by_blocks = shard_mode(cfg.data.shard_by, dp) == "blocks" and dp > 1
    delivered = STREAM_TOKENS_PER_CORE_S / (dp if by_blocks else 1)
    mode = (f"streaming with shard_by=blocks (every rank tokenizes all {dp} ranks' data)" if by_blocks
            else "streaming with shard_by=documents" if dp > 1 else "streaming")
    verdict = (f"DATA-BOUND: tokenizing a step's data takes about {consumed / delivered:.1f}x the step; prepare "
               f"the data (python -m data_pipeline.prepare, source: indexed)"
               if delivered < consumed else "keeps up")
    return (f"data: each data-parallel rank consumes {consumed / 1e3:,.0f}k tokens/s; {mode} delivers about "
            f"{delivered / 1e3:,.0f}k/s per rank on one core (estimate, benchmarks.data): {verdict}")
