"""Merge a TP/PP/DP training checkpoint into one weights-only checkpoint (checkpoint/consolidate.py):

    python -m launcher.consolidate --checkpoint runs/x/checkpoints --out runs/x/consolidated

writes model.safetensors + config.yaml, which `train.init_from` loads into any other layout and
`launcher.export_hf` / `launcher.evaluate` read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from checkpoint.consolidate import consolidate
from checkpoint.store import resolve_checkpoint
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from launcher.config import load_config
from launcher.hf_checkpoint import save_weights_checkpoint


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.consolidate", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(description="Merge a TP/PP/DP training checkpoint into one weights-only checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoints dir (follows `latest`) or a step_N dir")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.yaml)")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    load_dir, tag = resolve_checkpoint(path, world_size=1)  # consolidate() checks every rank's files
    state = consolidate(load_dir / tag)
    cfg = load_config(load_dir.parent / "config.yaml")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ProjectError(f"output folder is not empty: {out}")
    save_weights_checkpoint(out, cfg, state, {"consolidated_from": str(load_dir / tag)})
    print(f"consolidated {load_dir / tag} ({len(state)} tensors) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
