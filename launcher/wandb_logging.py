"""Weights & Biases as a second sink of launcher/metrics.py: what TensorBoard gets, on rank 0 only.

    logging:
      wandb: {mode: offline, project: outeffhop, entity: null, tags: [softmax1]}   # mode disabled: off (default)

Scalars go under the same names as TensorBoard's (`train/loss`, `val/ppl`, `outliers_kurtosis/...`) against the
training step (the metric `step`, so steps logged again after a resume from an earlier checkpoint are plotted,
as TensorBoard does, instead of dropped by W&B's own monotonic step). The periodic outlier evaluation adds its
per-layer image, the worst module's histogram and the per-module table; the resolved run config is the W&B
config. The run id is stored in `<run dir>/wandb_run_id`: a resumed run (--resume) continues the same W&B run.
Offline runs are written under `<run dir>/wandb/` and need no network (`wandb sync <run dir>/wandb/offline-run-*`
uploads them later; `wandb leet <run dir>/wandb` browses them locally).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"
STEP_METRIC = "step"


@dataclass
class WandbConfig:
    """The `logging.wandb` section."""

    mode: str = "disabled"  # online | offline | disabled (no W&B at all)
    project: str = "outeffhop"
    entity: str | None = None  # a W&B team or user; null: the logged-in user's default
    tags: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def validate(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ConfigError("logging.wandb.mode", self.mode, f"must be one of {', '.join(WANDB_MODES)}")
        if not self.project or "/" in self.project:
            raise ConfigError("logging.wandb.project", self.project, "must be a W&B project name (no '/')")
        if self.enabled:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("logging.wandb.mode", self.mode, "needs the wandb package: pip install "
                                  "wandb==0.31.0 (or set logging.wandb.mode=disabled)") from None


def run_id(run_path: Path, resuming: bool) -> tuple[str, bool]:
    """(W&B run id, whether it continues an earlier one): the stored id when resuming, else a new one (stored)."""
    path = run_path / RUN_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip(), True
    new = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids (valid in URLs and folder names)
    path.write_text(new + "\n")
    return new, False


class WandbWriter:
    """One W&B run, with TensorBoard SummaryWriter's add_* methods, so outliers/plots.py logs into it unchanged."""

    def __init__(self, cfg: WandbConfig, run_path: Path, name: str, config: dict[str, Any], resuming: bool) -> None:
        import wandb

        run_path.mkdir(parents=True, exist_ok=True)
        identifier, continued = run_id(run_path, resuming)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=name, tags=list(cfg.tags) or None, config=config,
            id=identifier, resume="allow" if continued else None, mode=cfg.mode, dir=str(run_path),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.define_metric(STEP_METRIC, hidden=True)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log({STEP_METRIC: step, **values})

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.log({tag: value}, step)

    def add_histogram(self, tag: str, values: Any, step: int) -> None:
        import wandb

        self.log({tag: wandb.Histogram(values.detach().float().cpu().numpy())}, step)

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        import wandb

        self.log({tag: wandb.Image(figure)}, step)

    def add_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        import wandb

        self.log({tag: wandb.Table(columns=columns, data=rows)}, step)

    def flush(self) -> None:
        """W&B writes as it goes (TensorBoard's writer needs this; kept for the same interface)."""

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
