"""Measured activation memory of one forward+backward on CPU: what launcher/planner.py's activation model is
checked against (tests/test_planner.py, `python -m launcher.plan --measure`).

CPU has no allocator statistics, so live tensor storages are tracked per op with a TorchDispatchMode and storage
weak references (inputs and existing tensors excluded). Parameter gradients are allocated before the pass, so
what is counted is activations, their gradients and the loss's buffers, as the planner's `activations` term."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.family import build_model, family_of
from model.recompute import apply_activation_checkpointing


class LiveTensorMemory(TorchDispatchMode):
    """Peak total bytes of tensor storages alive across ops, counting storages first seen as op outputs.

    `exclude`: tensors that exist already (weights, their gradients): views of them (`weight.t()`) are op
    outputs too, and would otherwise be counted as new memory."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0
        self._exclude = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self._exclude:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_activation_peak(cfg: Any, seed: int = 0) -> int:
    """Peak bytes of one training forward+backward of `cfg` (a RunConfig) at train.micro_batch_size x
    data.seq_length on CPU in fp32 with parallel.activation_checkpointing: the family's synthetic batch of random
    inputs (FamilySpec.synthetic_batch: e.g. BERT's labels select data.mlm_probability of the positions)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, seq_length=cfg.data.seq_length)
    model.train()
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, family_of(cfg.model))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # so gradients of weights are not counted as activations
    batch = family_of(cfg.model).synthetic_batch(cfg, generator)
    existing = [t for p in model.parameters() for t in (p, p.grad)]
    with LiveTensorMemory(exclude=existing) as tracker:
        model(batch.inputs, labels=batch.labels).backward()
    return tracker.peak
