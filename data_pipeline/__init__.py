"""Data pipeline: document sources -> SentencePiece tokens -> packed, rank-sharded, resumable blocks.

Names are imported on first use (PEP 562), so `python -m data_pipeline.train_tokenizer` and config
validation do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataConfig": "data_pipeline.config",
    "to_wiki40b_markers": "data_pipeline.markers",
    "wiki40b_to_text": "data_pipeline.markers",
    "BlockStream": "data_pipeline.packing",
    "train_examples": "data_pipeline.examples",
    "eval_examples": "data_pipeline.examples",
    "calibration_examples": "data_pipeline.examples",
    "batch_iterator": "data_pipeline.packing",
    "validation_blocks": "data_pipeline.packing",
    "DocumentSource": "data_pipeline.source_registry",
    "open_source": "data_pipeline.source_registry",
    "register_source": "data_pipeline.source_registry",
    "Tokenizer": "data_pipeline.tokenizer",
    "load_or_train_tokenizer": "data_pipeline.tokenizer",
    "train_tokenizer": "data_pipeline.tokenizer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from data_pipeline.config import DataConfig
    from data_pipeline.examples import calibration_examples, eval_examples, train_examples
    from data_pipeline.markers import to_wiki40b_markers, wiki40b_to_text
    from data_pipeline.packing import BlockStream, batch_iterator, validation_blocks
    from data_pipeline.source_registry import DocumentSource, open_source, register_source
    from data_pipeline.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
