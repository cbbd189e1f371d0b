"""What the two text families (OPT, BERT) share: the text data pipeline, the transformer config and layout
checks, and the FLOPs accounting. Each family's spec (model/opt/spec.py, model/bert/spec.py) subclasses it
and says what differs: its objective's examples, its loss targets, its stages, modules and head.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from common.errors import ConfigError
from data_pipeline.examples import TextObjective
from model.family import TRANSFORMER_SPLIT, FamilyData, FamilySpec, Metric


class TextFamilySpec(FamilySpec):
    objective: ClassVar[TextObjective]  # what an example is (model/opt/objective.py, model/bert/objective.py)
    tensor_parallel = TRANSFORMER_SPLIT
    metrics = (Metric("ppl", "ppl", higher_is_better=False),)

    @property
    def model_config_class(self) -> type:  # type: ignore[override]
        from model.config import ModelConfig

        return ModelConfig

    @property
    def data_config_class(self) -> type:  # type: ignore[override]
        from data_pipeline.config import DataConfig

        return DataConfig

    # ------------------------------------------------------------------ config and layout
    def validate_run(self, cfg: Any) -> None:
        if cfg.data.seq_length > cfg.model.max_position_embeddings:
            raise ConfigError("data.seq_length", cfg.data.seq_length,
                              f"exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")

    def check_layout(self, cfg: Any, tensor: int, pipeline: int) -> None:
        if self.tensor_parallel is not None:  # heads and widths first, then the vocab-parallel embedding
            self.tensor_parallel.check(cfg, tensor)
        if cfg.padded_vocab_size % tensor:
            raise ConfigError("parallel.tensor", tensor, f"must divide the padded vocabulary {cfg.padded_vocab_size}; "
                              f"set model.pad_vocab_to_multiple_of to a multiple of {tensor}")
        super().check_layout(cfg, tensor, pipeline)

    def cache_dir(self, cfg: Any) -> str | None:
        return cfg.data.cache_dir  # tokenizers and corpora

    def cost_model(self) -> TextFamilySpec:
        return self  # the transformer terms below (launcher/planner.py)

    def reference_values(self, cfg: Any) -> dict[str, float]:
        return {"uniform_ppl": float(cfg.model.vocab_size)}  # the perplexity of guessing uniformly

    # ------------------------------------------------------------------ data
    def tokenizer(self, cfg: Any) -> Any:
        from data_pipeline import load_or_train_tokenizer

        tokenizer = load_or_train_tokenizer(cfg.data)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                              f"is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})")
        return tokenizer

    def data(self, cfg: Any, dp_rank: int = 0, dp_world: int = 1) -> FamilyData:
        from data_pipeline.examples import eval_examples, eval_examples_by_source, train_examples
        from data_pipeline.prefetch import Prefetcher
        from data_pipeline.prepared import is_indexed

        tokenizer = self.tokenizer(cfg)
        kwargs: dict[str, Any] = dict(dp_rank=dp_rank, dp_world=dp_world, vocab_size=cfg.model.vocab_size,
                                      max_blocks=cfg.eval.max_blocks)
        # A blend's validation is its sources' examples together (what eval_examples returns for one): built once.
        by_source = eval_examples_by_source(cfg.data, self.objective, tokenizer, **kwargs)
        validation = ([example for examples in by_source.values() for example in examples] if by_source
                      else eval_examples(cfg.data, self.objective, tokenizer, **kwargs))
        train = train_examples(cfg.data, self.objective, tokenizer, dp_rank=dp_rank, dp_world=dp_world,
                               vocab_size=cfg.model.vocab_size)
        if cfg.data.prefetch and not is_indexed(cfg.data):  # streamed: tokenize the next examples during the step
            train = Prefetcher(train, cfg.data.prefetch)
        return FamilyData(train=train, validation=validation, tokenizer=tokenizer, validation_by_source=by_source)

    def validation_examples(self, cfg: Any) -> list[Any]:
        from data_pipeline.examples import eval_examples

        return eval_examples(cfg.data, self.objective, self.tokenizer(cfg), max_blocks=cfg.eval.max_blocks,
                             vocab_size=cfg.model.vocab_size)

    def calibration_examples(self, cfg: Any, count: int) -> list[Any]:
        from data_pipeline.examples import calibration_examples

        return calibration_examples(cfg.data, self.objective, self.tokenizer(cfg), count,
                                    vocab_size=cfg.model.vocab_size)

    # ------------------------------------------------------------------ cost
    def head_matmul_params(self, cfg: Any, data_cfg: Any) -> float:
        """Weights of the output head that take part in a matrix multiply per token (the tied LM head)."""
        return cfg.padded_vocab_size * cfg.hidden_size

    def flops_per_token(self, cfg: Any, seq_length: int, data_cfg: Any = None) -> float:
        """PaLM / Megatron: 6 x N_matmul + 12 x layers x hidden x seq (forward + backward, no recomputation).
        N_matmul counts every weight in a matrix multiply per token (layers and head); the attention term
        covers QK^T and PV."""
        d, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
        per_layer = 4 * d * d + 2 * d * f  # q, k, v, out + fc1, fc2
        return 6.0 * (layers * per_layer + self.head_matmul_params(cfg, data_cfg)) + 12.0 * layers * d * seq_length

    def flops_per_example(self, cfg: Any) -> float:
        return self.flops_per_token(cfg.model, cfg.data.seq_length, cfg.data) * cfg.data.seq_length

    # ------------------------------------------------------------------ memory planning (launcher/planner.py)
    ffn_activation_terms: ClassVar[int] = 1  # FFN activations [tokens, ffn/t] one layer keeps for backward
    embedding_norm: ClassVar[bool] = False  # the first stage keeps an embedding LayerNorm's input

    def embedding_params(self, cfg: Any, tp: int = 1) -> tuple[int, int]:
        """(first-stage, last-stage) parameters outside the layers on one TP rank."""
        raise NotImplementedError

    def head_activations(self, cfg: Any, tokens: int, act_bytes: int, data_cfg: Any = None) -> tuple[float, int]:
        """(bytes the output end keeps besides the log-probabilities, number of predicted positions); `data_cfg`:
        the run's data section (None: the family's defaults)."""
        return 3 * tokens * cfg.hidden_size * act_bytes, tokens  # final LN in/out and the head's input

    def synthetic_batch(self, cfg: Any, generator: torch.Generator) -> Any:
        """A random batch of the run's shape (launcher/memory_probe.py measures activations with it)."""
        from model.family import Batch

        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_length),
                            generator=generator)
        return Batch(ids, ids.clone())

