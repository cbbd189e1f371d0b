"""Reading prepared data (`data.source: indexed`) through megatron-core's datasets: the global sample index
decides every sample, each rank reads only its own samples, and resuming is O(1).

A prepared split (data_pipeline/prepare.py) is a megatron-core IndexedDataset (.bin/.idx): documents stored as
tokens + EOS. Epoch e of a split is megatron-core's `GPTDataset` over it with random_seed = data.seed + e: its
documents shuffled, concatenated, cut into samples of L tokens (L = data.seq_length, minus 1 with data.bos for
the BOS in front, minus 2 for BERT's [CLS] ... [SEP]; the partial tail of an epoch is dropped), and the samples
shuffled. Sample k of the endless stream is sample k mod n of epoch k div n (n samples per epoch): a pure
function of (data, seed, k), whatever train.steps is, so a run whose steps change on resume reads the same
samples. (GPTDataset's own multi-epoch mode would reshuffle every epoch when num_samples changes.)

A blend of prepared sources is megatron-core's `BlendedDataset` over those endless streams: its greedy choice
(each sample goes to the source furthest below weight x samples so far) is prefix-stable, so the index is built
for the samples read so far and doubled when the run reads past it.

Data-parallel rank r of W takes global samples r, r + W, r + 2W, ...: step k of every layout covers global
samples k x G ... (k + 1) x G - 1 (G = global batch), as with shard_by=blocks, but no rank reads another's. The
checkpointed state is the number of global samples consumed; it restores into any W that divides it. BERT's
masks are seeded by the global sample index (data_pipeline/mlm.py), so they follow the sample everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy
import torch

from common.errors import ProjectError
from data_pipeline.prepared import PreparedSource, check_tokenizer, parts_of

__all__ = ["IndexedStream", "validation_blocks"]

STATE_VERSION = 1
VALIDATION_SEED = 0  # validation samples do not depend on the run's seed: every run scores the same ones
_MIN_BLEND_SIZE = 1 << 16
_ENDLESS = 1 << 62  # an endless stream's length, as BlendedDataset asks every source for its size

# megatron-core logs a warning per dataset because we keep its indices in memory (path_to_cache=""): they are
# cheap to rebuild, and no rank then writes into a prepared folder that may be shared and read-only.
for _name in ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
              "megatron.core.datasets.megatron_dataset"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _TokenizerView:
    """What megatron-core's GPTDatasetConfig asks of a tokenizer. pad = -1: nothing is ever padded here."""

    def __init__(self, tokenizer: Any) -> None:
        self.vocab_size, self.eod, self.eos, self.pad = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.eos_id, -1
        self.unique_identifiers = {"fingerprint": tokenizer.fingerprint}


def _gpt_config(tokenizer: Any, length: int, seed: int) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    # No extra token: the model shifts its labels itself; blend=None makes megatron-core call this mock, which
    # only changes its caching (off here anyway).
    return GPTDatasetConfig(random_seed=seed, sequence_length=length, tokenizer=_TokenizerView(tokenizer),
                            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                            create_attention_mask=False, add_extra_token_to_sequence=False, path_to_cache="",
                            mmap_bin_files=True)


class EpochStream:
    """The endless samples of one prepared split: epoch e is megatron-core's GPTDataset seeded seed + e."""

    def __init__(self, prefix: str, tokenizer: Any, length: int, seed: int, train: bool = True) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.datasets.utils import Split

        self.prefix, self.tokenizer, self.length, self.seed = prefix, tokenizer, length, seed
        self.index_split = Split.train if train else Split.valid
        try:
            self.indexed = IndexedDataset(prefix)
        except Exception as e:  # a truncated or foreign .idx
            raise ProjectError(f"cannot read prepared data {prefix}.idx/.bin: {type(e).__name__}: {e}") from e
        self.unique_identifiers = {"class": "EpochStream", "prefix": prefix, "length": length, "seed": seed}
        self._epochs: dict[int, Any] = {}
        self.per_epoch = len(self.epoch(0))
        if self.per_epoch == 0:
            raise ProjectError(f"prepared data {prefix} has fewer than {length + 1} tokens: not one sample of "
                               f"data.seq_length")

    def epoch(self, e: int) -> Any:
        if e not in self._epochs:
            from megatron.core.datasets.gpt_dataset import GPTDataset

            if len(self._epochs) >= 2:  # a reader moves forward: keep the current and the next epoch
                del self._epochs[min(self._epochs)]
            self._epochs[e] = GPTDataset(self.indexed, self.prefix,
                                         numpy.arange(len(self.indexed), dtype=numpy.int32), None,
                                         self.index_split, _gpt_config(self.tokenizer, self.length, self.seed + e))
        return self._epochs[e]

    def __len__(self) -> int:
        return _ENDLESS

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        e, i = divmod(int(k), self.per_epoch)
        return {"tokens": self.epoch(e)[i]["tokens"]}


class GlobalSamples:
    """Global sample index -> token ids of a single prepared source or a weighted blend of them."""

    def __init__(self, parts: list[tuple[PreparedSource, float]], tokenizer: Any, length: int, seed: int,
                 split: str = "train") -> None:
        train = split == "train"
        self.streams = [EpochStream(part.split_prefix(split), tokenizer, length, seed, train) for part, _ in parts]
        self.weights = [weight for _, weight in parts]
        self._blend: Any = None

    def _blended(self, needed: int) -> Any:
        from megatron.core.datasets.blended_dataset import BlendedDataset

        if self._blend is None or len(self._blend) < needed:
            size = max(_MIN_BLEND_SIZE, 1 << (needed - 1).bit_length())
            self._blend = BlendedDataset(self.streams, self.weights, size,
                                         _gpt_config(self.streams[0].tokenizer, self.streams[0].length, 0))
        return self._blend

    def __getitem__(self, g: int) -> torch.Tensor:
        if len(self.streams) == 1:
            return self.streams[0][g]["tokens"]
        return self._blended(g + 1)[g]["tokens"]

    def epochs(self, g: int) -> int:
        """Passes completed over the prepared data by the first g samples (the fewest of any source)."""
        return min(int(g * w) // s.per_epoch for s, w in zip(self.streams, self.weights))


class IndexedStream:
    """One data-parallel rank's endless, resumable blocks of prepared data (BlockStream's interface): its n-th
    block is global sample n x dp_world + dp_rank, [prefix] + sample, documents separated by `separator_id`."""

    def __init__(self, cfg: Any, tokenizer: Any, split: str = "train", dp_rank: int = 0, dp_world: int = 1, *,
                 separator_id: int | None = None, prefix: list[int] | None = None) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
        check_tokenizer(cfg, tokenizer)
        self.cfg, self.split, self.dp_rank, self.dp_world = cfg, split, dp_rank, dp_world
        self.prefix = list(prefix or [])
        self.eos_id = tokenizer.eos_id
        self.separator_id = tokenizer.eos_id if separator_id is None else separator_id
        parts = parts_of(cfg)
        self.names = [part.name for part, _ in parts]
        self.weights = [weight for _, weight in parts]
        self.fingerprint = tokenizer.fingerprint
        self.samples = GlobalSamples(parts, tokenizer, cfg.seq_length - len(self.prefix), cfg.seed, split)
        self._taken = 0  # blocks this rank has yielded

    def __iter__(self) -> IndexedStream:
        return self

    def block(self, g: int) -> torch.Tensor:
        tokens = self.samples[g]
        if self.separator_id != self.eos_id:  # BERT: documents were stored with EOS, its sequences use [SEP]
            tokens = torch.where(tokens == self.eos_id, self.separator_id, tokens)
        if self.prefix:
            tokens = torch.cat([torch.tensor(self.prefix, dtype=torch.long), tokens])
        return tokens

    def __next__(self) -> torch.Tensor:
        g = self._taken * self.dp_world + self.dp_rank
        self._taken += 1
        return self.block(g)

    @property
    def last_block_id(self) -> int:
        if self._taken == 0:
            raise RuntimeError("no block has been read yet")
        return (self._taken - 1) * self.dp_world + self.dp_rank

    @property
    def epoch(self) -> int:
        return self.samples.epochs(self._taken * self.dp_world)

    def _identity(self) -> dict[str, Any]:
        return {"split": self.split, "names": self.names, "weights": self.weights, "seq_length": self.cfg.seq_length,
                "prefix": self.prefix, "separator": self.separator_id, "seed": self.cfg.seed,
                "tokenizer": self.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        """The global samples consumed (the same on every rank) and what the state must be restored into."""
        return {"version": STATE_VERSION, "kind": "indexed", **self._identity(),
                "consumed": self._taken * self.dp_world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "indexed" or state.get("version") != STATE_VERSION:
            raise ProjectError("data state does not match this run: the checkpoint did not read prepared data "
                               "(data.source: indexed) or is of another version; the run's data section changed")
        for key, now in self._identity().items():
            saved = state.get(key)
            if key == "weights":
                same = isinstance(saved, list) and len(saved) == len(now) and \
                    all(abs(a - b) <= 1e-9 for a, b in zip(saved, now))
            else:
                same = saved == now
            if not same:
                raise ProjectError(f"data state does not match this run: {key} is {saved!r} in the checkpoint "
                                   f"but {now!r} now")
        consumed = state.get("consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise ProjectError(f"data state is malformed: consumed = {consumed!r}")
        if consumed % self.dp_world:
            raise ProjectError(f"data state: {consumed} samples consumed cannot be split over {self.dp_world} "
                               f"data-parallel ranks; resume with a data-parallel size that divides it")
        self._taken = consumed // self.dp_world


def validation_blocks(cfg: Any, tokenizer: Any, split: str = "validation", dp_rank: int = 0, dp_world: int = 1,
                      max_blocks: int | None = None, separator_id: int | None = None,
                      prefix: list[int] | None = None) -> list[torch.Tensor]:
    """Fixed evaluation blocks of one rank: the first max_blocks samples (None: one epoch) of the prepared split
    with a fixed seed; global sample i goes to rank i % dp_world."""
    check_tokenizer(cfg, tokenizer)
    stream = IndexedStream(_with_seed(cfg, VALIDATION_SEED), tokenizer, split, separator_id=separator_id,
                           prefix=prefix)
    per_epoch = stream.samples.streams[0].per_epoch if len(stream.samples.streams) == 1 else \
        min(s.per_epoch for s in stream.samples.streams)
    count = per_epoch if max_blocks is None else min(max_blocks, per_epoch)
    mine = [stream.block(g) for g in range(dp_rank, count, dp_world)]
    if not mine:
        raise ProjectError(f"only {count} {split} samples of prepared data for {dp_world} data-parallel ranks: "
                           f"rank {dp_rank} gets none")
    return mine


def _with_seed(cfg: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(cfg, seed=seed)

