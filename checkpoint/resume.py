"""Where a run continues from (`--resume auto | none | PATH`), decided from files before any process group.

One run directory holds one history. `--resume auto` continues it from its newest intact checkpoint; a
path continues it only from its own newest checkpoint, or starts a new run directory (a branch) from
any checkpoint. Anything else would leave step folders of two histories side by side, where a name like
step_40 could point at weights of the other one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from checkpoint.store import COMPLETE, find_resumable, has_checkpoints, resolve_checkpoint, step_dirs, step_number
from common.errors import ProjectError

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


# Settings a checkpoint fixes: the model's shape, the data stream it is a position in, the layout and batch
# its files and RNG states were written for. Everything else (LR schedule, steps, intervals, logging,
# evaluation) may change on resume and takes effect.
FIXED_SECTIONS = ("model.", "attention.", "data.", "parallel.")
CHANGEABLE = {"attention.backend", "data.cache_dir", "data.prefetch", "parallel.activation_checkpointing",
              "train.compile"}
FIXED_TRAIN = {"train.micro_batch_size", "train.global_batch_size", "train.precision", "train.seed"}
# New values that continue whatever the checkpoint had: data.shard_by: auto resumes the stream however it was
# split (the data state holds that, e.g. blocks from before auto was the default) and so never blocks a resume.
CONTINUES = {("data.shard_by", "auto")}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> tuple[
        dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(changes a checkpoint cannot take, changes that apply on resume), each key -> (saved, new).

    `defaults`: the config schema's defaults (the run config's `to_dict()` of a default config)."""
    # A key the saved config lacks was added to the schema after the checkpoint was written: that run used
    # what is now its default (new keys default to the old behaviour). A key the schema no longer has
    # cannot apply either way. So a code update alone never blocks a resume (e.g. a requeued Slurm job).
    old_flat, new_flat = {**_flatten(defaults), **_flatten(saved)}, _flatten(new)
    changed = {key: (old_flat.get(key), value) for key, value in sorted(new_flat.items())
               if old_flat.get(key) != value and key != "train.init_from"}  # init_from is ignored on resume
    fixed = {key: change for key, change in changed.items() if key not in CHANGEABLE
             and (key, change[1]) not in CONTINUES and (key.startswith(FIXED_SECTIONS) or key in FIXED_TRAIN)}
    return fixed, {key: change for key, change in changed.items() if key not in fixed}


def saved_config(point: ResumePoint) -> dict[str, Any] | None:
    """The config that wrote a checkpoint: step_N/config.yaml, else the run's config.yaml (older checkpoints)."""
    load_dir, tag = point
    for path in (load_dir / tag / "config.yaml", load_dir.parent / "config.yaml"):
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            return loaded if isinstance(loaded, dict) else None
    return None


def check_resume_config(point: ResumePoint, new: dict[str, Any],
                        defaults: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Refuse (one line listing the keys) settings the checkpoint cannot take; return the ones that apply."""
    saved = saved_config(point)
    if saved is None:
        return {}
    fixed, changeable = config_changes(saved, new, defaults)
    if fixed:
        listed = ", ".join(f"{key} ({old!r} -> {value!r})" for key, (old, value) in fixed.items())
        raise ProjectError(f"cannot resume {point[0] / point[1]} with changed {listed}: the checkpoint was written "
                           f"for the old values; start a new run (logging.run_name) with train.init_from for new "
                           f"shapes or data")
    return changeable
