"""The `data:` section of an image-classification run (ViT): where the images come from and how they are
augmented (timm's create_transform / RandAugment / Mixup-CutMix arguments, by timm's names)."""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from pathlib import Path

from common.errors import ConfigError

IMAGE_SOURCES = ("digits", "imagefolder", "hub")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # timm.data.IMAGENET_DEFAULT_MEAN / STD
IMAGENET_STD = [0.229, 0.224, 0.225]


def check_auto_augment(spec: str) -> None:
    """The spec parsed exactly as timm's create_transform parses it (rand-*, augmix-*, original*, v0*): timm
    asserts on an unknown part with an empty AssertionError, at the first training batch."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    builders = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform,
                "original": auto_augment_transform, "v0": auto_augment_transform}
    builder = next((b for prefix, b in builders.items() if spec.startswith(prefix)), None)
    problem = "must be a timm auto-augment spec such as rand-m9-mstd0.5-inc1, augmix-m5-w3, original or v0, or null"
    if builder is None:
        raise ConfigError("data.auto_augment", spec, problem)
    try:
        builder(spec, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception:  # AssertionError / KeyError / ValueError from timm's parser
        raise ConfigError("data.auto_augment", spec, problem) from None


@dataclass
class ImageDataConfig:
    # digits: scikit-learn's bundled 1,797 8x8 handwritten digits (offline; 1,500 train / 297 validation).
    # imagefolder: ImageNet-style class folders under `path` (path/train/<class>/*, path/val/<class>/*),
    #   read through Hugging Face datasets' imagefolder builder, streamed.
    # hub: any image-classification dataset on the Hugging Face hub by name (or a local dataset folder), streamed.
    source: str = "digits"
    path: str | None = None  # imagefolder root
    hub_path: str | None = None  # hub dataset name, e.g. "ILSVRC/imagenet-1k"
    hub_config: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"  # imagefolder maps a val/ folder to this split too
    image_field: str = "image"
    label_field: str = "label"
    cache_dir: str = ".cache/data"  # datasets' cache
    seed: int = 1234  # epoch order and per-example augmentation
    shuffle: bool = True
    shuffle_buffer: int = 10000  # streamed sources' shuffle buffer
    # Augmentation (timm.data.create_transform's arguments; eval: resize to image_size / crop_pct, center crop).
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; None = off
    re_prob: float = 0.0  # random erasing
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # Batch mixing (timm.data.Mixup): alphas of mixup and cutmix; 0 and 0 = off.
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5

    def validate(self) -> None:
        if self.source not in IMAGE_SOURCES:
            raise ConfigError("data.source", self.source, f"must be one of {', '.join(IMAGE_SOURCES)} for images")
        if self.source == "imagefolder":
            if not self.path:
                raise ConfigError("data.path", self.path, "must name the image folder for source=imagefolder")
            if not Path(self.path).is_dir():
                raise ConfigError("data.path", self.path, "is not a folder (want <path>/train/<class>/<image>)")
            if not (Path(self.path) / "train").is_dir():
                raise ConfigError("data.path", self.path, "has no train/ folder of class folders")
        if self.source == "hub" and not self.hub_path:
            raise ConfigError("data.hub_path", self.hub_path, "must name a dataset for source=hub")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer", self.shuffle_buffer, "must be positive")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError("data.scale", self.scale, "must be [low, high] with 0 < low <= high <= 1")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError("data.ratio", self.ratio, "must be [low, high] with 0 < low <= high")
        for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"data.{key}", getattr(self, key), "must lie in [0, 1]")
        for key in ("mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}", getattr(self, key), "must be >= 0 (0 = off)")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError("data.interpolation", self.interpolation, f"must be one of {', '.join(INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError("data.crop_pct", self.crop_pct, "must lie in (0, 1]")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError("data.std", self.std, "must be positive, one value per channel as data.mean")
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment)
        for key in ("mean", "std"):
            if not all(math.isfinite(v) for v in getattr(self, key)):
                raise ConfigError(f"data.{key}", getattr(self, key), "must be finite numbers")
        if len(self.mean) not in (1, 3):
            raise ConfigError("data.mean", self.mean, "must have one value per channel (3 for RGB)")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0
