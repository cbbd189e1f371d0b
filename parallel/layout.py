"""The parallel layout (tensor x pipeline x data) of a run, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.family import family_of
from common.errors import ConfigError

# How DeepSpeed splits the layer list over pipeline stages: "layers" balances the model's repeated blocks
# (OPT decoder layers, BERT encoder layers; DeepSpeed's "type:<class>"), the others are DeepSpeed's own.
PARTITION_METHODS = ("layers", "parameters", "uniform")


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def describe(self) -> str:
        return f"TP{self.tensor} x PP{self.pipeline} x DP{self.data}"


def validate_layout(model: ModelConfig, *, tensor: int, pipeline: int, zero_stage: int, world_size: int,
                    micro_batch_size: int, global_batch_size: int) -> Layout:
    """Check that the model and batch split evenly over the layout; one ConfigError line otherwise."""
    for key, value in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(key, value, "must be a positive integer")
    if world_size % (tensor * pipeline):
        key, value = ("parallel.pipeline", pipeline) if pipeline > 1 else ("parallel.tensor", tensor)
        raise ConfigError(key, value, f"parallel.tensor x parallel.pipeline = {tensor * pipeline} must divide the "
                          f"world size {world_size}")
    family_of(model).check_layout(model, tensor, pipeline)  # what the family's shapes allow
    if pipeline > 1 and zero_stage > 1:
        raise ConfigError("parallel.zero_stage", zero_stage, "ZeRO-2/3 cannot be combined with pipeline parallelism "
                          "(DeepSpeed supports ZeRO-1 with pipelines)")
    data = world_size // (tensor * pipeline)
    step_batch = micro_batch_size * data
    if global_batch_size % step_batch:
        raise ConfigError("train.global_batch_size", global_batch_size,
                          f"must be a multiple of micro_batch_size x data-parallel ranks = {step_batch}")
    return Layout(tensor=tensor, pipeline=pipeline, data=data)
