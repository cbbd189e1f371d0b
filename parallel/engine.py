"""The model of a run in its parallel layout, wrapped by DeepSpeed, with layout-aware train/eval steps.

Every layout is built the same way: the full single-process model is initialised from the run seed
(or weights are loaded from a full state dict), then each rank copies its shard (parallel/sharding.py).
So TP/PP/DP runs start from exactly the weights of the single-process run, and weights move freely
between layouts. Layouts: plain module (TP1 PP1), megatron-core TP layers (TP>1, DeepSpeed `mpu` =
megatron-core's groups), DeepSpeed PipelineModule (PP>1, its topology gives the groups; TP inside).
A ParallelModel saves and restores its own checkpoint state (state_dict: its TP RNG tracker and the
parameter manifest that consolidation merges shards with).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from checkpoint.consolidate import merge_shards, parameter_files
from model.config import ModelConfig
from model.family import Batch, FamilySpec, add_sums, build_model, family_of
from model.layers import LocalLayers
from model.compile import compile_blocks, compile_report, eager
from model.recompute import apply_activation_checkpointing
from parallel.grad_clip import install_global_norm_clipping, uses_plain_optimizer
from parallel.groups import MegatronMPU, init_model_parallel
from parallel.layout import Layout
from parallel.pipeline import build_pipeline, canonical_name
from parallel.random import TRACKER, RNGStatesTracker, seed_model_parallel_rng
from parallel.sharding import load_full_state_dict, manifest


@dataclass
class ParallelModel:
    engine: Any
    layout: Layout
    module: nn.Module
    name_map: Callable[[str], str]
    num_parameters: int
    family: FamilySpec
    rng_tracker: RNGStatesTracker = TRACKER  # the TP dropout streams (parallel/random.py), saved with checkpoints
    compiled: bool = False  # train.compile: blocks compiled (model/compile.py); evaluation runs eagerly
    step_seconds: list[float] = field(default_factory=list)  # this process's first two step times (compile_note)

    def compile_note(self) -> str | None:
        """Once, after this process's second step of a compiled model: what compilation cost (one line)."""
        if not self.compiled or len(self.step_seconds) != 2:
            return None
        self.step_seconds.append(0.0)  # reported
        return compile_report(*self.step_seconds[:2])

    @property
    def pipelined(self) -> bool:
        return self.layout.pipeline > 1

    @property
    def tp_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    @property
    def dp_group(self) -> Any:
        return ps.get_data_parallel_group()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The canonical full state dict on global rank 0 ({} elsewhere); a collective over all ranks."""
        if self.layout.tensor == 1 and self.layout.pipeline == 1:
            return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if dist.get_rank() == 0 else {}
        params = manifest(self.module, self.name_map)
        mine = ({name: p.detach().cpu() for name, p in self.module.named_parameters()}, params, self.tp_rank) \
            if ps.get_data_parallel_rank() == 0 else None
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return merge_shards([g for g in gathered if g is not None]) if dist.get_rank() == 0 else {}

    def manifest(self) -> dict[str, Any]:
        """What consolidation needs to find and merge this rank's parameters in DeepSpeed's files."""
        params = manifest(self.module, self.name_map)
        files = parameter_files(self.module, params, self.tp_rank)
        return {"layout": vars(self.layout), "tp_rank": self.tp_rank,
                "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
                "params": {name: {**params[name], **files[name]} for name in params}}

    def state_dict(self) -> dict[str, Any]:
        """This rank's checkpoint state: the TP RNG streams and the parameter manifest."""
        return {"tp_rng": self.rng_tracker.state_dict(), "manifest": self.manifest()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the TP RNG streams (the weights come back through DeepSpeed; the manifest is for reading)."""
        self.rng_tracker.load_state_dict(state["tp_rng"])


def _full_model(cfg: ModelConfig, seq_length: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, seq_length=seq_length)


def build_parallel_model(cfg: ModelConfig, layout: Layout, *, seq_length: int, seed: int, ds_config: dict[str, Any],
                         make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                         make_scheduler: Callable[[torch.optim.Optimizer], Any],
                         partition_method: str = "layers", activation_checkpointing: str = "none",
                         initial_state: Mapping[str, torch.Tensor] | None = None,
                         initial_source: str = "initial weights", compile: bool = False) -> ParallelModel:
    import deepspeed

    init_model_parallel(layout.tensor, layout.pipeline)
    tp_rank = ps.get_tensor_model_parallel_rank()
    seed_model_parallel_rng(seed, tp_rank)
    full = _full_model(cfg, seq_length, seed)
    num_parameters = full.num_parameters()
    if initial_state is not None:
        load_full_state_dict(full, initial_state, tp_size=1, tp_rank=0, source=initial_source)
    name_map: Callable[[str], str] = lambda name: name  # noqa: E731
    if layout.tensor == 1 and layout.pipeline == 1:
        module: nn.Module = full
    else:
        if layout.tensor > 1:
            from parallel.tensor_parallel import TensorParallelLayers

            layers: LocalLayers = TensorParallelLayers(cfg.init_std)
        else:
            layers = LocalLayers(cfg.init_std)
        if layout.pipeline > 1:
            module = build_pipeline(cfg, seq_length, layers, pipeline=layout.pipeline, tensor=layout.tensor,
                                    data=layout.data, partition_method=partition_method)
            name_map = partial(canonical_name, cfg=cfg)
        else:
            module = build_model(cfg, seq_length=seq_length, layers=layers)
        load_full_state_dict(module, full.state_dict(), tp_size=layout.tensor, tp_rank=tp_rank, name_map=name_map,
                             source=initial_source)
        del full
    if compile:  # before recompute, which then recomputes with the compiled forward
        compile_blocks(module, family_of(cfg))
    # Recompute (parallel.activation_checkpointing) the same way in every layout; TP dropout rewinds its tracker.
    apply_activation_checkpointing(module, activation_checkpointing, family_of(cfg),
                                   rng_tracker=TRACKER if layout.tensor > 1 else None)
    optimizer = make_optimizer(module)
    mpu = MegatronMPU() if layout.tensor > 1 and layout.pipeline == 1 else None  # a PipelineModule brings its grid
    plain = uses_plain_optimizer(ds_config)
    if plain:  # DeepSpeed's own clipping on this path miscounts under pipelines (parallel/grad_clip.py)
        norm_mpu = module.mpu() if layout.pipeline > 1 else mpu  # type: ignore[operator]
        install_global_norm_clipping(optimizer, float(ds_config.get("gradient_clipping", 0.0)), norm_mpu)
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer),
                                           config=ds_config, mpu=mpu)
    if plain and engine.optimizer is not optimizer:
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__}; gradient "
                           "clipping expects it to step the client optimizer (ZeRO-0, fp32)")
    return ParallelModel(engine=engine, layout=layout, module=engine.module, name_map=name_map,
                         num_parameters=num_parameters, family=family_of(cfg), compiled=compile)


def _comm_device(group: Any) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _dp_mean(value: float, pm: ParallelModel) -> float:
    if pm.layout.data == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device(pm.dp_group))
    dist.all_reduce(tensor, group=pm.dp_group)
    return float(tensor.item()) / pm.layout.data


def train_step(pm: ParallelModel, batches: Iterator[Batch], grad_accumulation: int,
               device: torch.device) -> tuple[float, float | None]:
    """One optimizer step over `grad_accumulation` micro-batches: (mean loss over DP ranks, global grad norm).

    The norm is the single-process one in every layout: DeepSpeed's ZeRO/bf16/fp16 optimizers compute it,
    and on the plain ZeRO-0 fp32 path parallel/grad_clip.py does. None only if DeepSpeed computed none."""
    engine = pm.engine
    start = time.perf_counter()
    if pm.pipelined:
        pairs = (b.to(device).as_tuple() for b in batches)
        step_loss = float(engine.train_batch(data_iter=pairs))  # averaged over micro-batches and DP by DeepSpeed
    else:
        step_loss = 0.0
        for _ in range(grad_accumulation):
            batch = next(batches).to(device)
            loss = engine(batch.inputs, labels=batch.labels)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / grad_accumulation
        step_loss = _dp_mean(step_loss, pm)
    norm = engine.get_global_grad_norm()
    if pm.compiled and len(pm.step_seconds) < 2:
        pm.step_seconds.append(time.perf_counter() - start)
    return step_loss, float(norm) if norm is not None else None


@torch.no_grad()
def eval_loss(pm: ParallelModel, examples: list[Any], micro_batch_size: int,
              device: torch.device) -> dict[str, float]:
    """The family's validation metrics over every data-parallel rank's examples: {"loss", e.g. "ppl", ..., and
    the number of targets under the family's name for them, e.g. "tokens"}, each batch weighted by its number of
    targets (FamilySpec.eval_sums / finish_metrics, FamilySpec.target_unit)."""
    with eager() if pm.compiled else contextlib.nullcontext():
        return _eval_loss(pm, examples, micro_batch_size, device)


def _eval_loss(pm: ParallelModel, examples: list[Any], micro_batch_size: int,
               device: torch.device) -> dict[str, float]:
    engine, spec = pm.engine, pm.family
    engine.eval()
    sums: dict[str, float] = {}
    if pm.pipelined:
        # A pipeline keeps micro-batch shapes fixed: a partial last micro-batch is left out. One micro-batch
        # per call, so each loss is weighted by its own number of predictions (MLM counts vary). The last
        # stage holds only the loss, so metrics that need outputs are left out (finish_metrics skips them).
        for start in range(0, len(examples) - micro_batch_size + 1, micro_batch_size):
            batch = spec.collate(examples[start:start + micro_batch_size]).to(device)
            targets = spec.num_targets(batch)
            loss = float(engine.eval_batch(iter([batch.as_tuple()]), num_micro_batches=1))
            add_sums(sums, {"loss_sum": loss * targets, "targets": float(targets)})
    else:
        for start in range(0, len(examples), micro_batch_size):
            add_sums(sums, spec.eval_sums(engine, spec.collate(examples[start:start + micro_batch_size]).to(device)))
    # The last pipeline stage holds the loss (DeepSpeed broadcasts it to the stage's DP peers and the
    # other stages): the sums over data-parallel ranks are the same on every rank.
    sums = {key: _dp_mean(value, pm) * pm.layout.data for key, value in sorted(sums.items())}
    engine.train()
    return {**spec.finish_metrics(sums), spec.target_unit: sums.get("targets", 0.0)}
