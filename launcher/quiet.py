"""Keep library start-up noise off the console: warnings that say nothing the user can act on."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Call before megatron-core and DeepSpeed are imported (their warnings fire at import)."""
    # megatron-core, at import: optional fused kernels (Transformer Engine, Apex) are absent; it falls back.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # DeepSpeed, at import on a machine without a GPU: it picks the CPU, which is what we asked for.
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
