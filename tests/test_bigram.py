"""source=bigram_backcopy with the char tokenizer: the task's rules, its bigram statistics, exact resume, the same
data for every data-parallel layout, blends, and config errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare

from data_pipeline import BlockStream, DataConfig, load_or_train_tokenizer, open_source, validation_blocks
from data_pipeline.bigram import BigramBackcopySource, count_bigrams, table_from_counts, wiki_bigram_counts
from data_pipeline.char_tokenizer import ALPHABET, FIRST_CHAR_ID, CharTokenizer
from data_pipeline.examples import train_examples
from model.opt.objective import CAUSAL_LM
from common.errors import ConfigError, ProjectError


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    return DataConfig(source="bigram_backcopy", tokenizer_type="char", bos=True, seq_length=64,
                      cache_dir=str(tmp_path_factory.mktemp("bigram_cache")))


def _take(stream, n: int) -> list[list[int]]:
    return [next(stream).tolist() for _ in range(n)]


def test_table_is_estimated_from_the_wikipedia_sample(cfg: DataConfig) -> None:
    counts = wiki_bigram_counts(cfg.cache_dir, "en")
    assert counts.shape == (len(ALPHABET), len(ALPHABET)) and counts.sum() > 1_000_000
    assert np.array_equal(wiki_bigram_counts(cfg.cache_dir, "en"), counts)  # cached
    table = table_from_counts(counts, 3)
    assert np.allclose(table.probs.sum(axis=1), 1.0)
    assert "".join(ALPHABET[i] for i in table.triggers)[0] == " "  # English: space is the most frequent
    row = table.probs[ALPHABET.index("q")]
    assert ALPHABET[int(row.argmax())] == "u"  # a fact of English the table must have learned
    assert count_bigrams(["Ab\nc?"]).sum() == 4  # case-folded, newline as space, "?" kept


def test_blocks_are_bos_one_chain_eos_and_follow_the_rules(cfg: DataConfig) -> None:
    tok = load_or_train_tokenizer(cfg)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 67
    source = open_source(cfg, "train")
    triggers = {FIRST_CHAR_ID + i for i in source.table.triggers}
    blocks = _take(BlockStream(cfg, tok), 200)
    copies = 0
    for block in blocks:
        assert len(block) == 64 and block[0] == tok.bos_id and block[-1] == tok.eos_id
        chain = block[1:-1]
        assert all(FIRST_CHAR_ID <= t < tok.vocab_size for t in chain) and chain[0] not in triggers
        for i in range(1, len(chain) - 1):
            if chain[i] in triggers:  # the copy rule, and copies are never triggers
                assert chain[i + 1] == chain[i - 1] and chain[i - 1] not in triggers
                copies += 1
    assert copies > 0.1 * 200 * 62  # triggers are the most frequent characters: the rule is exercised a lot
    assert tok.decode(blocks[0]) == source.document(0, 0)


def test_bigram_statistics_match_the_table(cfg: DataConfig) -> None:
    source = BigramBackcopySource(replace(cfg, seq_length=402), "train")
    chains = [[ALPHABET.index(c) for c in source.document(0, j)] for j in range(300)]
    triggers = set(source.table.triggers)
    k = len(ALPHABET)
    counts = np.zeros((k, k))
    for chain in chains:  # transitions out of non-trigger states follow the bigram rows
        for a, b in zip(chain, chain[1:]):
            if a not in triggers:
                counts[a, b] += 1

    def p_value(row: int, probs: np.ndarray) -> float:
        observed, expected = counts[row], probs * counts[row].sum()
        keep = expected >= 5  # merge the rare cells into one, as chi-square needs
        obs = np.append(observed[keep], observed[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        return float(chisquare(obs, exp).pvalue)

    busy = [int(a) for a in np.argsort(-counts.sum(axis=1))[:10]]
    assert counts[busy].sum(axis=1).min() > 1500
    for row in busy:
        assert p_value(row, source.table.probs[row]) > 1e-4, ALPHABET[row]
        tv = 0.5 * np.abs(counts[row] / counts[row].sum() - source.table.probs[row]).sum()
        assert tv < 0.06, (ALPHABET[row], tv)
    wrong = source.table.probs[busy[1]]  # the test has power: another row's distribution is rejected
    assert p_value(busy[0], wrong) < 1e-6


@pytest.mark.parametrize("shard_by", ["blocks", "documents"])
def test_resume_and_data_parallel_layouts_give_the_same_data(cfg: DataConfig, shard_by: str) -> None:
    c = replace(cfg, shard_by=shard_by)
    tok = load_or_train_tokenizer(c)
    single = _take(BlockStream(c, tok), 32)
    ranks = [_take(BlockStream(c, tok, dp_rank=r, dp_world=2), 16) for r in range(2)]
    assert [b for pair in zip(*ranks) for b in pair] == single  # 2 ranks' shards interleave to the 1-rank stream
    for cut in (0, 5, 11):
        stream = BlockStream(c, tok, dp_rank=1, dp_world=2)
        _take(stream, cut)
        restored = BlockStream(c, tok, dp_rank=1, dp_world=2)
        restored.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        assert _take(restored, 4) == ranks[1][cut:cut + 4]
    other_seed = _take(BlockStream(replace(c, seed=5), tok), 2)
    assert other_seed != single[:2]


def test_validation_is_fixed_and_blends_work(cfg: DataConfig) -> None:
    tok = load_or_train_tokenizer(cfg)
    val = validation_blocks(cfg, tok, max_blocks=4)
    train = _take(BlockStream(cfg, tok), 4)
    assert [b.tolist() for b in val] == [b.tolist() for b in validation_blocks(cfg, tok, max_blocks=4)]
    assert [b.tolist() for b in val] != train  # another split, other chains
    blend = replace(cfg, sources=[{"name": "copy3", "source": "bigram_backcopy", "weight": 0.5},
                                  {"name": "copy1", "source": "bigram_backcopy", "backcopy_triggers": 1, "weight": 0.5},
                                  {"name": "wiki", "source": "wiki_sample", "weight": 0.2}])
    stream = train_examples(blend, CAUSAL_LM, tok)
    blocks = _take(stream, 40)
    assert all(b[0] == tok.bos_id for b in blocks) and min(stream.counts) > 0
    text = tok.decode(tok.encode("Paris, 1900!\nÉté"))
    assert text == "paris, 1900!\nété"


@pytest.mark.parametrize("changes, key", [
    ({"tokenizer_type": "unigram"}, "data.tokenizer_type"), ({"backcopy_triggers": 0}, "data.backcopy_triggers"),
    ({"language": "de"}, "data.language"), ({"seq_length": 3}, "data.seq_length"),
])
def test_bad_settings_name_the_key(cfg: DataConfig, changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        replace(cfg, **changes).validate()
    assert info.value.key == key and "\n" not in str(info.value)
    with pytest.raises(ProjectError, match="split"):
        BigramBackcopySource(cfg, "dev")
