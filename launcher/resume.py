"""Where a run continues from (`--resume auto | none | PATH`), decided from files before any process group.

One run directory holds one history. `--resume auto` continues it from its newest intact checkpoint; a
path continues it only from its own newest checkpoint, or starts a new run directory (a branch) from
any checkpoint. Anything else would leave step folders of two histories side by side, where a name like
step_40 could point at weights of the other one.
"""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint import COMPLETE, find_resumable, has_checkpoints, resolve_checkpoint, step_dirs, step_number
from model.errors import ProjectError

ResumePoint = tuple[Path, str]  # (checkpoints folder, step tag)


def resume_point(run_path: Path, resume: str, world_size: int) -> tuple[ResumePoint | None, str | None]:
    """(checkpoint to load or None, a note for the user or None); ProjectError (one line) when refused."""
    checkpoint_dir = run_path / "checkpoints"
    if resume == "auto":
        return find_resumable(checkpoint_dir, world_size)
    if resume == "none":
        if has_checkpoints(checkpoint_dir):
            raise ProjectError(f"run directory {run_path} already has checkpoints; pass --resume auto to "
                               f"continue it or set logging.run_name to start a new run")
        return None, None
    load_dir, tag = resolve_checkpoint(Path(resume), world_size)
    own = [p for p in step_dirs(checkpoint_dir) if (p / COMPLETE).is_file()]
    if own and own[0].resolve() != (load_dir / tag).resolve():
        branch = f"--set logging.run_name={run_path.name}-from-{tag} --resume {load_dir / tag}"
        if load_dir.resolve() == checkpoint_dir.resolve():
            raise ProjectError(f"{load_dir / tag} is older than this run's newest checkpoint {own[0].name} "
                               f"(step {step_number(own[0])}); continuing it here would mix two histories in "
                               f"{checkpoint_dir}. To branch from it, start a new run: {branch}")
        raise ProjectError(f"run directory {run_path} already has checkpoints of its own (newest {own[0].name}); "
                           f"to continue from {load_dir / tag}, start a new run: {branch}")
    return (load_dir, tag), None
