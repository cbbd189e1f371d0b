"""BERT's `data:` section: the text data section (data_pipeline/config.py) plus the masked-LM settings its
objective owns (model/bert/objective.py)."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from data_pipeline.config import DataConfig
from data_pipeline.mlm import MaskingRule


@dataclass
class BertDataConfig(DataConfig):
    # Each non-special token is selected with mlm_probability; a selected token becomes [MASK]
    # (mlm_mask_fraction), a random token (mlm_random_fraction) or stays. Training masks are seeded by data.seed
    # and the block's global index, evaluation masks by mlm_eval_seed: the same masks on every run, layout and
    # resume.
    mlm_probability: float = 0.15
    mlm_mask_fraction: float = 0.8
    mlm_random_fraction: float = 0.1
    mlm_eval_seed: int = 2024

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.mlm_eval_seed, int) or isinstance(self.mlm_eval_seed, bool) or self.mlm_eval_seed < 0:
            raise ConfigError("data.mlm_eval_seed", self.mlm_eval_seed, "must be a non-negative integer")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError("data.mlm_probability", self.mlm_probability, "must lie strictly between 0 and 1")
        for key in ("mlm_mask_fraction", "mlm_random_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.{key}", value, "must lie in [0, 1]")
        if self.mlm_mask_fraction + self.mlm_random_fraction > 1.0:
            raise ConfigError("data.mlm_random_fraction", self.mlm_random_fraction,
                              f"plus data.mlm_mask_fraction={self.mlm_mask_fraction} must not exceed 1")

    def masking_rule(self) -> MaskingRule:
        return MaskingRule(self.mlm_probability, self.mlm_mask_fraction, self.mlm_random_fraction)
