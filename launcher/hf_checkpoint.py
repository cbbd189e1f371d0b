"""A checkpoint's weights with its run config, checked against the model the config builds, and HF key names.

Reading any checkpoint kind into a full state dict and the weights-only format live in checkpoint/weights.py;
this module adds what needs the run config (launcher/config.py): `read_weights` / `load_full_state_dict`
return (RunConfig, state dict), `init_state` is what `train.init_from` starts a run from.

Every model family (model/family.py) goes through the same functions: shapes come from the family's own
model, and `to_hf` / `from_hf` map names with the family's Hugging Face adapter (model/<family>/hf.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from checkpoint.weights import check_shapes, locate, read_state_dict, save_weights, variant_param
from launcher.config import RunConfig, config_text, load_config
from common.errors import ProjectError
from model.family import family_of, spec_for
from model.hf_adapter import HFAdapter

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
__all__ = ["check_shapes", "expected_shapes", "from_hf", "init_state", "load_full_state_dict",
           "locate", "read_weights", "save_weights_checkpoint", "to_hf"]


def read_weights(path: str | Path) -> tuple[RunConfig, StateDict]:
    """The run config and the stored state dict, unchecked (see load_full_state_dict)."""
    config_path, folder = locate(path)
    cfg = load_config(config_path)
    return cfg, read_state_dict(folder)


def expected_shapes(cfg: RunConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of the single-process model the config describes (built on `meta`)."""
    spec = family_of(cfg.model)
    with torch.device("meta"):
        model = spec.build(cfg.model, seq_length=spec.example_length(cfg))
    return {key: value.shape for key, value in model.state_dict().items()}


def load_full_state_dict(path: str | Path) -> tuple[RunConfig, StateDict]:
    """(run config, whole-model state dict) of a checkpoint, checked against the model its config builds.

    Raises ProjectError (one line, naming the path) for a missing or partial folder, unreadable files,
    or weights whose names or shapes do not match the config."""
    cfg, state = read_weights(path)
    check_shapes(state, expected_shapes(cfg), str(path))
    return cfg, state


def _fresh_variant_params(cfg: RunConfig, keys: list[str]) -> StateDict:
    """Initial values for attention-variant parameters a checkpoint lacks, as a new model starts them: the
    variant's per-head parameters from the registry (model/variants.py), the head gate from a new HeadGate."""
    from model import variants
    from model.attention import HeadGate

    m, a = cfg.model, cfg.attention
    head_dim = m.hidden_size // m.num_heads
    per_head = variants.initial_head_params(a, m.num_heads)
    gates: dict[str, StateDict] = {}
    out: StateDict = {}
    for key in keys:
        match = variant_param(key)
        assert match is not None, key  # only variant parameters are ever missing (check_shapes)
        layer, name = key[:match.start()], match.group(1)
        if name in per_head:
            out[key] = per_head[name]
        else:
            if layer not in gates:
                gates[layer] = HeadGate(m.num_heads, head_dim, gate_type=a.gate_type, hidden=a.gate_hidden,
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


def to_hf(state: StateDict, tie_word_embeddings: bool, *, family: str) -> StateDict:
    """This project's names -> the family's Hugging Face class's names (its adapter, model/<family>/hf.py)."""
    return hf_adapter(family).to_hf(state, SimpleNamespace(tie_word_embeddings=tie_word_embeddings))


def from_hf(state: StateDict, tie_word_embeddings: bool, *, family: str) -> StateDict:
    """The family's Hugging Face class's names -> this project's (a tied head is not stored twice)."""
    return hf_adapter(family).from_hf(state, SimpleNamespace(tie_word_embeddings=tie_word_embeddings))


def hf_adapter(family: str) -> HFAdapter:
    """The family's Hugging Face adapter (model/<family>/hf.py); one line for a family without one."""
    adapter = spec_for(family).hf
    if adapter is None:
        raise ProjectError(f"model.family {family} has no Hugging Face export")
    return adapter


def save_weights_checkpoint(out: Path, cfg: RunConfig, state: StateDict, metadata: dict[str, str]) -> None:
    """Write a weights-only checkpoint: model.safetensors + config.yaml."""
    save_weights(out, state, metadata, config_text(cfg))
