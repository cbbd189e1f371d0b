"""W8A8 fake quantization of a STanHop-Net copy, from outliers.ptq's building blocks.

Quantized: every Linear weight and output (segment embedding, Hopfield projections, MLPs, segment merging),
the learned positions, pooling queries and memory patterns (weights), every LayerNorm's input and output
(STanHop is post-LN: the LayerNorm inputs are the residual sums), and in every Hopfield association the
scores, the retrieval weights (probabilities) and the retrieved context that enters out_proj.
Kept fp32: Linear biases (int32 accumulators in a real kernel), entmax's alpha (a normaliser parameter, like
the learnable sink logits) and the per-segment prediction heads, whose summed outputs are the forecast
(the counterpart of the LM head that the OPT/BERT protocol keeps fp32).
Every Hopfield association runs eagerly in the copy (scores and weights must exist as tensors).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from outliers.ptq import ActQuantizer, PTQSettings, QuantLinear, QuantOutput, quantize_weight

from model.stanhop.model import DecoderLayer, STanHopNet


class QuantSeparation(nn.Module):
    """scores -> quantized scores -> the layer's own separation -> quantized retrieval weights."""

    def __init__(self, separation: nn.Module | object, settings: PTQSettings) -> None:
        super().__init__()
        self.separation = separation  # a module (entmax, sparsemax, clipped) or a function (softmax, softmax1)
        self.score_quant = ActQuantizer(settings)
        self.prob_quant = ActQuantizer(settings)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.prob_quant(self.separation(self.score_quant(logits)))


def _quantize_hopfield(hopfield: Hopfield, settings: PTQSettings) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
        module = getattr(hopfield, name)
        if isinstance(module, nn.Linear):
            setattr(hopfield, name, QuantLinear(module, settings))
    if isinstance(hopfield.out_proj, nn.Linear):  # its input is the retrieved context
        hopfield.out_proj = QuantOutput(QuantLinear(hopfield.out_proj, settings, quantize_output=False), settings,
                                        quantize_input=True)
    hopfield.separation = QuantSeparation(hopfield.separation, settings)
    hopfield.separation_name = None  # the eager path: model.attention's fused kernels never expose weights


def _quantize_parameter(parameter: torch.Tensor, settings: PTQSettings) -> None:
    parameter.data.copy_(quantize_weight(parameter, settings))


def quantize_stanhop(model: STanHopNet, settings: PTQSettings) -> STanHopNet:
    """A fake-quantized fp32 copy of `model` (quantizers off until outliers.ptq.calibrate); model is untouched."""
    qmodel = copy.deepcopy(model).float().eval()
    for param in qmodel.parameters():
        param.requires_grad_(False)
    heads = {id(layer.predict) for layer in qmodel.modules() if isinstance(layer, DecoderLayer)}
    hopfields = [m for m in qmodel.modules() if isinstance(m, Hopfield)]
    for hopfield in hopfields:
        _quantize_hopfield(hopfield, settings)
    _quantize_parameter(qmodel.enc_pos, settings)
    _quantize_parameter(qmodel.dec_pos, settings)
    for module in qmodel.modules():
        if isinstance(module, HopfieldPooling):
            _quantize_parameter(module.query, settings)
        elif isinstance(module, HopfieldLayer):
            _quantize_parameter(module.stored, settings)
            if module.values is not None:
                _quantize_parameter(module.values, settings)
    hopfield_ids = {id(m) for h in hopfields for m in h.modules()}
    for parent in list(qmodel.modules()):
        if id(parent) in hopfield_ids or isinstance(parent, (QuantLinear, QuantOutput, QuantSeparation)):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in heads:
                setattr(parent, name, QuantLinear(child, settings))
            elif isinstance(child, nn.LayerNorm):
                setattr(parent, name, QuantOutput(child, settings, quantize_input=True))
    return qmodel
