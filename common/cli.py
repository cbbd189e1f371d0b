"""One entry-point discipline for every command (launcher.*, data_pipeline.*, benchmarks.*):

- bad input (a ProjectError, or a flag argparse cannot parse) -> one `error:` line naming the key, flag, path or
  value, exit code 2; commands raise it before any process group, export, download or write;
- a runtime failure (any other exception) -> one `error:` line, exit code 1, the traceback (and the library log
  lines of the run) in a log file the line names;
- Ctrl-C -> one line, exit code 130;
- third-party log lines (datasets, transformers, ...) stay off the console: they go to the log file on failure.

    def main(argv: list[str] | None = None) -> int:
        return run_command("launcher.plan", _main, argv)

argparse prints its usage and exits on a bad flag; `ArgumentParser` here raises UsageError instead, so a bad
flag reads like any other bad input.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from common.errors import ConfigError, ProjectError

# Loggers of this project: their warnings reach the console. Everything else is a library's.
PROJECT_LOGGERS = ("launcher", "data_pipeline", "model", "parallel", "checkpoint", "outliers", "benchmarks", "common")
# Libraries that install a console handler of their own on import (datasets, transformers: their
# utils.logging): it is removed so their records reach only the root logger, which keeps them off the console.
SELF_HANDLING_LIBRARIES = ("datasets", "transformers", "huggingface_hub", "lm-eval", "lm_eval")
LIBRARY_LINES_KEPT = 200  # the newest library log lines, written into the crash log


class UsageError(ProjectError):
    """A command-line flag argparse rejected (unknown flag, missing value, not an integer, bad choice)."""


class CommandFailed(Exception):
    """A runtime failure the command has already put in one line (e.g. a submitted job failed with its own
    `error:` line): printed as it is, exit code 1, no traceback file."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one `error:` line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def positive_int(flag: str, value: int | None, *, allow_none: bool = True) -> None:
    """Raise ConfigError naming `flag` unless `value` is a positive integer (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(flag, value, "must be a positive integer")


def finite_number(flag: str, value: float | None, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> None:
    """Raise ConfigError naming `flag` unless `value` is finite and within [low, high] ((low, high] with low_open)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(flag, value, "must be a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        left = "(" if low_open else "["
        raise ConfigError(flag, value, f"must lie in {left}{'-inf' if low is None else low}, "
                                       f"{'inf' if high is None else high}]")


class _LibraryRecords(logging.Handler):
    """Keeps the newest library log lines (for the crash log) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: collections.deque[str] = collections.deque(maxlen=LIBRARY_LINES_KEPT)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not _is_project(record.name):
            try:
                self.lines.append(self.format(record))
            except Exception:  # a library's malformed record must never take the command down
                pass


class _ProjectOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _is_project(record.name)


def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_LOGGERS or name == "__main__"


_library_records = _LibraryRecords()


def detach_library_console_handlers() -> None:
    """Remove the console handlers datasets/transformers install on import; their records go to the root logger
    (whose console handler, in a command, shows only this project's). Call right after importing such a library."""
    for name in SELF_HANDLING_LIBRARIES:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler:  # theirs print to stderr; a FileHandler someone added stays
                library.removeHandler(handler)
        library.propagate = True


def route_library_logs() -> None:
    """Library log lines off the console, into the crash log (every command's start)."""
    root = logging.getLogger()
    if _library_records not in root.handlers:
        root.addHandler(_library_records)
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _ProjectOnly) for f in handler.filters):
            handler.addFilter(_ProjectOnly())
    detach_library_console_handlers()


def library_log_lines() -> list[str]:
    return list(_library_records.lines)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """This project's warnings on whatever sys.stderr is now (a command called in-process, e.g. by a test,
    may find sys.stderr replaced since the previous call)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.addFilter(_ProjectOnly())

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _console_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and h is not _library_records for h in root.handlers):
        root.addHandler(_Stderr())
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    route_library_logs()


class _CrashLog:
    """Where a command's runtime failure leaves its traceback: a folder the command names once it knows its
    output (set_crash_dir), else the system's temporary folder."""

    folder: Path | None = None


def set_crash_dir(folder: str | os.PathLike | None) -> None:
    """The command's output folder: a runtime failure writes <command>-crash.log there (once it exists)."""
    _CrashLog.folder = Path(folder) if folder is not None else None


def write_crash_log(command: str, text: str) -> Path | None:
    """The traceback plus the newest library log lines; returns the file, or None when none could be written."""
    name = f"{command.rsplit('.', 1)[-1]}-crash.log"
    candidates = [_CrashLog.folder / name] if _CrashLog.folder is not None and _CrashLog.folder.is_dir() else []
    candidates.append(Path(tempfile.gettempdir()) / f"outeffhop-{command}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                    f"{os.getpid()}.log")
    body = text + ("\nlibrary log lines (newest last):\n" + "\n".join(library_log_lines()) + "\n"
                   if library_log_lines() else "")
    for path in candidates:
        try:
            path.write_text(body)
            return path
        except OSError:
            continue
    return None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def run_command(command: str, body: Callable[[list[str] | None], int | None], argv: list[str] | None,
                *, failure_line: Callable[[BaseException], str] | None = None) -> int:
    """Run a command's body under the discipline above; returns the exit code.

    `failure_line` (optional) turns a runtime failure into the command's own line (pretrain: the out-of-memory
    advice and the last checkpoint); the default names the exception and the crash log."""
    _console_logging()
    set_crash_dir(None)
    try:
        code = body(argv)
    except ProjectError as error:
        usage = f" (see python -m {command} --help)" if isinstance(error, UsageError) else ""
        print(f"error: {error}{usage}", file=sys.stderr, flush=True)
        return 2
    except CommandFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    except SystemExit as stop:  # --help, or a command that exits on purpose
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Exception as error:  # a bug or an environment failure: one line, the traceback in a file
        if failure_line is not None:
            line = failure_line(error)
        else:
            log = write_crash_log(command, traceback.format_exc())
            where = f" (traceback in {log})" if log is not None else ""
            line = f"{command} failed: {type(error).__name__}: {one_line(error)}{where}"
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    return 0 if code is None else int(code)
