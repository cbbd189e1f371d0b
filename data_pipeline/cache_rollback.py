"""Undo what a failed data preparation wrote into the data cache.

A corrupt or empty local data file is only found when `datasets` reads it, and by then the cache holds a
tokenizer lock file and `datasets`' partial arrow cache (and maybe a cache folder that did not exist).
Neither library rolls back on error, so a bad input would leave files behind; this removes every path
under the cache that the failed block created. Everything there is derived data, rebuilt on the next run.
Only a rejected input (ProjectError) rolls back: another run that shares the cache and created files in
the same seconds would lose them too, a risk worth taking for bad input but not for every crash.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from common.errors import ProjectError


def _existing(root: Path) -> dict[Path, tuple[int, int] | None]:
    """Every path under root (and root), with (atime, mtime) for folders: adding and removing an entry
    changes a folder's mtime, which the rollback puts back."""
    paths = [root, *root.rglob("*")] if root.exists() else []
    return {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) if p.is_dir() else None for p in paths}


@contextlib.contextmanager
def remove_new_cache_files_on_error(root: str | Path) -> Iterator[None]:
    """When the block rejects its input, delete the paths under `root` (and `root` itself) it created."""
    root = Path(root)
    before = _existing(root)
    try:
        yield
    except ProjectError:
        created = sorted(set(_existing(root)) - set(before), key=lambda p: len(p.parts))
        for path in created:  # shallowest first: removing a new folder removes what is inside it
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path, times in before.items():
            if times is not None and path.is_dir():
                os.utime(path, ns=times)
        raise
