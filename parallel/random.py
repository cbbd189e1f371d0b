"""A device-agnostic model-parallel RNG tracker.

Dropout inside tensor-parallel regions (attention probabilities of this rank's heads) must differ
between TP ranks, while dropout on replicated activations must agree. megatron-core's tracker does
this with CUDA generator states only and fails on CPU; this one forks torch's default generator
(CPU, plus the current CUDA device when present), so the same code runs on both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_OFFSET = 2718  # Megatron's offset: keeps the TP stream apart from the default seed stream


class RNGStatesTracker:
    def __init__(self) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _capture() -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def _restore(state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def add(self, name: str, seed: int) -> None:
        outer = self._capture()
        torch.manual_seed(seed)
        self.states[name] = self._capture()
        self._restore(outer)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise RuntimeError(f"RNG state {name!r} was never added to the tracker")
        outer = self._capture()
        self._restore(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._capture()
            self._restore(outer)

    def state_dict(self) -> dict[str, Any]:
        return {name: dict(state) for name, state in self.states.items()}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        self.states = {name: dict(state) for name, state in states.items()}


TRACKER = RNGStatesTracker()


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    TRACKER.add(MODEL_PARALLEL_RNG, seed + _OFFSET + tp_rank)
