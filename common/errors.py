"""The project's user-facing error: one line that names the offending key, path or value."""

from __future__ import annotations

from typing import Any


class ProjectError(Exception):
    """An error caused by user input (config, data, checkpoint); printed as one line, exit code 2."""


class ConfigError(ProjectError, ValueError):
    def __init__(self, key: str, value: Any, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"config key '{key}' = {value!r}: {problem}")
