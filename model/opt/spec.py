"""The OPT family's spec: a decoder-only causal LM trained on packed token blocks."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.errors import ConfigError
from model.family import BackcopyTask, Batch, StagesModule
from model.layers import IGNORE_INDEX, LocalLayers
from model.opt.hf import OPTAdapter
from model.opt.objective import CAUSAL_LM
from model.text_spec import TextFamilySpec

# Kind of hooked activation -> module name relative to decoder.layers.{j} (None: the layer's own output).
LAYER_MODULES: dict[str, str | None] = {
    "attn_out_proj": "self_attn.out_proj",
    "attn_layer_norm": "self_attn_layer_norm",
    "ffn_out": "fc2",
    "ffn_layer_norm": "final_layer_norm",
    "layer_out": None,
}
LAYER_PREFIX = "decoder.layers."
FINAL_LAYER_NORM = "decoder.final_layer_norm"


class OPTSpec(TextFamilySpec):
    block_types = ("OPTDecoderLayer",)
    name = "opt"
    objective = CAUSAL_LM  # token blocks [T]; the labels are the block itself, shifted in the model
    pipeline_stages = StagesModule("model.opt.pipeline")
    ptq_weight_range = "mse"  # the OPT recipe: the clipping that minimises the squared error on a grid
    clipped_softmax_alpha = 12.0  # the QC paper's OPT recipe: gamma = -12 / seq_length (BERT's: the default gamma)
    hf = OPTAdapter()

    def build(self, cfg: Any, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        from model.opt.model import OPTForCausalLM

        return OPTForCausalLM(cfg, seq_length=seq_length, layers=layers)

    def collate(self, examples: list[Any]) -> Batch:
        import torch

        ids = torch.stack(examples)
        return Batch(ids, ids)

    def num_targets(self, batch: Batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # every next token of the block

    def check_layout(self, cfg: Any, tensor: int, pipeline: int) -> None:
        if pipeline > 1 and not cfg.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings", cfg.tie_word_embeddings, "must be true with "
                              "parallel.pipeline > 1 (the pipeline builds the tied output layer)")
        super().check_layout(cfg, tensor, pipeline)

    def backcopy_task(self, cfg: Any) -> BackcopyTask | None:
        """On the bigram_backcopy source alone: its triggers and the char tokenizer's first character id (what
        the task-aware sink metrics split queries by)."""
        data = cfg.data
        if data.source != "bigram_backcopy" or data.sources:
            return None
        from data_pipeline.bigram import trigger_token_ids
        from data_pipeline.char_tokenizer import FIRST_CHAR_ID

        return BackcopyTask(trigger_token_ids(data), FIRST_CHAR_ID)

    # The Quantizable Transformers / OutEffHop protocol for OPT: per layer the outputs of out_proj, both
    # LayerNorms, fc2 and the layer itself; then the decoder's final LayerNorm.
    def outlier_modules(self, model: nn.Module) -> dict[str, str]:
        names: dict[str, str] = {}
        for j in range(len(model.decoder.layers)):
            for kind, suffix in LAYER_MODULES.items():
                names[f"{LAYER_PREFIX}{j}" + (f".{suffix}" if suffix else "")] = kind
        names[FINAL_LAYER_NORM] = "final_layer_norm"
        return names

    def embedding_params(self, cfg: Any, tp: int = 1) -> tuple[int, int]:
        """The word embedding is vocab-parallel, positions (OPT's offset of 2) replicated; the last stage has
        the final LayerNorm and the head (tied: the embedding's copy; untied: its own matrix)."""
        h, words = cfg.hidden_size, cfg.padded_vocab_size * cfg.hidden_size // tp
        return words + (cfg.max_position_embeddings + 2) * h, 2 * h + words

    def residual_streams(self, model: nn.Module) -> list[str]:
        return [f"{LAYER_PREFIX}{j}" for j in range(len(model.decoder.layers))]
