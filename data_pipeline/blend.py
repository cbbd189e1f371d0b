"""Weighted blends of document sources (`data.sources`): one packed, resumable block stream per source, and a
deterministic choice of the source of every block so that each source's share of tokens converges to its weight.

Every block holds data.seq_length tokens, so token shares are block shares. Block g (the global block index
when the blend is sharded by blocks, the rank's own index when by documents) comes from the source whose
cumulative-weight interval holds u(g) = frac(offset + g * alpha), alpha = (sqrt(5) - 1) / 2, offset from data.seed:
a Weyl (golden-ratio) sequence. Its shares converge like O(log n / n), not the O(1 / sqrt n) of random draws, and
every arithmetic subsequence g = k * W + r is again a Weyl sequence (step W * alpha is irrational), so each of
W data-parallel ranks sees the weights too, whatever W. Sharded by blocks, the choice depends only on g: one
process and any data-parallel layout read the same blocks in the same order (as a single BlockStream does).
Sharded by documents (data.shard_by auto or documents with several ranks), every source's documents are split over
the ranks as in one BlockStream and each rank draws its own blocks' sources from the same sequence: no rank
tokenizes a document another rank uses.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from itertools import accumulate
from typing import Any

import torch

from data_pipeline.config import BlendPart, shard_mode
from data_pipeline.packing import BlockStream, saved_shard_mode
from data_pipeline.tokenizer import Tokenizer
from common.errors import ProjectError

STATE_VERSION = 1
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def seed_offset(seed: int) -> float:
    """Where the sequence starts, in [0, 1): a hash of the seed (different seeds, different interleavings)."""
    return int(hashlib.sha256(f"blend-{seed}".encode()).hexdigest()[:12], 16) / 16**12


def source_of(index: int, cumulative: list[float], offset: float) -> int:
    """The source of block `index`: the cumulative-weight interval that holds frac(offset + index * alpha)."""
    u = (offset + index * GOLDEN) % 1.0
    return min(bisect_right(cumulative, u), len(cumulative) - 1)


class BlendStream:
    """Endless iterator of seq_length-token blocks from several sources for one data-parallel rank, with the
    BlockStream interface (state_dict / load_state_dict / last_block_id / epoch), so MLM examples, the launcher
    and checkpoints treat it like one source.

    Sharded by blocks (`shard_mode`: data.shard_by blocks, or one rank): each source is one global BlockStream that
    every rank reads; global block g is kept by rank g % dp_world, so after every rank has taken n blocks all ranks
    hold the same state (as BlockStream). By documents (auto or documents with several ranks): each source is this
    rank's documents-sharded BlockStream; states are per rank."""

    def __init__(self, parts: list[BlendPart], tokenizer: Tokenizer, split: str = "train", dp_rank: int = 0,
                 dp_world: int = 1, *, separator_id: int | None = None) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
        self.parts, self.split = parts, split
        self.names = [p.name for p in parts]
        self.weights = [p.weight for p in parts]
        self.cumulative = list(accumulate(self.weights))
        self.offset = seed_offset(parts[0].cfg.seed)
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._tokenizer, self._separator_id = tokenizer, separator_id
        self.shard_by = shard_mode(parts[0].cfg.shard_by, dp_world)
        self.streams = self._source_streams()
        self._index = 0  # blocks of the choice sequence consumed (global for blocks, this rank's for documents)
        self._blocks_emitted = 0
        self.counts = [0] * len(parts)  # blocks this rank has taken from each source
        self.last_source: str | None = None

    def _source_streams(self) -> list[BlockStream]:
        """One stream per source: global (rank 0 of 1) when sharded by blocks, this rank's documents otherwise."""
        rank, world = (0, 1) if self.shard_by == "blocks" else (self.dp_rank, self.dp_world)
        return [BlockStream(p.cfg, self._tokenizer, self.split, rank, world, separator_id=self._separator_id)
                for p in self.parts]

    def __iter__(self) -> BlendStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.shard_by == "blocks":  # the whole group of dp_world blocks, keep ours
            mine: list[int] = []
            for position in range(self.dp_world):
                source = source_of(self._index, self.cumulative, self.offset)
                block = self.streams[source].take(keep=position == self.dp_rank)
                self._index += 1
                if position == self.dp_rank:
                    mine, chosen = block, source
        else:
            chosen = source_of(self._index, self.cumulative, self.offset)
            mine = self.streams[chosen].take()
            self._index += 1
        self._blocks_emitted += 1
        self.counts[chosen] += 1
        self.last_source = self.names[chosen]
        return torch.tensor(mine, dtype=torch.long)

    @property
    def last_block_id(self) -> int:
        """The last block's global index (shard_by=blocks: the same in every layout), as BlockStream's."""
        if self._blocks_emitted == 0:
            raise RuntimeError("no block has been read yet")
        if self.shard_by == "blocks":
            return self._index - self.dp_world + self.dp_rank
        return (self._blocks_emitted - 1) * self.dp_world + self.dp_rank

    @property
    def epoch(self) -> int:
        """The fewest passes any source has completed (small sources repeat sooner)."""
        return min(stream.epoch for stream in self.streams)

    def state_dict(self) -> dict[str, Any]:
        """Every source's position, the choice sequence's position, and what the state must match."""
        return {"version": STATE_VERSION, "kind": "blend", "split": self.split, "names": self.names,
                "weights": self.weights, "shard_by": self.shard_by, "dp_world": self.dp_world,
                "dp_rank": self.dp_rank if self.shard_by == "documents" else None,
                "index": self._index, "blocks_emitted": self._blocks_emitted, "counts": list(self.counts),
                "sources": [stream.state_dict() for stream in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` stopped; ProjectError when it belongs to another blend."""
        if not isinstance(state, dict) or state.get("kind") != "blend" or state.get("version") != STATE_VERSION:
            raise ProjectError("data state does not match this run: the checkpoint's data state is not a blend "
                               "of data.sources (or another version); the run's data section changed")
        if state.get("names") != self.names:
            raise ProjectError(f"data state does not match this run: sources are {state.get('names')} in the "
                               f"checkpoint but {self.names} now")
        saved = state.get("weights") or []
        if len(saved) != len(self.weights) or any(abs(a - b) > 1e-9 for a, b in zip(saved, self.weights)):
            raise ProjectError(f"data state does not match this run: weights are {saved} in the checkpoint but "
                               f"{self.weights} now")
        saved_mode = saved_shard_mode(state)
        if self.parts[0].cfg.shard_by == "auto" and saved_mode in ("blocks", "documents") \
                and saved_mode != self.shard_by:  # auto continues the stream the checkpoint is a position in
            self.shard_by = saved_mode
            self.streams = self._source_streams()
        for key, saved, now in (("shard_by", saved_mode, self.shard_by),) + (
                (("dp_world", state.get("dp_world"), self.dp_world), ("dp_rank", state.get("dp_rank"), self.dp_rank))
                if self.shard_by == "documents" else ()):
            if saved != now:
                hint = " (data.shard_by: auto continues either)" if key == "shard_by" else ""
                raise ProjectError(f"data state does not match this run: {key} is {saved!r} in the "
                                   f"checkpoint but {now!r} now{hint}")
        try:
            index, emitted = int(state["index"]), int(state["blocks_emitted"])
            counts = [int(c) for c in state["counts"]]
            sources = list(state["sources"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProjectError(f"data state is malformed: {type(e).__name__}: {e}") from e
        if len(sources) != len(self.streams) or len(counts) != len(self.streams):
            raise ProjectError("data state is malformed: one position per source expected")
        for stream, source_state in zip(self.streams, sources):
            stream.load_state_dict(source_state)
        self._index, self._blocks_emitted, self.counts = index, emitted, counts
