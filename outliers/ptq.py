"""W8A8 post-training fake quantization of an OPT or BERT model (the QC/OutEffHop evaluation protocol).

    qmodel = quantize_w8a8(model, PTQSettings())   # a quantized copy; `model` is never touched
    calibrate(qmodel, batches)                     # static activation ranges from training batches
    qmodel(input_ids, labels=labels)               # simulated 8-bit inference

Weights: 8-bit symmetric per-tensor (range by min-max, the BERT recipe, or the clipping that minimises the
squared error on a grid: "mse", the OPT recipe; "auto" picks the family's recipe). Activations: 8-bit
asymmetric per-tensor with static ranges from a running min-max (momentum 0.9) over the calibration
batches, each batch optionally clipped to the (100 - p, p) percentiles first (OPT: p = 99.999).

Quantized, OPT: every Linear weight and output (q, k, v, out_proj, fc1, fc2), LayerNorm outputs, the token
and position embedding weights and their sum, both residual sums of every layer, attention scores,
probabilities and context (and, for gated attention, the gated context that enters out_proj).
Quantized, BERT: every Linear weight and output (q, k, v, out_proj, intermediate.dense, output.dense; the
intermediate dense's output after its GELU, as a fused kernel would hand it to output.dense), every
LayerNorm's output, the word, position and token-type embedding weights and their sum (the embedding
LayerNorm's input), both residual sums of every layer (the inputs of attention.output.LayerNorm and
output.LayerNorm: BERT is post-LN), attention scores, probabilities and context (and the gated context),
exactly as for OPT.
Kept in fp32: the LM / MLM head (OPT: the LM head tied to the token embedding; BERT: the whole
cls.predictions head, i.e. transform dense + GELU + LayerNorm, the decoder tied to the word embeddings and
its bias; the copy's head still reads the fp32 parameters while lookups read a quantized copy), Linear
biases (int32 accumulators in a real kernel), the gate's parameters and sigmoid output, and the learnable
sink logits (softmax parameters, like the gate's).

How: `quantize_w8a8` deep-copies the model and swaps modules, never re-implementing a forward pass: every
Linear -> QuantLinear, LayerNorm -> QuantOutput (its output quantized), Tap (model/taps.py: the residual
sums, the embedding sum, attention scores / probabilities / context / gated context, BERT's GELU output)
-> ActQuantizer, the embedding tied to the output head -> QuantEmbedding, any other weight (embedding
tables, learned positions) quantized in place. The family spec says what stays fp32
(`ptq_fp32_modules`), which embedding is tied to the head (`ptq_tied_embeddings`) and the weight-range
recipe (`ptq_weight_range`). Attention runs its eager path in the copy (`MultiHeadAttention.force_eager`:
scores and probabilities must exist as tensors, which the fused backends never materialise); with every
quantizer off the quantized copy computes what the model computes (tested).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

from common.errors import ProjectError
from model.family import Batch, family_of
from model.taps import Tap

WEIGHT_RANGES = ("mse", "minmax")


@dataclass(frozen=True)
class PTQSettings:
    weight_bits: int = 8
    act_bits: int = 8
    weight_range: str = "auto"  # "mse" (OPT), "minmax" (BERT) or "auto" (the model family's recipe)
    act_percentile: float | None = 99.999  # per-batch clipping before the running min-max; None = plain
    act_momentum: float = 0.9  # running range = momentum * running + (1 - momentum) * batch
    mse_candidates: int = 100  # clipping ratios tried by the weight MSE search
    quantize_weights: bool = True  # False: activations only (tests and ablations)


# ---------------------------------------------------------------- fake quantization, weights

def fake_quant(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max), bit for bit (tested):
    (clamp(round(x * (1/scale)) + zero_point) - zero_point) * scale with the kernel's float32 1/scale, as
    one in-place chain on a single new tensor. Written out because it runs on every activation of every
    W8A8 forward, where it is 4-8x faster on CPU than torch's kernel (which also builds a gradient mask)."""
    inv_scale = float(1.0 / torch.tensor(scale, dtype=torch.float32))
    return x.mul(inv_scale).round_().add_(zero_point).clamp_(quant_min, quant_max).sub_(zero_point).mul_(scale)


def _symmetric_fake_quant(w: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1  # restricted range [-qmax, qmax]: symmetric, zero exact
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -qmax, qmax)


def weight_scale(w: torch.Tensor, bits: int = 8, method: str = "mse", candidates: int = 100) -> float:
    """Scale of the symmetric per-tensor weight quantizer.

    minmax: torch.ao's MinMaxObserver (scale = max|w| / qmax). mse: a search over clipping ratios
    r = i / candidates in (0, 1], scale = r * max|w| / qmax, minimising mean((fq(w) - w)^2). Written by
    hand because torch.ao has no weight MSE observer (its HistogramObserver approximates the error from a
    histogram of an affine range); it is the reference code's grid search, done coarse-to-fine (a grid of
    ~sqrt(candidates) ratios, then every ratio within one coarse step of the best) in ~3 sqrt(candidates)
    evaluations instead of `candidates`: the same answer for an error curve with one minimum. r = 1
    (min-max) is always tried, so "mse" is never worse than "minmax" on the weight.
    """
    if method not in WEIGHT_RANGES:
        raise ValueError(f"unknown weight range method {method!r} (expected one of {WEIGHT_RANGES})")
    qmax = 2 ** (bits - 1) - 1
    observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-qmax, quant_max=qmax)
    observer(w.detach().float())
    scale = float(observer.calculate_qparams()[0])
    if method == "minmax":
        return scale
    flat = w.detach().float().reshape(1, -1)
    step = max(1, round(math.sqrt(candidates)))
    best = _best_ratio(flat, scale, range(candidates, 0, -step), candidates, qmax)
    best = _best_ratio(flat, scale, range(min(candidates, best + step - 1), max(0, best - step), -1), candidates, qmax)
    return scale * (best / candidates)


def _best_ratio(flat: torch.Tensor, scale: float, ratios: range, candidates: int, qmax: int) -> int:
    """The ratio (numerator over `candidates`) of least squared error; ties go to the first (the widest
    range: `ratios` run downwards). The candidates of a chunk are one broadcast [candidates, numel]
    computation of fake_quant's formula (3x faster than torch.fake_quantize_per_channel_affine with one
    "channel" per candidate, and far fewer kernel launches than a loop)."""
    numerators = list(ratios)
    chunk = max(1, (1 << 24) // flat.shape[1])  # at most ~16M elements (64 MB) per step
    errors = []
    for start in range(0, len(numerators), chunk):
        part = numerators[start:start + chunk]
        scales = torch.tensor([scale * (i / candidates) for i in part], dtype=torch.float32, device=flat.device)
        scales = scales[:, None]
        quantized = (flat * (1.0 / scales)).round_().clamp_(-qmax, qmax).mul_(scales)
        errors.append(quantized.sub_(flat).square_().mean(dim=1))
    return numerators[int(torch.cat(errors).argmin())]


def quantize_weight(w: torch.Tensor, settings: PTQSettings) -> torch.Tensor:
    if not settings.quantize_weights:
        return w.detach().clone()
    scale = weight_scale(w, settings.weight_bits, settings.weight_range, settings.mse_candidates)
    return _symmetric_fake_quant(w.detach().float(), scale, settings.weight_bits).to(w.dtype)


# ---------------------------------------------------------------- activations

class PercentileMovingAverageObserver(MovingAverageMinMaxObserver):
    """torch.ao's running min-max, fed each batch's (100 - p, p) percentiles instead of its min/max.

    Percentiles by nearest rank (exact; torch.quantile refuses tensors above 2^24 elements).
    """

    def __init__(self, percentile: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        flat = x_orig.detach().reshape(-1).float()
        if flat.numel() == 0:
            return x_orig
        # The value with `tail` values at or beyond it on each side (tail 1 = plain min / max).
        tail = min(flat.numel(), max(1, math.floor(flat.numel() * (100.0 - self.percentile) / 100.0) + 1))
        low, high = _tail_value(flat, tail, largest=False), _tail_value(flat, tail, largest=True)
        super().forward(torch.stack([low, high]))  # the parent's running average of the clipped range
        return x_orig


def _tail_value(flat: torch.Tensor, k: int, largest: bool, stride: int = 64) -> torch.Tensor:
    """The k-th largest (smallest) value of `flat`, exactly. A plain topk over millions of values is ~100x
    slower than a min/max pass on CPU, so the k-th value of a strided sample first gives a threshold:
    at least k values pass it (the sample's own), typically ~k * stride, and the answer is among them."""
    sample = flat[::stride]
    if sample.numel() >= k and flat.numel() > stride * k:
        threshold = sample.topk(k, largest=largest, sorted=False).values
        threshold = threshold.min() if largest else threshold.max()
        flat = flat[flat >= threshold] if largest else flat[flat <= threshold]
    values = flat.topk(k, largest=largest, sorted=False).values
    return values.min() if largest else values.max()


class ActQuantizer(nn.Module):
    """8-bit asymmetric per-tensor fake quantizer of one activation with a static (calibrated) range.

    mode "off": identity; "observe": identity that records the range; "quantize": fake-quantizes with the
    range frozen by `freeze()`.
    """

    def __init__(self, settings: PTQSettings) -> None:
        super().__init__()
        self.quant_min, self.quant_max = 0, 2 ** settings.act_bits - 1
        kwargs = dict(averaging_constant=1.0 - settings.act_momentum, dtype=torch.quint8,
                      qscheme=torch.per_tensor_affine, quant_min=self.quant_min, quant_max=self.quant_max)
        self.observer = (PercentileMovingAverageObserver(settings.act_percentile, **kwargs)
                         if settings.act_percentile is not None else MovingAverageMinMaxObserver(**kwargs))
        self.mode = "off"
        self.scale, self.zero_point = 1.0, 0

    def freeze(self) -> None:
        if torch.isinf(self.observer.min_val):
            raise RuntimeError("activation quantizer saw no data during calibration")
        scale, zero_point = self.observer.calculate_qparams()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer(x)
        elif self.mode == "quantize":
            return fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return x

    def extra_repr(self) -> str:
        return f"mode={self.mode}, scale={self.scale:.4g}, zero_point={self.zero_point}"


# ---------------------------------------------------------------- quantized building blocks

class QuantLinear(nn.Module):
    """A Linear with a fake-quantized weight (fp32 bias) and a quantized output (quantize_output=False: the
    output is quantized further on, e.g. after an activation by a QuantOutput around the enclosing module)."""

    def __init__(self, linear: nn.Linear, settings: PTQSettings, quantize_output: bool = True) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ProjectError(f"W8A8 evaluation needs plain nn.Linear layers (a single-process model), "
                               f"got {type(linear).__name__}")
        self.register_buffer("weight", quantize_weight(linear.weight, settings))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.output_quant = ActQuantizer(settings) if quantize_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(F.linear(x, self.weight, self.bias))


class QuantOutput(nn.Module):
    """Any module (a LayerNorm, BERT's intermediate) followed by a quantizer of its output; with
    quantize_input, also a quantizer of its (first) input (BERT's post-LN residual sums)."""

    def __init__(self, module: nn.Module, settings: PTQSettings, quantize_input: bool = False) -> None:
        super().__init__()
        self.module = module
        self.input_quant = ActQuantizer(settings) if quantize_input else None
        self.output_quant = ActQuantizer(settings)

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.output_quant(self.module(x, *args))


class QuantEmbedding(nn.Module):
    """Token lookups from a quantized copy of the weight; `.weight` stays the fp32 parameter, which is
    what the tied LM head reads (the LM head is not quantized)."""

    def __init__(self, embedding: nn.Embedding, settings: PTQSettings) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise ProjectError(f"W8A8 evaluation needs a plain nn.Embedding, got {type(embedding).__name__}")
        self.weight = embedding.weight
        self.register_buffer("qweight", quantize_weight(embedding.weight, settings))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.qweight)


# ---------------------------------------------------------------- the whole model

def resolve_settings(model: nn.Module, settings: PTQSettings) -> PTQSettings:
    """`settings` with weight_range "auto" replaced by the model family's recipe."""
    if settings.weight_range != "auto":
        return settings
    return replace(settings, weight_range=family_of(model.config).ptq_weight_range)


def quantize_w8a8(model: nn.Module, settings: PTQSettings = PTQSettings()) -> nn.Module:
    """A fake-quantized fp32 copy of a model (OPTForCausalLM, BertForMaskedLM, ...), quantizers off until
    `calibrate`; `model` is never touched."""
    spec = family_of(model.config)
    settings = resolve_settings(model, settings)
    qmodel = copy.deepcopy(model).float().eval()
    for param in qmodel.parameters():
        param.requires_grad_(False)
    for attention in spec.attention_modules(qmodel):
        attention.force_eager()  # the tapped path: fused backends never materialise scores
    _swap_modules(qmodel, settings, fp32=spec.ptq_fp32_modules(qmodel), tied=spec.ptq_tied_embeddings(qmodel))
    return qmodel


def _swap_modules(qmodel: nn.Module, settings: PTQSettings, fp32: set[str], tied: set[str]) -> None:
    modules = dict(qmodel.named_modules())
    kept = tuple(f"{name}." for name in fp32)
    # A Tap fused with a sibling Linear quantizes that Linear's output after its activation (BERT's GELU).
    fused = {_join(name.rpartition(".")[0], m.fused_with) for name, m in modules.items()
             if isinstance(m, Tap) and m.fused_with is not None}
    for name, module in modules.items():
        if not name or name in fp32 or name.startswith(kept):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        if isinstance(module, nn.Linear):
            replacement: nn.Module | None = QuantLinear(module, settings, quantize_output=name not in fused)
        elif isinstance(module, nn.LayerNorm):
            replacement = QuantOutput(module, settings)
        elif isinstance(module, Tap):
            replacement = ActQuantizer(settings)
        elif name in tied:
            replacement = QuantEmbedding(module, settings)
        else:
            replacement = None
            weight = module._parameters.get("weight")
            if weight is not None:  # an embedding table or learned positions: an untied copy, quantized in place
                weight.data.copy_(quantize_weight(weight, settings))
        if replacement is not None:
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                parent[int(attr)] = replacement
            else:
                setattr(parent, attr, replacement)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_mode(model: nn.Module, mode: str) -> None:
    for quantizer in act_quantizers(model):
        quantizer.mode = mode


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable[Batch | torch.Tensor]) -> nn.Module:
    """Record activation ranges on `batches` (fp activations, quantized weights; a Batch is run on its
    inputs, so MLM examples run on their masked input ids), then freeze them and switch every quantizer on.
    A bare tensor (a test's nn.Sequential input) is run as it is."""
    set_mode(qmodel, "observe")
    device = next(iter([*qmodel.parameters(), *qmodel.buffers()])).device
    seen = 0
    for batch in batches:
        inputs = batch.inputs if isinstance(batch, Batch) else batch
        qmodel(inputs.to(device))
        seen += 1
    if not seen:
        raise ProjectError("W8A8 calibration needs at least one batch (eval.calibration_batches)")
    for quantizer in act_quantizers(qmodel):
        quantizer.freeze()
    set_mode(qmodel, "quantize")
    return qmodel
