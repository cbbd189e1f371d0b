"""A config value checked and converted against its declared type; ConfigError (one line naming the key) if not.
Shared by the run config (launcher/config.py) and the entries of a blend (data.sources)."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from common.errors import ConfigError


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value against a dataclass field type (int, float, bool, str, Optional, list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        last_error: ConfigError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                last_error = error
        assert last_error is not None
        raise last_error
    if origin is list:
        if isinstance(value, str):  # a single path given on the command line
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, value, "must be a list")
        (item_type,) = typing.get_args(annotation)
        return [coerce(item, item_type, key) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, value, "must be an integer")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(number):  # no setting means anything at inf/NaN; they only fail later, elsewhere
            raise ConfigError(key, value, "must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "must be a string")
    return value
