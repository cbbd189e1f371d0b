"""Can a folder be created and written? Checked before any work starts, without creating anything."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import ProjectError


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (created and) written as a folder, naming the blocking path; None if it can."""
    target = Path(path).absolute()
    existing = target
    while existing != existing.parent:
        try:
            existing.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            existing = existing.parent
        except OSError as error:  # e.g. ENAMETOOLONG: mkdir would fail the same way
            return f"{error.strerror or error} (below {existing.parent})"
    if not existing.is_dir():
        return f"{existing} is not a folder" + ("" if existing == target else f", so {target} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return name_problem(existing, target)


def name_problem(existing: Path, target: Path) -> str | None:
    """Why mkdir would fail below `existing` for reasons other than permissions: a name or path too long for
    the file system (ENAMETOOLONG), an empty or NUL-containing name."""
    if "\0" in str(target):
        return f"{target!s:.80} contains a NUL character"
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in target.parts[len(existing.parts):]:
        if len(os.fsencode(part)) > name_max:
            return f"the name {part[:40]}... is longer than the file system allows ({name_max} bytes)"
    if len(os.fsencode(str(target))) >= path_max:
        return f"the path is longer than the file system allows ({path_max} bytes)"
    return None


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise ProjectError (one line naming `what` and the path) when the folder cannot be written."""
    problem = writable_dir_problem(path)
    if problem is not None:
        raise ProjectError(f"{what} {path} cannot be written: {problem}")
