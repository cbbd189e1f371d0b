"""Run under `torch.distributed.run`: train tiny OPT and BERT models for STEPS steps in each layout listed in
the LAYOUTS env var ("tp,pp,zero[,recompute[,compile]];..."; data parallel fills the rest of the world; recompute
is a parallel.activation_checkpointing mode, `compile` compiles the blocks as train.compile) and write, per
layout and run, the per-step losses and logged gradient norms as JSON (rank 0). With DROPOUT=p, hidden and
attention dropout are on and TP layouts also report how far their ranks' replicated weights drifted apart.
With PREPARED=<a data_pipeline.prepare folder>, the runs train on prepared data instead, each data-parallel rank
reading only its own samples through data_pipeline's IndexedStream (global sample n x dp + rank): the OPT runs'
token blocks, bert/softmax1's masked-LM examples (data_pipeline's masking, seeded per global sample; layouts with
one data-parallel rank only: the masked count varies per sequence, and the mean loss of a micro-batch is only
layout-independent where data parallelism does not regroup the micro-batches), and with PREPARED_BLEND=<JSON
data.sources of prepared folders> an opt/softmax run on that blend (megatron-core's BlendedDataset).

Used by tests/test_parallel.py to compare every layout with the single-process run; it goes through
parallel/engine.py, the code path of launcher.pretrain. Every mechanism that can differ between layouts is
active at once: clipping that binds (CLIP is far below the gradient norms), several accumulation steps per
optimizer step, a warmup + cosine schedule, and enough steps for Adam's second moment to shape the updates.
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
from parallel.groups import destroy_model_parallel  # noqa: E402
from parallel.layout import validate_layout  # noqa: E402

RUNS = {"opt/softmax": ("opt", dict(variant="softmax")),
        "opt/softmax1_gated": ("opt", dict(variant="softmax1", gated=True)),
        "bert/softmax1": ("bert", dict(variant="softmax1")),
        "bert/learnable_sink_gated": ("bert", dict(variant="learnable_sink", gated=True))}
STEPS, MICRO, GLOBAL, SEQ, VOCAB = 10, 2, 8, 16, 128
CLIP = 0.2  # the tiny models' gradient norms are 0.5-3: clipping scales every step
MASKED = 6  # MLM labels per sequence: equal counts, so DP's mean of rank means is the global mean


def mlm_examples(tokens: torch.Tensor) -> torch.Tensor:
    """[n, 2, seq] examples: MASKED positions per sequence are predicted (and replaced by token 1)."""
    generator = torch.Generator().manual_seed(1)
    positions = torch.stack([torch.randperm(SEQ, generator=generator)[:MASKED] for _ in range(len(tokens))])
    selected = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, positions, True)
    return torch.stack([tokens.masked_fill(selected, 1), tokens.masked_fill(~selected, -100)], dim=1)


def replicated_divergence(module: torch.nn.Module) -> float:
    """Largest difference between tensor-parallel ranks of any parameter every TP rank holds whole."""
    from megatron.core import parallel_state as ps

    from parallel.sharding import partition_dim

    group = ps.get_tensor_model_parallel_group()
    worst = 0.0
    for param in module.parameters():
        if partition_dim(param) is None:
            copies = [torch.empty_like(param.data) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, param.data.contiguous(), group=group)
            worst = max(worst, max(float((c - copies[0]).abs().max()) for c in copies))
    return worst


PREPARED_RUNS = ("opt/softmax", "opt/softmax1_gated", "bert/softmax1", "opt/softmax/blend")
MLM_PROBABILITY = 0.25  # 14 candidate tokens per sequence: no micro-batch of 2 without a masked one


def prepared_examples(family: str, dp_rank: int, dp_world: int, blend: bool = False) -> torch.Tensor:
    """This rank's STEPS x GLOBAL / dp_world examples of SEQ tokens from prepared data (only its own samples):
    token blocks, or BERT's [2, SEQ] masked examples; from PREPARED or the PREPARED_BLEND blend."""
    from data_pipeline.config import DataConfig
    from data_pipeline.examples import train_examples
    from data_pipeline.tokenizer import load_or_train_tokenizer
    from model.bert.data_config import BertDataConfig
    from model.bert.objective import MASKED_LM
    from model.opt.objective import CAUSAL_LM

    bert = family == "bert"
    data_class = BertDataConfig if bert else DataConfig  # BERT's data section holds its masking settings
    cfg = (data_class(sources=json.loads(os.environ["PREPARED_BLEND"]), seq_length=SEQ) if blend else
           data_class(source="indexed", path=os.environ["PREPARED"], seq_length=SEQ,
                      **({"mlm_probability": MLM_PROBABILITY} if bert else {})))
    objective = MASKED_LM if bert else CAUSAL_LM
    stream = train_examples(cfg, objective, load_or_train_tokenizer(cfg), dp_rank=dp_rank, dp_world=dp_world,
                            vocab_size=VOCAB)
    return torch.stack([next(stream) for _ in range(STEPS * GLOBAL // dp_world)])


def train_layout(tp: int, pp: int, zero: int, device: torch.device, dropout: float = 0.0,
                 recompute: str = "none", runs: list[str] | None = None,
                 compile: bool = False) -> dict[str, dict[str, list[float]]]:
    from megatron.core import parallel_state as ps

    results = {}
    prepared = os.environ.get("PREPARED")
    # Learnable sequences (each token one more than the last, from a random start), so every run must improve.
    starts = torch.randint(0, VOCAB, (STEPS * GLOBAL, 1), generator=torch.Generator().manual_seed(0))
    tokens = (starts + torch.arange(SEQ)) % VOCAB
    named = {**RUNS, "opt/softmax/blend": RUNS["opt/softmax"]} if os.environ.get("PREPARED_BLEND") else RUNS
    for name, (family, attention) in named.items():
        if (runs and name not in runs) or (prepared and name not in PREPARED_RUNS) or \
                (not prepared and name.endswith("/blend")):
            continue
        data = mlm_examples(tokens) if family == "bert" else tokens
        cfg = ModelConfig(family=family, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                          max_position_embeddings=SEQ, vocab_size=VOCAB, dropout=dropout, attention_dropout=dropout,
                          init_std=0.05,
                          attention=AttentionConfig(**attention))
        layout = validate_layout(cfg, tensor=tp, pipeline=pp, zero_stage=zero, world_size=dist.get_world_size(),
                                 micro_batch_size=MICRO, global_batch_size=GLOBAL)
        if prepared and family == "bert" and layout.data > 1:  # see the module docstring
            continue
        accumulation = GLOBAL // (MICRO * layout.data)
        ds_config = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO,
                     "gradient_accumulation_steps": accumulation, "gradient_clipping": CLIP,
                     "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}
        pm = build_parallel_model(
            cfg, layout, seq_length=SEQ, seed=7, ds_config=ds_config,
            make_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
            make_scheduler=lambda o: build_scheduler(o, lr=1e-2, min_lr=1e-3, warmup_steps=3, total_steps=STEPS,
                                                     schedule="cosine"),
            activation_checkpointing=recompute, compile=compile)
        dp_rank = ps.get_data_parallel_rank()
        if prepared:
            mine = prepared_examples(family, dp_rank, layout.data, blend=name.endswith("/blend"))
        else:
            mine = data[dp_rank::layout.data]  # block sharding, as data_pipeline's shard_by=blocks

        def batches():
            for start in range(0, len(mine), MICRO):
                yield pm.family.collate(list(mine[start:start + MICRO]))  # the family's typed Batch

        stream = batches()
        steps = [train_step(pm, stream, accumulation, device) for _ in range(STEPS)]
        results[name] = {"loss": [loss for loss, _ in steps],
                         "grad_norm": [float("nan") if norm is None else norm for _, norm in steps]}
        if dropout and tp > 1 and pp == 1:
            results[name]["replicated_divergence"] = replicated_divergence(pm.module)
    return results


def main() -> None:
    import deepspeed.utils.groups as ds_groups

    device = init_process_group()
    results = {}
    dropout = float(os.environ.get("DROPOUT", 0.0))
    runs = [name for name in os.environ.get("RUNS", "").split(",") if name]  # default: every run
    for spec in os.environ["LAYOUTS"].split(";"):
        tp, pp, zero, *extra = spec.split(",")
        results[spec] = train_layout(int(tp), int(pp), int(zero), device, dropout, extra[0] if extra else "none",
                                     runs=runs, compile=extra[1:] == ["compile"])
        # The next layout builds its own groups; DeepSpeed keeps the last engine's mpu in a module global.
        destroy_model_parallel()
        ds_groups.mpu = None
        dist.barrier()
    if dist.get_rank() == 0:
        Path(os.environ["OUT"]).write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main()
