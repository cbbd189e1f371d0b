"""What a family's Hugging Face adapter provides (model/<family>/hf.py): names, config and remote code.

`launcher.export_hf`, `launcher.hf_checkpoint` and the parity tests use only this interface, so exporting a
new family is one adapter in its package. The remote modeling file is self-contained (it imports only torch
and transformers) and is copied into every export with the shared attention file next to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


def rename(key: str, mapping: dict[str, str]) -> str:
    """`key` with the first of `mapping`'s substrings it contains replaced."""
    for old, new in mapping.items():
        if old in key:
            return key.replace(old, new, 1)
    return key


class HFAdapter(ABC):
    remote_module: str  # importable module of the remote modeling file (its file is shipped in the export)
    remote_class: str  # the model class in that file (named in config.json's auto_map)
    stock_class: str  # transformers' own class that computes the same model for plain softmax attention
    auto_class: str  # the Auto class that loads an export, e.g. "AutoModelForCausalLM"

    @abstractmethod
    def to_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        """This project's parameter names -> the remote (and stock) class's names."""

    @abstractmethod
    def from_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        """The Hugging Face class's names -> this project's."""

    @abstractmethod
    def config(self, cfg: Any, special_ids: dict[str, int | None], attention: dict[str, Any]) -> Any:
        """transformers' config of the exported model; `attention` holds the extra attention keys."""

    def is_stock(self, cfg: Any) -> bool:
        """True when transformers' own class computes exactly this model (no remote code needed)."""
        return cfg.attention.variant == "softmax" and not cfg.attention.gated

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Name the family's special tokens on the exported tokenizer (default: nothing to do)."""

    def export_folder(self, cfg: Any, state: StateDict, out: Any, dtype: Any = None) -> Any:
        """The family's own export folder (e.g. an image model: no tokenizer, a timm copy); None (the default):
        launcher.export_hf writes its text-model folder. `dtype`: a torch dtype, None keeps the weights'."""
        return None
