"""Where numbers go: TensorBoard scalars, `metrics.jsonl` (one JSON object per record) and, with
`logging.wandb.mode` online or offline, Weights & Biases (launcher/wandb_logging.py); rank 0 only.

A record goes to metrics.jsonl when it is logged; its scalars go to the writers (TensorBoard, W&B) then too, or,
with `defer_writers`, when `write_pending()` is called: the training loop's `MetricsWriters` component does that
after every step (launcher/components.py), so the writers are a periodic component like the others.

Every record carries `segment`: 0 for a run's first start, one more for each later start (a resume).
After a kill, steps after the last checkpoint are trained again and logged again; for each kind and step
the record with the highest segment is the current one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from launcher import json_safe
from launcher.wandb_logging import WandbConfig, WandbWriter


def last_segment(path: Path) -> int:
    """The segment of the last record in an existing metrics.jsonl (-1 when there is none)."""
    if not path.is_file():
        return -1
    last = -1
    for line in path.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line).get("segment", 0)))
        except (ValueError, AttributeError, TypeError):
            continue  # a line cut short by a kill
    return last


class MetricsLogger:
    """`writers`: TensorBoard's SummaryWriter and the W&B run (when on), both with add_scalar/add_figure/...;
    `config`: the resolved run config, TensorBoard's text `config` and the W&B run's config."""

    def __init__(self, run_path: Path, *, enabled: bool, tensorboard: bool, wandb: WandbConfig | None = None,
                 config: dict[str, Any] | None = None, resuming: bool = False, defer_writers: bool = False) -> None:
        self.enabled = enabled
        self.writer = None
        self.wandb: WandbWriter | None = None
        self._jsonl = None
        self.defer_writers = defer_writers
        self._pending: list[tuple[int, dict[str, float]]] = []  # (step, scalars) the writers have not had yet
        if not enabled:
            return
        run_path.mkdir(parents=True, exist_ok=True)
        path = run_path / "metrics.jsonl"
        self.segment = last_segment(path) + 1
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_path / "tb"))
            if config is not None:
                self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        if wandb is not None and wandb.enabled:
            self.wandb = WandbWriter(wandb, run_path, run_path.name, config or {}, resuming)

    @property
    def writers(self) -> list[Any]:
        return [w for w in (self.writer, self.wandb) if w is not None]

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Record `values` as TensorBoard scalars `<kind>/<name>` and as one JSON line."""
        if not self.enabled:
            return
        scalars = {f"{kind}/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        self._pending.append((step, scalars))
        if not self.defer_writers:
            self.write_pending()
        assert self._jsonl is not None
        record = {"kind": kind, "step": step, "segment": self.segment, "time": time.time(), **values}
        self._jsonl.write(json_safe.dumps(record) + "\n")  # a diverged loss is null, never a bare NaN

    def write_pending(self) -> int:
        """Give the writers every record's scalars logged since the last call, in order; how many records."""
        pending, self._pending = self._pending, []
        for step, scalars in pending:
            if self.writer is not None:
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, step)
            if self.wandb is not None and scalars:
                self.wandb.log(scalars, step)  # one W&B row per record
        return len(pending)

    def close_writers(self, exit_code: int = 0) -> None:
        """Write what is pending, then flush and close TensorBoard and finish the W&B run (once)."""
        if not self.enabled:
            return
        self.write_pending()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.close(exit_code)
            self.wandb = None

    def close(self, exit_code: int = 0) -> None:
        self.close_writers(exit_code)
        if self._jsonl is not None:
            self._jsonl.close()
