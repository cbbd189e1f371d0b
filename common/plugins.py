"""Objects named in a config by import path (`package.module:NAME`): how out-of-repo model families and
attention variants are found in every process (launcher subprocesses and deepspeed ranks import them anew)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
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


def find_registered(registry: dict[str, T], name: str, builtins: Mapping[str, str],
                    load: Callable[[str], T]) -> T | None:
    """`name`'s entry in `registry` (families, variants, data sources): registered already; built in, when
    importing its module (`builtins[name]`) registers it; or an import path, loaded by `load` (which checks it
    and raises one ConfigError line) and registered under `name`. None when it is none of these: the caller
    raises its own one-line error listing its choices."""
    if name not in registry:
        if name in builtins:
            importlib.import_module(builtins[name])
        elif is_import_path(name):
            registry[name] = load(name)
        else:
            return None
    return registry[name]
