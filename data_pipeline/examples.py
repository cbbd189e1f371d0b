"""Training and evaluation examples of a text family: packed token blocks turned into examples by the family's
objective, the one place the launcher, the periodic and standalone evaluations and the calibration data all
come through (so they see the same examples for the same config).

This module packs, blends, shards and prepares blocks; what an example *is* belongs to the family's objective
(`TextObjective`): OPT's causal LM (model/opt/objective.py) trains on the blocks themselves, BERT's masked LM
(model/bert/objective.py) masks them. A new text objective is one such class in its family's package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from data_pipeline.blend import BlendStream
from data_pipeline.config import DataConfig, blend_parts
from data_pipeline.indexed import IndexedStream
from data_pipeline.indexed import validation_blocks as indexed_validation_blocks
from data_pipeline.packing import BlockStream, block_prefix, validation_blocks
from data_pipeline.prepared import is_indexed

Blocks = BlockStream | BlendStream | IndexedStream  # one rank's endless, resumable stream of token blocks


class TextObjective(ABC):
    """What a text family trains for, made from packed token blocks (FamilySpec.objective of OPT and BERT)."""

    name: str  # the run summary's `objective`, e.g. "causal", "mlm"

    @abstractmethod
    def train(self, cfg: DataConfig, tokenizer: Any, dp_rank: int, dp_world: int, vocab_size: int | None,
              split: str = "train") -> Any:
        """The endless, resumable training examples of one data-parallel rank (state_dict / load_state_dict), of
        `split` (calibration's may differ)."""

    @abstractmethod
    def evaluate(self, cfg: DataConfig, tokenizer: Any, split: str, dp_rank: int, dp_world: int,
                 max_blocks: int | None, vocab_size: int | None) -> list[torch.Tensor]:
        """One source's fixed evaluation examples of one rank (global example i goes to rank i % dp_world)."""


def train_blocks(cfg: DataConfig, tokenizer: Any, dp_rank: int = 0, dp_world: int = 1,
                 separator_id: int | None = None, split: str = "train") -> Blocks:
    """One source's block stream, or the weighted blend of data.sources; prepared data by global sample index."""
    if is_indexed(cfg):
        return IndexedStream(cfg, tokenizer, split, dp_rank, dp_world, separator_id=separator_id,
                             prefix=block_prefix(cfg, tokenizer))
    if cfg.sources:
        return BlendStream(blend_parts(cfg), tokenizer, split, dp_rank=dp_rank, dp_world=dp_world,
                           separator_id=separator_id)
    return BlockStream(cfg, tokenizer, split, dp_rank=dp_rank, dp_world=dp_world, separator_id=separator_id)


def eval_blocks(cfg: DataConfig, tokenizer: Any, split: str = "validation", dp_rank: int = 0, dp_world: int = 1,
                max_blocks: int | None = None, separator_id: int | None = None) -> list[torch.Tensor]:
    """One source's fixed evaluation blocks of one rank: the first `max_blocks` of the split, global block i
    going to rank i % dp_world (prepared data: its samples with a fixed seed)."""
    if is_indexed(cfg):
        return indexed_validation_blocks(cfg, tokenizer, split, dp_rank, dp_world, max_blocks,
                                         separator_id=separator_id, prefix=block_prefix(cfg, tokenizer))
    return validation_blocks(cfg, tokenizer, split, dp_rank=dp_rank, dp_world=dp_world, max_blocks=max_blocks,
                             separator_id=separator_id)


def train_examples(cfg: DataConfig, objective: TextObjective, tokenizer: Any, dp_rank: int = 0, dp_world: int = 1,
                   vocab_size: int | None = None, split: str = "train") -> Any:
    """The endless, resumable training stream of one data-parallel rank (of `split`: calibration's may differ)."""
    return objective.train(cfg, tokenizer, dp_rank, dp_world, vocab_size, split)


def eval_examples(cfg: DataConfig, objective: TextObjective, tokenizer: Any, split: str = "validation",
                  dp_rank: int = 0, dp_world: int = 1, max_blocks: int | None = None,
                  vocab_size: int | None = None) -> list[torch.Tensor]:
    """The fixed evaluation examples of one rank (global example i goes to rank i % dp_world), the same for
    every layout. A blend evaluates on every source's examples together (eval_examples_by_source: each
    source's share of max_blocks, so the mean loss weighs the sources like training does)."""
    if cfg.sources:
        by_source = eval_examples_by_source(cfg, objective, tokenizer, split, dp_rank, dp_world, max_blocks, vocab_size)
        return [example for examples in by_source.values() for example in examples]
    return objective.evaluate(cfg, tokenizer, split, dp_rank, dp_world, max_blocks, vocab_size)


def calibration_examples(cfg: DataConfig, objective: TextObjective, tokenizer: Any, count: int,
                         vocab_size: int | None = None) -> list[torch.Tensor]:
    """The first `count` examples of the seeded training stream: the same on every call. Prepared data reads its
    validation split instead (held-out data, in data.seed's order: other samples than validation's fixed-seed
    first ones unless the split is small); streamed sources read train, as the demo's and study's numbers do."""
    split = "validation" if is_indexed(cfg) else "train"
    stream = train_examples(cfg, objective, tokenizer, vocab_size=vocab_size, split=split)
    return [next(stream) for _ in range(count)]


def eval_examples_by_source(cfg: DataConfig, objective: TextObjective, tokenizer: Any, split: str = "validation",
                            dp_rank: int = 0, dp_world: int = 1, max_blocks: int | None = None,
                            vocab_size: int | None = None) -> dict[str, list[torch.Tensor]]:
    """A blend's evaluation examples per source name ({} for one source): source i gets
    max(dp_world, round(max_blocks x weight_i)) blocks (all of its split when max_blocks is None)."""
    if not cfg.sources:
        return {}
    out: dict[str, list[torch.Tensor]] = {}
    for part in blend_parts(cfg):
        blocks = None if max_blocks is None else max(dp_world, round(max_blocks * part.weight))
        out[part.name] = eval_examples(part.cfg, objective, tokenizer, split, dp_rank, dp_world, blocks, vocab_size)
    return out
