"""train.compile: the model's blocks compiled with torch.compile (Inductor), as torchtitan does per block.

Per block rather than the whole model or DeepSpeed's engine.compile(): the embeddings, the loss and the
tensor-parallel collectives between blocks stay eager (megatron-core's autograd functions and the TP RNG
tracker would only break the graph), every layout (TP, PP stages, ZeRO) holds whole blocks, and one compiled
forward serves every block of a class (Dynamo treats the module as an input), so compile time does not grow
with depth. The blocks keep their names (model/block_forward.py), so checkpoints, resume and Hugging Face
export see the same model. Recompute wraps the compiled forward, so the recompute runs compiled code too.
Evaluation (validation, outlier statistics, W8A8) runs eagerly under `eager()`: its hooks and quantized copies
would only recompile.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from model.block_forward import with_forward

log = logging.getLogger(__name__)


def _compiled_forward(parent_forward: Callable[..., Any]) -> Callable[..., Any]:
    """The parent's forward through torch.compile; a block class that cannot compile (Dynamo or Inductor
    fails on it) says so in one line and runs eagerly from then on."""
    compiled = torch.compile(parent_forward)
    failure: list[str] = []

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not failure:
            try:
                return compiled(self, *args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:
                failure.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
                log.warning("train.compile: %s cannot compile (%s): it runs eagerly",
                            parent_forward.__qualname__.split(".")[0], failure[0][:200])
        return parent_forward(self, *args, **kwargs)
    return forward


def compile_blocks(model: nn.Module, family: Any) -> int:
    """Compile `model`'s blocks (FamilySpec.blocks) in place; returns how many. ValueError (one line) when
    the family names no blocks. Compilation itself happens at the first forward."""
    blocks = family.blocks(model)
    if not blocks:
        raise ValueError(f"family {family.name!r} names no blocks to compile (FamilySpec.block_types)")
    for block in blocks:
        with_forward(block, "Compiled", _compiled_forward)
    return len(blocks)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run everything compiled inside eagerly (evaluation, quantized copies)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def compile_report(first_step_s: float, second_step_s: float) -> str:
    """The one line reporting what compilation cost: the first step's time over the second's."""
    return (f"torch.compile: first step {first_step_s:.1f}s, second {second_step_s:.2f}s "
            f"(~{max(0.0, first_step_s - second_step_s):.1f}s compiling the blocks)")
