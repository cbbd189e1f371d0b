"""Masked-language-model examples for BERT: packed sequences with the 80/10/10 masking rule.

An example is a [2, seq_length] tensor (input ids, labels) built from a packed block of seq_length - 2
tokens (documents separated by [SEP]): `[CLS] block [SEP]`. Each token that is not special ([CLS],
[SEP], [PAD], [MASK], BOS, EOS, UNK) is selected with probability p (0.15); the label of a selected
position is its original token, every other label is -100. A selected token is replaced by [MASK] with
probability 0.8, by a uniformly drawn regular token with 0.1, and kept with 0.1 (BERT's rule, as
Hugging Face's DataCollatorForLanguageModeling applies it).

The masks are a pure function of (seed, block id), drawn from a torch.Generator seeded with both, so they
do not depend on the order blocks are read in, on the data-parallel layout (the block id is the global
block index) or on resumption (restoring the stream restores the block ids). Evaluation uses a fixed
seed of its own, so every evaluation of every run scores the same masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.packing import BlockStream
from common.errors import ProjectError

IGNORE_INDEX = -100  # the label of a position that predicts nothing (model/layers.py's IGNORE_INDEX)
SPECIAL_TOKENS = 2  # [CLS] at the start and [SEP] at the end of every example


@dataclass(frozen=True)
class MaskingRule:
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1


class Masker:
    """Turns packed token blocks into MLM examples for one tokenizer."""

    def __init__(self, tokenizer: Any, rule: MaskingRule, vocab_size: int | None = None) -> None:
        missing = [name for name in ("cls_id", "sep_id", "mask_id") if getattr(tokenizer, name, None) is None]
        if missing:
            raise ProjectError(f"tokenizer {tokenizer!r} has no {', '.join(m[:-3].upper() for m in missing)} "
                               f"token: BERT's masked-LM examples need [CLS], [SEP] and [MASK] (use a SentencePiece "
                               f"tokenizer trained by this project)")
        self.rule = rule
        self.cls_id, self.sep_id, self.mask_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id
        vocab_size = vocab_size or tokenizer.vocab_size
        special = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id, tokenizer.unk_id,
                   tokenizer.bos_id, tokenizer.eos_id}
        self.special = torch.tensor(sorted(i for i in special if i is not None and i >= 0), dtype=torch.long)
        # Random replacements are regular tokens only: never a structural token the model must not invent.
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[self.special[self.special < vocab_size]] = True
        self.regular = torch.nonzero(~is_special).flatten()

    def example(self, block: torch.Tensor, seed: int, block_id: int) -> torch.Tensor:
        """[CLS] block [SEP], masked: a [2, len(block) + 2] tensor (input ids, labels)."""
        tokens = torch.cat([torch.tensor([self.cls_id]), block.long(), torch.tensor([self.sep_id])])
        generator = torch.Generator().manual_seed(_mix(seed, block_id))
        draws = torch.rand(2, tokens.numel(), generator=generator)  # selection, replacement kind
        candidates = ~torch.isin(tokens, self.special)
        selected = (draws[0] < self.rule.probability) & candidates
        labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
        to_mask = selected & (draws[1] < self.rule.mask_fraction)
        to_random = selected & ~to_mask & (draws[1] < self.rule.mask_fraction + self.rule.random_fraction)
        random_tokens = self.regular[torch.randint(len(self.regular), tokens.shape, generator=generator)]
        inputs = torch.where(to_mask, torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(to_random, random_tokens, inputs)
        return torch.stack([inputs, labels])


def _mix(seed: int, block_id: int) -> int:
    # A distinct 63-bit generator seed per (seed, block): splitmix64's finaliser over both numbers.
    x = (seed * 0x9E3779B97F4A7C15 + block_id + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class MLMStream:
    """Endless, resumable iterator of MLM training examples for one data-parallel rank: a BlockStream of
    seq_length - 2 token blocks (documents separated by [SEP]), each masked by `Masker`. Its state is the
    block stream's state: the masks follow from the block ids."""

    def __init__(self, blocks: BlockStream, masker: Masker, seed: int) -> None:
        self.blocks, self.masker, self.seed = blocks, masker, seed

    def __iter__(self) -> MLMStream:
        return self

    def __next__(self) -> torch.Tensor:
        block = next(self.blocks)
        return self.masker.example(block, self.seed, self.blocks.last_block_id)

    @property
    def epoch(self) -> int:
        return self.blocks.epoch

    def state_dict(self) -> dict[str, Any]:
        return {**self.blocks.state_dict(), "mlm_seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mlm_seed") != self.seed:
            raise ProjectError(f"data state does not match this run: mlm_seed is {state.get('mlm_seed')!r} in "
                               f"the checkpoint but {self.seed!r} now")
        self.blocks.load_state_dict({k: v for k, v in state.items() if k != "mlm_seed"})
