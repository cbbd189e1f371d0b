"""Process groups: megatron-core's parallel_state, and the `mpu` view of it that DeepSpeed expects.

megatron-core orders ranks tensor-innermost and pipeline-outermost, the same mapping as DeepSpeed's
PipeModelDataParallelTopology (axes pipe, data, model), so both libraries agree on every rank's
(tp, pp, dp) coordinates.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


def init_model_parallel(tensor: int, pipeline: int) -> None:
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline)


def destroy_model_parallel() -> None:
    ps.destroy_model_parallel()


class MegatronMPU:
    """DeepSpeed's `mpu` interface (model parallel = tensor parallel here) over megatron-core's groups."""

    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_data_parallel_rank() -> int:
        return ps.get_data_parallel_rank()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return ps.get_data_parallel_world_size()

    @staticmethod
    def get_data_parallel_group():  # type: ignore[no-untyped-def]
        return ps.get_data_parallel_group()
