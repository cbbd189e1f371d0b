"""BERT's objective: masked-LM examples [2, data.seq_length] = (masked input ids, labels with -100 where
nothing is predicted), `[CLS] block [SEP]` from packed blocks of data.seq_length - 2 tokens (documents separated
by [SEP]), masked by data_pipeline/mlm.py's 80/10/10 rule with BertDataConfig's settings. Masks are a pure
function of (seed, global block index): training's of data.seed, evaluation's of data.mlm_eval_seed."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from common.errors import ConfigError, ProjectError
from data_pipeline.config import DataConfig
from data_pipeline.examples import TextObjective, eval_blocks, train_blocks
from data_pipeline.mlm import SPECIAL_TOKENS, Masker, MLMStream
from model.bert.data_config import BertDataConfig


def _settings(cfg: DataConfig) -> BertDataConfig:
    """BERT's data section; a plain text data section (e.g. built by hand) gets the default masking settings."""
    if not isinstance(cfg, BertDataConfig):
        cfg = BertDataConfig(**{f.name: getattr(cfg, f.name) for f in fields(DataConfig)})
    if cfg.seq_length <= SPECIAL_TOKENS:
        raise ConfigError("data.seq_length", cfg.seq_length, "must exceed 2 for masked-LM examples ([CLS] ... [SEP])")
    return cfg


def _block_config(cfg: DataConfig) -> DataConfig:
    # [CLS] is the masked-LM example's fixed first token: no BOS inside it.
    return replace(cfg, seq_length=cfg.seq_length - SPECIAL_TOKENS, bos=False)


class MaskedLM(TextObjective):
    name = "mlm"

    def train(self, cfg: DataConfig, tokenizer: Any, dp_rank: int, dp_world: int, vocab_size: int | None,
              split: str = "train") -> Any:
        settings = _settings(cfg)
        masker = Masker(tokenizer, settings.masking_rule(), vocab_size)
        blocks = train_blocks(_block_config(cfg), tokenizer, dp_rank, dp_world, separator_id=masker.sep_id, split=split)
        return MLMStream(blocks, masker, cfg.seed)  # type: ignore[arg-type]  (a blend has BlockStream's interface)

    def evaluate(self, cfg: DataConfig, tokenizer: Any, split: str, dp_rank: int, dp_world: int,
                 max_blocks: int | None, vocab_size: int | None) -> list[torch.Tensor]:
        """Every rank reads the same blocks and masks its share by global index with data.mlm_eval_seed."""
        settings = _settings(cfg)
        masker = Masker(tokenizer, settings.masking_rule(), vocab_size)
        blocks = eval_blocks(_block_config(cfg), tokenizer, split, max_blocks=max_blocks, separator_id=masker.sep_id)
        mine = [masker.example(block, settings.mlm_eval_seed, index)
                for index, block in enumerate(blocks) if index % dp_world == dp_rank]
        if not mine:
            raise ProjectError(f"only {len(blocks)} {split} blocks for {dp_world} data-parallel ranks: "
                               f"rank {dp_rank} gets none")
        return mine


MASKED_LM = MaskedLM()
