"""Masked-LM examples: the 80/10/10 rule's statistics, special tokens, determinism, resumption, sharding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_pipeline import Tokenizer, eval_examples, train_examples, train_tokenizer
from data_pipeline.mlm import IGNORE_INDEX, Masker, MaskingRule
from model.bert.data_config import BertDataConfig
from model.bert.objective import MASKED_LM
from common.errors import ConfigError, ProjectError
from tests.test_data_pipeline import expected_stream, make_docs, write_parquet


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = train_tokenizer(make_docs(300, seed=1), tmp_path_factory.mktemp("tok") / "tiny", vocab_size=320,
                           model_type="bpe")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = make_docs(40)
    return write_parquet(tmp_path_factory.mktemp("corpus") / "train.parquet", docs), docs


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory) -> BertDataConfig:
    path, _ = corpus
    return BertDataConfig(source="files", train_files=[str(path)], validation_files=[str(path)], seq_length=24,
                          cache_dir=str(tmp_path_factory.mktemp("cache")), vocab_size=320)


def test_masking_statistics_follow_the_80_10_10_rule(tok: Tokenizer) -> None:
    masker = Masker(tok, MaskingRule())
    special = set(masker.special.tolist())
    # ~200k tokens: the standard error of the 15% rate is ~0.1 point, of the 80/10/10 split ~0.25 points.
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randint(8, tok.vocab_size, (126,), generator=generator) for _ in range(1600)]
    for block in blocks[::7]:  # sprinkle structural tokens that must never be selected
        block[::9] = tok.sep_id
        block[1::13] = tok.eos_id
    examples = torch.stack([masker.example(b, seed=3, block_id=i) for i, b in enumerate(blocks)])
    originals = torch.stack([torch.cat([torch.tensor([tok.cls_id]), b, torch.tensor([tok.sep_id])]) for b in blocks])
    inputs, labels = examples[:, 0], examples[:, 1]
    candidates = ~torch.isin(originals, masker.special)
    selected = labels != IGNORE_INDEX

    assert not (selected & ~candidates).any(), "a special token was selected"
    assert torch.equal(labels[selected], originals[selected])  # labels are the original tokens
    assert torch.equal(inputs[~selected], originals[~selected])  # unselected tokens are untouched
    rate = selected.sum().item() / candidates.sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    n = selected.sum().item()
    masked = (inputs[selected] == tok.mask_id).sum().item() / n
    kept = (inputs[selected] == originals[selected]).sum().item() / n
    randomized = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01, (masked, kept)
    replaced = inputs[selected & (inputs != tok.mask_id) & (inputs != originals)]
    assert not torch.isin(replaced, torch.tensor(sorted(special))).any(), "a random replacement is special"
    assert examples[:, 0, 0].eq(tok.cls_id).all() and examples[:, 0, -1].eq(tok.sep_id).all()


def test_masks_are_a_function_of_seed_and_block_id(tok: Tokenizer) -> None:
    masker = Masker(tok, MaskingRule())
    block = torch.arange(8, 8 + 60)
    assert torch.equal(masker.example(block, 1, 5), masker.example(block, 1, 5))
    assert not torch.equal(masker.example(block, 1, 5), masker.example(block, 1, 6))
    assert not torch.equal(masker.example(block, 2, 5), masker.example(block, 1, 5))


def test_train_examples_pack_with_sep_and_resume_exactly(cfg: BertDataConfig, corpus, tok: Tokenizer) -> None:
    _, docs = corpus
    stream = train_examples(replace(cfg, shuffle=False), MASKED_LM, tok)
    first = [next(stream) for _ in range(6)]
    assert all(e.shape == (2, cfg.seq_length) for e in first)
    # Unmasked content is the corpus packed with [SEP] after every document, [CLS] ... [SEP] around each block.
    packed = [t if t != tok.eos_id else tok.sep_id for t in expected_stream(tok, docs)]
    inner = cfg.seq_length - 2
    for i, example in enumerate(first):
        original = torch.where(example[1] != IGNORE_INDEX, example[1], example[0])
        assert original[0] == tok.cls_id and original[-1] == tok.sep_id
        assert original[1:-1].tolist() == packed[i * inner:(i + 1) * inner]

    stream = train_examples(cfg, MASKED_LM, tok)
    for _ in range(9):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(30)]  # crosses an epoch boundary (~20 examples per epoch)
    resumed = train_examples(cfg, MASKED_LM, tok)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(30)]))
    with pytest.raises(ProjectError, match="mlm_seed"):
        train_examples(replace(cfg, seed=cfg.seed + 1), MASKED_LM, tok).load_state_dict(state)


def test_data_parallel_ranks_see_the_single_process_examples(cfg: BertDataConfig, tok: Tokenizer) -> None:
    cfg = replace(cfg, shard_by="blocks")  # the layout-equivalent mode (auto shards by documents)
    single = train_examples(cfg, MASKED_LM, tok)
    ranks = [train_examples(cfg, MASKED_LM, tok, dp_rank=r, dp_world=2) for r in range(2)]
    for _ in range(8):
        for rank in ranks:
            assert torch.equal(next(single), next(rank))  # same blocks AND the same masks


def test_eval_examples_are_fixed_and_sharded(cfg: BertDataConfig, tok: Tokenizer) -> None:
    full = eval_examples(cfg, MASKED_LM, tok)
    assert torch.equal(torch.stack(full), torch.stack(eval_examples(cfg, MASKED_LM, tok)))
    shards = [eval_examples(cfg, MASKED_LM, tok, dp_rank=r, dp_world=3) for r in range(3)]
    assert all(torch.equal(full[i], shards[i % 3][i // 3]) for i in range(len(full)))
    # The evaluation masks do not follow the training seed.
    assert torch.equal(torch.stack(full), torch.stack(eval_examples(replace(cfg, seed=99), MASKED_LM, tok)))
    other = eval_examples(replace(cfg, mlm_eval_seed=cfg.mlm_eval_seed + 1), MASKED_LM, tok)
    assert not torch.equal(torch.stack(full), torch.stack(other))


@pytest.mark.parametrize("changes, key", [({"mlm_probability": 0.0}, "data.mlm_probability"),
                                          ({"mlm_mask_fraction": 1.2}, "data.mlm_mask_fraction"),
                                          ({"mlm_mask_fraction": 0.8, "mlm_random_fraction": 0.3},
                                           "data.mlm_random_fraction"),
                                          ({"mlm_eval_seed": -1}, "data.mlm_eval_seed")])
def test_bad_masking_settings_name_the_key(cfg: BertDataConfig, changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        replace(cfg, **changes).validate()


def test_tokenizer_without_mask_token_is_refused(cfg: BertDataConfig, tok: Tokenizer) -> None:
    class NoMask:
        cls_id, sep_id, mask_id = tok.cls_id, tok.sep_id, None

    with pytest.raises(ProjectError, match="MASK"):
        Masker(NoMask(), MaskingRule())
    with pytest.raises(ConfigError, match="data.seq_length"):
        train_examples(replace(cfg, seq_length=2), MASKED_LM, tok)
