"""Prepared data folders (data_pipeline/prepare.py's output) as a run config names them: which source, split files
and tokenizer. Reads only manifests (no torch), so config validation can check `data.path` before anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.errors import ProjectError

MANIFEST = "manifest.json"  # what data_pipeline.prepare writes last into its output folder


@dataclass(frozen=True)
class PreparedSource:
    name: str
    root: Path  # the folder holding manifest.json
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def split_prefix(self, split: str) -> str:
        splits = self.manifest["sources"][self.name]["splits"]
        if split not in splits:
            raise ProjectError(f"prepared data {self.root / self.name} has no '{split}' split (it has "
                               f"{', '.join(splits) or 'none'}): prepare it with --splits")
        prefix = self.root / splits[split]["prefix"]
        for ext in ("bin", "idx"):
            if not Path(f"{prefix}.{ext}").is_file():
                raise ProjectError(f"prepared data file missing: {prefix}.{ext}")
        return str(prefix)

    def tokenizer_path(self) -> str | None:
        """The tokenizer to read this data with: the copy prepare made, or the spec it recorded."""
        tok = self.manifest["tokenizer"]
        if tok.get("file"):
            return str(self.root / tok["file"])
        return None if tok.get("spec") == "char" else tok.get("spec")


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProjectError(f"prepared data manifest {path} is unreadable: {e}") from None


def resolve_prepared(path: str | Path) -> PreparedSource:
    """data.path -> the prepared source: DIR/<name> (DIR holds manifest.json) or DIR when it holds one source."""
    return _resolve(str(Path(path).expanduser().absolute()))


@lru_cache(maxsize=64)
def _resolve(path_text: str) -> PreparedSource:
    path = Path(path_text)
    if not path.exists():
        raise ProjectError(f"prepared data folder not found: {path} (write it with python -m data_pipeline.prepare)")
    for root, name in ((path, None), (path.parent, path.name)):
        manifest = read_manifest(root)
        if manifest is None:
            continue
        sources = manifest.get("sources", {})
        if name is None:
            if len(sources) != 1:
                raise ProjectError(f"{root} holds {len(sources)} prepared sources ({', '.join(sources)}): set "
                                   f"data.path to one of them, e.g. {root / next(iter(sources), 'NAME')}")
            name = next(iter(sources))
        if name not in sources:
            raise ProjectError(f"{root / MANIFEST} has no source '{name}' (it has {', '.join(sources)})")
        if not sources[name].get("splits"):
            raise ProjectError(f"prepared source {root / name} is not complete (no merged split yet): finish "
                               f"python -m data_pipeline.prepare (or its --merge step)")
        return PreparedSource(name, root, manifest)
    raise ProjectError(f"{path} is not a prepared data folder (no {MANIFEST} in it or its parent)")


def parts_of(cfg: Any) -> list[tuple[PreparedSource, float]]:
    """The prepared sources of a data config with normalised weights (one source: weight 1)."""
    from data_pipeline.config import blend_parts

    if cfg.sources:
        return [(resolve_prepared(part.cfg.path), part.weight) for part in blend_parts(cfg)]
    return [(resolve_prepared(cfg.path), 1.0)]


def is_indexed(cfg: Any) -> bool:
    """Whether a data config reads prepared data (a blend is all prepared or all streamed: config.validate)."""
    if cfg.sources:
        return all(entry.get("source") == "indexed" for entry in cfg.sources)
    return cfg.source == "indexed"


def check_tokenizer(cfg: Any, tokenizer: Any) -> None:
    """One error line when the run's tokenizer is not the one the prepared data was written with."""
    for part, _ in parts_of(cfg):
        if part.fingerprint != tokenizer.fingerprint:
            raise ProjectError(f"data.tokenizer {tokenizer!r} (fingerprint {tokenizer.fingerprint}) is not the "
                               f"tokenizer {part.root / part.name} was prepared with ({part.fingerprint}); "
                               f"unset data.tokenizer to use the prepared one")
