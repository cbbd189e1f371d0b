"""Strict JSON for files other programs read (summary.json, ...): NaN and infinities become null.

Python's json writes a bare `NaN`, which is not JSON (jq, JavaScript and most parsers reject the file);
a loss that does not exist yet (a run stopped before its first log interval) or diverged is `null` instead.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps that can only produce valid JSON (raises on anything non-finite it did not convert)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
