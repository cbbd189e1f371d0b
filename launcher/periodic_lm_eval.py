"""The in-training lm-evaluation-harness hook: every `eval.lm_eval_interval` steps (and at the last step) rank 0
runs launcher.lm_eval on the checkpoint just written and logs the task scores (`kind: lm_eval` in metrics.jsonl,
TensorBoard scalars `lm_eval/<task>/<metric>`); the result file lands in that step's directory. The other ranks
wait at a barrier; training's RNG streams are not touched (the harness runs on an exported copy)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from launcher.distributed import barrier


class PeriodicLmEval:
    def __init__(self, cfg: Any, metrics: Any, *, is_main: bool) -> None:
        self.cfg, self.metrics, self.is_main = cfg, metrics, is_main
        self.tasks: list[str] = list(cfg.eval.lm_eval_tasks)
        self.interval: int = cfg.eval.lm_eval_interval
        self.seconds = 0.0

    @classmethod
    def create(cls, cfg: Any, metrics: Any, *, is_main: bool) -> PeriodicLmEval | None:
        return cls(cfg, metrics, is_main=is_main) if cfg.eval.lm_eval_tasks else None

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.cfg.train.steps

    def run(self, step: int, step_dir: Path, device: Any) -> str | None:
        """Evaluate the checkpoint in `step_dir`, log the scores; returns a one-line summary on rank 0."""
        line = None
        if self.is_main:
            from launcher.lm_eval import run_lm_eval

            start = time.perf_counter()
            result = run_lm_eval(step_dir, self.tasks, limit=self.cfg.eval.lm_eval_limit, device=str(device),
                                 compare_own=False)
            scores = {f"{task}/{metric}": value for task, metrics in result["tasks"].items()
                      for metric, value in metrics.items()}
            self.metrics.log(step, "lm_eval", scores)
            self.seconds += time.perf_counter() - start
            line = (f"step {step}: lm-eval " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                    + f" [{time.perf_counter() - start:.1f}s]")
        barrier()
        return line
