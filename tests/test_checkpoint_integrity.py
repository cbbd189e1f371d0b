"""Checkpoint integrity: a manifest of sizes and sha256 sums written last, fsynced files and pointers,
verification before resuming, and `--resume auto` falling back to the newest intact checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_pretrain, tiny_overrides, train_losses
from checkpoint.store import COMPLETE, LATEST, read_latest, save_checkpoint
from launcher.pretrain import main
from checkpoint.resume import resume_point
from common.errors import ProjectError

MODEL_FILE = "mp_rank_00_model_states.pt"


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / trained_run.name
    shutil.copytree(trained_run, run)
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_fill(path: Path) -> None:  # same size, every byte zero: only the checksum can tell
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated model file": lambda step: truncate(step / MODEL_FILE),
    "zeroed model file": lambda step: zero_fill(step / MODEL_FILE),
    "truncated rank file": lambda step: truncate(step / "rank_0.pt"),
    "missing rank file": lambda step: (step / "rank_0.pt").unlink(),
    "garbage manifest": lambda step: (step / COMPLETE).write_bytes(b"\x00\xff garbage"),
}


def test_manifest_lists_every_file_with_size_and_checksum(trained_run: Path) -> None:
    step = trained_run / "checkpoints" / "step_6"
    manifest = json.loads((step / COMPLETE).read_text())
    assert manifest["step"] == 6
    assert set(manifest["files"]) == {MODEL_FILE, "rank_0.pt", "config.yaml"}
    assert all(manifest["files"][name]["size"] == (step / name).stat().st_size for name in manifest["files"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(trained_run: Path, tmp_path: Path,
                                                                   damage: str) -> None:
    run = copy_run(trained_run, tmp_path)
    DAMAGE[damage](run / "checkpoints" / "step_6")
    (point, note) = resume_point(run, "auto", world_size=1)
    assert point == (run / "checkpoints", "step_3")
    assert note is not None and "step_6" in note and "newest intact" in note and "\n" not in note
    with pytest.raises(ProjectError, match="step_6 cannot be resumed"):  # an explicit path is never replaced
        resume_point(run, str(run / "checkpoints" / "step_6"), world_size=1)


@pytest.mark.parametrize("pointer", [b"", b"\x00\x9c\xffgarbage", b"step_99", None])
def test_a_bad_or_missing_latest_pointer_still_finds_the_step_folders(trained_run: Path, tmp_path: Path,
                                                                      pointer: bytes | None) -> None:
    run = copy_run(trained_run, tmp_path)
    latest = run / "checkpoints" / LATEST
    latest.unlink() if pointer is None else latest.write_bytes(pointer)
    assert resume_point(run, "auto", world_size=1)[0] == (run / "checkpoints", "step_6")
    with pytest.raises(ProjectError, match="already has checkpoints"):  # never a fresh start over them
        resume_point(run, "none", world_size=1)


def test_no_intact_checkpoint_stops_with_one_line(trained_run: Path, tmp_path: Path, data_cache: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(trained_run, tmp_path)
    for step in ("step_3", "step_6"):
        zero_fill(run / "checkpoints" / step / MODEL_FILE)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    args = ["--config", "configs/opt_tiny.yaml", "--resume", "auto"]
    args += [x for o in tiny_overrides(data_cache, tmp_path, **{"logging.run_name": run.name}) for x in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no intact checkpoint in") and "step_6" in err and "\n" not in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.slow
def test_fallback_resume_continues_exactly_from_the_older_checkpoint(trained_run: Path, tmp_path: Path,
                                                                      data_cache: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "metrics.jsonl").unlink()
    zero_fill(run / "checkpoints" / "step_6" / MODEL_FILE)
    result = run_pretrain(tiny_overrides(data_cache, tmp_path, **{"logging.run_name": run.name}), resume="auto")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "resuming from" in notes[0] and "step_3" in notes[0], result.stderr[-2000:]
    expected = train_losses(trained_run)
    got = train_losses(run)
    assert sorted(got) == [4, 5, 6] and all(got[s] == pytest.approx(expected[s], rel=1e-6) for s in got)
    assert read_latest(run / "checkpoints") == "step_6"  # rewritten, intact again
    assert resume_point(run, str(run / "checkpoints" / "step_6"), world_size=1)[0] is not None


class _NoState:
    """A checkpoint component with nothing to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Engine:
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(save_dir) / tag / MODEL_FILE).write_bytes(b"weights")


def test_checkpoint_files_manifest_latest_and_folders_are_fsynced(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(_Engine(), tmp_path, 3, 0, {"data": _NoState()}, keep=2, files={"config.yaml": "x: 1\n"})
    step = tmp_path / "step_3"
    for path in (step / MODEL_FILE, step / "rank_0.pt", step / "config.yaml", step, tmp_path):
        assert str(path.resolve()) in synced, path
    # the manifest and `latest` are fsynced under their temporary names, before the rename
    assert any(Path(p).name.startswith(f".{COMPLETE}.tmp") for p in synced)
    assert any(Path(p).name.startswith(f".{LATEST}.tmp") for p in synced)
    assert synced.index(str(step.resolve())) < max(i for i, p in enumerate(synced) if f".{LATEST}.tmp" in p)
