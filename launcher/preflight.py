"""Checks of a valid config against this machine, made before any process group, model or file exists:
the attention backend on this device, the precision on this device, and the folders the run writes."""

from __future__ import annotations

import torch

from data_pipeline.writable import check_writable_dir
from launcher.config import RunConfig
from model.attention import resolve_backend
from common.errors import ConfigError


def expected_device() -> torch.device:
    """The device launcher.distributed.init_process_group will pick (CUDA when present, else CPU)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def preflight(cfg: RunConfig) -> None:
    device = expected_device()
    try:
        resolve_backend(cfg.attention.backend, cfg.attention.variant, device)
    except ValueError as error:  # e.g. triton without a GPU or interpreter, sdpa with clipped softmax
        raise ConfigError("attention.backend", cfg.attention.backend, str(error)) from None
    if cfg.attention.backend == "triton" and getattr(cfg.model, "attention_dropout", 0.0) > 0:
        raise ConfigError("attention.backend", "triton", "the fused kernel has no attention dropout; set "
                          "model.attention_dropout=0 or another backend")
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16", "needs a CUDA GPU (on CPU use fp32 or bf16)")
    check_writable_dir(cfg.run_path, "logging.run_dir/run_name")
    if getattr(cfg.data, "cache_dir", None):  # the text families cache tokenizers and corpora there
        check_writable_dir(cfg.data.cache_dir, "data.cache_dir")
