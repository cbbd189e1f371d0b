"""Whole-model weights out of any checkpoint kind, and the weights-only checkpoint format.

Two checkpoint kinds hold a model:
  - a training checkpoint (checkpoint/store.py): `runs/<name>/checkpoints/[step_N]`, or the run
    directory itself; the run config is `runs/<name>/config.yaml`.
  - a weights-only checkpoint (written by `launcher.import_hf`, `launcher.consolidate`): a folder with
    `model.safetensors` (this project's parameter names) and `config.yaml`; no optimizer, data or RNG state.

`read_state_dict` returns the single-process model's state dict for either: checkpoints that carry a
parameter manifest (every layout: DP, TP, PP) are merged by checkpoint/consolidate.py; ZeRO-3 partitions
by DeepSpeed's zero_to_fp32; older single-rank checkpoints are read from `mp_rank_00_model_states.pt`.
Export, `train.init_from` and evaluation all go through it (launcher/hf_checkpoint.py adds the run
config), so a new on-disk layout only needs teaching here (or in checkpoint/consolidate.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from checkpoint.consolidate import consolidate, has_manifest
from checkpoint.store import resolve_checkpoint
from common.errors import ProjectError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MODEL_STATES = "mp_rank_00_model_states.pt"
StateDict = dict[str, torch.Tensor]


def variant_param(key: str) -> re.Match[str] | None:
    """A match (group 1: the leaf name) when `key` is a parameter that exists only for some attention variants:
    a registered variant's per-head parameter (model/variants.py, e.g. `...self_attn.sink_logit`, entmax's
    `alpha_logit`) or the head gate's (`...gate.<name>`). Switching variants adds or drops exactly these."""
    from model import variants

    names = "|".join(sorted(map(re.escape, variants.head_param_names())))
    return re.search(rf"\.({names}|gate\.\w+)$" if names else r"\.(gate\.\w+)$", key)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def locate(path: str | Path) -> tuple[Path, Path]:
    """(config.yaml, the folder holding the weights) for a weights-only or training checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ProjectError(f"checkpoint not found: {path}")
    if (path / WEIGHTS_FILE).is_file():
        config = path / CONFIG_FILE
    else:
        if (path / "checkpoints").is_dir() and not (path / "latest").is_file():
            path = path / "checkpoints"  # a run directory
        load_dir, tag = resolve_checkpoint(path, world_size=1)
        path, config = load_dir / tag, load_dir.parent / CONFIG_FILE
    if not config.is_file():
        raise ProjectError(f"run config not found next to checkpoint: {config}")
    return config, path


def _zero3_state_dict(step_dir: Path) -> StateDict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    except Exception as error:  # DeepSpeed raises assorted errors for missing/partial shards
        raise ProjectError(f"cannot consolidate ZeRO-3 checkpoint {step_dir}: {_one_line(error)}") from None


def _training_state_dict(step_dir: Path) -> StateDict:
    if any(step_dir.glob("zero_pp_rank_*_model_states.pt")):  # ZeRO-3: parameters live in partitions
        return _zero3_state_dict(step_dir)
    if has_manifest(step_dir):
        return consolidate(step_dir)
    states = step_dir / MODEL_STATES  # a single-rank checkpoint saved before manifests existed
    if not states.is_file():
        raise ProjectError(f"checkpoint has no model weights ({MODEL_STATES} missing): {step_dir}")
    try:
        module = torch.load(states, map_location="cpu", weights_only=False, mmap=True)["module"]
    except Exception as error:
        raise ProjectError(f"cannot read model weights {states}: {_one_line(error)}") from None
    return dict(module or {})


def read_state_dict(folder: Path) -> StateDict:
    """The stored full state dict of the weights folder `locate` found, unchecked."""
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(folder / WEIGHTS_FILE)
        except Exception as error:
            raise ProjectError(f"cannot read {folder / WEIGHTS_FILE}: {_one_line(error)}") from None
    return _training_state_dict(folder)


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str,
                 allow_variant_changes: bool = False) -> None:
    """One-line ProjectError for the first missing, unexpected or wrongly shaped parameter.

    allow_variant_changes: attention-variant parameters (sink logits, gate) may be missing or extra
    (continued pretraining with another variant: new ones start from their initialisation)."""
    for key, shape in expected.items():
        if key not in state:
            if allow_variant_changes and variant_param(key):
                continue
            raise ProjectError(f"checkpoint {where} lacks parameter '{key}' that the configured model has "
                               f"(different attention variant or number of layers?)")
        if state[key].shape != shape:
            raise ProjectError(f"checkpoint {where}: '{key}' has shape {list(state[key].shape)}, the configured "
                               f"model needs {list(shape)}")
    for key in state:
        if key not in expected and not (allow_variant_changes and variant_param(key)):
            raise ProjectError(f"checkpoint {where} has parameter '{key}' that the configured model lacks")


def save_weights(out: Path, state: StateDict, metadata: dict[str, str], config_text: str) -> None:
    """Write a weights-only checkpoint: model.safetensors + config.yaml (the run config's text)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, out / WEIGHTS_FILE,
              metadata={"format": "pt", **metadata})
    (out / CONFIG_FILE).write_text(config_text)
