"""Outlier statistics of a model's activations: per-sequence kurtosis and infinity norm.

The protocol of Bondarenko et al. (2023), used by OutEffHop, hooks per family (each family's spec lists its
modules: FamilySpec.outlier_modules), e.g.
  - OPT, per layer j: the outputs of `self_attn.out_proj`, `self_attn_layer_norm`, `fc2`,
    `final_layer_norm` and the layer itself (its output), plus the decoder's final LayerNorm;
  - BERT (post-LN), per layer j: the output of the FFN output dense `output.dense`, the input of the
    output LayerNorm (dense output + residual: where BERT's outliers live; named
    `bert.encoder.layer.{j}.output.LayerNorm:input`) and that LayerNorm's output (the layer's output).
For every sequence the activation is flattened to T*d values and two numbers are taken (one definition,
used everywhere in this project):

    kurtosis  k = mean((x - mu)^4) / (std^4 + 1e-6)   Pearson (non-excess; a Gaussian gives 3),
                                                       std with Bessel's correction (unbiased)
    inf norm  max |x|

Both are averaged over the evaluation set per module, once over all T positions and once without position 0
(`kurtosis_rest`, `inf_norm_rest`: what is left when the first token, the usual attention sink, is set aside).
Summaries: avg kurtosis (mean over modules),
max kurtosis and max inf norm (max over modules), and the max inf norm over FFN outputs (kind "ffn_out":
fc2 / output.dense) and over layer outputs (kind "layer_out") separately, since the final LayerNorm can
dominate the overall maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KURTOSIS_EPS = 1e-6

# A statistics name is a module's name as in model.named_modules() (its output), or that name + INPUT_SUFFIX
# (its first input). Which modules are hooked is the family's choice (FamilySpec.outlier_modules).
INPUT_SUFFIX = ":input"


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
    """Statistics names of the protocol's hooked activations of `model` -> their kind (the family's list)."""
    from model.family import family_of

    return family_of(model.config).outlier_modules(model)


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer statistics name (its first numeric component, e.g. 3 in
    `decoder.layers.3.fc2` or `blocks.3.mlp.fc2`); None for modules outside the layers (a final LayerNorm)."""
    for part in name.split(":", 1)[0].split("."):
        if part.isdigit():
            return int(part)
    return None


def hook_activation(model: nn.Module, name: str, fn: Any) -> torch.utils.hooks.RemovableHandle:
    """Call fn(activation) on every forward of the activation a statistics name denotes: a module's output
    (a forward hook) or, with INPUT_SUFFIX, its first input (a forward pre-hook). Returns the handle."""
    # The hooks return None whatever fn returns: a value would replace the module's inputs or output.
    if name.endswith(INPUT_SUFFIX):
        def pre_hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            fn(inputs[0])
        return model.get_submodule(name[:-len(INPUT_SUFFIX)]).register_forward_pre_hook(pre_hook)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        fn(output[0] if isinstance(output, tuple) else output)
    return model.get_submodule(name).register_forward_hook(hook)


@dataclass
class ModuleStats:
    """Running per-module sums over evaluated sequences."""

    kind: str
    sequences: int = 0
    kurtosis_sum: float = 0.0
    inf_norm_sum: float = 0.0
    inf_norm_peak: float = 0.0
    kurtosis_peak: float = 0.0
    kurtosis_rest_sum: float = 0.0  # without position 0 (activations are [batch, T, d])
    inf_norm_rest_sum: float = 0.0

    def add(self, activation: torch.Tensor) -> None:
        k, inf = kurtosis(activation), inf_norm(activation)
        if activation.dim() >= 3 and activation.shape[1] > 1:
            rest = activation[:, 1:]
            self.kurtosis_rest_sum += float(kurtosis(rest).sum())
            self.inf_norm_rest_sum += float(inf_norm(rest).sum())
        self.sequences += k.numel()
        self.kurtosis_sum += float(k.sum())
        self.inf_norm_sum += float(inf.sum())
        self.kurtosis_peak = max(self.kurtosis_peak, float(k.max()))
        self.inf_norm_peak = max(self.inf_norm_peak, float(inf.max()))

    def to_dict(self) -> dict[str, Any]:
        n = max(self.sequences, 1)
        return {"kind": self.kind, "kurtosis": self.kurtosis_sum / n, "inf_norm": self.inf_norm_sum / n,
                "kurtosis_max": self.kurtosis_peak, "inf_norm_max": self.inf_norm_peak, "sequences": self.sequences,
                "kurtosis_rest": self.kurtosis_rest_sum / n, "inf_norm_rest": self.inf_norm_rest_sum / n}


class OutlierHooks:
    """Context manager: forward (pre-)hooks on the protocol's activations that accumulate ModuleStats.

        with OutlierHooks(model) as hooks:
            model(batch)
        per_module = hooks.results()   # {name: {"kind", "kurtosis", "inf_norm", ...}}

    Hooks only read activations; they are removed on exit, so the model is left as it was.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats = {name: ModuleStats(kind) for name, kind in outlier_modules(model).items()}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> OutlierHooks:
        for name, stats in self.stats.items():
            self._handles.append(hook_activation(self.model, name, stats.add))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def results(self) -> dict[str, dict[str, Any]]:
        return {name: stats.to_dict() for name, stats in self.stats.items()}


def summarize(per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers over modules (see the module docstring)."""
    def peak(kinds: tuple[str, ...] | None, key: str) -> float:
        values = [m[key] for m in per_module.values() if kinds is None or m["kind"] in kinds]
        return max(values) if values else float("nan")

    kurt = [m["kurtosis"] for m in per_module.values()]
    kurt_rest = [m["kurtosis_rest"] for m in per_module.values() if "kurtosis_rest" in m]
    worst = max(per_module, key=lambda name: per_module[name]["inf_norm"])
    return {
        "avg_kurtosis": sum(kurt) / len(kurt),
        "max_kurtosis": max(kurt),
        "max_inf_norm": peak(None, "inf_norm"),
        "ffn_max_inf_norm": peak(("ffn_out",), "inf_norm"),
        "layer_max_inf_norm": peak(("layer_out",), "inf_norm"),
        "worst_module": worst,
        "avg_kurtosis_rest": sum(kurt_rest) / len(kurt_rest) if kurt_rest else float("nan"),
        "max_inf_norm_rest": peak(None, "inf_norm_rest") if kurt_rest else float("nan"),
    }
