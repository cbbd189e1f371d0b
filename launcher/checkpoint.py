"""Crash-safe DeepSpeed checkpoints with the data-stream and RNG state of every rank.

Layout of `runs/<name>/checkpoints/`:
    step_<N>/                 DeepSpeed's files (model, optimizer and scheduler states, per ZeRO rank)
    step_<N>/rank_<r>.pt      this project's per-rank state: data stream position, RNG states, step
    step_<N>/complete         written last; a step directory without it is an interrupted save
    latest                    name of the newest complete step directory, replaced atomically

DeepSpeed writes its own `latest` with a plain open/write; we pass save_latest=False and update the
pointer ourselves only after every rank finished, so a kill at any moment leaves the previous
checkpoint as `latest`, intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.distributed import barrier
from model.errors import ProjectError

LATEST = "latest"
COMPLETE = "complete"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_tag(step: int) -> str:
    return f"step_{step}"


def read_latest(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / LATEST
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def last_checkpoint_note(checkpoint_dir: Path) -> str:
    """Half a sentence for a failed run's error line: where the user continues from."""
    tag = read_latest(checkpoint_dir)
    if tag is None:
        return "no checkpoint was written"
    return f"the last checkpoint {checkpoint_dir / tag} is intact (continue from it with --resume auto)"


def resolve_checkpoint(path: Path, world_size: int) -> tuple[Path, str]:
    """(checkpoints dir, tag) for a checkpoints dir (follows `latest`) or a step directory.

    Raises ProjectError naming the path when the checkpoint is missing, interrupted or was saved by a
    different number of ranks. Reads only files: safe before any process group exists.
    """
    path = Path(path)
    if (path / LATEST).is_file():
        load_dir, tag = path, read_latest(path)
        if tag is None:
            raise ProjectError(f"checkpoint pointer is empty: {path / LATEST}")
    elif (path / COMPLETE).is_file() or path.name.startswith("step_"):
        load_dir, tag = path.parent, path.name
    else:
        raise ProjectError(f"not a checkpoint (no '{LATEST}' pointer or step directory): {path}")
    step_dir = load_dir / tag
    if not (step_dir / COMPLETE).is_file():
        raise ProjectError(f"checkpoint is incomplete or unreadable (no '{COMPLETE}' marker): {step_dir}")
    missing = [r for r in range(world_size) if not (step_dir / f"rank_{r}.pt").is_file()]
    if missing:
        saved = len(list(step_dir.glob("rank_*.pt")))
        raise ProjectError(f"checkpoint {step_dir} has state for {saved} ranks, this run has {world_size} "
                           f"(missing rank_{missing[0]}.pt)")
    return load_dir, tag


def save_checkpoint(engine: Any, checkpoint_dir: Path, step: int, rank: int, rank_state: dict[str, Any],
                    keep: int) -> Path:
    tag = step_tag(step)
    step_dir = checkpoint_dir / tag
    if read_latest(checkpoint_dir) == tag:  # already saved (e.g. right after resuming): never rewrite it
        return step_dir
    if rank == 0:
        if step_dir.exists():  # leftovers of an interrupted save of this step; `latest` never named it
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
    barrier()
    _atomic_torch_save({**rank_state, "step": step, "rng": rng_state()}, step_dir / f"rank_{rank}.pt")
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step}, save_latest=False)
    barrier()
    if rank == 0:
        (step_dir / COMPLETE).write_text(f"{step}\n")
        _atomic_write_text(checkpoint_dir / LATEST, tag)
        prune_checkpoints(checkpoint_dir, keep)
    barrier()
    return step_dir


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step directories (0 keeps all); never the one `latest` names."""
    if keep <= 0:
        return
    latest = read_latest(checkpoint_dir)
    steps = sorted((int(p.name.split("_", 1)[1]), p) for p in checkpoint_dir.glob("step_*")
                   if p.is_dir() and p.name.split("_", 1)[1].isdigit())
    for _, path in steps[:-keep]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine: Any, load_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and return this rank's state (RNG restored)."""
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise ProjectError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    state = torch.load(load_dir / tag / f"rank_{rank}.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state
