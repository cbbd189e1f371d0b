"""One full state dict <-> the shards of any layout.

Every layout is initialised from, and every checkpoint can be consolidated into, one full
single-process state dict with the canonical (Hugging-Face-like) parameter names of model/opt.py.
A parameter split over tensor-parallel ranks carries megatron-core's attributes
`tensor_model_parallel` and `partition_dim`; its shard for TP rank r is chunk r of tp along that dim.
Pipeline stages name their parameters differently; `name_map` translates them to canonical names.
The way back (shards -> full, `merge_shards`) is consolidation's: checkpoint/consolidate.py.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from common.errors import ProjectError

NameMap = Callable[[str], str]


def _identity(name: str) -> str:
    return name


def partition_dim(param: torch.Tensor) -> int | None:
    return int(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else None


def manifest(module: nn.Module, name_map: NameMap = _identity) -> dict[str, int | None]:
    """{module parameter name: (canonical name, partition dim or None)}, saved with every checkpoint."""
    return {name: {"canonical": name_map(name), "partition_dim": partition_dim(param)}  # type: ignore[misc]
            for name, param in module.named_parameters()}


def load_full_state_dict(module: nn.Module, full: Mapping[str, torch.Tensor], *, tp_size: int, tp_rank: int,
                         name_map: NameMap = _identity, source: str = "state dict") -> None:
    """Copy this rank's shard of every parameter from a full state dict (shapes checked, names named)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            canonical = name_map(name)
            if canonical not in full:
                raise ProjectError(f"{source} has no parameter '{canonical}'")
            value = full[canonical]
            dim = partition_dim(param)
            if dim is not None:
                if value.shape[dim] % tp_size:
                    raise ProjectError(f"{source}: '{canonical}' {tuple(value.shape)} does not split into {tp_size} "
                                       f"tensor-parallel shards along dim {dim}")
                value = value.chunk(tp_size, dim=dim)[tp_rank]
            if value.shape != param.shape:
                raise ProjectError(f"{source}: '{canonical}' has shape {tuple(value.shape)}, this model expects "
                                   f"{tuple(param.shape)} (rank {tp_rank} of TP{tp_size})")
            param.copy_(value.to(param.dtype))
