"""Training and evaluation examples for a model family's objective: the one place that knows both.

    objective "causal" (OPT): token blocks of data.seq_length, documents separated by EOS (BOS first with data.bos);
    objective "mlm"    (BERT): [2, data.seq_length] masked examples (data_pipeline/mlm.py).

The launcher, the periodic and standalone evaluations and the calibration data all come through here, so
they see the same examples for the same config.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from data_pipeline.blend import BlendStream
from data_pipeline.config import DataConfig, blend_parts
from data_pipeline.mlm import SPECIAL_TOKENS, Masker, MaskingRule, MLMStream
from data_pipeline.indexed import IndexedStream
from data_pipeline.prepared import is_indexed
from data_pipeline.indexed import validation_blocks as indexed_validation_blocks
from data_pipeline.packing import BlockStream, block_prefix, validation_blocks
from common.errors import ConfigError, ProjectError

OBJECTIVES = ("causal", "mlm")


def _check(cfg: DataConfig, objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (expected one of {OBJECTIVES})")
    if objective == "mlm" and cfg.seq_length <= SPECIAL_TOKENS:
        raise ConfigError("data.seq_length", cfg.seq_length, "must exceed 2 for masked-LM examples ([CLS] ... [SEP])")


def _block_config(cfg: DataConfig) -> DataConfig:
    # [CLS] is the masked-LM example's fixed first token: no BOS inside it.
    return replace(cfg, seq_length=cfg.seq_length - SPECIAL_TOKENS, bos=False)


def _blocks(cfg: DataConfig, tokenizer: Any, dp_rank: int, dp_world: int, separator_id: int | None = None,
            split: str = "train") -> BlockStream | BlendStream | IndexedStream:
    """One source's block stream, or the weighted blend of data.sources; prepared data by global sample index."""
    if is_indexed(cfg):
        return IndexedStream(cfg, tokenizer, split, dp_rank, dp_world, separator_id=separator_id,
                             prefix=block_prefix(cfg, tokenizer))
    if cfg.sources:
        return BlendStream(blend_parts(cfg), tokenizer, split, dp_rank=dp_rank, dp_world=dp_world,
                           separator_id=separator_id)
    return BlockStream(cfg, tokenizer, split, dp_rank=dp_rank, dp_world=dp_world, separator_id=separator_id)


def train_examples(cfg: DataConfig, objective: str, tokenizer: Any, dp_rank: int = 0, dp_world: int = 1,
                   vocab_size: int | None = None, split: str = "train") -> BlockStream | BlendStream | MLMStream:
    """The endless, resumable training stream of one data-parallel rank (of `split`: calibration's may differ)."""
    _check(cfg, objective)
    if objective == "causal":
        return _blocks(cfg, tokenizer, dp_rank, dp_world, split=split)
    masker = Masker(tokenizer, MaskingRule.from_config(cfg), vocab_size)
    blocks = _blocks(_block_config(cfg), tokenizer, dp_rank, dp_world, separator_id=masker.sep_id, split=split)
    return MLMStream(blocks, masker, cfg.seed)  # type: ignore[arg-type]  (a blend has BlockStream's interface)


def eval_examples(cfg: DataConfig, objective: str, tokenizer: Any, split: str = "validation", dp_rank: int = 0,
                  dp_world: int = 1, max_blocks: int | None = None, vocab_size: int | None = None) -> list[torch.Tensor]:
    """The fixed evaluation examples of one rank (global example i goes to rank i % dp_world); MLM masks
    come from data.mlm_eval_seed and the example's global index, so they are the same for every layout.
    A blend evaluates on every source's examples together (eval_examples_by_source: each source's share of
    max_blocks, so the mean loss weighs the sources like training does)."""
    if cfg.sources:
        by_source = eval_examples_by_source(cfg, objective, tokenizer, split, dp_rank, dp_world, max_blocks, vocab_size)
        return [example for examples in by_source.values() for example in examples]
    _check(cfg, objective)
    if objective == "causal":
        if is_indexed(cfg):
            return indexed_validation_blocks(cfg, tokenizer, split, dp_rank, dp_world, max_blocks,
                                             prefix=block_prefix(cfg, tokenizer))
        return validation_blocks(cfg, tokenizer, split, dp_rank=dp_rank, dp_world=dp_world, max_blocks=max_blocks)
    masker = Masker(tokenizer, MaskingRule.from_config(cfg), vocab_size)
    read = indexed_validation_blocks if is_indexed(cfg) else validation_blocks
    blocks = read(_block_config(cfg), tokenizer, split, max_blocks=max_blocks, separator_id=masker.sep_id)
    mine = [masker.example(block, cfg.mlm_eval_seed, index)
            for index, block in enumerate(blocks) if index % dp_world == dp_rank]
    if not mine:
        raise ProjectError(f"only {len(blocks)} {split} blocks for {dp_world} data-parallel ranks: "
                           f"rank {dp_rank} gets none")
    return mine


def calibration_examples(cfg: DataConfig, objective: str, tokenizer: Any, count: int,
                         vocab_size: int | None = None) -> list[torch.Tensor]:
    """The first `count` examples of the seeded training stream: the same on every call. Prepared data reads its
    validation split instead (held-out data, in data.seed's order: other samples than validation's fixed-seed
    first ones unless the split is small); streamed sources read train, as the demo's and study's numbers do."""
    split = "validation" if is_indexed(cfg) else "train"
    stream = train_examples(cfg, objective, tokenizer, vocab_size=vocab_size, split=split)
    return [next(stream) for _ in range(count)]


def eval_examples_by_source(cfg: DataConfig, objective: str, tokenizer: Any, split: str = "validation",
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
