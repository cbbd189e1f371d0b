"""Attention-sink and no-op statistics of a model, per layer and head (issue 17).

Per layer j, averaged over the evaluated sequences (b = one sequence, T positions, H heads):
  bos_mass[h]           mean over queries t >= 1 of p[t, 0]: the attention mass on position 0 (BOS, [CLS]);
                        a head is a sink head when it is above SINK_THRESHOLD (sink_head_share: their share)
  nothing_mass[h]       mean over all queries of 1 - sum_s p[t, s]: the mass given to nothing (softmax1, the
                        learnable sink, clipped variants; 0 for softmax)
  value_norm_ratio[h]   ||v_0|| / median_t ||v_t||: a small first value makes attention to it a no-op
  residual_norm_ratio   ||h_0|| / median_t ||h_t|| of the residual stream after the layer (OPT: the layer's
                        output; BERT: the input of the output LayerNorm), the massive first-token activation
  gate_mean[h], gate_first[h]   gated attention: the gate over all positions / at position 0
The probabilities are recomputed eagerly from the layer's own q/k/v projections in forward pre-hooks, in the
evaluation copy of the model only (fused backends never materialise them); training is never touched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model.attention import MultiHeadAttention, _causal_mask
from model.family import family_of
from model.variants import probabilities
from outliers.stats import hook_activation

SINK_THRESHOLD = 0.3  # Gu et al. 2024 count a head as a sink head above this mass on the first token
# Headline numbers of summarize_sinks, in print order (None where a variant has no such quantity).
SINK_SUMMARY_KEYS = ("sink_head_share", "bos_mass_mean", "max_residual_norm_ratio", "mean_value_norm_ratio",
                     "nothing_mass_mean", "gate_mean")
PER_HEAD_KEYS = ("bos_mass", "nothing_mass", "value_norm_ratio", "gate_mean", "gate_first")


def first_over_median(x: torch.Tensor) -> torch.Tensor:
    """||x[..., 0, :]|| / median_t ||x[..., t, :]|| for [..., T, d] -> [...] (float64); T >= 1."""
    norms = x.detach().double().norm(dim=-1)
    return norms[..., 0] / norms.median(dim=-1).values.clamp_min(1e-12)


def attention_probabilities(attn: MultiHeadAttention, x: torch.Tensor,
                            attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [B, H, T, T], values [B, H, T, head_dim]) of one attention module on its input x, as its
    eager backend computes them."""
    q, k, v = (attn._split_heads(proj(x)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = attn_mask
    if attn.causal:
        causal = _causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    sink = attn.sink_logit.view(-1, 1, 1).to(logits.dtype) if attn.sink_logit is not None else None
    return probabilities(logits, attn.variant, sink_logit=sink, **attn.variant_params), v


def head_statistics(probs: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence, per-head numbers [B, H] from probabilities [B, H, T, T] and values [B, H, T, d]."""
    probs = probs.double()
    later = probs[..., 1:, 0] if probs.shape[-2] > 1 else probs[..., :, 0]  # queries t >= 1 (query 0 sees only 0)
    return {"bos_mass": later.mean(dim=-1), "nothing_mass": (1.0 - probs.sum(dim=-1)).mean(dim=-1),
            "value_norm_ratio": first_over_median(values)}


class SinkHooks:
    """Context manager: hooks on every attention module, its gate and the residual stream that accumulate the
    statistics of the module docstring over every forward pass; `results()` gives one dict per layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        spec = family_of(model.config)
        self.attention = spec.attention_modules(model)
        self.residual = spec.residual_streams(model)  # per layer: the residual stream after it
        self.sums: list[dict[str, Any]] = [{} for _ in self.attention]
        self.counts: list[dict[str, int]] = [{} for _ in self.attention]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _add(self, layer: int, key: str, per_sequence: torch.Tensor) -> None:
        """Add a [B, ...] batch of per-sequence values to the running sum of `key`."""
        total = per_sequence.detach().double().sum(dim=0).cpu()
        sums, counts = self.sums[layer], self.counts[layer]
        sums[key] = total if key not in sums else sums[key] + total
        counts[key] = counts.get(key, 0) + per_sequence.shape[0]

    def __enter__(self) -> SinkHooks:
        for j, attn in enumerate(self.attention):
            self._handles.append(attn.register_forward_pre_hook(self._attention_hook(j), with_kwargs=True))
            if attn.gate is not None:
                self._handles.append(attn.gate.register_forward_hook(self._gate_hook(j)))
            if j < len(self.residual):  # a family without residual_streams gets no residual ratio
                self._handles.append(hook_activation(self.model, self.residual[j], self._residual_hook(j)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _attention_hook(self, layer: int) -> Any:
        attn = self.attention[layer]

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            with torch.no_grad():
                for b in range(x.shape[0]):  # one sequence at a time: [H, T, T] at most in memory
                    row_mask = None if mask is None else mask[b:b + 1] if mask.shape[0] > 1 else mask
                    probs, values = attention_probabilities(attn, x[b:b + 1], row_mask)
                    for key, value in head_statistics(probs, values).items():
                        self._add(layer, key, value)
        return hook

    def _gate_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, gate: torch.Tensor) -> None:  # [B, H, T, 1]
            self._add(layer, "gate_mean", gate[..., 0].mean(dim=-1))
            self._add(layer, "gate_first", gate[..., 0, 0])
        return hook

    def _residual_hook(self, layer: int) -> Any:
        return lambda hidden: self._add(layer, "residual_norm_ratio", first_over_median(hidden))

    def results(self) -> list[dict[str, Any]]:
        """One dict per layer: the per-head lists of PER_HEAD_KEYS (None where absent), sink_head_share,
        bos_mass_mean and residual_norm_ratio."""
        layers = []
        for j, (sums, counts) in enumerate(zip(self.sums, self.counts)):
            means = {key: (sums[key] / counts[key]).tolist() for key in sums}
            bos = means.get("bos_mass") or []
            layers.append({
                "layer": j, **{key: means.get(key) for key in PER_HEAD_KEYS},
                "sink_head_share": sum(m > SINK_THRESHOLD for m in bos) / len(bos) if bos else None,
                "bos_mass_mean": sum(bos) / len(bos) if bos else None,
                "residual_norm_ratio": means.get("residual_norm_ratio"),
            })
        return layers


def summarize_sinks(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """SINK_SUMMARY_KEYS over all layers and heads (None when no layer has the quantity)."""
    def flat(key: str) -> list[float]:
        return [v for layer in layers for v in (layer.get(key) or [])]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    bos = flat("bos_mass")
    residual = [layer["residual_norm_ratio"] for layer in layers if layer.get("residual_norm_ratio") is not None]
    return {"sink_head_share": mean([float(m > SINK_THRESHOLD) for m in bos]), "bos_mass_mean": mean(bos),
            "max_residual_norm_ratio": max(residual) if residual else None,
            "mean_value_norm_ratio": mean(flat("value_norm_ratio")), "nothing_mass_mean": mean(flat("nothing_mass")),
            "gate_mean": mean(flat("gate_mean"))}


def format_sink_table(layers: list[dict[str, Any]]) -> str:
    """One row per layer: the head means and the sink-head share."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            value = sum(value) / len(value) if value else float("nan")
        return f"{value:.3g}"

    rows = [("layer", "BOS mass", "sink heads", "residual 0/median", "value 0/median", "mass to nothing", "gate")]
    for layer in layers:
        rows.append((str(layer["layer"]), cell(layer["bos_mass_mean"]), cell(layer["sink_head_share"]),
                     cell(layer["residual_norm_ratio"]), cell(layer["value_norm_ratio"]),
                     cell(layer["nothing_mass"]), cell(layer["gate_mean"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
