"""The memory half of launcher/planner.py: per-rank parameters, model states (AdamW, ZeRO 0-3) and the activations
autograd keeps for backward, counted from the model shape the way this code and megatron-core split it.

  - parameters per rank: column/row/vocab-parallel weights / TP, LayerNorms, row biases, positions replicated;
    the busiest pipeline stage holds ceil(L / PP) layers plus the embeddings (and the tied head copy);
  - model states: ZeRO-2/3 in 16-bit come from DeepSpeed's own estimators; the rest by hand (see model_states);
  - activations: the tensors autograd keeps for backward, counted per layer from the code (validated against
    measured CPU peak memory in tests/test_planner.py), times the micro-batches a 1F1B stage holds.
docs/planner.md states the formulas with their sources.
"""

from __future__ import annotations

from launcher.throughput import cost_model
from model import variants
from model.config import ModelConfig
from model.family import Section
from model.recompute import recompute_mode

ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weights (mixed precision, and the ZeRO optimizers' fp32 partition)
FP32_GRAD_BYTES = 4  # fp32 gradients the mixed-precision / ZeRO optimizers step on


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
    OPT: final LN in/out and the head's input 3xh; BERT: the MLM head on the ~data.mlm_probability selected tokens
    (gathered hidden, dense out, GELU out, LN out: 4nh)."""
    x, vocab = seq * micro_batch, m.padded_vocab_size / tp
    kept_other, predicted = cost_model(m).head_activations(m, x, act_bytes, data_cfg)  # the family reads the data section
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
