"""Tokenize a configured corpus once into megatron-core indexed shards (.bin/.idx), read later by index.

    python -m data_pipeline.prepare --config configs/opt_125m.yaml --out data/prepared/opt_125m --workers 8
    python -m data_pipeline.prepare --config X --out DIR --task $SLURM_ARRAY_TASK_ID --tasks $SLURM_ARRAY_TASK_COUNT
    python -m data_pipeline.prepare --config X --out DIR --merge            # after every array task finished

Every source of the config (each entry of data.sources, or the one data.source) and split is cut into
`--num-shards` document shards: shard k holds the documents j of the unshuffled split with j % num_shards == k
(a streamed source hands out whole parquet files per shard when they divide evenly, as for data-parallel
ranks). Each document is stored as its tokens followed by EOS (megatron-core's GPTDataset packs across them).
A shard is written under a temporary name, renamed, then recorded in `<shard>.json` (documents, tokens, sizes):
the record is what says "done", so after a kill a restart redoes only unfinished shards, and the result is
byte-identical to an uninterrupted preparation (shard k's content depends on k and num_shards only, never on
which worker or job wrote it). The final step merges a split's shards in order into `<name>/<split>.bin/.idx`
with megatron-core's IndexedDatasetBuilder.add_index, then deletes the shard data (their records stay).

DIR/manifest.json holds the tokenizer (fingerprint; a SentencePiece model is copied to DIR/tokenizer.model so
a run reads the prepared data with exactly that tokenizer), the shard count and, per source and split, the
documents, tokens and files. A run reads it with `data.source: indexed` and `data.path: DIR/<name>`
(data_pipeline/indexed.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from common.durable import atomic_write_text
from common.errors import ProjectError
from data_pipeline.prepared import MANIFEST, read_manifest
from data_pipeline.tokenizer import open_tokenizer_spec

TOKENIZER_FILE = "tokenizer.model"
VERSION = 1
_PROGRESS_EVERY = 256  # documents between progress messages of a worker


@dataclass(frozen=True)
class ShardJob:
    data: dict[str, Any]  # the source's DataConfig fields
    name: str  # the source's name (its folder under DIR)
    split: str
    shard: int
    num_shards: int
    max_documents: int | None  # only the first N documents of the split (a synthetic source never ends)
    tokenizer: str  # how a worker opens the tokenizer (tokenizer_spec)
    prefix: str  # the shard's path prefix (no extension)


def shard_prefix(out: Path, name: str, split: str, shard: int, num_shards: int) -> Path:
    return out / name / split / f"shard-{shard:05d}-of-{num_shards:05d}"


def split_prefix(out: Path, name: str, split: str) -> Path:
    return out / name / split


def token_dtype(vocab_size: int) -> Any:
    import numpy

    return numpy.uint16 if vocab_size <= 65536 else numpy.int32


# ------------------------------------------------------------------------------------------- tokenizer

def tokenizer_spec(tokenizer: Any) -> str:
    """A string every worker (and a later run) opens the same tokenizer from."""
    from data_pipeline.char_tokenizer import CharTokenizer
    from data_pipeline.tokenizer import HFTokenizer

    if isinstance(tokenizer, CharTokenizer):
        return "char"
    if isinstance(tokenizer, HFTokenizer):
        return f"hf:{tokenizer.path.absolute()}"
    return str(Path(tokenizer.path).absolute())


# ------------------------------------------------------------------------------------------- one shard

_progress_queue: Any = None
_opened: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _report(documents: int, tokens: int) -> None:
    if _progress_queue is not None:
        _progress_queue.put((documents, tokens))


def record_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def shard_done(prefix: str | Path) -> dict[str, Any] | None:
    """The shard's record when it was completed and its files are intact; ProjectError when they were damaged."""
    path = record_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProjectError(f"shard record {path} is unreadable ({e}); delete it and its .bin/.idx to redo "
                           f"the shard") from None
    if record.get("merged"):
        return record
    for ext in ("bin", "idx"):
        file = Path(f"{prefix}.{ext}")
        size = file.stat().st_size if file.is_file() else None
        if size != record.get(f"{ext}_bytes"):
            raise ProjectError(f"interrupted or damaged shard {file}: {size} bytes, its record {path} says "
                               f"{record.get(f'{ext}_bytes')}; delete {path} to redo the shard")
    return record


def tokenize_shard(job: ShardJob) -> dict[str, Any]:
    """Write one shard (tmp names, rename, record last); return its record. Idempotent: a done shard is kept."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from data_pipeline.config import DataConfig
    from data_pipeline.packing import document_tokens
    from data_pipeline.sources import open_source

    done = shard_done(job.prefix)
    if done is not None:
        _report(done["documents_read"], done["tokens"])
        return done
    key = (job.tokenizer, json.dumps(job.data, sort_keys=True), job.split)
    if key not in _opened:  # a worker opens each source and the tokenizer once, not once per shard
        _opened[key] = (open_tokenizer_spec(job.tokenizer),
                        open_source(replace(DataConfig(**job.data), shuffle=False), job.split))
    tokenizer, source = _opened[key]
    # Document j of the split goes to shard j % num_shards; --max-documents keeps j < max_documents.
    count = None if job.max_documents is None else max(0, -(-(job.max_documents - job.shard) // job.num_shards))
    texts = source.documents(0, 0, job.shard, job.num_shards)
    if count is not None:
        texts = islice(texts, count)
    folder = Path(job.prefix).parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".tmp-{Path(job.prefix).name}-*"):  # an interrupted attempt at this shard
        stale.unlink(missing_ok=True)
    tmp = f"{folder}/.tmp-{Path(job.prefix).name}-{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=token_dtype(tokenizer.vocab_size))
    documents = read = tokens = 0
    pending_docs = pending_tokens = 0
    for text in texts:
        read += 1
        ids = document_tokens(tokenizer, text, tokenizer.eos_id)
        if ids is not None:  # blank documents are skipped (as packing skips them)
            builder.add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])  # megatron-core converts
            documents += 1
            tokens += len(ids)
            pending_tokens += len(ids)
        pending_docs += 1
        if pending_docs >= _PROGRESS_EVERY:
            _report(pending_docs, pending_tokens)
            pending_docs = pending_tokens = 0
    builder.finalize(f"{tmp}.idx")
    _report(pending_docs, pending_tokens)
    for ext in ("bin", "idx"):
        os.replace(f"{tmp}.{ext}", f"{job.prefix}.{ext}")
    record = {"source": job.name, "split": job.split, "shard": job.shard, "num_shards": job.num_shards,
              "documents_read": read, "documents": documents, "tokens": tokens,
              "bin_bytes": Path(f"{job.prefix}.bin").stat().st_size,
              "idx_bytes": Path(f"{job.prefix}.idx").stat().st_size}
    atomic_write_text(record_path(job.prefix), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


# ---------------------------------------------------------------------------------------------- merge

def merge_split(out: Path, name: str, split: str, num_shards: int, vocab_size: int) -> dict[str, Any]:
    """Concatenate a split's shards in shard order into <name>/<split>.bin/.idx; return the split's record."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    target = split_prefix(out, name, split)
    records = []
    missing = []
    for k in range(num_shards):
        record = shard_done(shard_prefix(out, name, split, k, num_shards))
        if record is None:
            missing.append(k)
        records.append(record)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ProjectError(f"cannot merge {name}/{split}: shards {shown} of {num_shards} are not done "
                           f"(run the remaining --task jobs first)")
    merged_record = {"documents": sum(r["documents"] for r in records), "tokens": sum(r["tokens"] for r in records),
                     "documents_read": sum(r["documents_read"] for r in records), "prefix": f"{name}/{split}"}
    tmp = target.with_name(f".tmp-{split}-{os.getpid()}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=token_dtype(vocab_size))
    for k in range(num_shards):
        builder.add_index(str(shard_prefix(out, name, split, k, num_shards)))
    builder.finalize(f"{tmp}.idx")
    for ext in ("bin", "idx"):
        os.replace(f"{tmp}.{ext}", f"{target}.{ext}")
    merged_record["bin_bytes"] = Path(f"{target}.bin").stat().st_size
    merged_record["idx_bytes"] = Path(f"{target}.idx").stat().st_size
    return merged_record


def drop_shard_data(out: Path, name: str, split: str, num_shards: int) -> None:
    """After the merge is recorded: shard data goes, records stay (marked merged) so a rerun skips them."""
    for k in range(num_shards):
        prefix = shard_prefix(out, name, split, k, num_shards)
        record = json.loads(record_path(prefix).read_text())
        if not record.get("merged"):
            atomic_write_text(record_path(prefix), json.dumps({**record, "merged": True}, indent=1, sort_keys=True) + "\n")
        for ext in ("bin", "idx"):
            Path(f"{prefix}.{ext}").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- manifest

def _source_description(cfg: Any) -> dict[str, Any]:
    keys = ("source", "language", "train_files", "validation_files", "text_field", "hub_path", "hub_config",
            "hub_train_split", "hub_validation_split", "hub_holdout", "backcopy_triggers", "bigram_smoothing")
    return {key: getattr(cfg, key) for key in keys}


def _check_manifest(manifest: dict[str, Any], fresh: dict[str, Any], out: Path) -> None:
    """A restart must prepare exactly what the first start did: else one error line and nothing touched."""
    old_tok, new_tok = manifest.get("tokenizer", {}), fresh["tokenizer"]
    if old_tok.get("fingerprint") != new_tok["fingerprint"]:
        raise ProjectError(f"the tokenizer differs from the one {out / MANIFEST} was prepared with "
                           f"(fingerprint {old_tok.get('fingerprint')}, now {new_tok['fingerprint']}); "
                           f"prepare into another --out folder")
    for key in ("num_shards", "max_documents"):
        if manifest.get(key) != fresh[key]:
            raise ProjectError(f"--{key.replace('_', '-')} is {fresh[key]} but {out / MANIFEST} was prepared with "
                               f"{manifest.get(key)}; use the same value to continue, or another --out folder")
    for name, entry in fresh["sources"].items():
        old = manifest.get("sources", {}).get(name)
        if old is not None and old.get("source") != entry["source"]:
            raise ProjectError(f"source '{name}' differs from the one {out / MANIFEST} was prepared with "
                               f"({old.get('source')}); prepare into another --out folder")


# ---------------------------------------------------------------------------------------------- driver

TEXT_FAMILIES = ("opt", "bert")


def load_data_config(path: str | Path, overrides: tuple[str, ...] = ()) -> Any:
    """The `data:` section of a run config (a text family's), with `--set data.key=value` overrides applied.
    Read here rather than through launcher.config: data_pipeline sits below the launcher (and needs no model)."""
    import dataclasses
    import typing

    import yaml

    from common.errors import ConfigError
    from data_pipeline.config import DataConfig

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ProjectError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ProjectError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data", {}), dict):
        raise ConfigError("data", raw.get("data") if isinstance(raw, dict) else raw, "must be a mapping")
    family = (raw.get("model") or {}).get("family", "opt") if isinstance(raw.get("model"), dict) else "opt"
    if family not in TEXT_FAMILIES:
        raise ConfigError("model.family", family, "has no text data to prepare (prepare is for opt and bert)")
    values = dict(raw.get("data") or {})
    for text in overrides:
        key, _, value = text.partition("=")
        if not _ or not key.startswith("data.") or key.count(".") != 1:
            raise ConfigError(key, value, "--set takes data.KEY=VALUE here")
        values[key.removeprefix("data.")] = yaml.safe_load(value) if value.strip() else ""
    fields = {field.name: field for field in dataclasses.fields(DataConfig)}
    hints = typing.get_type_hints(DataConfig)
    # A family's own data keys (BERT's masking, model/bert/data_config.py: DataConfig.MOVED_KEYS) shape examples
    # after preparation: not read here.
    values = {key: value for key, value in values.items() if key not in DataConfig.MOVED_KEYS}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"data.{key}", value, f"unknown key (valid: {', '.join(sorted(fields))})")
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
    cfg = DataConfig(**values)
    cfg.validate()
    return cfg


def _parts(data_cfg: Any) -> list[tuple[str, Any]]:
    from data_pipeline.config import blend_parts, default_name

    parts = [(p.name, p.cfg) for p in blend_parts(data_cfg)] if data_cfg.sources else \
        [(default_name(data_cfg), data_cfg)]
    for name, cfg in parts:
        if cfg.source == "indexed":
            raise ProjectError(f"source '{name}' is already prepared (source: indexed): nothing to tokenize")
    return parts


def prepare(config: str, out: str | Path, *, overrides: tuple[str, ...] = (), workers: int = 1,
            num_shards: int | None = None, splits: tuple[str, ...] = ("train", "validation"),
            max_documents: int | None = None, task: int | None = None, tasks: int | None = None,
            merge_only: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Prepare (this task's share of) every source and split of `config` under `out`; returns the manifest once
    every shard is done and merged (None for an array task that left the merge to the final step)."""
    from data_pipeline.tokenizer import load_or_train_tokenizer
    from data_pipeline.writable import check_writable_dir

    out = Path(out)
    data_cfg = load_data_config(config, overrides)
    parts = _parts(data_cfg)
    if workers < 1:
        raise ProjectError(f"--workers must be at least 1, got {workers}")
    manifest = read_manifest(out)
    num_shards = num_shards or (manifest or {}).get("num_shards") or max(8, workers)
    if num_shards < 1:
        raise ProjectError(f"--num-shards must be at least 1, got {num_shards}")
    if (task is None) != (tasks is None) or (tasks is not None and not 0 <= task < tasks):
        raise ProjectError(f"--task {task} --tasks {tasks}: give both, with 0 <= task < tasks")
    if max_documents is not None and max_documents < 1:
        raise ProjectError(f"--max-documents must be positive, got {max_documents}")
    check_writable_dir(out, "output folder")
    from data_pipeline.sources import open_source

    for name, sub in parts:  # every source and split opens (files exist, the hub answers) before any work
        for split in splits:
            open_source(sub, split)
    tokenizer = load_or_train_tokenizer(data_cfg)
    fresh = {"version": VERSION, "num_shards": num_shards, "max_documents": max_documents,
             "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                           "kind": type(tokenizer).__name__, "spec": tokenizer_spec(tokenizer)},
             "sources": {name: {"source": _source_description(sub), "splits": {}} for name, sub in parts}}
    if manifest is not None:
        _check_manifest(manifest, fresh, out)
        for name, entry in manifest.get("sources", {}).items():  # keep what earlier starts recorded
            if name in fresh["sources"]:
                fresh["sources"][name]["splits"] = entry.get("splits", {})
    out.mkdir(parents=True, exist_ok=True)
    if fresh["tokenizer"]["kind"] == "Tokenizer":  # SentencePiece: the run reads with this very file
        target = out / TOKENIZER_FILE
        if not target.is_file():
            shutil.copyfile(fresh["tokenizer"]["spec"], out / f".{TOKENIZER_FILE}.tmp")
            os.replace(out / f".{TOKENIZER_FILE}.tmp", target)
        fresh["tokenizer"]["file"] = TOKENIZER_FILE
    atomic_write_text(out / MANIFEST, json.dumps(fresh, indent=1, sort_keys=True) + "\n")

    spec = fresh["tokenizer"]["spec"]
    if fresh["tokenizer"]["kind"] == "Tokenizer":
        spec = str((out / TOKENIZER_FILE).absolute())
    jobs = [ShardJob(asdict(sub), name, split, k, num_shards, max_documents, spec,
                     str(shard_prefix(out, name, split, k, num_shards)))
            for name, sub in parts for split in splits for k in range(num_shards)
            if split not in fresh["sources"][name]["splits"]]  # a merged split is complete
    if task is not None:
        jobs = [job for job in jobs if job.shard % tasks == task]
    if not merge_only:
        _run_jobs(jobs, workers, progress, f"{out.name}" + (f" task {task}/{tasks}" if task is not None else ""))
    if task is not None:
        print(f"task {task} of {tasks}: {len(jobs)} shards done under {out}; merge with --merge when all tasks "
              f"finished", flush=True)
        return None
    for name, sub in parts:
        for split in splits:
            if split in fresh["sources"][name]["splits"]:
                continue
            record = merge_split(out, name, split, num_shards, tokenizer.vocab_size)
            fresh["sources"][name]["splits"][split] = record
            atomic_write_text(out / MANIFEST, json.dumps(fresh, indent=1, sort_keys=True) + "\n")
            drop_shard_data(out, name, split, num_shards)
    return fresh


def _run_jobs(jobs: list[ShardJob], workers: int, progress: bool, label: str) -> None:
    from tqdm import tqdm

    if not jobs:
        return
    start = time.perf_counter()
    bar = tqdm(desc=f"prepare {label}", unit="doc", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    totals = [0, 0]

    def update(documents: int, tokens: int) -> None:
        totals[0] += documents
        totals[1] += tokens
        bar.update(documents)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{totals[1] / elapsed / 1e3:,.0f}k tokens/s", refresh=False)

    if workers == 1:
        import queue as queue_module

        local: queue_module.SimpleQueue = queue_module.SimpleQueue()
        _init_worker(local)
        try:
            for job in jobs:
                tokenize_shard(job)
                while not local.empty():
                    update(*local.get())
        finally:
            _init_worker(None)
    else:
        # fork where there is one: workers start with the parent's imports (seconds saved per worker); each opens
        # its own source and tokenizer.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        queue = context.Queue()
        with context.Pool(workers, initializer=_init_worker, initargs=(queue,)) as pool:
            pending = pool.map_async(tokenize_shard, jobs, chunksize=1)
            while not pending.ready():
                pending.wait(0.2)
                while not queue.empty():
                    update(*queue.get())
            pending.get()  # re-raises a worker's error
            while not queue.empty():
                update(*queue.get())
    bar.close()
    elapsed = time.perf_counter() - start
    if progress:
        print(f"tokenized {totals[0]:,} documents, {totals[1]:,} tokens in {elapsed:.1f} s "
              f"({totals[1] / max(elapsed, 1e-9) / 1e3:,.0f}k tokens/s, {workers} worker(s))", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a run config (its data: section is prepared)")
    parser.add_argument("--out", required=True, help="output folder (manifest.json, tokenizer, <source>/<split>.bin/.idx)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--workers", type=int, default=1, help="parallel tokenizer processes")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="document shards per split (default max(8, workers); fixed once the folder exists)")
    parser.add_argument("--splits", default="train,validation", help="comma-separated splits to prepare")
    parser.add_argument("--max-documents", type=int, default=None,
                        help="only the first N documents of each split (needed for a synthetic source)")
    parser.add_argument("--task", type=int, default=None, help="array task index: do shards k with k %% tasks == task")
    parser.add_argument("--tasks", type=int, default=None, help="array task count")
    parser.add_argument("--merge", action="store_true", help="only merge the shards all tasks wrote")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.config, args.out, overrides=tuple(args.set), workers=args.workers,
                           num_shards=args.num_shards, splits=tuple(s for s in args.splits.split(",") if s),
                           max_documents=args.max_documents, task=args.task, tasks=args.tasks,
                           merge_only=args.merge, progress=not args.no_progress)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that became unwritable, a full disk
        print(f"error: cannot write {error.filename or args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    if manifest is not None:
        for name, entry in manifest["sources"].items():
            for split, record in entry["splits"].items():
                print(f"{name}/{split}: {record['documents']:,} documents, {record['tokens']:,} tokens "
                      f"-> {Path(args.out) / record['prefix']}.bin", flush=True)
        print(f"manifest: {Path(args.out) / MANIFEST}; train with --set data.source=indexed "
              f"--set data.path={Path(args.out) / next(iter(manifest['sources']))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
