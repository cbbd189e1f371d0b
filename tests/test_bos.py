"""data.bos: every causal-LM block (training, validation, calibration, blends) starts with BOS, the rest is the
usual packed stream; resumable and the same for every data-parallel layout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import BlockStream, DataConfig, Tokenizer, train_tokenizer, validation_blocks
from data_pipeline.blend import BlendStream
from data_pipeline.config import blend_parts
from data_pipeline.examples import calibration_examples, eval_examples, train_examples
from model.opt.objective import CAUSAL_LM
from launcher.config import load_config
from common.errors import ConfigError, ProjectError

WORDS = "the cat sat on a mat while the river ran past old stone walls in summer light".split()


def _docs(n: int, offset: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 17)) + f" n{offset + i}"
            for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, Tokenizer, list[str]]:
    root = tmp_path_factory.mktemp("bos")
    docs = _docs(40, 0)
    pq.write_table(pa.table({"text": docs}), root / "a.parquet")
    pq.write_table(pa.table({"text": _docs(40, 100)}), root / "b.parquet")
    tok = Tokenizer(train_tokenizer(docs, root / "tok", vocab_size=300, model_type="bpe"))
    cfg = DataConfig(source="files", train_files=[str(root / "a.parquet")], validation_files=[str(root / "a.parquet")],
                     seq_length=12, bos=True, shuffle=False, cache_dir=str(root / "cache"), vocab_size=300)
    return cfg, tok, docs


def _take(stream, n: int) -> list[list[int]]:
    return [next(stream).tolist() for _ in range(n)]


def test_every_block_is_bos_plus_the_packed_stream(setup) -> None:
    cfg, tok, docs = setup
    stream = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    blocks = _take(BlockStream(cfg, tok), 30)
    assert all(len(b) == 12 and b[0] == tok.bos_id for b in blocks)
    assert [t for b in blocks for t in b[1:]] == stream[:30 * 11]  # no content token lost or repeated
    assert tok.bos_id not in stream  # so position 0 is the only BOS
    plain = _take(BlockStream(replace(cfg, bos=False), tok), 3)
    assert plain[0][0] != tok.bos_id and [t for b in plain for t in b] == stream[:36]
    val = validation_blocks(cfg, tok, max_blocks=5)
    assert [b.tolist() for b in val] == blocks[:5]  # unshuffled first epoch, BOS first
    assert all(b[0] == tok.bos_id for b in calibration_examples(cfg, CAUSAL_LM, tok, 4))


@pytest.mark.parametrize("shard_by", ["blocks", "documents"])
def test_resume_gives_identical_blocks(setup, shard_by: str) -> None:
    cfg = replace(setup[0], shuffle=True, shard_by=shard_by)
    tok = setup[1]
    reference = _take(BlockStream(cfg, tok, dp_rank=1, dp_world=2), 40)
    for cut in (0, 7, 23):
        stream = BlockStream(cfg, tok, dp_rank=1, dp_world=2)
        _take(stream, cut)
        restored = BlockStream(cfg, tok, dp_rank=1, dp_world=2)
        restored.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        assert _take(restored, 6) == reference[cut:cut + 6]
    state = BlockStream(cfg, tok).state_dict()
    with pytest.raises(ProjectError, match="bos is True in the checkpoint but False now"):
        BlockStream(replace(cfg, bos=False), tok).load_state_dict(state)
    old = {k: v for k, v in BlockStream(replace(cfg, bos=False), tok).state_dict().items() if k != "bos"}
    BlockStream(replace(cfg, bos=False), tok).load_state_dict(old)  # a state from before data.bos: no BOS


def test_data_parallel_ranks_interleave_to_the_single_stream(setup) -> None:
    cfg, tok, _ = setup
    cfg = replace(cfg, shard_by="blocks")  # the layout-equivalent mode (auto shards by documents)
    single = _take(BlockStream(cfg, tok), 20)
    ranks = [_take(BlockStream(cfg, tok, dp_rank=r, dp_world=2), 10) for r in range(2)]
    assert [b for pair in zip(*ranks) for b in pair] == single


def test_blend_blocks_start_with_bos_and_resume(setup) -> None:
    cfg, tok, _ = setup
    root = Path(cfg.train_files[0]).parent
    blend = replace(cfg, sources=[{"name": "a", "source": "files", "train_files": [str(root / "a.parquet")],
                                   "validation_files": [str(root / "a.parquet")], "weight": 0.7},
                                  {"name": "b", "source": "files", "train_files": [str(root / "b.parquet")],
                                   "validation_files": [str(root / "b.parquet")], "weight": 0.3}])
    stream = train_examples(blend, CAUSAL_LM, tok)
    assert isinstance(stream, BlendStream)
    blocks = _take(stream, 30)
    assert all(b[0] == tok.bos_id for b in blocks) and set(stream.counts) != {0}
    cut = BlendStream(blend_parts(blend), tok)
    _take(cut, 11)
    restored = BlendStream(blend_parts(blend), tok)
    restored.load_state_dict(cut.state_dict())
    assert _take(restored, 8) == blocks[11:19]
    assert all(b[0] == tok.bos_id for b in eval_examples(blend, CAUSAL_LM, tok, max_blocks=6))


def test_bos_is_validated(setup) -> None:
    with pytest.raises(ConfigError) as info:
        replace(DataConfig(), bos="yes").validate()
    assert info.value.key == "data.bos"
    with pytest.raises(ConfigError) as info:
        load_config("configs/bert_tiny.yaml", ["data.bos=true"])
    assert info.value.key == "data.bos" and "[CLS]" in str(info.value) and "\n" not in str(info.value)
    assert load_config("configs/opt_125m.yaml").data.bos  # the papers' OPT recipes start blocks with BOS
