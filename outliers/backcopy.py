"""Task-aware sink statistics of the Bigram-Backcopy task (data.source: bigram_backcopy; Guo et al. 2024).

The dormant head of Guo et al. attends to BOS from the queries where it has nothing to do (non-trigger
characters: the next one follows the bigram table) and does its work (copy the character before the
trigger) from trigger queries. outliers/sinks.py averages over both kinds of query and so understates it;
here every quantity is split by the query's token, per layer and head:
  bos_mass_{trigger,non_trigger}[h]      mean over those queries t >= 1 of p[t, 0]
  nothing_mass_{trigger,non_trigger}[h]  mean of 1 - sum_s p[t, s] (softmax1, learnable sink; 0 for softmax)
  gate_{trigger,non_trigger}[h]          the gate's value at those queries (gated attention; None otherwise)
  bos_value_norm[h], median_value_norm[h]   ||v_0|| and median_t ||v_t|| of the head's values (per sequence,
                                          averaged): a sink's BOS value shrinks so that attending to it is a no-op
  bos_residual_norm, median_residual_norm   ||h_0|| and median_t ||h_t|| of the residual stream after the layer
and the next-token loss split by the input token: `backcopy_loss` where it is a trigger (the target is the
copy of the character before it), `bigram_loss` where it is any other character (targets that are special
tokens, e.g. the final EOS, are left out of both).
Query and loss means are over all such positions of all evaluated sequences (token-weighted).

The headline (BACKCOPY_KEYS) follows the sink head: the layer and head with the largest non-trigger BOS
mass, and reports its numbers; the residual norms are the largest over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.family import family_of
from outliers.sinks import attention_probabilities
from outliers.stats import hook_activation

# Headline numbers (an evaluation's flat keys; None where a model has no such quantity), in print order.
BACKCOPY_KEYS = ("bos_mass_non_trigger", "bos_mass_trigger", "backcopy_loss", "bigram_loss", "bos_value_norm",
                 "bos_value_norm_ratio", "bos_residual_norm", "bos_residual_norm_ratio", "nothing_mass_non_trigger",
                 "nothing_mass_trigger", "gate_non_trigger", "gate_trigger", "sink_layer", "sink_head")
QUERY_KEYS = ("bos_mass", "nothing_mass", "gate")  # split by query kind: <key>_trigger, <key>_non_trigger
KINDS = ("trigger", "non_trigger")


def query_kinds(tokens: torch.Tensor, trigger_ids: Sequence[int], first_token_id: int) -> dict[str, torch.Tensor]:
    """Bool masks [B, T] of the trigger and non-trigger queries among positions t >= 1 (query 0 sees only
    BOS) whose token is a character, i.e. at least `first_token_id` (specials such as EOS are neither)."""
    is_trigger = torch.isin(tokens, torch.tensor(list(trigger_ids), device=tokens.device))
    counted = tokens >= first_token_id
    counted[:, 0] = False
    return {"trigger": counted & is_trigger, "non_trigger": counted & ~is_trigger}


def split_query_sums(per_query: torch.Tensor, kinds: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """per_query [B, H, T] -> {kind: (sum over those queries [H], their number [H])}."""
    out = {}
    for kind, mask in kinds.items():
        m = mask[:, None, :].to(per_query.dtype)
        out[kind] = ((per_query * m).sum(dim=(0, 2)), m.sum(dim=(0, 2)).expand(per_query.shape[1]))
    return out


def task_losses(token_losses: torch.Tensor, tokens: torch.Tensor,
                trigger_ids: Sequence[int], first_token_id: int) -> dict[str, tuple[float, float]]:
    """Per-position losses [B, T-1] of the shifted prediction (position t predicts token t+1) of `tokens`
    [B, T] -> {"backcopy": (loss sum, positions), "bigram": (...)}: split by the input token at t."""
    kinds = query_kinds(tokens[:, :-1], trigger_ids, first_token_id)
    character_target = tokens[:, 1:] >= first_token_id
    losses = token_losses.detach().double()
    return {name: (float((losses * (kinds[kind] & character_target)).sum()),
                   float((kinds[kind] & character_target).sum()))
            for name, kind in (("backcopy", "trigger"), ("bigram", "non_trigger"))}


class BackcopyHooks:
    """Context manager: hooks that accumulate the module docstring's statistics over every forward pass of a
    causal LM (OPT) on bigram_backcopy blocks; `results()` per layer, `summary()` the headline."""

    def __init__(self, model: nn.Module, trigger_ids: Sequence[int], first_token_id: int) -> None:
        self.model, self.trigger_ids, self.first_token_id = model, tuple(trigger_ids), first_token_id
        spec = family_of(model.config)
        self.attention = spec.attention_modules(model)
        self.residual = spec.residual_streams(model)
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in self.attention]
        self.losses = {"backcopy": [0.0, 0.0], "bigram": [0.0, 0.0]}
        self._tokens: torch.Tensor | None = None  # the input ids of the forward pass in progress
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _add(self, layer: int, key: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        sums = self.sums[layer]
        total = total.detach().double().cpu()
        count = torch.as_tensor(count, dtype=torch.float64).cpu().expand_as(total)
        if key in sums:
            sums[key] = sums[key] + total
            sums[key + "/count"] = sums[key + "/count"] + count
        else:
            sums[key], sums[key + "/count"] = total, count.clone()

    def __enter__(self) -> BackcopyHooks:
        self._handles.append(self.model.register_forward_pre_hook(self._tokens_hook, with_kwargs=True))
        for j, attn in enumerate(self.attention):
            self._handles.append(attn.register_forward_pre_hook(self._attention_hook(j), with_kwargs=True))
            if attn.gate is not None:
                self._handles.append(attn.gate.register_forward_hook(self._gate_hook(j)))
            if j < len(self.residual):
                self._handles.append(hook_activation(self.model, self.residual[j], self._residual_hook(j)))
        self._handles.append(self.model.decoder.final_layer_norm.register_forward_hook(self._loss_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _tokens_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._tokens = args[0] if args else kwargs["input_ids"]

    def _kinds(self) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            raise RuntimeError("BackcopyHooks saw an attention call outside a model forward")
        return query_kinds(self._tokens, self.trigger_ids, self.first_token_id)

    def _attention_hook(self, layer: int) -> Any:
        attn = self.attention[layer]

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            kinds = self._kinds()
            with torch.no_grad():
                for b in range(x.shape[0]):  # one sequence at a time: [H, T, T] at most in memory
                    row_mask = None if mask is None else mask[b:b + 1] if mask.shape[0] > 1 else mask
                    probs, values = attention_probabilities(attn, x[b:b + 1], row_mask)
                    probs = probs.double()
                    row_kinds = {k: m[b:b + 1] for k, m in kinds.items()}
                    for key, per_query in (("bos_mass", probs[..., 0]), ("nothing_mass", 1.0 - probs.sum(dim=-1))):
                        for kind, (total, count) in split_query_sums(per_query, row_kinds).items():
                            self._add(layer, f"{key}_{kind}", total, count)
                    norms = values.detach().double().norm(dim=-1)[0]  # [H, T]
                    self._add(layer, "bos_value_norm", norms[:, 0], 1.0)
                    self._add(layer, "median_value_norm", norms.median(dim=-1).values, 1.0)
        return hook

    def _gate_hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, gate: torch.Tensor) -> None:  # [B, H, T, 1]
            for kind, (total, count) in split_query_sums(gate[..., 0].double(), self._kinds()).items():
                self._add(layer, f"gate_{kind}", total, count)
        return hook

    def _residual_hook(self, layer: int) -> Any:
        def hook(hidden: torch.Tensor) -> None:  # [B, T, d]
            norms = hidden.detach().double().norm(dim=-1)
            self._add(layer, "bos_residual_norm", norms[:, 0].sum(), norms.shape[0])
            self._add(layer, "median_residual_norm", norms.median(dim=-1).values.sum(), norms.shape[0])
        return hook

    def _loss_hook(self, _module: nn.Module, _inputs: Any, hidden: torch.Tensor) -> None:
        tokens = self._tokens
        with torch.no_grad():
            losses, _ = self.model.token_losses(hidden, tokens)
        for name, (total, count) in task_losses(losses, tokens, self.trigger_ids, self.first_token_id).items():
            self.losses[name][0] += total
            self.losses[name][1] += count

    def results(self) -> list[dict[str, Any]]:
        """One dict per layer: per-head lists of the split query means and the value norms, and the residual
        norms (None where absent, e.g. the gate of an ungated model)."""
        layers = []
        for j, sums in enumerate(self.sums):
            def mean(key: str) -> Any:
                if key not in sums:
                    return None
                return (sums[key] / sums[key + "/count"].clamp_min(1)).tolist()  # per head, or a number
            layer: dict[str, Any] = {"layer": j}
            for key in QUERY_KEYS:
                for kind in KINDS:
                    layer[f"{key}_{kind}"] = mean(f"{key}_{kind}")
            for key in ("bos_value_norm", "median_value_norm", "bos_residual_norm", "median_residual_norm"):
                layer[key] = mean(key)
            layers.append(layer)
        return layers

    def summary(self) -> dict[str, Any]:
        return summarize_backcopy(self.results(), {k: (v[0] / v[1] if v[1] else None) for k, v in self.losses.items()})


def summarize_backcopy(layers: list[dict[str, Any]], losses: dict[str, float | None]) -> dict[str, Any]:
    """BACKCOPY_KEYS from per-layer results and the {"backcopy", "bigram"} mean losses."""
    heads = [(layer["bos_mass_non_trigger"][h], j, h) for j, layer in enumerate(layers)
             for h in range(len(layer.get("bos_mass_non_trigger") or []))]
    out: dict[str, Any] = {key: None for key in BACKCOPY_KEYS}
    out["backcopy_loss"], out["bigram_loss"] = losses.get("backcopy"), losses.get("bigram")
    if heads:
        _, j, h = max(heads)
        layer = layers[j]

        def at(key: str) -> float | None:
            return layer[key][h] if layer.get(key) is not None else None

        out.update({"sink_layer": j, "sink_head": h, "bos_value_norm": at("bos_value_norm")})
        for key in QUERY_KEYS:
            for kind in KINDS:
                out[f"{key}_{kind}"] = at(f"{key}_{kind}")
        median = at("median_value_norm")
        out["bos_value_norm_ratio"] = out["bos_value_norm"] / median if median else None
    residual = [(layer["bos_residual_norm"], layer["median_residual_norm"]) for layer in layers
                if layer.get("bos_residual_norm") is not None]
    if residual:
        bos, median = max(residual)
        out["bos_residual_norm"] = bos
        out["bos_residual_norm_ratio"] = bos / median if median else None
    return out


def format_backcopy_table(layers: list[dict[str, Any]]) -> str:
    """One row per layer and head: BOS mass from trigger / non-trigger queries, value and residual norms."""
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3g}"

    rows = [("layer", "head", "BOS non-trigger", "BOS trigger", "nothing non-trigger", "gate non-trigger",
             "BOS value norm", "median value norm", "BOS residual", "median residual")]
    for layer in layers:
        for h in range(len(layer.get("bos_mass_non_trigger") or [])):
            def at(key: str) -> Any:
                return layer[key][h] if layer.get(key) is not None else None
            rows.append((str(layer["layer"]), str(h), cell(at("bos_mass_non_trigger")), cell(at("bos_mass_trigger")),
                         cell(at("nothing_mass_non_trigger")), cell(at("gate_non_trigger")),
                         cell(at("bos_value_norm")), cell(at("median_value_norm")),
                         cell(layer.get("bos_residual_norm")), cell(layer.get("median_residual_norm"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
