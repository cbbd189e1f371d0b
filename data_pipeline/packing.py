"""Packing documents into fixed-length token blocks, sharding them over data-parallel ranks, resuming.

The token stream of an epoch is: for each document in epoch order, its tokens followed by EOS.
The stream is cut into consecutive, non-overlapping blocks of seq_length tokens (a document may span
blocks; nothing is padded). Epochs follow each other without a gap: the tokens left over at the end of
epoch e continue into the first block of epoch e + 1. With data.bos every block is BOS + the next
seq_length - 1 tokens of that stream (the stream itself never holds BOS), so position 0 is always the same token.

One packer (`TokenBuffer` + `document_tokens`) serves both readers: the endless, sharded, resumable training
`BlockStream` and the one-epoch `epoch_blocks` that validation cuts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from data_pipeline.config import DataConfig, shard_mode
from data_pipeline.source_registry import DocumentSource, open_source
from data_pipeline.tokenizer import Tokenizer
from common.errors import ProjectError

STATE_VERSION = 1
# State keys that must equal the current stream's for a restore to continue the same sequence.
_MATCHING_KEYS = ("source", "split", "seq_length", "bos", "shard_by", "shuffle", "seed", "tokenizer")


def saved_shard_mode(state: dict[str, Any]) -> str | None:
    """The sharding a saved stream state was written with, as `shard_mode` names it: a documents state of one rank
    (written before one-rank streams were named blocks) is the blocks stream."""
    mode = state.get("shard_by")
    return "blocks" if mode == "documents" and state.get("dp_world") == 1 else mode


def document_tokens(tokenizer: Tokenizer, text: str, separator_id: int) -> list[int] | None:
    """A document's tokens followed by the separator (EOS, or BERT's [SEP]); None for a blank document."""
    if not text.strip():
        return None
    ids = tokenizer.encode(text)
    ids.append(separator_id)
    return ids


class TokenBuffer:
    """Packed tokens not yet cut into a block: documents go in at the end, blocks are cut from the front."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self._tokens = tokens if tokens is not None else []
        self._pos = 0  # tokens before it are already in blocks

    def __len__(self) -> int:
        return len(self._tokens) - self._pos

    def add(self, ids: list[int]) -> None:
        self._tokens.extend(ids)

    def cut(self, n: int, keep: bool = True) -> list[int]:
        """The next n tokens ([] when not `keep`: skipped, not copied); the caller checks len(self) >= n."""
        block = self._tokens[self._pos:self._pos + n] if keep else []
        self._pos += n
        if self._pos > 4 * n and 2 * self._pos > len(self._tokens):  # amortised O(1) compaction
            del self._tokens[:self._pos]
            self._pos = 0
        return block

    def pending(self) -> list[int]:
        return self._tokens[self._pos:]


class BlockStream:
    """Endless iterator over `torch.LongTensor` blocks of exactly `cfg.seq_length` tokens for one
    data-parallel rank (dp_rank of dp_world).

    How ranks split the stream is `shard_mode(cfg.shard_by, dp_world)` (`self.mode`):

    blocks (data.shard_by: blocks; any one-rank stream): every rank reads and tokenizes the same stream and keeps
    global block i iff i % dp_world == dp_rank. Guarantee: if every rank forms its micro-batches from
    consecutive blocks of its stream, step k of DP=W with micro-batch m covers exactly the global blocks k*W*m ...
    (k+1)*W*m - 1, the same set as step k of a single process with micro-batch W*m (e.g. one process
    with micro-batch 4 and two ranks with micro-batch 2 see the same 4 blocks per step). Each next()
    consumes one whole group of dp_world blocks, so after every rank has taken n blocks all ranks hold
    the SAME state: saving it once (e.g. from rank 0) is enough, and it may be restored with another
    dp_world (block ownership is then counted from the restore point).

    documents (data.shard_by: documents, or auto, the default, with several ranks): document j of the epoch
    order goes to rank j % dp_world before packing, so each rank tokenizes only its share and nothing it throws
    away. Every document is read by exactly one rank; ranks' states differ, each rank restores its own (same
    dp_world), and a step's global batch differs from one process's (the blocks are packed per rank).
    On one rank both modes are the same stream (the same blocks, block ids and state).

    `state_dict()` / `load_state_dict()` capture the position exactly: a fresh stream restored from a
    state yields the very blocks the original would have yielded next, across epoch boundaries too.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, split: str = "train", dp_rank: int = 0,
                 dp_world: int = 1, *, source: DocumentSource | None = None, separator_id: int | None = None) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        # Token after every document: EOS (causal LM), [SEP] (BERT's packed MLM sequences).
        self.separator_id = tokenizer.eos_id if separator_id is None else separator_id
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.mode = shard_mode(cfg.shard_by, dp_world)
        self.source = source if source is not None else open_source(cfg, split)
        self.seq_length = cfg.seq_length
        self.prefix = block_prefix(cfg, tokenizer)
        self._epoch = 0
        self._doc_index = 0  # documents of this rank's epoch order already packed
        self._buffer = TokenBuffer()
        self._global_blocks = 0  # blocks cut from the (global, for shard_by=blocks) stream so far
        self._blocks_emitted = 0  # blocks this rank has yielded
        self._docs: Iterator[str] | None = None  # opened lazily at (_epoch, _doc_index)
        self._epoch_tokens = 0
        self._epoch_from_start = True

    def __iter__(self) -> BlockStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.mode == "blocks":  # cut the whole group of dp_world blocks, keep ours
            group = [self._cut_block(keep=i == self.dp_rank) for i in range(self.dp_world)]
            mine = group[self.dp_rank]
        else:
            mine = self._cut_block()
        self._blocks_emitted += 1
        return torch.tensor(mine, dtype=torch.long)

    def take(self, keep: bool = True) -> list[int]:
        """The next block of the whole stream as token ids ([] when not `keep`: cut, not copied). For a global
        stream (dp_world=1) read by a blend, which decides per block which rank keeps it."""
        block = self._cut_block(keep)
        self._blocks_emitted += 1
        return block

    @property
    def last_block_id(self) -> int:
        """A number naming the block `next()` returned last, unique within this stream and, for
        shard_by=blocks, the same for every data-parallel layout (its global index): what per-block
        randomness (MLM masking) is seeded from, so that it survives resumption and re-sharding."""
        if self._blocks_emitted == 0:
            raise RuntimeError("no block has been read yet")
        if self.mode == "blocks":
            return self._global_blocks - self.dp_world + self.dp_rank
        return (self._blocks_emitted - 1) * self.dp_world + self.dp_rank

    def _cut_block(self, keep: bool = True) -> list[int]:
        n = self.seq_length - len(self.prefix)
        while len(self._buffer) < n:
            self._read_document()
        block = self._buffer.cut(n, keep)
        self._global_blocks += 1
        return self.prefix + block if keep else []

    def _read_document(self) -> None:
        if self._docs is None:
            rank, world = (self.dp_rank, self.dp_world) if self.mode == "documents" else (0, 1)
            self._docs = self.source.documents(self._epoch, self._doc_index, rank, world)
        try:
            text = next(self._docs)
        except StopIteration:
            if self._epoch_from_start and self._epoch_tokens == 0:  # would loop forever
                share = f" for data-parallel rank {self.dp_rank} of {self.dp_world}" \
                    if self.mode == "documents" else ""
                raise ProjectError(f"empty corpus: no non-empty document in {self.source.name} "
                                   f"split '{self.split}'{share}") from None
            self._epoch, self._doc_index, self._docs = self._epoch + 1, 0, None
            self._epoch_tokens, self._epoch_from_start = 0, True
            return
        self._doc_index += 1
        ids = document_tokens(self.tokenizer, text, self.separator_id)
        if ids is not None:
            self._buffer.add(ids)
            self._epoch_tokens += len(ids)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream (plus what it must be restored into)."""
        return {
            "version": STATE_VERSION,
            "source": self.source.name,
            "split": self.split,
            "seq_length": self.seq_length,
            "bos": self.cfg.bos,
            "shard_by": self.mode,
            "shuffle": self.cfg.shuffle,
            "seed": self.cfg.seed,
            "tokenizer": self.tokenizer.fingerprint,
            "dp_world": self.dp_world,
            # Only document sharding makes the state rank-specific.
            "dp_rank": self.dp_rank if self.mode == "documents" else None,
            "epoch": self._epoch,
            "doc_index": self._doc_index,
            "buffer": self._buffer.pending(),
            "global_blocks": self._global_blocks,
            "blocks_emitted": self._blocks_emitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; raise ProjectError when it belongs to a different stream."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ProjectError(f"data state: unsupported version {version!r} (expected {STATE_VERSION})")
        state = {**state, "shard_by": saved_shard_mode(state)}
        mode = self.mode
        if self.cfg.shard_by == "auto" and state["shard_by"] in ("blocks", "documents"):
            self.mode = state["shard_by"]  # auto continues the stream the checkpoint is a position in, however split
        current = self.state_dict()
        keys = _MATCHING_KEYS + (("dp_world", "dp_rank") if self.mode == "documents" else ())
        for key in keys:
            if state.get(key, False if key == "bos" else None) != current[key]:  # states before data.bos had none
                self.mode = mode
                hint = " (data.shard_by: auto continues either)" if key == "shard_by" else ""
                raise ProjectError(f"data state does not match this run: {key} is {state.get(key)!r} "
                                   f"in the checkpoint but {current[key]!r} now{hint}")
        try:
            epoch, doc_index = int(state["epoch"]), int(state["doc_index"])
            global_blocks, emitted = int(state["global_blocks"]), int(state["blocks_emitted"])
            buffer = [int(t) for t in state["buffer"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProjectError(f"data state is malformed: {type(e).__name__}: {e}") from e
        if min(epoch, doc_index, global_blocks, emitted) < 0 \
                or any(not 0 <= t < self.tokenizer.vocab_size for t in buffer):
            raise ProjectError("data state is malformed: negative position or bad token buffer")
        self._epoch, self._doc_index = epoch, doc_index
        self._buffer = TokenBuffer(buffer)
        self._global_blocks, self._blocks_emitted = global_blocks, emitted
        self._docs = None
        self._epoch_tokens, self._epoch_from_start = 0, doc_index == 0


def batch_iterator(blocks: Iterable[torch.Tensor], micro_batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive blocks into [micro_batch_size, seq_length] batches (a partial tail is dropped)."""
    if micro_batch_size < 1:
        raise ProjectError(f"micro batch size must be positive, got {micro_batch_size}")
    it = iter(blocks)
    while True:
        batch = []
        for _ in range(micro_batch_size):
            block = next(it, None)
            if block is None:
                return
            batch.append(block)
        yield torch.stack(batch)


def block_prefix(cfg: DataConfig, tokenizer: Tokenizer) -> list[int]:
    """What every block starts with: [BOS] with data.bos, else nothing."""
    if not cfg.bos:
        return []
    if tokenizer.bos_id is None or tokenizer.bos_id < 0:
        raise ProjectError(f"data.bos needs a BOS token, but the tokenizer {tokenizer} has none")
    return [tokenizer.bos_id]


def epoch_blocks(source: DocumentSource, tokenizer: Tokenizer, seq_length: int, epoch: int = 0,
                 separator_id: int | None = None, prefix: list[int] | None = None) -> Iterator[list[int]]:
    """The full blocks of one epoch of `source` (whole stream, no sharding), each `prefix` + seq_length -
    len(prefix) stream tokens; the partial tail is dropped."""
    separator = tokenizer.eos_id if separator_id is None else separator_id
    prefix = prefix or []
    n = seq_length - len(prefix)
    buffer = TokenBuffer()
    for text in source.documents(epoch):
        ids = document_tokens(tokenizer, text, separator)
        if ids is None:
            continue
        buffer.add(ids)
        while len(buffer) >= n:
            yield prefix + buffer.cut(n)


def validation_blocks(cfg: DataConfig, tokenizer: Tokenizer, split: str = "validation", dp_rank: int = 0,
                      dp_world: int = 1, max_blocks: int | None = None,
                      separator_id: int | None = None) -> list[torch.Tensor]:
    """Fixed evaluation blocks for one rank: the first `max_blocks` global blocks (default
    None = all) of the unshuffled first epoch of `split`, global block i
    going to rank i % dp_world, so the union over ranks is the same for every dp_world."""
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
    source = open_source(replace(cfg, shuffle=False), split)
    blocks: list[list[int]] = []
    for block in epoch_blocks(source, tokenizer, cfg.seq_length, separator_id=separator_id,
                              prefix=block_prefix(cfg, tokenizer)):
        blocks.append(block)
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
    if not blocks:
        raise ProjectError(f"{source.name} split '{split}' has fewer than seq_length={cfg.seq_length} "
                           f"tokens: no full validation block")
    mine = blocks[dp_rank::dp_world]
    if not mine:
        raise ProjectError(f"only {len(blocks)} validation blocks in {source.name} split '{split}' for "
                           f"{dp_world} data-parallel ranks: rank {dp_rank} gets none")
    return [torch.tensor(b, dtype=torch.long) for b in mine]
