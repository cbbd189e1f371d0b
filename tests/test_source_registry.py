"""Data sources are a registry like families and variants (issue 25): a source defined in this file only is
named as `data.source: test_source_registry:Numbered` and is tokenized and packed like the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ConfigError
from data_pipeline.config import DataConfig
from data_pipeline.packing import validation_blocks
from data_pipeline.source_registry import DocumentSource, open_source
from data_pipeline.tokenizer import load_or_train_tokenizer

SOURCE = f"{Path(__file__).stem}:Numbered"


class Numbered(DocumentSource):
    """Documents "doc <j> of <split>." (a finite validation split, an endless train split)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.name, self.split = "numbered", split

    def documents(self, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        total = 10**9 if self.split == "train" else 40
        for j in range(rank + start * world, total, world):
            yield f"doc {j} of {self.split}."


def test_a_source_from_a_test_file_is_opened_tokenized_and_packed(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = DataConfig(source=SOURCE, tokenizer_type="char", seq_length=16, cache_dir=str(tmp_path))
    cfg.validate()
    assert list(open_source(cfg, "validation").documents(0, rank=1, world=2))[:2] == ["doc 1 of validation.",
                                                                                      "doc 3 of validation."]
    tokenizer = load_or_train_tokenizer(cfg)
    blocks = validation_blocks(cfg, tokenizer, max_blocks=3)
    assert len(blocks) == 3 and all(len(block) == 16 for block in blocks)
    assert tokenizer.decode(blocks[0].tolist()) == "doc 0 of validat"  # 16 characters


def test_an_unknown_source_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="data.source.*package.module:NAME"):
        DataConfig(source="no_such_source").validate()
    with pytest.raises(ConfigError, match="data.source.*cannot be imported"):
        open_source(DataConfig(source="no_such_module:Source", tokenizer_type="char"), "train")
