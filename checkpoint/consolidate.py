"""Merge the TP/PP shards of a DeepSpeed checkpoint (or of live ranks) into the full single-process state dict.

Every rank's `rank_<r>.pt` carries the parallel model's manifest (`ParallelModel.manifest`): for each of
its parameters, its canonical name, its TP partition dim and the DeepSpeed file and key holding it
(`parameter_files`, the one place that knows DeepSpeed's file names). Data-parallel replicas are skipped;
the tied embedding saved by the first stage is taken once.

`python -m launcher.consolidate --checkpoint runs/x/checkpoints --out runs/x/consolidated` writes the
result as a weights-only checkpoint (checkpoint/weights.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from checkpoint.store import PARALLEL, upgrade_rank_state
from common.errors import ProjectError

StateDict = dict[str, torch.Tensor]


def parameter_files(module: nn.Module, names: Iterable[str], tp_rank: int) -> dict[str, dict[str, str]]:
    """{parameter name: {"file", "key"}}: where DeepSpeed's save_checkpoint puts each parameter of `module`.

    A PipelineModule saves one file per layer (named by DeepSpeed's ckpt_layer_path; the tied embedding
    with the first stage's layer 0), any other module one file per TP rank holding {"module": state dict}."""
    if hasattr(module, "ckpt_layer_path"):  # a DeepSpeed PipelineModule
        files = {}
        for name in names:
            tied = name.startswith("tied_modules.")
            index = 0 if tied else int(name.split(".", 1)[0])
            local = name.split(".", 2)[2] if tied else name.split(".", 1)[1]
            path = module.ckpt_layer_path("", index - module._local_start)  # type: ignore[operator]
            files[name] = {"file": path.lstrip("/"), "key": local}
        return files
    return {name: {"file": f"mp_rank_{tp_rank:02d}_model_states.pt", "key": name} for name in names}


def merge_shards(shards: list[tuple[Mapping[str, torch.Tensor], Mapping[str, dict], int]]) -> StateDict:
    """Consolidate [(state dict, manifest, tp_rank)] covering every TP rank of every pipeline stage.

    Each manifest maps its parameter names to canonical names and partition dims. A parameter held by
    several shards of the same TP rank (replicated over stages, e.g. the tied embedding on the first
    and last stage) is taken once; split parameters are concatenated in TP-rank order.
    """
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for state, names, tp_rank in shards:
        for name, info in names.items():
            if name not in state:
                raise ProjectError(f"checkpoint shard lacks parameter '{name}'")
            canonical, dim = info["canonical"], info["partition_dim"]
            dims[canonical] = dim
            pieces.setdefault(canonical, {}).setdefault(tp_rank, state[name].detach().cpu())
    merged = {}
    for name, by_rank in pieces.items():
        ranks = sorted(by_rank)
        if dims[name] is None:
            merged[name] = by_rank[ranks[0]]
            continue
        if ranks != list(range(len(ranks))):
            raise ProjectError(f"checkpoint shards of '{name}' cover TP ranks {ranks}, not 0..{len(ranks) - 1}")
        merged[name] = torch.cat([by_rank[r] for r in ranks], dim=dims[name])
    return merged


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ProjectError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign file: name it
        raise ProjectError(f"cannot read checkpoint file {path}: {' '.join(str(error).split())[:200]}") from None


def _manifest(rank_file: Path) -> dict[str, Any] | None:
    """The parallel model's manifest in a rank_<r>.pt (either layout of the file), or None."""
    return upgrade_rank_state(_load(rank_file)).get(PARALLEL, {}).get("manifest")


def has_manifest(step_dir: Path) -> bool:
    rank0 = step_dir / "rank_0.pt"
    return rank0.is_file() and _manifest(rank0) is not None


def consolidate(step_dir: Path) -> StateDict:
    """The full canonical state dict of a (complete) step directory of any layout."""
    step_dir = Path(step_dir)
    rank_files = sorted(step_dir.glob("rank_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not rank_files:
        raise ProjectError(f"no rank_<r>.pt files in checkpoint {step_dir}")
    shards, seen, files = [], set(), {}
    for rank_file in rank_files:
        man = _manifest(rank_file)
        if man is None:
            raise ProjectError(f"{rank_file} has no parameter manifest (saved by an older version)")
        if man["dp_rank"] != 0 or (man["tp_rank"], man["pp_rank"]) in seen:
            continue  # data-parallel replicas hold the same shard
        seen.add((man["tp_rank"], man["pp_rank"]))
        by_file: dict[str, dict[str, dict]] = defaultdict(dict)
        for name, info in man["params"].items():
            by_file[info["file"]][name] = info
        state: StateDict = {}
        for file, params in by_file.items():
            if file not in files:
                loaded = _load(step_dir / file)
                files[file] = loaded["module"] if file.startswith("mp_rank_") else loaded
            for name, info in params.items():
                if info["key"] not in files[file]:
                    raise ProjectError(f"{step_dir / file} lacks '{info['key']}'")
                tensor = files[file][info["key"]]
                if tensor.numel() == 0:
                    raise ProjectError(f"{step_dir / file}: '{info['key']}' is empty (ZeRO-3 partitioned); "
                                       "consolidate ZeRO-3 checkpoints with DeepSpeed's zero_to_fp32")
                state[name] = tensor
        shards.append((state, {n: {"canonical": i["canonical"], "partition_dim": i["partition_dim"]}
                               for n, i in man["params"].items()}, man["tp_rank"]))
    return merge_shards(shards)
