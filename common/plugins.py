"""Objects named in a config by import path (`package.module:NAME`): how out-of-repo model families and
attention variants are found in every process (launcher subprocesses and deepspeed ranks import them anew)."""

from __future__ import annotations

import importlib
from typing import TypeVar

from common.errors import ConfigError

T = TypeVar("T")


def is_import_path(name: object) -> bool:
    return isinstance(name, str) and ":" in name


def import_named(name: str, kind: type[T], key: str) -> T:
    """The object `package.module:NAME` names, checked to be a `kind`; one ConfigError line naming `key`."""
    module_name, _, attr = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(key, name, f"cannot be imported ({error})") from None
    if not isinstance(found, kind):
        raise ConfigError(key, name, f"does not name a {kind.__module__}.{kind.__qualname__}")
    return found
