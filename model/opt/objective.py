"""OPT's objective: a causal LM trains on packed token blocks of data.seq_length themselves (documents
separated by EOS, BOS first with data.bos); the labels are the block, shifted inside the model."""

from __future__ import annotations

from typing import Any

import torch

from data_pipeline.config import DataConfig
from data_pipeline.examples import TextObjective, eval_blocks, train_blocks


class CausalLM(TextObjective):
    name = "causal"

    def train(self, cfg: DataConfig, tokenizer: Any, dp_rank: int, dp_world: int, vocab_size: int | None,
              split: str = "train") -> Any:
        return train_blocks(cfg, tokenizer, dp_rank, dp_world, split=split)

    def evaluate(self, cfg: DataConfig, tokenizer: Any, split: str, dp_rank: int, dp_world: int,
                 max_blocks: int | None, vocab_size: int | None) -> list[torch.Tensor]:
        return eval_blocks(cfg, tokenizer, split, dp_rank, dp_world, max_blocks)


CAUSAL_LM = CausalLM()
