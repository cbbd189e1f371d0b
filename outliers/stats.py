"""Outlier statistics of an OPT model's activations: per-sequence kurtosis and infinity norm.

The protocol of Bondarenko et al. (2023), used by OutEffHop: forward hooks on, per layer j,
`self_attn.out_proj`, `self_attn_layer_norm`, `fc2`, `final_layer_norm` and the layer itself (its
output), plus the decoder's final LayerNorm. For every sequence the module's output is flattened to
T*d values and two numbers are taken (one definition, used everywhere in this project):

    kurtosis  k = mean((x - mu)^4) / (std^4 + 1e-6)   Pearson (non-excess; a Gaussian gives 3),
                                                       std with Bessel's correction (unbiased)
    inf norm  max |x|

Both are averaged over the evaluation set per module. Summaries: avg kurtosis (mean over modules),
max kurtosis and max inf norm (max over modules), and the max inf norm over FFN outputs (fc2) and over
layer outputs separately, since the final LayerNorm can dominate the overall maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KURTOSIS_EPS = 1e-6

# Kind of hooked module -> name relative to decoder.layers.{j} (None: the layer itself).
LAYER_MODULES: dict[str, str | None] = {
    "attn_out_proj": "self_attn.out_proj",
    "attn_layer_norm": "self_attn_layer_norm",
    "ffn_out": "fc2",
    "ffn_layer_norm": "final_layer_norm",
    "layer_out": None,
}
FINAL_LAYER_NORM = "decoder.final_layer_norm"


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Per-sequence Pearson kurtosis of activations [batch, ...] -> [batch] (float64).

    Each sequence is flattened; k = mean((x - mu)^4) / (std^4 + 1e-6) with the unbiased std. For n values
    this is scipy.stats.kurtosis(x, fisher=False) * m2^2 / (s^4 + 1e-6), m2 the biased and s^2 the
    unbiased variance: the same number to within ((n - 1) / n)^2.
    """
    # float32 passes with torch's cascaded sums (~1e-7 relative to float64), the ratio in float64: several
    # times faster on CPU than float64 tensors or torch.var_mean's row-wise Welford pass.
    flat = x.detach().reshape(x.shape[0], -1).float()
    squared = (flat - flat.mean(dim=1, keepdim=True)).square_()
    variance = squared.sum(dim=1).double() / (flat.shape[1] - 1)  # unbiased
    fourth = squared.square_().mean(dim=1).double()
    return fourth / (variance.square() + KURTOSIS_EPS)


def inf_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sequence infinity norm max|x| of activations [batch, ...] -> [batch] (float64)."""
    low, high = torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)  # one pass, no |x| copy
    return torch.maximum(low.abs(), high.abs()).double()


def outlier_modules(model: nn.Module) -> dict[str, str]:
    """Names (as in model.named_modules()) of the hooked modules of an OPTForCausalLM -> their kind."""
    names: dict[str, str] = {}
    for j in range(len(model.decoder.layers)):
        for kind, suffix in LAYER_MODULES.items():
            names[f"decoder.layers.{j}" + (f".{suffix}" if suffix else "")] = kind
    names[FINAL_LAYER_NORM] = "final_layer_norm"
    return names


@dataclass
class ModuleStats:
    """Running per-module sums over evaluated sequences."""

    kind: str
    sequences: int = 0
    kurtosis_sum: float = 0.0
    inf_norm_sum: float = 0.0
    inf_norm_peak: float = 0.0
    kurtosis_peak: float = 0.0

    def add(self, activation: torch.Tensor) -> None:
        k, inf = kurtosis(activation), inf_norm(activation)
        self.sequences += k.numel()
        self.kurtosis_sum += float(k.sum())
        self.inf_norm_sum += float(inf.sum())
        self.kurtosis_peak = max(self.kurtosis_peak, float(k.max()))
        self.inf_norm_peak = max(self.inf_norm_peak, float(inf.max()))

    def to_dict(self) -> dict[str, Any]:
        n = max(self.sequences, 1)
        return {"kind": self.kind, "kurtosis": self.kurtosis_sum / n, "inf_norm": self.inf_norm_sum / n,
                "kurtosis_max": self.kurtosis_peak, "inf_norm_max": self.inf_norm_peak, "sequences": self.sequences}


class OutlierHooks:
    """Context manager: forward hooks on the protocol's modules that accumulate ModuleStats.

        with OutlierHooks(model) as hooks:
            model(batch)
        per_module = hooks.results()   # {name: {"kind", "kurtosis", "inf_norm", ...}}

    Hooks only read outputs; they are removed on exit, so the model is left as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats = {name: ModuleStats(kind) for name, kind in outlier_modules(model).items()}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> OutlierHooks:
        for name in self.stats:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):  # noqa: ANN202 - a torch hook signature
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.stats[name].add(output[0] if isinstance(output, tuple) else output)
        return hook

    def results(self) -> dict[str, dict[str, Any]]:
        return {name: stats.to_dict() for name, stats in self.stats.items()}


def summarize(per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers over modules (see the module docstring)."""
    def peak(kinds: tuple[str, ...] | None, key: str) -> float:
        values = [m[key] for m in per_module.values() if kinds is None or m["kind"] in kinds]
        return max(values) if values else float("nan")

    kurt = [m["kurtosis"] for m in per_module.values()]
    worst = max(per_module, key=lambda name: per_module[name]["inf_norm"])
    return {
        "avg_kurtosis": sum(kurt) / len(kurt),
        "max_kurtosis": max(kurt),
        "max_inf_norm": peak(None, "inf_norm"),
        "ffn_max_inf_norm": peak(("ffn_out",), "inf_norm"),
        "layer_max_inf_norm": peak(("layer_out",), "inf_norm"),
        "worst_module": worst,
    }
