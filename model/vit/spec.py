"""The ViT family's spec: image classification with timm's VisionTransformer and this project's attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from model.family import (TRANSFORMER_SPLIT, Batch, FamilyData, FamilySpec, Metric, NamedObjective, StagesModule,
                          Throughput)
from model.layers import IGNORE_INDEX, LocalLayers
from model.vit.config import ViTConfig
from model.vit.data_config import ImageDataConfig

# The Quantizable Transformers protocol for ViT, per block j: kind -> name relative to blocks.{j} (None: the
# block itself, i.e. its output, the residual stream after it). Kinds are OPT's, so summaries and tables
# (ffn_out, layer_out) read the same.
LAYER_MODULES: dict[str, str | None] = {
    "attn_layer_norm": "norm1",
    "attn_out_proj": "attn.out_proj",
    "ffn_layer_norm": "norm2",
    "ffn_out": "mlp.fc2",
    "layer_out": None,
}
LAYER_PREFIX = "blocks."
FINAL_NORM = "norm"


class ViTSpec(FamilySpec):
    block_types = ("Block",)
    name = "vit"
    objective = NamedObjective("classification")
    tensor_parallel = TRANSFORMER_SPLIT
    throughput = Throughput("images", lambda cfg: 1)  # timm's samples/s; FLOPs per image for MFU
    target_unit = "images"  # one label (or soft target) per image
    pipeline_stages = StagesModule("model.vit.pipeline")
    model_config_class = ViTConfig
    data_config_class = ImageDataConfig
    metrics = (Metric("top1", "top-1", higher_is_better=True),)
    ptq_weight_range = "mse"

    # ------------------------------------------------------------------ model and config
    def build(self, cfg: Any, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        from model.vit.model import VisionTransformer

        return VisionTransformer(cfg, seq_length=seq_length, layers=layers)

    def validate_model(self, cfg: Any) -> None:
        cfg.validate()

    def validate_run(self, cfg: Any) -> None:
        if cfg.model.in_chans != 3:
            raise ConfigError("model.in_chans", cfg.model.in_chans, "must be 3: images are decoded as RGB")
        if len(cfg.data.mean) != cfg.model.in_chans:
            raise ConfigError("data.mean", cfg.data.mean, f"needs one value per channel ({cfg.model.in_chans})")
        if cfg.data.mixing and cfg.train.micro_batch_size % 2:
            raise ConfigError("train.micro_batch_size", cfg.train.micro_batch_size, "must be even for mixup / "
                              "cutmix (timm pairs each image with the batch's reverse)")

    def example_length(self, cfg: Any) -> int:
        return cfg.model.seq_length  # patches + the class token

    # ------------------------------------------------------------------ data
    def _source(self, cfg: Any) -> Any:
        from model.vit.data import open_image_source

        source = open_image_source(cfg.data)
        if source.num_classes is not None and source.num_classes != cfg.model.num_classes:
            raise ConfigError("model.num_classes", cfg.model.num_classes,
                              f"differs from the {source.num_classes} classes of {source.name}")
        return source

    def cache_dir(self, cfg: Any) -> str | None:
        return cfg.data.cache_dir  # datasets' cache of image folders and hub datasets

    def data(self, cfg: Any, dp_rank: int = 0, dp_world: int = 1) -> FamilyData:
        from model.vit.data import ImageStream, validation_examples

        source = self._source(cfg)
        m = cfg.model
        return FamilyData(train=ImageStream(cfg.data, source, m.image_size, m.num_classes, dp_rank, dp_world),
                          validation=validation_examples(cfg.data, source, m.image_size, m.num_classes,
                                                         dp_rank, dp_world, _max_examples(cfg)))

    def validation_examples(self, cfg: Any) -> list[Any]:
        from model.vit.data import validation_examples

        return validation_examples(cfg.data, self._source(cfg), cfg.model.image_size, cfg.model.num_classes,
                                   limit=_max_examples(cfg))

    def calibration_examples(self, cfg: Any, count: int) -> list[Any]:
        from model.vit.data import calibration_examples

        return calibration_examples(cfg.data, self._source(cfg), cfg.model.image_size, cfg.model.num_classes, count)

    def collate(self, examples: list[Any]) -> Batch:
        from model.vit.data import collate

        return collate(examples)

    def train_batch_transform(self, cfg: Any) -> Any:
        if not cfg.data.mixing:
            return None
        from model.vit.data import BatchMixing

        return BatchMixing(cfg.data, cfg.model.num_classes, cfg.model.label_smoothing)

    # ------------------------------------------------------------------ loss and metrics
    def num_targets(self, batch: Batch) -> int:
        if batch.labels.is_floating_point():  # soft targets: one per image
            return len(batch)
        return int((batch.labels != IGNORE_INDEX).sum())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Loss (the training objective, label smoothing included) and correct top-1 predictions, from one
        forward pass."""
        from model.vit.model import classification_loss

        with torch.no_grad():
            logits = model(batch.inputs)
        labels = batch.labels
        targets = self.num_targets(batch)
        loss = classification_loss(logits, labels, _label_smoothing(model))
        hard = labels.argmax(dim=-1) if labels.is_floating_point() else labels
        correct = ((logits.argmax(dim=-1) == hard) & (hard != IGNORE_INDEX)).sum()
        return {"loss_sum": float(loss) * targets, "targets": float(targets), "correct": float(correct)}

    def finish_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        targets = max(sums["targets"], 1.0)
        metrics = {"loss": sums["loss_sum"] / targets}
        if "correct" in sums:  # a pipeline's last stage reports the loss alone
            metrics["top1"] = 100.0 * sums["correct"] / targets
        return metrics

    def metrics_from_loss(self, loss: float) -> dict[str, float]:
        return {}

    def reference_values(self, cfg: Any) -> dict[str, float]:
        return {"chance_top1": 100.0 / cfg.model.num_classes}  # the top-1 of guessing

    # ------------------------------------------------------------------ outliers and quantization
    def outlier_modules(self, model: nn.Module) -> dict[str, str]:
        names = {f"{LAYER_PREFIX}{j}" + (f".{suffix}" if suffix else ""): kind
                 for j in range(len(model.blocks)) for kind, suffix in LAYER_MODULES.items()}
        names[FINAL_NORM] = "final_layer_norm"
        return names

    def ptq_fp32_modules(self, model: nn.Module) -> set[str]:
        """The classifier stays fp32, as OPT's and BERT's output heads do (plus the default: attention gates)."""
        return super().ptq_fp32_modules(model) | {"head"}

    def residual_streams(self, model: nn.Module) -> list[str]:
        return [f"{LAYER_PREFIX}{j}" for j in range(len(model.blocks))]

    # ------------------------------------------------------------------ cost
    def flops_per_example(self, cfg: Any) -> float:
        """PaLM's accounting: 6 x (weights in a matrix multiply) per position they run on, plus 12 x layers x
        hidden x T per position for QK^T and PV. The blocks run on all T = patches + 1 positions, the patch
        embedding on the patches, the classifier on the class token alone."""
        m = cfg.model
        d, f, t = m.hidden_size, m.ffn_hidden_size, m.seq_length
        per_layer = 4 * d * d + 2 * d * f
        patch = m.in_chans * m.patch_size ** 2 * d
        matmul = m.num_layers * per_layer * t + patch * m.num_patches + d * m.num_classes
        return 6.0 * matmul + 12.0 * m.num_layers * d * t * t

    def synthetic_batch(self, cfg: Any, generator: torch.Generator) -> Batch:
        m = cfg.model
        pixels = torch.randn(cfg.train.micro_batch_size, m.in_chans, m.image_size, m.image_size, generator=generator)
        return Batch(pixels, torch.randint(0, m.num_classes, (cfg.train.micro_batch_size,), generator=generator))

    # ------------------------------------------------------------------ export
    @property
    def hf(self) -> Any:  # type: ignore[override]
        from model.vit.hf import ViTAdapter

        return ViTAdapter()


def _max_examples(cfg: Any) -> int | None:
    """eval.max_blocks: validation images per evaluation (None = the whole split)."""
    return getattr(getattr(cfg, "eval", None), "max_blocks", None)


def _label_smoothing(model: nn.Module) -> float:
    """The objective's label smoothing of a VisionTransformer, also behind wrappers (DeepSpeed's `.module`)."""
    while hasattr(model, "module"):  # DeepSpeed's engine (whose own `config` is its settings)
        model = model.module
    return float(model.config.label_smoothing)
