"""Merge the TP/PP shards of a DeepSpeed checkpoint into the full single-process state dict.

Every rank's `rank_<r>.pt` carries a manifest (written by `ParallelModel.manifest`): for each of its
parameters, the DeepSpeed file and key holding it, its canonical name and its TP partition dim. Data-
parallel replicas are skipped; the tied embedding saved by the first stage is taken once.

    python -m parallel.consolidate --checkpoint runs/x/checkpoints --out runs/x/consolidated
writes a weights-only checkpoint (model.safetensors + config.yaml) that `train.init_from` loads into
any other layout, and `launcher.export_hf` / `launcher.evaluate` read.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from common.errors import ProjectError
from parallel.sharding import merge_shards

StateDict = dict[str, torch.Tensor]


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ProjectError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or foreign file: name it
        raise ProjectError(f"cannot read checkpoint file {path}: {' '.join(str(error).split())[:200]}") from None


def has_manifest(step_dir: Path) -> bool:
    rank0 = step_dir / "rank_0.pt"
    return rank0.is_file() and "manifest" in _load(rank0)


def consolidate(step_dir: Path) -> StateDict:
    """The full canonical state dict of a (complete) step directory of any layout."""
    step_dir = Path(step_dir)
    rank_files = sorted(step_dir.glob("rank_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not rank_files:
        raise ProjectError(f"no rank_<r>.pt files in checkpoint {step_dir}")
    shards, seen, files = [], set(), {}
    for rank_file in rank_files:
        man = _load(rank_file).get("manifest")
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


def main(argv: list[str] | None = None) -> int:
    from launcher.checkpoint import resolve_checkpoint
    from launcher.config import load_config
    from launcher.hf_checkpoint import save_weights_checkpoint

    parser = argparse.ArgumentParser(description="Merge a TP/PP/DP training checkpoint into one weights-only checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoints dir (follows `latest`) or a step_N dir")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.yaml)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.checkpoint)
        load_dir, tag = resolve_checkpoint(path, world_size=1)  # consolidate() checks every rank's files
        state = consolidate(load_dir / tag)
        cfg = load_config(load_dir.parent / "config.yaml")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ProjectError(f"output folder is not empty: {out}")
        save_weights_checkpoint(out, cfg, state, {"consolidated_from": str(load_dir / tag)})
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"consolidated {load_dir / tag} ({len(state)} tensors) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
