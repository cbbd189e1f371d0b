"""data_pipeline: sources, markers, tokenizer, packing, rank sharding and resumable state (CPU, seconds)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from dataclasses import replace
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data_pipeline.tokenizer as tokenizer_module
from data_pipeline import (
    BlockStream,
    DataConfig,
    Tokenizer,
    batch_iterator,
    load_or_train_tokenizer,
    open_source,
    to_wiki40b_markers,
    train_tokenizer,
    validation_blocks,
    wiki40b_to_text,
)
from data_pipeline.markers import parse_wiki40b
from data_pipeline.sources import (
    WIKI40B_DIR_ENV,
    WIKI40B_SCHEMA,
    StreamingSource,
    build_wiki_sample,
    wiki_sample_split,
)
from common.errors import ConfigError, ProjectError

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat dog sat on a mat while river stone light bright morning evening city north south old new "
         "music paper table window garden summer winter quickly slowly green blue red history science").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Synthetic documents of 3..40 words; every fifth has a paragraph break."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        if i % 5 == 0:
            text += "\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        docs.append(f"doc{i} {text}")
    return docs


def write_parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), path)
    return path


def write_wiki40b(path: Path, docs: list[tuple[str, list[str]]]) -> Path:
    rows = [{"wikidata_id": f"Q{i}", "text": to_wiki40b_markers(title, paras), "version_id": "1"}
            for i, (title, paras) in enumerate(docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=WIKI40B_SCHEMA), path)
    return path


@pytest.fixture
def no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever a shuffled parquet stream's iterator ends (apache/arrow#45214
    # workaround); harmless once per epoch in training, but it would dominate these tests.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = make_docs(300, seed=1) + ["Paris é ½ naïve café [MASK]"]
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tiny", vocab_size=320, model_type="bpe")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = make_docs(14)  # ~1,100 tokens: ~70 blocks of 16 per epoch
    docs[7] = "   "  # an empty document is skipped by packing
    return write_parquet(tmp_path_factory.mktemp("corpus") / "train.parquet", docs), docs


@pytest.fixture(scope="module")
def files_cfg(corpus, tmp_path_factory) -> DataConfig:
    path, _ = corpus
    return DataConfig(source="files", train_files=[str(path)], validation_files=[str(path)], seq_length=16,
                      cache_dir=str(tmp_path_factory.mktemp("cache")), vocab_size=320)


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wiki_cache")


def expected_stream(tok: Tokenizer, docs) -> list[int]:
    out: list[int] = []
    for d in docs:
        if d.strip():
            out += tok.encode(d) + [tok.eos_id]
    return out


def take(stream, n: int) -> list[list[int]]:
    return [next(stream).tolist() for _ in range(n)]


# ------------------------------------------------------------------------------------------- markers

def test_markers_round_trip():
    sections = [("Life", ["Born 1815."]), ("Work", ["Notes."])]
    raw = to_wiki40b_markers("Ada Lovelace", ["Lead one.", "Lead two."], sections)
    assert raw.startswith("\n_START_ARTICLE_\nAda Lovelace\n_START_PARAGRAPH_\nLead one._NEWLINE_Lead two.")
    assert parse_wiki40b(raw) == ("Ada Lovelace", ["Lead one.", "Lead two."], sections)
    assert wiki40b_to_text(raw) == "Ada Lovelace\n\nLead one.\nLead two.\n\nLife\nBorn 1815.\n\nWork\nNotes."
    hub_style = "\n_START_ARTICLE_\nT\n_START_SECTION_\nSec\n_START_PARAGRAPH_\npara_NEWLINE_more"
    assert wiki40b_to_text(hub_style) == "T\n\nSec\npara\nmore"
    assert wiki40b_to_text("plain text_NEWLINE_next") == "plain text\nnext"


# ---------------------------------------------------------------------------------------- wiki_sample

def test_wiki_sample_fixed_split_in_wiki40b_schema(wiki_cache):
    out = build_wiki_sample(wiki_cache, "en")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "test.parquet", "train.parquet", "validation.parquet"]
    assert not list(out.glob("*.tmp-*")), "no temporary files left behind"
    tables = {s: pq.read_table(out / f"{s}.parquet") for s in ("train", "validation", "test")}
    ids = {}
    for split, table in tables.items():
        assert table.schema.names == ["wikidata_id", "text", "version_id"]
        ids[split] = set(table.column("wikidata_id").to_pylist())
        for text in table.column("text").to_pylist()[:50]:  # the split is a pure function of the title
            title, paragraphs, _ = parse_wiki40b(text)
            assert text.startswith("\n_START_ARTICLE_\n") and paragraphs and wiki_sample_split(title) == split
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    sizes = {s: t.num_rows for s, t in tables.items()}
    total = sum(sizes.values())
    assert total > 9000 and 0.85 < sizes["train"] / total < 0.95 and 0.03 < sizes["validation"] / total < 0.07
    mtime = (out / "train.parquet").stat().st_mtime_ns
    build_wiki_sample(wiki_cache, "en")  # cached: not rewritten
    assert (out / "train.parquet").stat().st_mtime_ns == mtime

    cfg = DataConfig(cache_dir=str(wiki_cache), shuffle=False)
    source = open_source(cfg, "validation")
    assert source.name == "wiki_sample/en" and len(source) == sizes["validation"]
    first = next(source.documents(0))
    title = parse_wiki40b(tables["validation"]["text"][0].as_py())[0]
    assert "_START_" not in first and first.split("\n\n")[0] == title


# -------------------------------------------------------------------------------------------- wiki40b

def test_wiki40b_streaming_on_local_parquet(tmp_path, monkeypatch, no_stream_shutdown_sleep):
    articles = [(f"Title {i}", [f"Paragraph {i} one.", f"Paragraph {i} two."]) for i in range(30)]
    write_wiki40b(tmp_path / "en" / "train-00000-of-00002.parquet", articles[:15])
    write_wiki40b(tmp_path / "en" / "train-00001-of-00002.parquet", articles[15:])
    expected = [f"{t}\n\n{p[0]}\n{p[1]}" for t, p in articles]
    cfg = DataConfig(source="wiki40b", shuffle=False, shuffle_buffer=8, cache_dir=str(tmp_path / "cache"))

    source = open_source(cfg, "train", wiki40b_dir=tmp_path)
    assert isinstance(source, StreamingSource) and source.name == "wiki40b/en"
    assert list(source.documents(0)) == expected
    assert list(source.documents(0, start=25)) == expected[25:]

    monkeypatch.setenv(WIKI40B_DIR_ENV, str(tmp_path))  # the env var is the other way to point at a copy
    shuffled = open_source(replace(cfg, shuffle=True), "train")
    e0, e1 = list(shuffled.documents(0)), list(shuffled.documents(1))
    assert sorted(e0) == sorted(expected) and e0 != expected and e1 != e0
    assert list(shuffled.documents(0)) == e0 and list(shuffled.documents(0, start=11)) == e0[11:]
    r0, r1 = list(shuffled.documents(0, rank=0, world=2)), list(shuffled.documents(0, rank=1, world=2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(expected)

    with pytest.raises(ProjectError, match="validation"):
        open_source(cfg, "validation", wiki40b_dir=tmp_path)  # no validation parquet written


# ---------------------------------------------------------------------------------------------- files

def test_files_source_parquet_jsonl_txt(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["alpha one", "alpha two"], column="body")
    rows = [{"body": "beta one", "id": 1}, {"body": "beta two", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.txt").write_text("gamma one\nstill gamma one\n\ngamma two\n")
    cfg = DataConfig(source="files", train_files=[str(tmp_path / "*.parquet"), str(tmp_path / "b.jsonl"),
                                                  str(tmp_path / "c.txt")],
                     text_field="body", shuffle=False, cache_dir=str(tmp_path / "cache"))
    source = open_source(cfg, "train")
    assert list(source.documents(0)) == ["alpha one", "alpha two", "beta one", "beta two",
                                         "gamma one\nstill gamma one", "gamma two"]
    assert list(source.documents(0, start=1, rank=1, world=2)) == ["beta two", "gamma two"]
    with pytest.raises(ProjectError, match="body"):
        open_source(replace(cfg, train_files=[str(tmp_path / "a.parquet")], text_field="text"), "train")


def test_missing_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(ProjectError, match="nope.parquet"):
        DataConfig(source="files", train_files=[missing]).validate()
    with pytest.raises(ProjectError, match="nope.parquet"):
        open_source(DataConfig(source="files", train_files=[missing]), "train")
    with pytest.raises(ProjectError, match=r"missing\.model"):
        load_or_train_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.model")))
    with pytest.raises(ProjectError, match=r"\*\.jsonl"):
        DataConfig(source="files", train_files=[str(tmp_path / "*.jsonl")]).validate()


def test_empty_corpus_names_the_path(tmp_path):
    empty = write_parquet(tmp_path / "blank.parquet", ["", "   ", "\n"])
    with pytest.raises(ProjectError, match="empty corpus.*blank.parquet"):
        open_source(DataConfig(source="files", train_files=[str(empty)], cache_dir=str(tmp_path / "c")), "train")
    (tmp_path / "nothing.jsonl").write_text("")
    with pytest.raises(ProjectError, match="nothing.jsonl"):
        open_source(DataConfig(source="files", train_files=[str(tmp_path / "nothing.jsonl")],
                               cache_dir=str(tmp_path / "c")), "train")


@pytest.mark.parametrize("changes, key", [
    ({"source": "web"}, "data.source"), ({"shard_by": "tokens"}, "data.shard_by"),
    ({"tokenizer_type": "wordpiece"}, "data.tokenizer_type"), ({"seq_length": 0}, "data.seq_length"),
    ({"vocab_size": -5}, "data.vocab_size"), ({"source": "files"}, "data.train_files"),
    ({"language": "de"}, "data.language"),
])
def test_config_validation(changes, key):
    DataConfig().validate()
    with pytest.raises(ConfigError) as info:
        replace(DataConfig(), **changes).validate()
    assert info.value.key == key and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_special_ids_and_round_trip(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.newline_id, tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6, 7)
    assert tok.vocab_size == 320
    text = "Title line\n\n  two  spaces, unseen ünïcödé 漢字 😀 and [MASK] [CLS]\nnext line\n"
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.mask_id in ids and tok.cls_id in ids
    assert ids.count(tok.newline_id) == 4
    assert tok.decode(ids) == text  # lossless, newlines included
    line = tok.encode("cat sat")
    assert tok.encode("x\ncat sat")[-len(line):] == line, "a line's first word tokenizes as usual"


def test_load_or_train_tokenizer_caches_and_trains_once(corpus, tmp_path, monkeypatch):
    path, _ = corpus
    cfg = DataConfig(source="files", train_files=[str(path)], vocab_size=300, tokenizer_type="bpe",
                     tokenizer_sample_docs=10, cache_dir=str(tmp_path))
    calls = []
    real_train = tokenizer_module.train_tokenizer

    def counting_train(texts, *args, **kwargs):
        calls.append(len(list(texts)))  # documents offered: at most tokenizer_sample_docs
        return real_train(make_docs(30), *args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", counting_train)
    results: list[Tokenizer] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_train_tokenizer(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [10] and len(results) == 2 and results[0].path == results[1].path
    assert results[0].path.parent == tmp_path / "tokenizers" and results[0].vocab_size == 300
    assert not [p for p in results[0].path.parent.iterdir() if ".tmp-" in p.name]
    assert load_or_train_tokenizer(cfg).path == results[0].path and calls == [10]
    assert load_or_train_tokenizer(replace(cfg, vocab_size=310)).path != results[0].path  # keyed by vocab
    assert load_or_train_tokenizer(replace(cfg, tokenizer=str(results[0].path))).path == results[0].path


def test_train_tokenizer_cli(corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "cli.model"
    cli = [sys.executable, "-m", "data_pipeline.train_tokenizer", "--source", "files"]
    run = subprocess.run(cli + ["--files", str(path), "--vocab-size", "300", "--type", "bpe", "--out", str(out),
                                "--cache-dir", str(tmp_path / "c")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and Tokenizer(out).vocab_size == 300
    assert len(run.stdout.strip().splitlines()) == 1 and str(out) in run.stdout
    bad = subprocess.run(cli + ["--files", str(tmp_path / "gone.txt"), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "gone.txt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------------- packing

def test_packing_exact_blocks_eos_after_every_document(files_cfg, corpus, tok):
    _, docs = corpus
    cfg = replace(files_cfg, shuffle=False)
    expected = expected_stream(tok, docs)
    n_blocks = len(expected) // cfg.seq_length + 3  # into the second epoch
    blocks = take(BlockStream(cfg, tok), n_blocks)
    assert all(len(b) == cfg.seq_length for b in blocks)
    flat = [t for b in blocks for t in b]
    assert flat == (expected + expected)[:len(flat)]  # no gap, no overlap, epochs continue seamlessly
    assert expected.count(tok.eos_id) == sum(1 for d in docs if d.strip())


def test_batch_iterator_shapes(files_cfg, tok):
    batches = list(islice(batch_iterator(BlockStream(files_cfg, tok), 3), 2))
    assert [tuple(b.shape) for b in batches] == [(3, 16), (3, 16)] and batches[0].dtype == torch.long


@pytest.mark.parametrize("shard_by", ["blocks", "documents"])
def test_resume_equals_uninterrupted_stream(files_cfg, tok, shard_by):
    cfg = replace(files_cfg, shard_by=shard_by)  # shuffle on
    reference = BlockStream(cfg, tok, dp_rank=1, dp_world=2)
    ref_blocks = take(reference, 60)
    assert reference.epoch >= 1, "the test must cross an epoch boundary"
    source = reference.source
    epochs = []
    for cut in range(0, 56):
        stream = BlockStream(cfg, tok, dp_rank=1, dp_world=2, source=source)
        take(stream, cut)
        state = json.loads(json.dumps(stream.state_dict()))  # JSON-serialisable
        epochs.append(state["epoch"])
        restored = BlockStream(cfg, tok, dp_rank=1, dp_world=2, source=source)
        restored.load_state_dict(state)
        assert take(restored, 4) == ref_blocks[cut:cut + 4], f"resume after {cut} blocks"
    assert epochs[0] == 0 and epochs[-1] >= 1


def test_resume_with_fresh_source_and_streaming(tmp_path, tok, monkeypatch, no_stream_shutdown_sleep):
    articles = [(f"Article {i}", make_docs(1, seed=i)) for i in range(8)]  # ~20 blocks of 32 per epoch
    write_wiki40b(tmp_path / "en" / "train-00000-of-00001.parquet", articles)
    monkeypatch.setenv(WIKI40B_DIR_ENV, str(tmp_path))
    cfg = DataConfig(source="wiki40b", seq_length=32, shuffle_buffer=5, cache_dir=str(tmp_path / "c"))
    reference_stream = BlockStream(cfg, tok)
    reference = take(reference_stream, 40)
    assert reference_stream.epoch >= 1
    for cut in (5, 17, 29):
        stream = BlockStream(cfg, tok)
        take(stream, cut)
        restored = BlockStream(cfg, tok)  # opens its own source, like a restarted job
        restored.load_state_dict(stream.state_dict())
        assert take(restored, 6) == reference[cut:cut + 6]


def test_state_mismatch_is_refused(files_cfg, tok):
    state = BlockStream(files_cfg, tok).state_dict()
    with pytest.raises(ProjectError, match="seq_length"):
        BlockStream(replace(files_cfg, seq_length=32), tok).load_state_dict(state)
    with pytest.raises(ProjectError, match="seed"):
        BlockStream(replace(files_cfg, seed=7), tok).load_state_dict(state)
    with pytest.raises(ProjectError, match="source"):
        BlockStream(files_cfg, tok).load_state_dict({**state, "source": "wiki_sample/en"})
    docs_state = BlockStream(replace(files_cfg, shard_by="documents"), tok, dp_rank=0, dp_world=2).state_dict()
    with pytest.raises(ProjectError, match="dp_rank"):
        BlockStream(replace(files_cfg, shard_by="documents"), tok, dp_rank=1, dp_world=2).load_state_dict(docs_state)


# ------------------------------------------------------------------------------------------- sharding

def test_block_sharding_matches_single_process(files_cfg, tok):
    files_cfg = replace(files_cfg, shard_by="blocks")  # the layout-equivalent mode (auto shards by documents)
    single = batch_iterator(BlockStream(files_cfg, tok), 4)
    ranks = [BlockStream(files_cfg, tok, dp_rank=r, dp_world=2) for r in range(2)]
    per_rank = [batch_iterator(s, 2) for s in ranks]
    for _ in range(12):  # crosses an epoch boundary
        expected = next(single)
        got = torch.cat([next(b) for b in per_rank])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
        # at step boundaries all ranks hold the same state: it can be saved once
        assert ranks[0].state_dict() == ranks[1].state_dict()
    # ... and restored with another data-parallel size, continuing the same global stream
    state = ranks[0].state_dict()
    four = [BlockStream(files_cfg, tok, dp_rank=r, dp_world=4) for r in range(4)]
    for s in four:
        s.load_state_dict(state)
    assert sorted(tuple(next(s).tolist()) for s in four) == sorted(map(tuple, next(single).tolist()))


def test_document_sharding_is_disjoint(files_cfg, corpus, tok):
    _, docs = corpus
    cfg = replace(files_cfg, shard_by="documents", shuffle=False)
    source = open_source(cfg, "train")
    shares = [list(source.documents(0, rank=r, world=2)) for r in range(2)]
    cleaned = [d.strip() for d in docs]
    assert shares == [cleaned[0::2], cleaned[1::2]]
    for rank in range(2):  # each rank packs exactly its own share
        blocks = take(BlockStream(cfg, tok, dp_rank=rank, dp_world=2, source=source), 5)
        assert [t for b in blocks for t in b] == expected_stream(tok, shares[rank])[:5 * cfg.seq_length]


def test_order_is_deterministic_per_seed(files_cfg, tok):
    a, b = take(BlockStream(files_cfg, tok), 10), take(BlockStream(files_cfg, tok), 10)
    c = take(BlockStream(replace(files_cfg, seed=99), tok), 10)
    assert a == b and a != c
    source = open_source(files_cfg, "train")
    assert list(source.documents(0)) != list(source.documents(1))  # a new shuffle each epoch


# ----------------------------------------------------------------------------------------- validation

def test_validation_blocks_fixed_and_sharded(files_cfg, corpus, tok):
    _, docs = corpus
    single = validation_blocks(files_cfg, tok, max_blocks=9)
    assert len(single) == 9
    assert [t for b in single for t in b.tolist()] == expected_stream(tok, docs)[:9 * 16]  # unshuffled
    shards = [validation_blocks(files_cfg, tok, dp_rank=r, dp_world=2, max_blocks=9) for r in range(2)]
    assert [len(s) for s in shards] == [5, 4]
    assert sorted(tuple(b.tolist()) for s in shards for b in s) == sorted(tuple(b.tolist()) for b in single)
    assert len(validation_blocks(files_cfg, tok, max_blocks=None)) == len(expected_stream(tok, docs)) // 16
    with pytest.raises(ProjectError, match="no full validation block"):
        validation_blocks(replace(files_cfg, seq_length=100_000), tok)
