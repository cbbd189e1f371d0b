"""Image-classification data for ViT: sources, the resumable training stream, fixed validation examples.

An example is (pixels [C, H, W] float32, label int). Sources (data.source):
  - digits: scikit-learn's bundled 8x8 handwritten digits (offline, the CPU demo and the tests);
  - imagefolder: ImageNet-style class folders, through Hugging Face datasets' imagefolder builder, streamed;
  - hub: any image-classification dataset by name, streamed.
Data-parallel ranks: example j of an epoch's order goes to rank j % dp_world (digits: the same global order on
every layout, so DP2 with micro-batch m sees what one process with 2m sees); streamed sources are split with
datasets' split_dataset_by_node (whole shards per rank when they divide evenly).
Augmentation is timm's (create_transform: RandomResizedCrop, flip, RandAugment, random erasing; Mixup/CutMix
on the batch). Each example's augmentation is seeded by (data.seed, epoch, its index), so a resumed stream
yields the very tensors the uninterrupted one would have, and the global RNGs are left as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError

from common.cli import detach_library_console_handlers
from common.errors import ConfigError, ProjectError
from model.family import Batch
from model.vit.data_config import ImageDataConfig
from model.vit.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
from timm.data import Mixup, create_transform  # noqa: E402

datasets.disable_progress_bars()
# datasets' own stderr handler: its log lines would precede our one `error:` line (common/cli.py).
detach_library_console_handlers()

Example = tuple[torch.Tensor, int]
DIGITS_VALIDATION = 297  # held-out digits (the last ones of a fixed permutation): 1,500 train / 297 validation
DIGITS_SPLIT_SEED = 0  # fixed, not data.seed: the validation set is the same in every run
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- decoding

def decode(raw: Any, where: str) -> Image.Image:
    """A source's raw image (uint8 array, PIL image, datasets' {"bytes", "path"}) -> an RGB PIL image."""
    try:
        if isinstance(raw, np.ndarray):
            image = Image.fromarray(raw)
        elif isinstance(raw, Image.Image):
            image = raw
        elif isinstance(raw, dict) and raw.get("bytes"):
            image = Image.open(io.BytesIO(raw["bytes"]))
        elif isinstance(raw, dict) and raw.get("path"):
            where = raw["path"]
            image = Image.open(raw["path"])
        else:
            raise ProjectError(f"no image in {where} (got {type(raw).__name__})")
        image.load()
        return to_rgb(image, where)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ProjectError(f"corrupt image {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """8-bit RGB. PIL's convert("RGB") clips 16-bit grey levels (0..65535) at 255, so a 16-bit PNG would turn
    near-white: those are scaled to 8 bits first. Palette images convert through their palette. Float and
    32-bit integer images have no agreed range: refused in one line."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):  # PNG: at most 16 bits
        levels = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8))  # 2-D uint8: mode L
    elif image.mode in ("I", "F"):
        raise ProjectError(f"image {where} has mode {image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}"
                           f" pixels without a known range): convert it to 8- or 16-bit")
    elif image.mode in ("P", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    return image.convert("RGB")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run timm's transforms (Python `random`, NumPy and torch RNGs) from `seed`, then restore all three."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def example_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


# ----------------------------------------------------------------------------------------------- sources

class ImageSource:
    """Raw (image, label) records of one split, in a per-epoch order, restricted to one rank's share."""

    name: str
    num_classes: int | None = None

    def records(self, split: str, epoch: int, start: int = 0, rank: int = 0, world: int = 1,
                shuffle: bool = True) -> Iterator[tuple[Any, int, str]]:
        """(raw image, label, where) of `split`'s epoch order, this rank's share from its `start`-th record."""
        raise NotImplementedError


class DigitsSource(ImageSource):
    """scikit-learn's 1,797 8x8 digits (bundled in its wheel: sklearn/datasets/data/digits.csv.gz, BSD-3),
    scaled from 0..16 to 0..255 grey levels."""

    name = "digits"
    num_classes = 10

    def __init__(self, seed: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # [1797, 8, 8]
        self.labels = digits.target.astype(np.int64)
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(self.labels))
        self.splits = {"train": order[:-DIGITS_VALIDATION], "validation": order[-DIGITS_VALIDATION:]}
        self.seed = seed

    def records(self, split: str, epoch: int, start: int = 0, rank: int = 0, world: int = 1,
                shuffle: bool = True) -> Iterator[tuple[Any, int, str]]:
        indices = self.splits[split]
        if shuffle:
            indices = indices[np.random.default_rng([self.seed, epoch]).permutation(len(indices))]
        for i in indices[rank + start * world::world]:
            yield self.images[i], int(self.labels[i]), f"digits example {i}"


class StreamedSource(ImageSource):
    """A streamed datasets.IterableDataset per split with an image and a label column (images left encoded:
    they are decoded here, so a corrupt file is named)."""

    def __init__(self, name: str, open_split: Callable[[str], datasets.IterableDataset], cfg: ImageDataConfig) -> None:
        self.name, self._open, self.cfg = name, open_split, cfg
        self._splits: dict[str, datasets.IterableDataset] = {}
        features = self.split("train").features or {}
        label = features.get(cfg.label_field)
        self.num_classes = len(label.names) if isinstance(label, datasets.ClassLabel) else None

    def split(self, split: str) -> datasets.IterableDataset:
        if split not in self._splits:
            cfg = self.cfg
            hub_split = cfg.train_split if split == "train" else cfg.validation_split
            try:
                ds = self._open(hub_split)
                missing = [f for f in (cfg.image_field, cfg.label_field) if f not in (ds.column_names or [f])]
                if missing == [cfg.label_field] and self.name.startswith("imagefolder:"):  # datasets adds no
                    # label column to a folder with a single class folder (or images directly under the split)
                    raise ProjectError(f"{self.name} split '{hub_split}' has fewer than two class folders: "
                                       f"image classification wants <data.path>/{hub_split}/<class>/<image> "
                                       f"with at least two classes")
                if missing:
                    raise ProjectError(f"{self.name} split '{hub_split}' has no column {missing[0]!r} "
                                       f"(columns: {', '.join(ds.column_names)}; set data.image_field / label_field)")
                ds = ds.select_columns([cfg.image_field, cfg.label_field])
                ds = ds.cast_column(cfg.image_field, datasets.Image(decode=False))
            except ProjectError:
                raise
            except Exception as e:  # network, unknown dataset or split: one line that says where
                raise ProjectError(f"cannot stream {self.name} split '{hub_split}': "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
            self._splits[split] = ds
        return self._splits[split]

    def records(self, split: str, epoch: int, start: int = 0, rank: int = 0, world: int = 1,
                shuffle: bool = True) -> Iterator[tuple[Any, int, str]]:
        ds = self.split(split)
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        if shuffle:
            ds = ds.shuffle(seed=self.cfg.seed + epoch, buffer_size=self.cfg.shuffle_buffer)
        if start:
            ds = ds.skip(start)
        for j, row in enumerate(ds, start=start):
            yield row[self.cfg.image_field], int(row[self.cfg.label_field]), f"{self.name} {split} record {j}"


def open_image_source(cfg: ImageDataConfig) -> ImageSource:
    cfg.validate()
    if cfg.source == "digits":
        return DigitsSource(cfg.seed)
    if cfg.source == "imagefolder":
        return StreamedSource(f"imagefolder:{cfg.path}", lambda split: datasets.load_dataset(
            "imagefolder", data_dir=cfg.path, split=split, streaming=True, cache_dir=cfg.cache_dir), cfg)
    return StreamedSource(f"hub:{cfg.hub_path}", lambda split: datasets.load_dataset(
        cfg.hub_path, cfg.hub_config, split=split, streaming=True, cache_dir=cfg.cache_dir), cfg)


# -------------------------------------------------------------------------------------------- transforms

def image_transform(cfg: ImageDataConfig, image_size: int, training: bool) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training (RandomResizedCrop, flip, RandAugment, erasing) or evaluation (resize, center crop) transform."""
    if training:
        return create_transform(image_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                hflip=cfg.hflip, vflip=0.0, color_jitter=None, auto_augment=cfg.auto_augment,
                                interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                re_prob=cfg.re_prob, re_mode="pixel")
    return create_transform(image_size, is_training=False, interpolation=cfg.interpolation if
                            cfg.interpolation != "random" else "bicubic", mean=tuple(cfg.mean), std=tuple(cfg.std),
                            crop_pct=cfg.crop_pct)


def check_label(label: int, num_classes: int, where: str) -> int:
    if not 0 <= label < num_classes:
        raise ConfigError("model.num_classes", num_classes, f"is too small for label {label} of {where}")
    return label


# ------------------------------------------------------------------------------------------------ streams

class ImageStream:
    """Endless, resumable training examples of one data-parallel rank.

    Position: (epoch, index), index = examples this rank has taken in the epoch. Every rank takes one example
    per next(), so all ranks hold the same state and saving it once is enough. Example j of the epoch order is
    augmented from seed (data.seed, epoch, j): `load_state_dict` continues with the very tensors the
    uninterrupted stream would have produced next."""

    def __init__(self, cfg: ImageDataConfig, source: ImageSource, image_size: int, num_classes: int,
                 dp_rank: int = 0, dp_world: int = 1, *, training_transform: bool = True) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
        self.cfg, self.source, self.num_classes = cfg, source, num_classes
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.transform = image_transform(cfg, image_size, training=training_transform)
        self.image_size = image_size
        self._epoch, self._index = 0, 0
        self._records: Iterator[tuple[Any, int, str]] | None = None

    def __iter__(self) -> ImageStream:
        return self

    def __next__(self) -> Example:
        record = None
        for _ in range(2):  # at most one epoch boundary per example
            if self._records is None:
                self._records = self.source.records("train", self._epoch, self._index, self.dp_rank, self.dp_world,
                                                    shuffle=self.cfg.shuffle)
            record = next(self._records, None)
            if record is not None:
                break
            if self._index == 0:
                raise ProjectError(f"empty training split: {self.source.name} has no examples for data-parallel "
                                   f"rank {self.dp_rank} of {self.dp_world}")
            self._epoch, self._index, self._records = self._epoch + 1, 0, None
        assert record is not None
        raw, label, where = record
        global_index = self._index * self.dp_world + self.dp_rank
        with seeded(example_seed(self.cfg.seed, self._epoch, global_index)):
            pixels = self.transform(decode(raw, where))
        self._index += 1
        return pixels, check_label(label, self.num_classes, where)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "source": self.source.name, "seed": self.cfg.seed,
                "shuffle": self.cfg.shuffle, "image_size": self.image_size, "dp_world": self.dp_world,
                "epoch": self._epoch, "index": self._index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; ProjectError (one line) when it belongs to another stream."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ProjectError(f"image data state: unsupported version "
                               f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        current = self.state_dict()
        for key in ("source", "seed", "shuffle", "image_size", "dp_world"):
            if state.get(key) != current[key]:
                raise ProjectError(f"data state does not match this run: {key} is {state.get(key)!r} in the "
                                   f"checkpoint but {current[key]!r} now")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ProjectError("data state is malformed: negative epoch or index")
        self._epoch, self._index, self._records = epoch, index, None


class ImageExamples(Sequence[Example]):
    """Fixed examples decoded and transformed on access (the validation set: ImageNet's would not fit in
    memory as tensors). Holds the raw records: encoded bytes or file paths for streamed sources."""

    def __init__(self, records: list[tuple[Any, int, str]], transform: Callable[[Image.Image], torch.Tensor],
                 num_classes: int) -> None:
        self.records, self.transform, self.num_classes = records, transform, num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[return-value]
        raw, label, where = self.records[index]
        return self.transform(decode(raw, where)), check_label(label, self.num_classes, where)


def validation_examples(cfg: ImageDataConfig, source: ImageSource, image_size: int, num_classes: int,
                        dp_rank: int = 0, dp_world: int = 1, limit: int | None = None) -> ImageExamples:
    """This rank's share of the first `limit` (eval.max_blocks; None = all) validation records, in a fixed
    order: global example i goes to rank i % dp_world."""
    records = []
    for i, record in enumerate(source.records("validation", 0, shuffle=False)):
        if limit is not None and i >= limit:
            break
        if i % dp_world == dp_rank:
            records.append(record)
    if not records:
        raise ProjectError(f"empty validation split: {source.name} has no examples for data-parallel rank {dp_rank}")
    for raw, label, where in records:  # every one decodes: found before step 1, not at the first evaluation
        decode(raw, where)
        check_label(label, num_classes, where)
    return ImageExamples(records, image_transform(cfg, image_size, training=False), num_classes)


def calibration_examples(cfg: ImageDataConfig, source: ImageSource, image_size: int, num_classes: int,
                         count: int) -> list[Example]:
    """The first `count` training examples of the seeded epoch-0 order, evaluation-transformed (W8A8
    calibration sees images as evaluation does, without augmentation)."""
    stream = ImageStream(cfg, source, image_size, num_classes, training_transform=False)
    return [next(stream) for _ in range(count)]


def collate(examples: Sequence[Example]) -> Batch:
    pixels = torch.stack([pixels for pixels, _ in examples])
    return Batch(pixels, torch.tensor([label for _, label in examples], dtype=torch.long))


class BatchMixing:
    """timm's Mixup / CutMix on a training batch: labels become soft targets [B, classes] that carry the label
    smoothing. timm draws from NumPy's global RNG; here it is seeded by data.seed and a digest of the batch,
    so a resumed run mixes every batch as the uninterrupted one did."""

    def __init__(self, cfg: ImageDataConfig, num_classes: int, label_smoothing: float) -> None:
        self.seed = cfg.seed
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=label_smoothing,
                           num_classes=num_classes)

    def __call__(self, batch: Batch) -> Batch:
        if batch.labels.is_floating_point():
            return batch  # already mixed
        if len(batch) % 2:
            raise ConfigError("train.micro_batch_size", len(batch), "must be even for mixup / cutmix (timm pairs "
                              "each image with the batch's reverse)")
        sample = batch.inputs[:, :, ::7, ::7].contiguous().numpy().tobytes() + batch.labels.numpy().tobytes()
        digest = int.from_bytes(hashlib.sha1(sample).digest()[:8], "little")
        pixels = batch.inputs.clone()
        with seeded(example_seed(self.seed, digest, 0)):
            pixels, targets = self.mixup(pixels, batch.labels)
        return Batch(pixels, targets)
