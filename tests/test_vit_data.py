"""ViT image data (model/vit/data.py): digits, imagefolder and hub sources, exact resume, rank sharding,
fixed validation, Mixup/CutMix determinism, one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError, ProjectError
from model.family import spec_for
from model.vit.config import ViTConfig
from model.vit.data import BatchMixing, ImageStream, collate, open_image_source, validation_examples
from model.vit.data_config import ImageDataConfig

DIGITS = dict(scale=[0.5, 1.0], hflip=0.0, auto_augment="rand-m5-mstd0.5", crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3)


def equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataConfig, object]:
    cfg = ImageDataConfig(**DIGITS)  # type: ignore[arg-type]
    return cfg, open_image_source(cfg)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """An ImageNet-style folder: 3 classes, 4 train and 2 val images each, odd sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("ant", "bee", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((13 + i, 11, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    return tmp_path


def test_digits_are_the_bundled_real_digits(digits: tuple) -> None:
    cfg, source = digits
    assert source.num_classes == 10 and len(source.splits["train"]) == 1500 and len(source.splits["validation"]) == 297
    assert not set(source.splits["train"]) & set(source.splits["validation"])
    pixels, label = next(ImageStream(cfg, source, 16, 10))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32 and 0 <= label < 10


def test_resume_continues_with_the_same_tensors_and_leaves_global_rngs_alone(digits: tuple) -> None:
    cfg, source = digits
    stream = ImageStream(cfg, source, 16, 10)
    [next(stream) for _ in range(5)]
    state = stream.state_dict()
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    expected = [next(stream) for _ in range(6)]
    assert torch.equal(torch.rand(1), before)  # augmentation used its own seeded RNGs
    resumed = ImageStream(cfg, source, 16, 10)
    resumed.load_state_dict(state)
    assert equal([next(resumed) for _ in range(6)], expected)


def test_resume_across_an_epoch_boundary(folder: Path) -> None:
    cfg = ImageDataConfig(source="imagefolder", path=str(folder), **DIGITS)  # type: ignore[arg-type]
    source = open_image_source(cfg)
    assert source.num_classes == 3
    stream = ImageStream(cfg, source, 8, 3)
    first_epoch = [next(stream) for _ in range(12)]
    state = stream.state_dict()
    second = [next(stream) for _ in range(14)]
    assert stream.epoch == 2 and sorted(l for _, l in first_epoch) == [0] * 4 + [1] * 4 + [2] * 4
    resumed = ImageStream(cfg, source, 8, 3)
    resumed.load_state_dict(state)
    assert equal([next(resumed) for _ in range(14)], second)


def test_two_ranks_interleave_into_the_single_process_stream(digits: tuple) -> None:
    cfg, source = digits
    single = [next(ImageStream(cfg, source, 16, 10)) for _ in range(1)]
    one = ImageStream(cfg, source, 16, 10)
    whole = [next(one) for _ in range(8)]
    ranks = [ImageStream(cfg, source, 16, 10, rank, 2) for rank in (0, 1)]
    shards = [[next(r) for _ in range(4)] for r in ranks]
    assert equal(whole[0::2], shards[0]) and equal(whole[1::2], shards[1]) and equal(single, whole[:1])
    assert ranks[0].state_dict() == ranks[1].state_dict()  # saving one rank's state is enough
    with pytest.raises(ProjectError, match="dp_world is 2 in the checkpoint but 1 now"):
        ImageStream(cfg, source, 16, 10).load_state_dict(ranks[0].state_dict())


def test_validation_is_fixed_and_split_over_ranks(digits: tuple) -> None:
    cfg, source = digits
    first, again = validation_examples(cfg, source, 16, 10), validation_examples(cfg, source, 16, 10)
    assert len(first) == 297 and equal(list(first[:20]), list(again[:20]))
    halves = [validation_examples(cfg, source, 16, 10, rank, 2) for rank in (0, 1)]
    assert len(halves[0]) + len(halves[1]) == 297 and equal(list(halves[1][:5]), list(first[1:10:2]))


def test_imagefolder_streams_validation_and_hub_reads_a_dataset_folder(folder: Path) -> None:
    cfg = ImageDataConfig(source="imagefolder", path=str(folder), **DIGITS)  # type: ignore[arg-type]
    val = validation_examples(cfg, open_image_source(cfg), 8, 3)
    assert len(val) == 6 and sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    hub = ImageDataConfig(source="hub", hub_path=str(folder), **DIGITS)  # type: ignore[arg-type]
    hub_source = open_image_source(hub)
    assert hub_source.num_classes == 3 and len(validation_examples(hub, hub_source, 8, 3)) == 6
    ranks = [ImageStream(hub, hub_source, 8, 3, rank, 2) for rank in (0, 1)]
    assert [len([next(r) for _ in range(6)]) for r in ranks] == [6, 6]


def test_mixup_is_seeded_by_the_batch_and_targets_are_soft(digits: tuple) -> None:
    cfg, source = digits
    batch = collate([next(ImageStream(cfg, source, 16, 10)) for _ in range(1)] * 2
                    + [next(iter(validation_examples(cfg, source, 16, 10)))] * 2)
    mixing = BatchMixing(ImageDataConfig(mixup=0.2, cutmix=0.2), num_classes=10, label_smoothing=0.1)
    first, second = mixing(batch), mixing(batch)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.labels, second.labels)
    assert first.labels.shape == (4, 10) and torch.allclose(first.labels.sum(-1), torch.ones(4))
    assert first.labels.min() > 0  # label smoothing carried into the soft targets


# ---------------------------------------------------------------------------------------------- bad input

def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


def test_missing_image_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        open_image_source(ImageDataConfig(source="imagefolder", path=str(tmp_path / "nowhere")))
    assert "data.path" in one_line(error) and "is not a folder" in str(error.value)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError) as error:
        open_image_source(ImageDataConfig(source="imagefolder", path=str(tmp_path / "flat")))
    assert "has no train/ folder" in one_line(error)


def test_corrupt_image_is_one_line_naming_the_file(folder: Path) -> None:
    bad = folder / "train" / "ant" / "0.png"
    bad.write_bytes(b"not a png at all")
    cfg = ImageDataConfig(source="imagefolder", path=str(folder), shuffle=False, **DIGITS)  # type: ignore[arg-type]
    stream = ImageStream(cfg, open_image_source(cfg), 8, 3)
    with pytest.raises(ProjectError) as error:
        [next(stream) for _ in range(12)]
    assert "corrupt image" in one_line(error) and str(bad) in str(error.value)


def test_image_size_not_divisible_by_patch_size_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        ViTConfig(image_size=30, patch_size=16).validate()
    assert one_line(error) == "config key 'model.image_size' = 30: must be divisible by model.patch_size=16"


def test_class_count_mismatch_and_labels_out_of_range_are_one_line(folder: Path) -> None:
    spec = spec_for("vit")
    data = ImageDataConfig(source="imagefolder", path=str(folder), **DIGITS)  # type: ignore[arg-type]
    cfg = SimpleNamespace(model=ViTConfig(image_size=8, patch_size=4, num_classes=5), data=data)
    with pytest.raises(ConfigError) as error:
        spec.data(cfg)
    assert "model.num_classes" in one_line(error) and "3 classes" in str(error.value)


@pytest.mark.parametrize("key, value", [("source", "webdataset"), ("scale", [0.9, 0.1]), ("hflip", 2.0),
                                        ("crop_pct", 0.0), ("auto_augment", "magic"), ("mixup", -1.0)])
def test_bad_data_config_is_one_line(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        ImageDataConfig(**{key: value}).validate()  # type: ignore[arg-type]
    assert f"data.{key}" in one_line(error)


def test_the_launcher_batches_are_mixed_when_the_recipe_asks_for_it() -> None:
    """launcher.pretrain feeds spec.train_batches: with data.mixup set, every training batch carries soft targets
    (timm's Mixup), the same on a second pass (a resumed run mixes as the uninterrupted one did)."""
    from launcher.config import load_config

    spec = spec_for("vit")
    plain = load_config("configs/vit_tiny.yaml", ["data.mixup=0.0", "data.cutmix=0.0"])
    mixed = load_config("configs/vit_tiny.yaml", ["data.mixup=0.2", "data.cutmix=0.2"])
    hard = next(spec.train_batches(plain, spec.data(plain).train))
    first = next(spec.train_batches(mixed, spec.data(mixed).train))
    again = next(spec.train_batches(mixed, spec.data(mixed).train))
    assert not hard.labels.is_floating_point()
    assert first.labels.is_floating_point() and first.labels.shape == (len(first), mixed.model.num_classes)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config("configs/vit_tiny.yaml", ["data.mixup=0.2", "train.micro_batch_size=7",
                                              "train.global_batch_size=7"])
