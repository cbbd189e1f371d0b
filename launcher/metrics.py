"""Where numbers go: TensorBoard scalars, `metrics.jsonl` (one JSON object per record), rank 0 only."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from launcher import json_safe


class MetricsLogger:
    def __init__(self, run_path: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        run_path.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_path / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_path / "tb"))

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Record `values` as TensorBoard scalars `<kind>/<name>` and as one JSON line."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
        assert self._jsonl is not None
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self._jsonl.write(json_safe.dumps(record) + "\n")  # a diverged loss is null, never a bare NaN

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
