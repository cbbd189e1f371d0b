"""Activation recompute (parallel.activation_checkpointing) in every layout: one process, TP, PP, ZeRO.

Megatron's modes: `full` recomputes every block (the family's `blocks`) from its input in backward; `selective`
recomputes only attention's core (scores, softmax, dropout, probabilities x values), whose [heads, T, T]
tensors are the largest activations of the eager backend and whose fused backends keep their output.

torch.utils.checkpoint (non-reentrant) restores torch's default generator for the recompute, so the replicated
dropout masks repeat; the tensor-parallel dropout stream lives in the layer factory's RNG tracker
(parallel/random.py), which torch knows nothing of: the recompute context rewinds the tracker to its state at
the forward and puts the advanced state back after, so each rank's head-parallel masks repeat too.
A recomputed block becomes an instance of a subclass of its class whose forward checkpoints the parent's
(model/block_forward.py), so parameter names, state dicts, hooks, isinstance and deep copies are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.block_forward import with_forward

RECOMPUTE_MODES = ("none", "full", "selective")


def recompute_mode(value: Any) -> str:
    """A config value as a mode name: the old booleans mean full (true) and none (false)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    return str(value)


@contextlib.contextmanager
def _rewound(tracker: Any, states: dict[str, Any]) -> Iterator[None]:
    advanced = tracker.state_dict()
    tracker.load_state_dict(states)
    try:
        yield
    finally:
        tracker.load_state_dict(advanced)


def recomputed(function: Callable[..., Any], *args: Any, rng_tracker: Any = None, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` whose intermediate activations are recomputed in backward, with the same
    default-generator and `rng_tracker` (TP) dropout masks as the forward."""
    if not torch.is_grad_enabled():  # evaluation: nothing to keep, nothing to recompute
        return function(*args, **kwargs)
    states = rng_tracker.state_dict() if rng_tracker is not None else None

    def contexts() -> tuple[Any, Any]:
        return contextlib.nullcontext(), (_rewound(rng_tracker, states) if states is not None
                                          else contextlib.nullcontext())

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts, **kwargs)


def _recomputed_forward(parent_forward: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return recomputed(parent_forward, self, *args, rng_tracker=self.recompute_rng_tracker, **kwargs)
    return forward


def apply_activation_checkpointing(model: nn.Module, mode: str, family: Any, rng_tracker: Any = None) -> int:
    """Recompute `model`'s blocks (`full`) or its attention cores (`selective`) in backward; returns how many
    modules recompute. ValueError when the family has nothing to recompute in that mode."""
    mode = recompute_mode(mode)
    if mode == "none":
        return 0
    if mode == "full":
        blocks = family.blocks(model)
        if not blocks:
            raise ValueError(f"family {family.name!r} names no blocks to recompute (FamilySpec.block_types)")
        for block in blocks:
            block.recompute_rng_tracker = rng_tracker
            with_forward(block, "Recomputed", _recomputed_forward)
        return len(blocks)
    if mode == "selective":
        attention = [m for m in family.attention_modules(model) if hasattr(m, "recompute_core")]
        if not attention:
            raise ValueError(f"family {family.name!r} has no attention core to recompute selectively "
                             "(model/attention.py's MultiHeadAttention); use full")
        for module in attention:
            module.recompute_core = True
        return len(attention)
    raise ValueError(f"unknown recompute mode {mode!r} (one of {', '.join(RECOMPUTE_MODES)})")
