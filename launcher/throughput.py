"""Throughput accounting: model FLOPs per token, TFLOP/s per accelerator and MFU.

FLOPs per token (forward + backward = 3 x forward, no recomputation counted), as in PaLM / Megatron:
    6 * N_matmul + 12 * num_layers * hidden * seq_length
N_matmul counts every weight that takes part in a matrix multiply per token (all layer weights and
the LM head, which is the tied embedding); the attention term covers QK^T and PV. BERT's MLM head
(transform + tied decoder) runs only on the selected positions: it counts with that fraction.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig

# Dense bf16 peak TFLOP/s per accelerator (vendor datasheets), used when logging.peak_tflops is unset.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


def flops_per_token(cfg: ModelConfig, seq_length: int, mlm_probability: float = 0.15) -> float:
    d, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    per_layer = 4 * d * d + 2 * d * f  # q, k, v, out + fc1, fc2
    head = cfg.padded_vocab_size * d
    if cfg.family == "bert":
        head = (head + d * d) * mlm_probability
    matmul_params = layers * per_layer + head
    return 6.0 * matmul_params + 12.0 * layers * d * seq_length


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


def throughput_metrics(tokens_per_s: float, flops_token: float, devices: int, peak: float | None) -> dict[str, float]:
    tflops = tokens_per_s * flops_token / devices / 1e12
    values = {"tflops_per_device": tflops}
    if peak:
        values["mfu"] = tflops / peak
    return values
