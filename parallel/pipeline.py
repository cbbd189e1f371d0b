"""Pipeline parallelism: a model family's stages (its spec's `pipeline_stages` piece) as a DeepSpeed PipelineModule.

The family builds the LayerSpecs from the same blocks as its single-process model (model/opt/pipeline.py,
model/bert/pipeline.py); this module only adds what every family shares: the topology and the partitioning
(activation recompute is model/recompute.py's in every layout, applied by parallel/engine.py). Parameter names inside the PipelineModule ("3.fc1.weight") map to the
canonical single-process names with the family's `canonical_name`, which sharding and consolidation use.
"""

from __future__ import annotations

from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from common.errors import ConfigError
from model.family import ModelSection, PipelineStages, family_of
from model.layers import LocalLayers


def stages(cfg: ModelSection) -> PipelineStages:
    """The family's pipeline piece (FamilySpec.pipeline_stages); check_layout has refused a family without one."""
    piece = family_of(cfg).pipeline_stages
    if piece is None:
        raise ConfigError("parallel.pipeline", ">1", f"is not supported by model.family={cfg.family}")
    return piece


def canonical_name(name: str, cfg: ModelSection) -> str:
    """PipelineModule parameter name -> the single-process model's name."""
    return stages(cfg).canonical_name(name, cfg)


def build_pipeline(cfg: ModelSection, seq_length: int, layers: LocalLayers, *, pipeline: int, tensor: int,
                   data: int, partition_method: str) -> PipelineModule:
    parts = stages(cfg).parts(cfg, seq_length, layers)
    method = f"type:{parts.layer_class}" if partition_method == "layers" else partition_method
    topology = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    return PipelineModule(layers=parts.specs, loss_fn=parts.loss_fn, topology=topology, partition_method=method)
