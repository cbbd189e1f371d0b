"""What a family's Hugging Face adapter provides (model/<family>/hf.py): names, config and remote code.

`launcher.export_hf`, `launcher.hf_checkpoint` and the parity tests use only this interface, so exporting a
new family is one adapter in its package. The remote modeling file is self-contained (it imports only torch
and transformers) and is copied into every export with the shared attention file next to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ProjectError
from model.hf_remote.outeffhop_attention import DEFAULTS

StateDict = dict[str, torch.Tensor]


@dataclass
class HFSource:
    """A published model read for `launcher.import_hf`: its shape as the run config's `model:` values and its
    weights under this project's names, checked against what the family's model computes."""

    model: dict[str, Any]  # values for the run config's model section
    weights: Callable[[], StateDict]  # reads the weights (this project's names); called after the cheap checks
    attention: dict[str, Any] = field(default_factory=dict)  # an export_hf folder's attention keys ({}: softmax)
    tokenizer_dir: Path | None = None  # its tokenizer files (None: an image model)
    data: dict[str, Any] = field(default_factory=dict)  # data-section values it fixes (an image model's mean/std)
    # A head the source may lack (e.g. a headless BertModel): what to call it and its parameters' name prefixes
    # in this project's model. Missing ones are initialised on import, as a new model starts them.
    head: tuple[str, tuple[str, ...]] | None = None


def one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]


def attention_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The attention settings an export_hf folder's config.json carries (none in a published model): the keys of
    the export file's table (outeffhop_attention.DEFAULTS)."""
    return {key: config[key] for key in DEFAULTS if key in config}


def require(path: Path, config: Any, settings: dict[str, tuple[Any, str]], model: str) -> None:
    """One ProjectError line for the first `settings` key (name -> (value needed, what differs otherwise)) whose
    value in transformers' `config` differs: this project's `model` cannot compute that model."""
    for key, (value, meaning) in settings.items():
        if getattr(config, key, value) != value:
            raise ProjectError(f"{path}: {key}={getattr(config, key)!r} ({meaning}) is not supported: this "
                               f"project's {model}")


def load_remote(model_class: Any, folder: Path, allowed_missing: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """`model_class.from_pretrained(folder)` in fp32 (a transformers class: it reads every weight format and
    legacy name); (model in eval mode, the missing parameters under `allowed_missing`, e.g. a head). Any other
    missing or mismatched weight is one ProjectError line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report: the missing keys that matter are ours to name, in one line
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    except Exception as error:
        raise ProjectError(f"cannot load weights from {folder}: {one_line(error)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    lacking = [key for key in missing if not key.startswith(allowed_missing)] if allowed_missing else missing
    if lacking or info["mismatched_keys"]:
        first = lacking or [str(k) for k in info["mismatched_keys"]]
        raise ProjectError(f"weights in {folder} are incomplete or do not match its config.json (first: {first[0]})")
    return model.eval(), missing


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

    # ---------------------------------------------------------------- import (launcher.import_hf)
    model_types: tuple[str, ...] = ()  # config.json `model_type` values this family imports
    default_recipe: str | None = None  # the --config recipe when none is given

    def read_source(self, folder: Path, config: dict[str, Any]) -> HFSource:
        """The published model in `folder` (its parsed config.json: `config`), or one ProjectError line when this
        project's model cannot compute it."""
        raise ProjectError(f"{folder}: importing this model family is not supported")

    def export_folder(self, cfg: Any, state: StateDict, out: Any, dtype: Any = None) -> Any:
        """The family's own export folder (e.g. an image model: no tokenizer, a timm copy); None (the default):
        launcher.export_hf writes its text-model folder. `dtype`: a torch dtype, None keeps the weights'."""
        return None
