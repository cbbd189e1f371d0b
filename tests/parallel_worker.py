"""Run under `torch.distributed.run`: train tiny OPT and BERT models for 10 steps in the layout given by
TP/PP/ZERO env vars (data parallel fills the rest of the world) and write the per-step losses as JSON (rank 0).

Used by tests/test_parallel.py to compare every layout with the single-process run; it goes through
parallel/engine.py, the code path of launcher.pretrain.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.distributed import init_process_group  # noqa: E402
from launcher.schedule import build_scheduler  # noqa: E402
from model.config import AttentionConfig, ModelConfig  # noqa: E402
from parallel.engine import build_parallel_model, train_step  # noqa: E402
from parallel.layout import validate_layout  # noqa: E402

RUNS = {"opt/softmax": ("opt", dict(variant="softmax")), "opt/softmax1": ("opt", dict(variant="softmax1")),
        "opt/softmax1_gated": ("opt", dict(variant="softmax1", gated=True)),
        "bert/softmax1": ("bert", dict(variant="softmax1")),
        "bert/learnable_sink_gated": ("bert", dict(variant="learnable_sink", gated=True))}
STEPS, MICRO, GLOBAL, SEQ, VOCAB = 10, 2, 4, 16, 128
MASKED = 3  # MLM labels per sequence: equal counts, so DP's mean of rank means is the global mean


def mlm_examples(tokens: torch.Tensor) -> torch.Tensor:
    """[n, 2, seq] examples: MASKED positions per sequence are predicted (and replaced by token 1)."""
    generator = torch.Generator().manual_seed(1)
    positions = torch.stack([torch.randperm(SEQ, generator=generator)[:MASKED] for _ in range(len(tokens))])
    selected = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, positions, True)
    return torch.stack([tokens.masked_fill(selected, 1), tokens.masked_fill(~selected, -100)], dim=1)


def main() -> None:
    device = init_process_group()
    tp, pp, zero = int(os.environ["TP"]), int(os.environ["PP"]), int(os.environ.get("ZERO", 0))
    results = {}
    tokens = torch.randint(0, VOCAB, (STEPS * GLOBAL, SEQ), generator=torch.Generator().manual_seed(0))
    for name, (family, attention) in RUNS.items():
        data = mlm_examples(tokens) if family == "bert" else tokens
        cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                          max_position_embeddings=SEQ, vocab_size=VOCAB, dropout=0.0, init_std=0.05,
                          attention=AttentionConfig(**attention))
        layout = validate_layout(cfg, tensor=tp, pipeline=pp, zero_stage=zero, world_size=dist.get_world_size(),
                                 micro_batch_size=MICRO, global_batch_size=GLOBAL)
        accumulation = GLOBAL // (MICRO * layout.data)
        ds_config = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO,
                     "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
                     "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
        pm = build_parallel_model(
            cfg, layout, seq_length=SEQ, seed=7, ds_config=ds_config,
            make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1),
            make_scheduler=lambda o: build_scheduler(o, lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=STEPS,
                                                     schedule="cosine"))
        from megatron.core import parallel_state as ps

        dp_rank = ps.get_data_parallel_rank()
        mine = data[dp_rank::layout.data]  # block sharding, as data_pipeline's shard_by=blocks

        def batches():
            for start in range(0, len(mine), MICRO):
                yield mine[start:start + MICRO]

        stream = batches()
        results[name] = [train_step(pm, stream, accumulation, zero, device)[0] for _ in range(STEPS)]
    if dist.get_rank() == 0:
        Path(os.environ["OUT"]).write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main()
