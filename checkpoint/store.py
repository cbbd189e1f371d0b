"""Crash-safe, verifiable DeepSpeed checkpoints with every rank's component states and RNG states.

Layout of `runs/<name>/checkpoints/`:
    step_<N>/                 DeepSpeed's files (model, optimizer and scheduler states, per ZeRO rank)
    step_<N>/rank_<r>.pt      this project's per-rank state: {component name: its state_dict()} (the data
                              stream's position, the parallel model's RNG tracker and parameter
                              manifest), the global RNG states and the step
    step_<N>/config.yaml      the run config that wrote it (resuming compares it with the new one)
    step_<N>/complete         the manifest, written last: JSON with the step and every file's size and
                              sha256; a step directory without it is an interrupted save
    latest                    name of the newest complete step directory, replaced atomically

DeepSpeed writes its own `latest` with a plain open/write; we pass save_latest=False and update the
pointer ourselves only after every rank finished and the manifest is on disk, so a kill at any moment
leaves the previous checkpoint as `latest`, intact. Every file, the manifest, `latest` and the folders
holding them are fsynced first, so the same holds after a power loss. Before resuming, the manifest is
checked against the files: `--resume auto` falls back to the newest intact checkpoint (a step folder
counts even when `latest` is missing or garbage) and never starts over existing checkpoints.

The writer does not know what it stores: every component (anything with state_dict / load_state_dict)
saves and restores its own state under its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
import torch.distributed as dist

from common.distributed import barrier
from common.durable import atomic_write_text, fsync_path
from common.errors import ProjectError

LATEST = "latest"
COMPLETE = "complete"
STEP_DIR = re.compile(r"step_(\d+)")
_CHUNK = 1 << 22
# Component names that consolidation reads (the parallel model's manifest) and that checkpoints written
# before components saved themselves stored flat: {"data", "tp_rng", "manifest", "step", "rng"}.
DATA, PARALLEL = "data", "parallel"
_FLAT_PARALLEL_KEYS = ("tp_rng", "manifest")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, fsynced on the way (DeepSpeed's torch.save does not sync)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
        os.fsync(handle.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


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


def step_number(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    """Every step_<N> folder, newest first (complete or not)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(n, p) for p in checkpoint_dir.iterdir() if (n := step_number(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def read_latest(checkpoint_dir: Path) -> str | None:
    """The step folder `latest` names, or None when it is missing, empty or not a step name (garbage)."""
    pointer = checkpoint_dir / LATEST
    try:
        tag = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if STEP_DIR.fullmatch(tag) else None


def has_checkpoints(checkpoint_dir: Path) -> bool:
    """True when the folder holds a `latest` pointer or any complete step folder."""
    return (checkpoint_dir / LATEST).exists() or any((p / COMPLETE).is_file() for p in step_dirs(checkpoint_dir))


def last_checkpoint_note(checkpoint_dir: Path) -> str:
    """Half a sentence for a failed run's error line: where the user continues from."""
    tag = read_latest(checkpoint_dir)
    if tag is None:
        return "no checkpoint was written"
    return f"the last checkpoint {checkpoint_dir / tag} is intact (continue from it with --resume auto)"


def checkpoint_problem(step_dir: Path, world_size: int) -> str | None:
    """Why `step_dir` cannot be resumed by `world_size` ranks (one phrase naming the file), or None.

    Checks the manifest's sizes and sha256 sums (reads every file: run it before any process group)."""
    try:
        manifest = (step_dir / COMPLETE).read_text()
    except FileNotFoundError:
        return f"incomplete (no '{COMPLETE}' manifest: the save was interrupted)"
    except (OSError, UnicodeDecodeError) as error:
        return f"unreadable manifest {step_dir / COMPLETE}: {error}"
    missing = [r for r in range(world_size) if not (step_dir / f"rank_{r}.pt").is_file()]
    if missing:
        saved = len(list(step_dir.glob("rank_*.pt")))
        return (f"has state for {saved} ranks, this run has {world_size} (missing rank_{missing[0]}.pt); "
                f"resume with the layout that wrote it, or consolidate it and start from it with train.init_from")
    if manifest.strip().isdigit():  # written before manifests existed: presence is all that can be checked
        return None
    try:
        files = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError):
        return f"damaged manifest {step_dir / COMPLETE}"
    for name, expected in sorted(files.items()):
        path = step_dir / name
        if not path.is_file():
            return f"missing {name}"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if _file_record(path)["sha256"] != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def resolve_checkpoint(path: Path, world_size: int) -> tuple[Path, str]:
    """(checkpoints dir, tag) for a checkpoints dir (follows `latest`) or a step directory, verified.

    Raises ProjectError naming the path when the checkpoint is missing, interrupted, damaged or was saved
    by a different number of ranks. Reads only files: safe before any process group exists."""
    path = Path(path)
    if (path / LATEST).exists():
        load_dir, tag = path, read_latest(path)
        if tag is None:
            raise ProjectError(f"checkpoint pointer {path / LATEST} is empty or unreadable; pass a step folder "
                               f"(e.g. {path}/step_N) or use --resume auto, which falls back to intact step folders")
    elif (path / COMPLETE).is_file() or STEP_DIR.fullmatch(path.name):
        load_dir, tag = path.parent, path.name
    else:
        raise ProjectError(f"not a checkpoint (no '{LATEST}' pointer or step directory): {path}")
    problem = checkpoint_problem(load_dir / tag, world_size)
    if problem is not None:
        raise ProjectError(f"checkpoint {load_dir / tag} cannot be resumed: {problem}")
    return load_dir, tag


def find_resumable(checkpoint_dir: Path, world_size: int) -> tuple[tuple[Path, str] | None, str | None]:
    """`--resume auto`: the newest intact checkpoint and a one-line note when it is not what `latest` says.

    (None, None) when the folder holds no complete checkpoint (a fresh start). Raises ProjectError when
    complete checkpoints exist but none is intact: starting over them would silently lose the run."""
    latest = read_latest(checkpoint_dir)
    damaged: list[str] = []
    for step_dir in step_dirs(checkpoint_dir):
        if not (step_dir / COMPLETE).is_file():
            continue  # an interrupted save; `latest` never named it
        problem = checkpoint_problem(step_dir, world_size)
        if problem is not None:
            damaged.append(f"{step_dir.name} {problem}")
            continue
        note = None
        if damaged:
            note = f"{'; '.join(damaged)}: resuming from {step_dir}, the newest intact checkpoint"
        elif latest != step_dir.name:
            pointer = "is missing or unreadable" if latest is None else f"names {latest}"
            note = f"{checkpoint_dir / LATEST} {pointer}: resuming from {step_dir}, the newest intact checkpoint"
        return (checkpoint_dir, step_dir.name), note
    if damaged:
        raise ProjectError(f"no intact checkpoint in {checkpoint_dir} ({'; '.join(damaged)}); move the folder "
                           f"away to start over, or set logging.run_name to start a new run")
    return None, None


def save_checkpoint(engine: Any, checkpoint_dir: Path, step: int, rank: int, components: Mapping[str, Stateful],
                    keep: int, files: dict[str, str] | None = None) -> Path:
    """Write step_<step> on every rank, then (rank 0) its manifest, then move `latest` to it, then prune.

    `components`: name -> what saves its own state into this rank's rank_<r>.pt (e.g. DATA: the data stream,
    PARALLEL: the parallel model). `files`: small text files rank 0 writes into the step folder (name ->
    content), e.g. config.yaml."""
    tag = step_tag(step)
    step_dir = checkpoint_dir / tag
    if rank == 0:
        # Leftovers of an interrupted save, or a damaged checkpoint `--resume auto` fell back past (then
        # `latest` may still name it; until the new manifest exists, resuming falls back as before).
        if step_dir.exists():
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
        for name, text in (files or {}).items():
            (step_dir / name).write_text(text)
    barrier()
    rank_state = {name: component.state_dict() for name, component in components.items()}
    _atomic_torch_save({**rank_state, "step": step, "rng": rng_state()}, step_dir / f"rank_{rank}.pt")
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step}, save_latest=False)
    barrier()
    records = _hash_share(step_dir)  # every rank hashes and fsyncs a share of the files
    if rank == 0:
        manifest = {"step": step, "files": records}
        for folder in sorted({(step_dir / name).parent for name in records}, reverse=True):
            fsync_path(folder)
        atomic_write_text(step_dir / COMPLETE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        atomic_write_text(checkpoint_dir / LATEST, tag)
        prune_checkpoints(checkpoint_dir, keep)
    barrier()
    return step_dir


def _hash_share(step_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under step_dir (relative names); the work is split over the ranks and
    gathered on every rank."""
    names = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    mine = {name: _file_record(step_dir / name) for name in names[rank::world]}
    if world == 1:
        return mine
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: record for share in shares for name, record in share.items()}


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete step folders (0 keeps all) and interrupted saves older
    than the newest complete one. Runs after a new checkpoint is complete; never touches the one `latest`
    names, so the last good checkpoint always survives."""
    if keep <= 0:
        return
    latest = read_latest(checkpoint_dir)
    folders = step_dirs(checkpoint_dir)
    complete = [p for p in folders if (p / COMPLETE).is_file()]
    newest = step_number(complete[0]) if complete else None
    stale = complete[keep:] + [p for p in folders if not (p / COMPLETE).is_file() and newest is not None
                               and (step_number(p) or 0) < newest]
    for path in stale:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine: Any, load_dir: Path, tag: str, rank: int, components: Mapping[str, Stateful]) -> int:
    """Restore engine (weights, optimizer, scheduler), the global RNG states and every component's own state
    from this rank's rank_<r>.pt; returns the checkpoint's step."""
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise ProjectError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    rank_file = load_dir / tag / f"rank_{rank}.pt"
    state = upgrade_rank_state(torch.load(rank_file, weights_only=False))
    set_rng_state(state["rng"])
    for name, component in components.items():
        if name not in state:
            raise ProjectError(f"checkpoint file {rank_file} holds no '{name}' state")
        component.load_state_dict(state[name])
    return int(state["step"])


def upgrade_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """A rank_<r>.pt as components store it: older checkpoints kept the parallel model's state flat."""
    if PARALLEL not in state and any(key in state for key in _FLAT_PARALLEL_KEYS):
        state = {**state, PARALLEL: {key: state[key] for key in _FLAT_PARALLEL_KEYS if key in state}}
    return state
