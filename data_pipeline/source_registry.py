"""Text data sources by name, like model families and attention variants: `data.source` names a registered
source (the built-in ones are imported on first lookup) or `package.module:NAME`, a `SourceOpener` outside
this repository (imported and registered on first use, in every process).

A source opens one split of the corpus as a `DocumentSource`: cleaned plain-text documents in a per-epoch
order, restricted to a data-parallel rank's share. Tokenizing, packing, sharding, blending and resuming are
the pipeline's (data_pipeline/packing.py, blend.py) and come with every source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from common.errors import ConfigError
from common.plugins import find_registered, import_named
from data_pipeline.config import BUILTIN_SOURCES, DataConfig


class DocumentSource(ABC):
    """Documents of one split. `name` identifies the corpus (it is stored in BlockStream states)."""

    name: str
    split: str

    @abstractmethod
    def documents(self, epoch: int, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[str]:
        """Cleaned documents of `epoch` in that epoch's order, restricted to this rank's share (documents
        j of the epoch order with j % world == rank; a streamed source may hand out whole parquet shards
        instead), starting at index `start` of that share. Empty documents are yielded as "" so that
        indices stay stable; callers skip them."""


# opener(data config, split, **options) -> that split's documents; bad input raises ProjectError (one line).
# Options are keywords some callers pass (wiki40b_dir); an opener ignores the ones it does not know.
SourceOpener = Callable[..., DocumentSource]
_REGISTRY: dict[str, SourceOpener] = {}


def register_source(name: str, opener: SourceOpener) -> SourceOpener:
    """Make `opener` known as data.source `name`; re-registering a name replaces it."""
    _REGISTRY[name] = opener
    return opener


def _import_opener(path: str) -> SourceOpener:
    opener = import_named(path, object, "data.source")
    if not callable(opener):
        raise ConfigError("data.source", path, "must name a callable (data config, split, **options) -> DocumentSource")
    return opener


def source_opener(name: str) -> SourceOpener:
    opener = find_registered(_REGISTRY, name, BUILTIN_SOURCES, _import_opener)
    if opener is None:
        raise ConfigError("data.source", name, f"must be one of {', '.join(BUILTIN_SOURCES)} or package.module:NAME")
    return opener


def open_source(cfg: DataConfig, split: str = "train", **options: object) -> DocumentSource:
    """The configured corpus's `split`. Options: `wiki40b_dir` (or $WIKI40B_DATA_DIR) replaces the hub for
    wiki40b."""
    cfg.validate()
    return source_opener(cfg.source)(cfg, split, **options)
