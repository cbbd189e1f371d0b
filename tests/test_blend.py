"""Weighted blends (data.sources): token shares follow the weights globally and per data-parallel rank, resume
is exact, layouts read the same blocks, the hub kind streams a local dataset folder, bad entries are one line."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_pipeline.blend import BlendStream
from data_pipeline.config import SHARD_BY as SHARD_MODES, DataConfig, blend_parts
from data_pipeline.examples import eval_examples, eval_examples_by_source, train_examples
from data_pipeline.tokenizer import load_or_train_tokenizer
from model.bert.objective import MASKED_LM
from model.opt.objective import CAUSAL_LM
from common.errors import ConfigError, ProjectError

A_WORDS = ["apple", "apricot", "avocado", "almond", "anchor", "arrow", "amber", "atlas"]
Z_WORDS = ["zebra", "zinc", "zone", "zigzag", "zenith", "zircon", "zodiac", "zucchini"]
SEQ = 32


def _write_docs(path: Path, words: list[str], count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blend")
    return {"a_train": _write_docs(root / "a_train.jsonl", A_WORDS, 300, 1),
            "a_val": _write_docs(root / "a_val.jsonl", A_WORDS, 30, 2),
            "z_train": _write_docs(root / "z_train.jsonl", Z_WORDS, 60, 3),  # small: it repeats epochs
            "z_val": _write_docs(root / "z_val.jsonl", Z_WORDS, 30, 4), "root": root}


def blend_config(corpora: dict[str, Path], weights: tuple[float, float] = (0.8, 0.2), **extra: object) -> DataConfig:
    settings: dict = {"vocab_size": 300, "seq_length": SEQ, "cache_dir": str(corpora["root"] / "cache"),
                      "tokenizer_sample_docs": 200, **extra}
    cfg = DataConfig(
        **settings,
        sources=[{"name": "apples", "source": "files", "train_files": [str(corpora["a_train"])],
                  "validation_files": [str(corpora["a_val"])], "weight": weights[0]},
                 {"name": "zebras", "source": "files", "train_files": [str(corpora["z_train"])],
                  "validation_files": [str(corpora["z_val"])], "weight": weights[1]}])
    cfg.validate()
    return cfg


def _is_apple_block(block: torch.Tensor, tokenizer) -> bool:
    text = tokenizer.decode(block.tolist())
    a = sum(text.count(w) for w in A_WORDS)
    z = sum(text.count(w) for w in Z_WORDS)
    assert a == 0 or z == 0, text  # a block never mixes sources
    return a > 0


def test_token_shares_follow_weights_globally_and_per_rank(corpora: dict[str, Path]) -> None:
    cfg = blend_config(corpora)
    tokenizer = load_or_train_tokenizer(cfg)
    blocks = 3000
    stream = train_examples(cfg, CAUSAL_LM, tokenizer)
    apples = sum(_is_apple_block(next(stream), tokenizer) for _ in range(blocks))
    assert abs(apples / blocks - 0.8) <= 0.02
    assert stream.counts == [apples, blocks - apples]  # the stream's own bookkeeping agrees with the text
    for world in (2, 3):  # every rank sees the weights too (a Weyl sequence's strided subsequences are one too)
        for rank in range(world):
            ranked = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=rank, dp_world=world)
            share = sum(_is_apple_block(next(ranked), tokenizer) for _ in range(blocks // world)) / (blocks // world)
            assert abs(share - 0.8) <= 0.02, (world, rank, share)


def test_layouts_read_the_same_blocks_and_seed_changes_order(corpora: dict[str, Path]) -> None:
    cfg = blend_config(corpora, shard_by="blocks")  # the layout-equivalent mode (auto shards by documents)
    tokenizer = load_or_train_tokenizer(cfg)
    single = train_examples(cfg, CAUSAL_LM, tokenizer)
    expected = [next(single) for _ in range(40)]
    ranks = [train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=r, dp_world=2) for r in range(2)]
    interleaved = [next(ranks[i % 2]) for i in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(expected, interleaved))
    reseeded = train_examples(replace(cfg, seed=cfg.seed + 1), CAUSAL_LM, tokenizer)
    assert not all(torch.equal(a, next(reseeded)) for a in expected)


@pytest.mark.parametrize("shard_by", ["blocks", "documents"])
def test_blend_resumes_exactly(corpora: dict[str, Path], shard_by: str) -> None:
    cfg = blend_config(corpora, shard_by=shard_by)
    tokenizer = load_or_train_tokenizer(cfg)
    stream = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    for _ in range(450):  # past the zebra corpus's first epoch (60 short documents)
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint stores it
    expected = [next(stream) for _ in range(300)]
    resumed = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)
    assert resumed.state_dict() == stream.state_dict()
    assert stream.streams[1].epoch >= 1  # the resume crossed an epoch boundary of the small source
    other = train_examples(blend_config(corpora, (0.5, 0.5), shard_by=shard_by), CAUSAL_LM, tokenizer,
                           dp_rank=1, dp_world=2)
    with pytest.raises(ProjectError, match="weights are"):
        other.load_state_dict(state)


class RecordingTokenizer:
    """A tokenizer that records every text it encodes: what one rank tokenized."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.texts = tokenizer, []

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def encode(self, text: str) -> list[int]:
        self.texts.append(text)
        return self._tokenizer.encode(text)


def test_default_sharding_gives_every_rank_its_own_documents(corpora: dict[str, Path]) -> None:
    """data.shard_by: auto (the default) on 2 ranks: through a whole epoch of each blend source the ranks tokenize
    disjoint sets of documents whose union is the corpus, where blocks sharding tokenizes everything on every rank;
    resume is exact; one rank reads the blocks stream itself; a blocks checkpoint continues as blocks under auto."""
    cfg = blend_config(corpora, shuffle=False)  # the same share per epoch: shares are sets to compare
    assert cfg.shard_by == "auto" and DataConfig().shard_by == "auto"
    tokenizer = load_or_train_tokenizer(cfg)
    corpus = {json.loads(line)["text"].strip() for key in ("a_train", "z_train")
              for line in corpora[key].read_text().splitlines()}
    for shard_by in ("auto", "blocks"):
        recorders = [RecordingTokenizer(tokenizer) for _ in range(2)]
        streams = [train_examples(replace(cfg, shard_by=shard_by), CAUSAL_LM, recorders[r], dp_rank=r, dp_world=2)
                   for r in range(2)]
        while min(stream.epoch for stream in streams) < 1:  # every rank's every source through its first epoch
            for stream in streams:
                next(stream)
        shares = [set(recorder.texts) for recorder in recorders]
        if shard_by == "auto":
            assert streams[0].state_dict()["shard_by"] == "documents"
            assert not shares[0] & shares[1] and shares[0] | shares[1] == corpus
        else:
            assert shares[0] == shares[1] == corpus

    ranked = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    for _ in range(100):
        next(ranked)
    state = json.loads(json.dumps(ranked.state_dict()))
    expected = [next(ranked) for _ in range(50)]
    resumed = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)

    blocks_cfg = replace(cfg, shard_by="blocks")  # one rank: auto, documents and blocks are one stream
    single = {mode: train_examples(replace(cfg, shard_by=mode), CAUSAL_LM, tokenizer) for mode in SHARD_MODES}
    first = {mode: [next(stream) for _ in range(60)] for mode, stream in single.items()}
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*first.values()))
    assert len({json.dumps(stream.state_dict()) for stream in single.values()}) == 1

    old = train_examples(blocks_cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)  # e.g. before auto was the default
    for _ in range(40):
        next(old)
    continued = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    continued.load_state_dict(json.loads(json.dumps(old.state_dict())))
    assert all(torch.equal(next(old), next(continued)) for _ in range(40))
    with pytest.raises(ProjectError, match="shard_by is 'blocks' in the checkpoint but 'documents' now"):
        train_examples(replace(cfg, shard_by="documents"), CAUSAL_LM, tokenizer, dp_rank=1,
                       dp_world=2).load_state_dict(old.state_dict())
    source = blend_parts(blocks_cfg)[0].cfg  # one source (a BlockStream) continues the same way
    old = train_examples(source, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    for _ in range(20):
        next(old)
    continued = train_examples(replace(source, shard_by="auto"), CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    continued.load_state_dict(json.loads(json.dumps(old.state_dict())))
    assert all(torch.equal(next(old), next(continued)) for _ in range(20))


def test_mlm_examples_and_validation_per_source(corpora: dict[str, Path]) -> None:
    cfg = blend_config(corpora, seq_length=SEQ + 2)
    tokenizer = load_or_train_tokenizer(cfg)
    stream = train_examples(cfg, MASKED_LM, tokenizer, vocab_size=320)
    example = next(stream)
    assert example.shape == (2, SEQ + 2) and isinstance(stream.blocks, BlendStream)
    by_source = eval_examples_by_source(cfg, CAUSAL_LM, tokenizer, max_blocks=10)
    assert list(by_source) == ["apples", "zebras"] and [len(v) for v in by_source.values()] == [8, 2]
    assert all(_is_apple_block(b, tokenizer) for b in by_source["apples"])
    assert not any(_is_apple_block(b, tokenizer) for b in by_source["zebras"])
    combined = eval_examples(cfg, CAUSAL_LM, tokenizer, max_blocks=10)
    assert len(combined) == 10
    assert eval_examples_by_source(blend_parts(cfg)[0].cfg, CAUSAL_LM, tokenizer) == {}  # one source: none


def test_hub_kind_streams_a_local_dataset_folder_with_holdout(corpora: dict[str, Path]) -> None:
    folder = corpora["root"] / "hub_books"
    folder.mkdir(exist_ok=True)
    _write_docs(folder / "train.jsonl", Z_WORDS, 200, 7)
    cfg = DataConfig(source="hub", hub_path=str(folder), hub_holdout=0.1, vocab_size=300, seq_length=SEQ,
                     cache_dir=str(corpora["root"] / "cache"), tokenizer_sample_docs=100)
    from data_pipeline.sources import open_source

    train = list(open_source(replace(cfg, shuffle=False), "train").documents(0))
    validation = list(open_source(replace(cfg, shuffle=False), "validation").documents(0))
    assert 5 <= len(validation) <= 40 and len(train) + len(validation) == 200
    assert not set(train) & set(validation)
    blend = replace(blend_config(corpora), sources=[
        {"name": "apples", "source": "files", "train_files": str(corpora["a_train"]),
         "validation_files": str(corpora["a_val"]), "weight": 3},
        {"source": "hub", "hub_path": str(folder), "hub_holdout": 0.1, "weight": 1}])
    assert [(p.name, p.weight) for p in blend_parts(blend)] == [("apples", 0.75), ("hub_books", 0.25)]
    tokenizer = load_or_train_tokenizer(blend)
    stream = train_examples(blend, CAUSAL_LM, tokenizer)
    assert [next(stream).shape for _ in range(8)] == [torch.Size([SEQ])] * 8


@pytest.mark.parametrize("entry,message", [
    ({"source": "files", "train_files": ["x.jsonl"]}, "'data.sources[1].weight' = None: must be a positive finite number"),
    ({"source": "wiki40b", "language": "xx", "weight": 1}, "'data.sources[1].language' = 'xx'"),
    ({"source": "hub", "weight": 1}, "'data.sources[1].hub_path' = None"),
    ({"source": "files", "weight": 1, "seq_length": 8}, "'data.sources[1].seq_length' = 8: unknown key"),
    ({"name": "apples", "source": "wiki_sample", "weight": 1}, "'data.sources[1].name' = 'apples': is used"),
])
def test_bad_source_entries_name_the_entry(corpora: dict[str, Path], entry: dict, message: str) -> None:
    cfg = blend_config(corpora)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        replace(cfg, sources=[cfg.sources[0], entry]).validate()


def test_pretrain_blend_resumes_exactly_and_logs_each_source(data_cache: Path, tmp_path: Path) -> None:
    """launcher.pretrain on a blend of the bundled English and French samples: an interrupted run resumed from
    its checkpoint trains exactly like an uninterrupted one, and validation is logged per source."""
    from conftest import run_pretrain, tiny_overrides, train_losses

    blend = ("[{source: wiki_sample, language: en, weight: 0.7}, "
             "{source: wiki_sample, language: fr, weight: 0.3}]")
    common = {"data.sources": blend, "eval.outlier_interval": "null"}
    whole = run_pretrain(tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "whole"}))
    assert whole.returncode == 0, whole.stderr[-3000:]
    parted = tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "parted"})
    first = run_pretrain(parted + ["train.exit_interval=3"])
    assert first.returncode == 0 and "exit_interval reached" in first.stdout + first.stderr, first.stderr[-3000:]
    second = run_pretrain(parted, resume="auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert train_losses(tmp_path / "parted") == train_losses(tmp_path / "whole")
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    for name in ("wiki_sample_en", "wiki_sample_fr"):
        steps = [r["step"] for r in records if r["kind"] == f"val/{name}"]
        assert steps == [3, 6], (name, steps)
    assert "wiki_sample_fr val ppl" in whole.stdout
