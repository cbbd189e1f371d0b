"""Whole-model weights out of a checkpoint, the weights-only checkpoint format, and HF key names.

Two checkpoint kinds hold a model:
  - a training checkpoint (launcher/checkpoint.py): `runs/<name>/checkpoints/[step_N]`, or the run
    directory itself; the run config is `runs/<name>/config.yaml`.
  - a weights-only checkpoint (written by `launcher.import_hf`, `parallel.consolidate`): a folder with `model.safetensors`
    (this project's parameter names) and `config.yaml`; no optimizer, data or RNG state.

`load_full_state_dict` returns the single-process model's state dict for either: checkpoints that carry
a parameter manifest (every layout: DP, TP, PP) are merged by `parallel.consolidate`; ZeRO-3 partitions by
DeepSpeed's zero_to_fp32; older single-rank checkpoints are read from `mp_rank_00_model_states.pt`.
Export, `train.init_from` and the shape checks below all go through it, so a new on-disk layout only
needs teaching here (or in parallel/consolidate.py).

Every model family (model/family.py) goes through the same functions: shapes come from the family's own
model, and `to_hf` / `from_hf` map names with the family's Hugging Face adapter (model/<family>/hf.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from launcher.checkpoint import resolve_checkpoint
from launcher.config import RunConfig, load_config
from common.errors import ProjectError
from model.family import family_of, spec_for

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MODEL_STATES = "mp_rank_00_model_states.pt"
# Parameters that exist only for some attention variants: switching variants adds or drops them
# (OPT: `...self_attn.sink_logit`, BERT: `...attention.self.sink_logit`).
VARIANT_PARAM = re.compile(r"\.(?:self_attn|attention\.self)\.(sink_logit|gate\.\w+)$")
StateDict = dict[str, torch.Tensor]


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
    from parallel.consolidate import consolidate, has_manifest

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


def read_weights(path: str | Path) -> tuple[RunConfig, StateDict]:
    """The run config and the stored state dict, unchecked (see load_full_state_dict)."""
    config_path, folder = locate(path)
    cfg = load_config(config_path)
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        try:
            return cfg, load_file(folder / WEIGHTS_FILE)
        except Exception as error:
            raise ProjectError(f"cannot read {folder / WEIGHTS_FILE}: {_one_line(error)}") from None
    return cfg, _training_state_dict(folder)


def expected_shapes(cfg: RunConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of the single-process model the config describes (built on `meta`)."""
    spec = family_of(cfg.model)
    with torch.device("meta"):
        model = spec.build(cfg.model, seq_length=spec.example_length(cfg))
    return {key: value.shape for key, value in model.state_dict().items()}


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str,
                 allow_variant_changes: bool = False) -> None:
    """One-line ProjectError for the first missing, unexpected or wrongly shaped parameter.

    allow_variant_changes: attention-variant parameters (sink logits, gate) may be missing or extra
    (continued pretraining with another variant: new ones start from their initialisation)."""
    for key, shape in expected.items():
        if key not in state:
            if allow_variant_changes and VARIANT_PARAM.search(key):
                continue
            raise ProjectError(f"checkpoint {where} lacks parameter '{key}' that the configured model has "
                               f"(different attention variant or number of layers?)")
        if state[key].shape != shape:
            raise ProjectError(f"checkpoint {where}: '{key}' has shape {list(state[key].shape)}, the configured "
                               f"model needs {list(shape)}")
    for key in state:
        if key not in expected and not (allow_variant_changes and VARIANT_PARAM.search(key)):
            raise ProjectError(f"checkpoint {where} has parameter '{key}' that the configured model lacks")


def load_full_state_dict(path: str | Path) -> tuple[RunConfig, StateDict]:
    """(run config, whole-model state dict) of a checkpoint, checked against the model its config builds.

    Raises ProjectError (one line, naming the path) for a missing or partial folder, unreadable files,
    or weights whose names or shapes do not match the config."""
    cfg, state = read_weights(path)
    check_shapes(state, expected_shapes(cfg), str(path))
    return cfg, state


def _fresh_variant_params(cfg: RunConfig, keys: list[str]) -> StateDict:
    """Initial values for attention-variant parameters a checkpoint lacks, as a new model starts them."""
    from model.attention import HeadGate

    m, a = cfg.model, cfg.attention
    gates: dict[str, StateDict] = {}
    out: StateDict = {}
    for key in keys:
        match = VARIANT_PARAM.search(key)
        assert match is not None, key  # only variant parameters are ever missing (check_shapes)
        layer, name = key[:match.start()], match.group(1)
        if name == "sink_logit":
            out[key] = torch.zeros(m.num_heads)
        else:
            if layer not in gates:
                gates[layer] = HeadGate(m.num_heads, m.head_dim, gate_type=a.gate_type, hidden=a.gate_hidden,
                                        init_prob=a.gate_init_prob, init_std=m.init_std).state_dict()
            out[key] = gates[layer][name.removeprefix("gate.")]
    return out


def init_state(path: str | Path, cfg: RunConfig) -> StateDict:
    """The full state dict that `train.init_from` starts a run from: the checkpoint's weights, checked
    against the run's model. Switching attention variants is allowed: parameters only the new variant
    has (sink logits, gate) are freshly initialised, ones it lacks are dropped."""
    _, state = read_weights(path)
    expected = expected_shapes(cfg)
    check_shapes(state, expected, str(path), allow_variant_changes=True)
    state = {key: value for key, value in state.items() if key in expected}
    missing = [key for key in expected if key not in state]
    if missing:
        log.warning("train.init_from %s: %d attention-variant parameters start from their initialisation (%s, ...)",
                    path, len(missing), missing[0])
        state.update(_fresh_variant_params(cfg, missing))
    return state


def to_hf(state: StateDict, tie_word_embeddings: bool, family: str = "opt") -> StateDict:
    """This project's names -> the family's Hugging Face class's names (its adapter, model/<family>/hf.py)."""
    return _adapter(family).to_hf(state, SimpleNamespace(tie_word_embeddings=tie_word_embeddings))


def from_hf(state: StateDict, tie_word_embeddings: bool, family: str = "opt") -> StateDict:
    """The family's Hugging Face class's names -> this project's (a tied head is not stored twice)."""
    return _adapter(family).from_hf(state, SimpleNamespace(tie_word_embeddings=tie_word_embeddings))


def _adapter(family: str) -> Any:
    adapter = spec_for(family).hf
    if adapter is None:
        raise ProjectError(f"model.family {family} has no Hugging Face export")
    return adapter


def save_weights_checkpoint(out: Path, cfg: RunConfig, state: StateDict, metadata: dict[str, str]) -> None:
    """Write a weights-only checkpoint: model.safetensors + config.yaml."""
    from safetensors.torch import save_file

    from launcher.config import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, out / WEIGHTS_FILE,
              metadata={"format": "pt", **metadata})
    save_config(cfg, out / CONFIG_FILE)
