"""Writes that survive a kill or a power loss at any moment: the old file or the new one, never a torn one.
Checkpoints (checkpoint/store.py) and prepared-data records (data_pipeline/prepare.py) both rely on it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to stable storage (a directory: its list of names)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, rename it over `path`, and fsync the folder (the rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
