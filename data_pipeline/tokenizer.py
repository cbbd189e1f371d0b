"""SentencePiece tokenizer: training (byte fallback, fixed special ids), caching and a thin wrapper.

Newlines: SentencePiece treats its input as one line of words, so "\\n" gets no piece of its own and
the word after it loses its word-start marker. We keep newlines as a dedicated user-defined piece
"\\n" (id 4) and encode text line by line, so every line's first word is tokenized like any other
word and paragraph structure survives into the model's stream. With the identity normalization and
remove_extra_whitespaces=False, decode(encode(text)) == text for every string (byte fallback covers
characters outside the vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import sentencepiece as spm
from filelock import FileLock

from data_pipeline.config import HF_TOKENIZER_PREFIX, DataConfig, expand_files
from data_pipeline.special_tokens import BOS_ID, CLS, EOS_ID, MASK, NEWLINE, PAD_ID, SEP, UNK_ID, USER_SYMBOLS
from common.errors import ProjectError

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when training options change, so old cached models are not reused


class Tokenizer:
    """A SentencePiece model. Special ids: pad=0, unk=1, bos=2, eos=3 (for models trained here)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ProjectError(f"tokenizer file not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ProjectError(f"not a SentencePiece model: {self.path} ({' '.join(str(e).split())})") from e
        self.vocab_size: int = self.sp.get_piece_size()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.eos_id < 0:  # packing separates documents with EOS
            raise ProjectError(f"tokenizer has no EOS piece: {self.path}")
        # User-defined pieces (None when an external model lacks them).
        self.newline_id = self._piece_id(NEWLINE)
        self.cls_id = self._piece_id(CLS)
        self.sep_id = self._piece_id(SEP)
        self.mask_id = self._piece_id(MASK)
        # Content hash: a BlockStream state records it so a resume with another tokenizer is refused.
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        if self.newline_id is None or NEWLINE not in text:
            return self.sp.encode(text)
        # One call per line: SentencePiece's list API starts a thread pool per call (~4x slower here).
        ids: list[int] = []
        for i, line in enumerate(text.split(NEWLINE)):
            if i:
                ids.append(self.newline_id)
            ids.extend(self.sp.encode(line))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.newline_id is None:
            return self.sp.decode(ids)
        lines: list[list[int]] = [[]]
        for i in ids:
            if i == self.newline_id:
                lines.append([])
            else:
                lines[-1].append(i)
        return NEWLINE.join(self.sp.decode(line) for line in lines)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer folder (`data.tokenizer: hf:<dir>`) behind Tokenizer's interface, e.g.
    OPT's GPT-2 BPE for continuing published OPT weights. Encodes without special tokens, as Tokenizer."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ProjectError(f"tokenizer folder not found: {self.path}")
        try:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(self.path))
        except ImportError:
            raise ProjectError(f"data.tokenizer '{HF_TOKENIZER_PREFIX}{self.path}' needs the transformers package") from None
        except Exception as e:
            raise ProjectError(f"not a Hugging Face tokenizer folder: {self.path} ({' '.join(str(e).split())})") from e
        self.hf.model_max_length = int(1e30)  # documents are split into blocks later: no length warnings
        self.vocab_size: int = len(self.hf)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            -1 if i is None else int(i)
            for i in (self.hf.pad_token_id, self.hf.unk_token_id, self.hf.bos_token_id, self.hf.eos_token_id))
        self.newline_id = None
        # BERT's tokens for masked-LM examples (None where the tokenizer has none, e.g. OPT's GPT-2 BPE)
        self.cls_id, self.sep_id, self.mask_id = (
            None if i is None else int(i) for i in (self.hf.cls_token_id, self.hf.sep_token_id, self.hf.mask_token_id))
        if self.eos_id < 0 and self.sep_id is not None:
            self.eos_id = self.sep_id  # a WordPiece BERT vocabulary has no EOS: [SEP] separates packed documents
        if self.eos_id < 0:
            raise ProjectError(f"tokenizer has no EOS token: {self.path}")
        digest = hashlib.sha256()
        for file in sorted(p for p in self.path.iterdir() if p.is_file()):
            digest.update(file.name.encode() + file.read_bytes())
        self.fingerprint = digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def open_tokenizer(spec: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """A SentencePiece .model path, or "hf:<dir>" for a Hugging Face tokenizer folder."""
    spec = str(spec)
    if spec.startswith(HF_TOKENIZER_PREFIX):
        return HFTokenizer(spec[len(HF_TOKENIZER_PREFIX):])
    return Tokenizer(spec)


def _training_lines(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    # Documents are fed line by line: encode() splits at newlines the same way, and SentencePiece
    # silently drops "sentences" longer than max_sentence_length.
    for text in texts:
        counter[0] += 1
        for line in text.split(NEWLINE):
            if line.strip():
                counter[1] += 1
                yield line


def train_tokenizer(texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int,
                    model_type: str = "unigram") -> Path:
    """Train a SentencePiece model on `texts`; write `<model_prefix>.model` (and `.vocab`) atomically.

    Trains under a unique temporary prefix and renames, so a reader never sees a partial file and two
    concurrent trainers just replace each other's (equivalent) result. Returns the .model path."""
    prefix = Path(model_prefix)
    if prefix.suffix == ".model":
        prefix = prefix.with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    counter = [0, 0]  # documents, lines
    try:
        with open(os.devnull, "w") as quiet:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts, counter),
                model_prefix=str(tmp),
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,  # unseen characters become byte pieces: never <unk>
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                user_defined_symbols=USER_SYMBOLS,
                normalization_rule_name="identity",  # lossless: decode(encode(x)) == x
                remove_extra_whitespaces=False,
                max_sentence_length=1 << 16,  # bytes; long Wikipedia paragraphs are not dropped
                num_threads=max(1, min(16, os.cpu_count() or 1)),
                logstream=quiet,
            )
    except RuntimeError as e:
        for suffix in (".model", ".vocab"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        if counter[1] == 0:
            raise ProjectError(f"no text to train the tokenizer on ({prefix}.model)") from e
        raise ProjectError(f"tokenizer training failed (vocab_size={vocab_size}, {model_type}, "
                           f"{counter[0]} documents): {' '.join(str(e).split())}") from e
    os.replace(f"{tmp}.vocab", f"{prefix}.vocab")
    os.replace(f"{tmp}.model", f"{prefix}.model")  # last: the .model's existence means "done"
    log.info("trained %s tokenizer (vocab %d) on %d documents: %s.model", model_type, vocab_size, counter[0], prefix)
    return Path(f"{prefix}.model")


def cached_tokenizer_path(cfg: DataConfig) -> Path:
    """Where load_or_train_tokenizer keeps the model trained for this corpus and vocabulary."""
    key: dict[str, object] = {"version": _CACHE_VERSION, "vocab_size": cfg.vocab_size,
                              "type": cfg.tokenizer_type, "sample_docs": cfg.tokenizer_sample_docs}
    if cfg.sources:  # a blend: every source's corpus and weight
        from data_pipeline.config import blend_parts

        key["sources"] = [[part.name, part.weight, _corpus_key(part.cfg)] for part in blend_parts(cfg)]
        source, label = "blend", "-".join(part.name for part in blend_parts(cfg))[:40]
    else:
        key.update(_corpus_key(cfg))
        source, label = cfg.source, ("files" if cfg.source == "files" else "hub" if cfg.source == "hub"
                                     else cfg.language)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{source}-{label}-{cfg.tokenizer_type}-{cfg.vocab_size}-{digest}.model"
    return Path(cfg.cache_dir) / "tokenizers" / name


def _corpus_key(cfg: DataConfig) -> dict[str, object]:
    """What identifies one source's training corpus (the key of its cached tokenizer)."""
    if cfg.source == "files":
        return {"source": "files", "files": [os.path.abspath(p) for p in expand_files(cfg.train_files)],
                "text_field": cfg.text_field}
    if cfg.source == "hub":
        return {"source": "hub", "path": cfg.hub_path, "config": cfg.hub_config, "split": cfg.hub_train_split,
                "holdout": cfg.hub_holdout, "text_field": cfg.text_field}
    return {"source": cfg.source, "language": cfg.language}


def load_or_train_tokenizer(cfg: DataConfig) -> Tokenizer | HFTokenizer:
    """cfg.tokenizer if set; else the cached model for this corpus, trained on first use from at most
    cfg.tokenizer_sample_docs train documents. A file lock makes one process train while others wait
    (e.g. every rank calls this at start-up); the model itself is written atomically."""
    cfg.validate()
    if cfg.tokenizer is not None:
        return open_tokenizer(cfg.tokenizer)
    from data_pipeline.prepared import is_indexed  # no heavy imports at module level there

    if is_indexed(cfg):  # prepared data is read with the tokenizer it was written with
        return prepared_tokenizer(cfg)
    if cfg.tokenizer_type == "char":  # a fixed vocabulary: nothing to train or cache
        from data_pipeline.char_tokenizer import CharTokenizer

        return CharTokenizer()  # type: ignore[return-value]  (Tokenizer's interface)
    path = cached_tokenizer_path(cfg)
    if path.is_file():
        return Tokenizer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            train_from_config(cfg, path)
    return Tokenizer(path)


def train_from_config(cfg: DataConfig, out: str | os.PathLike) -> tuple[Path, int, str]:
    """Train on at most cfg.tokenizer_sample_docs documents of the configured train split.
    Returns (model path, documents used, source name)."""
    from data_pipeline.sources import open_source  # sources import datasets: only needed to train

    # A fixed-seed shuffled sample, so the tokenizer does not depend on the run's seed or shuffle flag; a blend
    # contributes round(tokenizer_sample_docs x weight) documents of each source.
    if cfg.sources:
        from data_pipeline.config import blend_parts

        shares = [(part.cfg, max(1, round(cfg.tokenizer_sample_docs * part.weight))) for part in blend_parts(cfg)]
    else:
        shares = [(cfg, cfg.tokenizer_sample_docs)]
    sources = [(open_source(replace(sub, shuffle=True, seed=0), "train"), count) for sub, count in shares]
    name = " + ".join(source.name for source, _ in sources)
    used = [0]

    def sample() -> Iterator[str]:
        for source, count in sources:
            for text in islice(source.documents(epoch=0), count):
                used[0] += 1
                yield text

    start = time.perf_counter()
    path = train_tokenizer(sample(), out, cfg.vocab_size, cfg.tokenizer_type)
    log.info("tokenizer for %s trained in %.1f s", name, time.perf_counter() - start)
    return path, used[0], name


def open_tokenizer_spec(spec: str) -> Tokenizer | HFTokenizer:
    """A tokenizer by the spec data_pipeline.prepare records: "char", a SentencePiece path or "hf:<dir>"."""
    if spec == "char":
        from data_pipeline.char_tokenizer import CharTokenizer

        return CharTokenizer()  # type: ignore[return-value]  (Tokenizer's interface)
    return open_tokenizer(spec)


def prepared_tokenizer(cfg: DataConfig) -> Tokenizer | HFTokenizer:
    """The tokenizer the prepared data was written with (data.tokenizer unset)."""
    from data_pipeline.prepared import parts_of

    parts = parts_of(cfg)
    fingerprints = {part.fingerprint for part, _ in parts}
    if len(fingerprints) > 1:
        raise ProjectError(f"the prepared sources of data.sources were tokenized with different tokenizers "
                           f"({', '.join(sorted(fingerprints))}): prepare them with one config")
    spec = parts[0][0].tokenizer_path()
    return open_tokenizer_spec(spec or "char")
