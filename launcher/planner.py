"""Memory and time plan of a run before launch: per-rank parameters, gradients, optimizer states and activations
for a layout (TP, PP, DP, ZeRO stage, precision, micro batch, activation checkpointing), FLOPs per step and
the expected step time at an assumed MFU, and the layouts that fit a number of GPUs.

Formulas (docs/planner.md states them with their sources):
  - step time: compute at an assumed MFU (plus what recomputation adds), tensor-parallel all-reduces, pipeline
    sends and the 1F1B bubble on the critical path, the data-parallel gradient reduction / ZeRO-3 gathers
    (launcher/comm_model.py costs the collectives on the layout's links);
  - parameters per rank: counted from the model shape the way model/opt.py, model/bert.py and the megatron-core
    layers split them (column/row/vocab-parallel weights / TP, LayerNorms, row biases, positions replicated);
    the busiest pipeline stage holds ceil(L / PP) layers plus the embeddings (and the tied head copy);
  - model states: ZeRO-2/3 in 16-bit come from DeepSpeed's own estimators; the rest by hand (see model_states);
  - activations: the tensors autograd keeps for backward, counted per layer from the code (validated against
    measured CPU peak memory in tests/test_planner.py), times the micro-batches a 1F1B stage holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from launcher.comm_model import Network, all_gather_s, all_reduce_s, network_for, p2p_s
from launcher.throughput import PEAK_TFLOPS, cost_model, flops_per_token
from model import variants
from model.config import ModelConfig
from model.family import Section
from model.recompute import RECOMPUTE_MODES, recompute_mode
from common.errors import ConfigError
from model.family import family_of

GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weights (mixed precision, and the ZeRO optimizers' fp32 partition)
FP32_GRAD_BYTES = 4  # fp32 gradients the mixed-precision / ZeRO optimizers step on
# Tensor-parallel degrees the suggestions try (megatron's advice: within a node).
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float | None  # dense bf16 (GPU) peak; None where unknown (CPU)
    kind: str = "cuda"  # "cuda" or "cpu": decides the attention backend and dropout-mask bytes


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


# ------------------------------------------------------------------------------------------- parameters

def layer_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank (OPT and BERT blocks have the same
    weights: q/k/v column-parallel with bias, out row-parallel (bias replicated), two LayerNorms, an FFN)."""
    h, f, heads = m.hidden_size, m.ffn_hidden_size, m.num_heads
    attention = 3 * (h * h + h) // tp + h * h // tp + h
    ffn = (h * f + f) // tp + f * h // tp + h
    norms = 2 * 2 * h
    local_heads, head_dim = heads // tp, h // heads
    extra = local_heads * len(variants.get(m.attention.variant).head_params)  # e.g. the learnable sink's logits
    if m.attention.gated:
        if m.attention.gate_type == "mlp":
            g = m.attention.gate_hidden
            extra += local_heads * (head_dim * g + g + g + 1)
        else:
            extra += local_heads * (head_dim + 1)
    return attention + ffn + norms + extra


def embedding_params(m: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(first-stage, last-stage) parameters outside the layers on one TP rank. The word embedding is
    vocab-parallel; positions, token types and LayerNorms are replicated. The tied head is the word embedding
    (one copy in one process; DeepSpeed keeps a copy on the first and the last pipeline stage)."""
    return cost_model(m).embedding_params(m, tp)


def total_params(m: ModelConfig) -> int:
    """The single-process model's parameter count (tied weights once), equal to model.num_parameters()."""
    first, last = embedding_params(m)
    tied = m.padded_vocab_size * m.hidden_size if m.tie_word_embeddings else 0
    return m.num_layers * layer_params(m) + first + last - tied


def stage_layers(num_layers: int, pipeline: int) -> list[int]:
    """Layers per pipeline stage, as DeepSpeed's balanced partition of equal-weight layers gives them."""
    base, extra = divmod(num_layers, pipeline)
    return [base + (1 if i < extra else 0) for i in range(pipeline)]


def stage_params(m: ModelConfig, tp: int, pipeline: int, stage: int) -> int:
    first, last = embedding_params(m, tp)
    layers = stage_layers(m.num_layers, pipeline)[stage] * layer_params(m, tp)
    if pipeline == 1:
        tied = m.padded_vocab_size * m.hidden_size // tp if m.tie_word_embeddings else 0
        return layers + first + last - tied
    return layers + (first if stage == 0 else 0) + (last if stage == pipeline - 1 else 0)


# ------------------------------------------------------------------------------------------ model states

def model_states(params: int, largest_layer: int, dp: int, zero_stage: int, precision: str) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states (AdamW) on one rank holding `params` parameters
    (its TP/PP shard) whose ZeRO group has `dp` ranks.

    ZeRO-2/3 with 16-bit weights: DeepSpeed's estimate_zero2/3_model_states_mem_needs give the total (2P + 18P/N;
    4L + 18P/N with L the largest layer), split here into 16-bit weights, the optimizer's fp32 master copy and
    Adam moments (12P/N), and gradients (the remainder: 16-bit + fp32 gradient partitions). By hand, because
    DeepSpeed has no estimator for them: ZeRO-0/1 and fp32 training. There the optimizer keeps 8 bytes of Adam
    moments per parameter, plus a 4-byte fp32 master copy when weights are 16-bit, and the ZeRO-1/2/3
    optimizers always keep an fp32 copy of their partition (DeepSpeed clones it even from fp32 weights)."""
    b = 4 if precision == "fp32" else 2
    mixed = b != 4
    if zero_stage in (2, 3) and mixed:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        if zero_stage == 2:
            _, total = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=dp, cpu_offload=False)
            weights = 2 * params
        else:
            _, total, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=dp,
                                                                cpu_offload=False, cpu_offload_params=False)
            weights = 2 * params / dp + 2 * largest_layer
        optimizer = (MASTER_BYTES + ADAM_STATE_BYTES) * params / dp
        return {"parameters": weights, "gradients": total - weights - optimizer, "optimizer": optimizer}
    if zero_stage == 0:
        grads = b * params + (FP32_GRAD_BYTES * params if mixed else 0)  # 16-bit grads + the fp32 accumulators
        optimizer = ((MASTER_BYTES if mixed else 0) + ADAM_STATE_BYTES) * params
        return {"parameters": float(b * params), "gradients": float(grads), "optimizer": float(optimizer)}
    optimizer = (MASTER_BYTES + ADAM_STATE_BYTES) * params / dp
    fp32_part = FP32_GRAD_BYTES * params / dp if mixed else 0.0  # fp32 weights: the partition's grads are shared
    if zero_stage == 1:
        return {"parameters": float(b * params), "gradients": b * params + fp32_part, "optimizer": optimizer}
    if zero_stage == 2:
        return {"parameters": float(b * params), "gradients": b * params / dp + fp32_part, "optimizer": optimizer}
    weights = b * params / dp + b * largest_layer  # ZeRO-3: the partition + the largest layer gathered
    return {"parameters": weights, "gradients": b * params / dp + b * largest_layer, "optimizer": optimizer}


# ------------------------------------------------------------------------------------------- activations

def materializes_scores(m: ModelConfig, device_kind: str) -> bool:
    """True when the attention backend keeps [heads, T, T] tensors (eager): model/attention.py's `auto` picks
    a fused backend the variant registers (Triton on CUDA for softmax1/learnable_sink, SDPA for softmax/softmax1),
    else eager."""
    backend, variant = m.attention.backend, m.attention.variant
    if backend == "auto":  # a fused backend that `auto` picks on this device kind (model/variants.py)
        return not any(fused.auto_on is None or device_kind in fused.auto_on
                       for fused in variants.get(variant).backends.values())
    return backend == "eager"


def layer_activation_elements(m: ModelConfig, micro_batch: int, seq: int, tp: int,
                              device_kind: str, selective: bool = False) -> tuple[float, float]:
    """(activation elements, dropout-mask elements) one layer keeps for backward for one micro-batch.

    x = seq * micro_batch tokens, h hidden, f FFN, a heads, t TP:
      OPT (pre-LN):  4xh (LN1 in/out, LN2 in/out, replicated) + 5xh/t (q, k, v, attention output, the
                     contiguous context for out_proj) + xf/t (ReLU output, fc2's input)
      BERT (post-LN): 4xh (layer input, attention LN in/out, output LN in) + 5xh/t + 2xf/t (GELU in and out)
      + xh/t when gated (the ungated context the gate multiplies), + 3 a T^2 b / t when the backend materialises
      the scores (logits, masked logits, probabilities), dropout masks 2xh per layer (+ a T^2 b / t eager
      attention dropout). Selective recompute keeps none of attention's core: neither its output (xh/t) nor the
      scores and their dropout mask."""
    x, h, f, heads = seq * micro_batch, m.hidden_size, m.ffn_hidden_size, m.num_heads
    ffn_terms = cost_model(m).ffn_activation_terms
    elements = 4 * x * h + (4 if selective else 5) * x * h / tp + ffn_terms * x * f / tp
    if m.attention.gated:
        elements += x * h / tp
    eager = materializes_scores(m, device_kind) and not selective
    if eager:
        elements += 3 * heads * seq * seq * micro_batch / tp
    masks = 2 * x * h if m.dropout > 0 else 0.0
    if m.attention_dropout > 0 and eager:
        masks += heads * seq * seq * micro_batch / tp
    return elements, masks


def head_activation_bytes(m: ModelConfig, micro_batch: int, seq: int, tp: int, act_bytes: int,
                          data_cfg: Section | None = None) -> tuple[float, float]:
    """(kept, backward peak extra) bytes of the output end for one micro-batch on the last stage.

    The loss keeps fp32 log-probabilities [tokens, V/t] (losses are computed in fp32 whatever the weights);
    backward briefly holds their gradient and the logits' gradient (fp32, + a 16-bit cast): 2-2.5x that.
    OPT: final LN in/out and the head's input 3xh; BERT: the MLM head on the ~data.mlm_probability selected
    tokens (gathered hidden, dense out, GELU out, LN out: 4nh). `data_cfg`: the run's data section, which the
    family's cost model reads (None: the family's defaults)."""
    x, vocab = seq * micro_batch, m.padded_vocab_size / tp
    kept_other, predicted = cost_model(m).head_activations(m, x, act_bytes, data_cfg)
    logprobs = 4 * predicted * vocab
    backward = (4 + 4 + (act_bytes if act_bytes != 4 else 0)) * predicted * vocab
    return kept_other + logprobs, backward


def activation_bytes(m: ModelConfig, *, micro_batch: int, seq: int, tp: int, pipeline: int, stage: int,
                     in_flight: int, checkpointing: str | bool, act_bytes: int, device_kind: str,
                     data_cfg: Section | None = None) -> float:
    """Peak activation bytes of pipeline stage `stage` holding `in_flight` micro-batches (1F1B), with
    `checkpointing` one of RECOMPUTE_MODES."""
    mode = recompute_mode(checkpointing)
    layers = stage_layers(m.num_layers, pipeline)[stage]
    elements, masks = layer_activation_elements(m, micro_batch, seq, tp, device_kind, selective=mode == "selective")
    mask_bytes = 1 if device_kind == "cuda" else act_bytes  # bool masks on CUDA, float noise on CPU
    per_layer = elements * act_bytes + masks * mask_bytes
    full_elements, full_masks = layer_activation_elements(m, micro_batch, seq, tp, device_kind)
    full_layer = full_elements * act_bytes + full_masks * mask_bytes
    if mode == "full":  # each layer keeps its input; one layer is recomputed at a time
        kept = layers * in_flight * seq * micro_batch * m.hidden_size * act_bytes + full_layer
    else:  # selective: one layer's attention core is recomputed at a time
        kept = layers * in_flight * per_layer + (full_layer - per_layer)
    if stage == 0 and cost_model(m).embedding_norm:  # embedding LayerNorm input (+ dropout mask)
        kept += in_flight * seq * micro_batch * m.hidden_size * (act_bytes + (mask_bytes if m.dropout > 0 else 0))
    if stage == pipeline - 1:  # the last stage finishes each micro-batch's backward before the next forward
        head, backward = head_activation_bytes(m, micro_batch, seq, tp, act_bytes, data_cfg)
        kept += head + backward
    return kept


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


def step_time_terms(cfg: Any, layout: LayoutChoice, device: Device, network: Network, mfu: float,
                    params: int) -> dict[str, float]:
    """The step time's terms in seconds (their sum is the step time); `params` are the busiest rank's.

    Critical path: (accumulation + p - 1) 1F1B slots, each a micro-batch's forward and backward on the busiest
    stage: its compute at `mfu` of the peak, its tensor-parallel all-reduces (2 in the forward, 2 in the backward
    per layer, +2 with full recompute; the vocab-parallel embedding's and cross entropy's; synchronous, as in
    Megatron, so never overlapped) and, with pipelines, one activation send and one gradient send. The data-
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
    compute = hardware / (world * device.peak_tflops * 1e12 * mfu)
    x = layout.micro_batch_size * seq
    activation = x * m.hidden_size * b
    tp_per_micro = 0.0
    if t > 1:
        link = network.link(t)
        per_layer = 4 + (2 if layout.activation_checkpointing == "full" else 0)
        layers = max(stage_layers(m.num_layers, p))
        tp_per_micro = ((layers * per_layer + 1) * all_reduce_s(activation, t, link)
                        + 3 * all_reduce_s(4 * x, t, link))  # embedding; cross entropy's max, sum, target logit
    p2p_per_micro = 2 * p2p_s(activation, network.link(t * d * p)) if p > 1 else 0.0
    slot = compute / accumulation + tp_per_micro + p2p_per_micro
    terms = {"compute": compute, "tensor_parallel": accumulation * tp_per_micro,
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
    from data_pipeline.prepared import is_indexed

    dp = plan.layout.data
    consumed = cfg.train.global_batch_size * cfg.data.seq_length / plan.step_time_s / dp
    if is_indexed(cfg.data):
        return (f"data: each data-parallel rank consumes {consumed / 1e3:,.0f}k tokens/s; prepared data "
                f"(source: indexed) reads only its own samples, far faster: data does not bound the step")
    by_blocks = cfg.data.shard_by == "blocks" and dp > 1
    delivered = STREAM_TOKENS_PER_CORE_S / (dp if by_blocks else 1)
    mode = (f"streaming with shard_by=blocks (every rank tokenizes all {dp} ranks' data)" if by_blocks
            else "streaming with shard_by=documents" if dp > 1 else "streaming")
    verdict = (f"DATA-BOUND: tokenizing a step's data takes about {consumed / delivered:.1f}x the step; prepare "
               f"the data (python -m data_pipeline.prepare, source: indexed)"
               if delivered < consumed else "keeps up")
    return (f"data: each data-parallel rank consumes {consumed / 1e3:,.0f}k tokens/s; {mode} delivers about "
            f"{delivered / 1e3:,.0f}k/s per rank on one core (estimate, benchmarks.data): {verdict}")
