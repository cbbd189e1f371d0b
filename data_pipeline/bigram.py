"""`data.source: bigram_backcopy`: the Bigram-Backcopy task of Guo et al. 2024 ("Active-dormant attention
heads", arXiv 2410.13835), generated on the fly.

A document is a character chain over data_pipeline.char_tokenizer.ALPHABET:
  - the first character is drawn from the unigram distribution without the triggers;
  - after a non-trigger character c the next one is drawn from the bigram row P(. | c);
  - after a trigger (one of the data.backcopy_triggers most frequent characters) the next character copies
    the one before the trigger. Copies are never triggers (by induction: every trigger follows a
    non-trigger), so the rule is always defined.
The bigram table is estimated from the bundled Wikipedia sample's train split (data.language; case-folded,
bigrams across characters outside the alphabet are skipped, data.bigram_smoothing added to every count: 1 by
default, 0 for the raw counts of Guo et al.) and cached under data.cache_dir.

Document j of an epoch is a pure function of (data.seed, split, epoch, j): any rank can generate any share
at any position, so resuming and data-parallel sharding are exact, as for a stored corpus. A document has
data.seq_length - 1 (- 1 more with data.bos) characters: with the EOS that packing appends it fills one
block exactly, so with data.bos every block is BOS + one fresh chain + EOS, the task's layout. The train
split never ends; validation and test hold EVAL_DOCUMENTS documents.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, count
from pathlib import Path

import numpy as np

from data_pipeline.char_tokenizer import ALPHABET, FIRST_CHAR_ID
from data_pipeline.config import DataConfig
from data_pipeline.source_registry import DocumentSource, register_source
from common.errors import ProjectError

EVAL_DOCUMENTS = 4096  # documents in the validation and test splits (train is endless)
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_TABLE_VERSION = 1


@dataclass(frozen=True)
class BigramTable:
    """Row-stochastic transition probabilities over ALPHABET, the unigram counts and the trigger indices."""

    probs: np.ndarray  # [K, K] float64, rows sum to 1
    unigram: np.ndarray  # [K] character counts of the corpus
    triggers: tuple[int, ...]  # indices into ALPHABET, most frequent first

    smoothing: float = 1.0  # added to every count (also the unigram counts of start_distribution)

    def start_distribution(self) -> np.ndarray:
        """Where a chain starts: the unigram distribution with the triggers removed."""
        weights = self.unigram.astype(np.float64) + self.smoothing
        weights[list(self.triggers)] = 0.0
        return weights / weights.sum()


def count_bigrams(texts: list[str], alphabet: str = ALPHABET) -> np.ndarray:
    """[K, K] counts of adjacent character pairs (case-folded; newlines as spaces; pairs touching a character
    outside `alphabet` skipped)."""
    lookup = np.full(0x110000, -1, dtype=np.int64)
    for i, ch in enumerate(alphabet):
        lookup[ord(ch)] = i
    k = len(alphabet)
    counts = np.zeros(k * k, dtype=np.int64)
    for text in texts:
        codes = lookup[np.frombuffer(text.lower().replace("\n", " ").encode("utf-32-le"), dtype=np.uint32)]
        a, b = codes[:-1], codes[1:]
        valid = (a >= 0) & (b >= 0)
        counts += np.bincount(a[valid] * k + b[valid], minlength=k * k)
    return counts.reshape(k, k)


def table_from_counts(counts: np.ndarray, triggers: int, smoothing: float = 1.0) -> BigramTable:
    """The table of `counts` + `smoothing`. Unsmoothed, a row without counts (a character the corpus never
    continues inside the alphabet) continues like a chain's start: the unigram distribution without triggers."""
    smoothed = counts.astype(np.float64) + smoothing
    unigram = counts.sum(axis=1) + counts.sum(axis=0)
    order = np.argsort(-unigram, kind="stable")
    trigger_ids = tuple(int(i) for i in order[:triggers])
    totals = smoothed.sum(axis=1, keepdims=True)
    probs = smoothed / np.where(totals > 0, totals, 1.0)
    table = BigramTable(probs, unigram, trigger_ids, smoothing)
    probs[totals[:, 0] == 0] = table.start_distribution()
    return table


def wiki_bigram_counts(cache_dir: str, language: str) -> np.ndarray:
    """Bigram counts of the Wikipedia sample's train split, computed once and cached as .npy."""
    digest = hashlib.sha256(f"{_TABLE_VERSION}:{ALPHABET}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / "bigram" / f"wiki_sample-{language}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    import pyarrow.parquet as pq

    from data_pipeline.markers import wiki40b_to_text
    from data_pipeline.sources import build_wiki_sample

    column = pq.read_table(build_wiki_sample(cache_dir, language) / "train.parquet", columns=["text"]).column("text")
    counts = count_bigrams([wiki40b_to_text(text or "") for text in column.to_pylist()])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:  # np.save on a path would append .npy to the temporary name
        np.save(handle, counts)
    os.replace(tmp, path)  # concurrent ranks write the same array: the last rename wins
    return counts


def bigram_table(cfg: DataConfig) -> BigramTable:
    """The table of a data config (data.language, data.backcopy_triggers, data.bigram_smoothing)."""
    return table_from_counts(wiki_bigram_counts(cfg.cache_dir, cfg.language), cfg.backcopy_triggers,
                             cfg.bigram_smoothing)


def trigger_token_ids(cfg: DataConfig) -> tuple[int, ...]:
    """The char tokenizer's ids of the trigger characters (what the task-aware sink metrics split queries by)."""
    return tuple(FIRST_CHAR_ID + i for i in bigram_table(cfg).triggers)


def generate_chain(table: BigramTable, length: int, rng: np.random.Generator,
                   cumulative: list[list[float]] | None = None, start: list[float] | None = None) -> list[int]:
    """One chain of `length` character indices (the rules of the module docstring)."""
    cumulative = cumulative if cumulative is not None else [list(accumulate(row)) for row in table.probs]
    start = start if start is not None else list(accumulate(table.start_distribution()))
    triggers = set(table.triggers)
    uniforms = rng.random(length).tolist()
    chain = [min(bisect_right(start, uniforms[0]), len(start) - 1)]
    for i in range(1, length):
        previous = chain[-1]
        if previous in triggers:
            chain.append(chain[-2])
        else:
            row = cumulative[previous]
            chain.append(min(bisect_right(row, uniforms[i]), len(row) - 1))
    return chain


class BigramBackcopySource(DocumentSource):
    """Bigram-Backcopy chains as text documents, one block each."""

    def __init__(self, cfg: DataConfig, split: str, table: BigramTable | None = None) -> None:
        if split not in SPLIT_CODES:
            raise ProjectError(f"unknown split '{split}' for source bigram_backcopy (one of {', '.join(SPLIT_CODES)})")
        self.name = f"bigram_backcopy/{cfg.language}/triggers{cfg.backcopy_triggers}" + (
            f"/smoothing{cfg.bigram_smoothing:g}" if cfg.bigram_smoothing != 1.0 else "")
        self.split, self.seed = split, cfg.seed
        self.table = table or bigram_table(cfg)
        self.length = cfg.seq_length - 1 - (1 if cfg.bos else 0)  # + EOS (+ BOS) = one block
        self._cumulative = [list(accumulate(row)) for row in self.table.probs]
        self._start = list(accumulate(self.table.start_distribution()))

    @property
    def trigger_chars(self) -> str:
        return "".join(ALPHABET[i] for i in self.table.triggers)

    def document(self, epoch: int, index: int) -> str:
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], epoch, index])
        return "".join(ALPHABET[i] for i in generate_chain(self.table, self.length, rng, self._cumulative, self._start))

    def documents(self, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        total = None if self.split == "train" else EVAL_DOCUMENTS
        positions = count(rank + start * world, world) if total is None else range(rank + start * world, total, world)
        for index in positions:
            yield self.document(epoch, index)



def open_bigram_backcopy(cfg: DataConfig, split: str, **options: object) -> BigramBackcopySource:
    return BigramBackcopySource(cfg, split)


register_source("bigram_backcopy", open_bigram_backcopy)
