"""Throughput accounting: model FLOPs per token, TFLOP/s per accelerator and MFU.

FLOPs per token come from the model family (FamilySpec.flops_per_token; for the transformers, PaLM /
Megatron's 6 * N_matmul + 12 * num_layers * hidden * seq_length, forward + backward, no recomputation).
"""

from __future__ import annotations


import torch

from common.errors import ConfigError
from model.family import CostModel, ModelSection, Section, family_of

# Dense bf16 peak TFLOP/s per accelerator (vendor datasheets), used when logging.peak_tflops is unset.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


def cost_model(cfg: ModelSection) -> CostModel:
    """The family's planner terms (FamilySpec.cost_model); ConfigError for a family without them."""
    model = family_of(cfg).cost_model()
    if model is None:
        raise ConfigError("model.family", cfg.family, "has no memory model for launcher.plan")
    return model


def flops_per_token(cfg: ModelSection, seq_length: int, data_cfg: Section | None = None) -> float:
    """Training FLOPs per token of the model `cfg` describes at this sequence length (the family's accounting,
    CostModel.flops_per_token, which reads what it needs of the run's data section; None: the family's
    defaults)."""
    return cost_model(cfg).flops_per_token(cfg, seq_length, data_cfg)


def peak_tflops(configured: float | None) -> float | None:
    """Per-accelerator peak: the configured value, else a known GPU's datasheet value, else None (CPU)."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def throughput_metrics(per_s: float, flops_per_unit: float, devices: int, peak: float | None) -> dict[str, float]:
    """TFLOP/s per device (and MFU against `peak`) of `per_s` units a second (tokens, images, windows: the
    family's Throughput unit) at `flops_per_unit` training FLOPs each."""
    tflops = per_s * flops_per_unit / devices / 1e12
    values = {"tflops_per_device": tflops}
    if peak:
        values["mfu"] = tflops / peak
    return values
