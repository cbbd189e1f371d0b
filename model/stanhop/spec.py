"""The STanHop-Net family's spec: multivariate long-horizon forecasting on sliding windows of a CSV."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from model.family import Batch, FamilyData, FamilySpec, Metric, NamedObjective, Throughput
from model.layers import LocalLayers

from model.stanhop.config import StanhopConfig
from model.stanhop.data import SplitWindows, StanhopDataConfig, WindowStream, load_table

# Per-layer statistics: kind -> module name relative to encoder.{j} / decoder.{j} (None: the layer's output).
# The Hopfield layers' outputs (the OutEffHop protocol's modules for STanHop), the block's last FFN output (the
# counterpart of OPT's fc2: the summaries' "ffn_out") and each layer's output.
ENCODER_MODULES: dict[str, str | None] = {
    "time_hopfield": "block.time_hopfield",
    "series_pooling": "block.series_pooling",
    "series_hopfield": "block.series_hopfield",
    "ffn_out": "block.series_mlp.2",
    "layer_out": None,
}
DECODER_MODULES: dict[str, str | None] = {**{k: v for k, v in ENCODER_MODULES.items() if v},
                                          "cross_hopfield": "cross_hopfield", "layer_out": None}
ENCODER_PREFIX, DECODER_PREFIX = "encoder.", "decoder."


def _windows(cfg: Any, split: str) -> SplitWindows:
    """One split's windows; the CSV's series must be the ones model.num_series says."""
    model, data = cfg.model, cfg.data
    table = load_table(data, model.in_len, model.out_len)
    if len(table.columns) != model.num_series:
        raise ConfigError("model.num_series", model.num_series,
                          f"must equal the {len(table.columns)} series of {table.path} ({', '.join(table.columns)})")
    return SplitWindows(table, split, model.in_len, model.out_len)


class StanhopSpec(FamilySpec):
    block_types = ("STanHopBlock", "DecoderLayer")
    recompute_modes = ("none", "full")  # Hopfield layers, no MultiHeadAttention core to recompute selectively
    name = "stanhop"
    objective = NamedObjective("forecasting")
    model_config_class = StanhopConfig
    data_config_class = StanhopDataConfig
    metrics = (Metric("mse", "MSE", fmt=".4f"), Metric("mae", "MAE", fmt=".4f"))
    throughput = Throughput("windows", lambda cfg: 1)  # forecast windows (input + horizon) per second
    target_unit = "points"  # forecast values: horizon x series per window
    tensor_parallel = None  # small enough for data parallelism: parallel.tensor and parallel.pipeline stay 1
    ptq_weight_range = "minmax"  # small per-tensor weights; no OutEffHop recipe says otherwise

    # ------------------------------------------------------------------ model and config
    def build(self, cfg: Any, seq_length: int | None = None, layers: LocalLayers | None = None) -> nn.Module:
        from model.stanhop.model import STanHopNet

        return STanHopNet(cfg)  # `layers` is the single-process factory here: check_layout refuses TP and PP

    def example_length(self, cfg: Any) -> int:
        return int(cfg.model.in_segments)  # segments per series that the time Hopfield layers associate

    # ------------------------------------------------------------------ data
    def data(self, cfg: Any, dp_rank: int = 0, dp_world: int = 1) -> FamilyData:
        train = WindowStream(_windows(cfg, "train"), cfg.data.seed, dp_rank, dp_world)
        validation = self.validation_examples(cfg)
        test = self.test_examples(cfg)
        return FamilyData(train=train, validation=validation[dp_rank::dp_world], test=test[dp_rank::dp_world])

    def validation_examples(self, cfg: Any) -> list[Any]:
        windows = _windows(cfg, "validation")
        return [windows[i] for i in windows.evenly_spaced(cfg.data.max_validation_windows)]

    def test_examples(self, cfg: Any, limit: int | None = None) -> list[Any] | None:
        """The test split's windows (the papers' reported numbers): `limit` (default data.max_test_windows)
        evenly spaced ones, or all of them."""
        windows = _windows(cfg, "test")
        return [windows[i] for i in windows.evenly_spaced(limit if limit is not None else cfg.data.max_test_windows)]

    def calibration_examples(self, cfg: Any, count: int) -> list[Any]:
        stream = WindowStream(_windows(cfg, "train"), cfg.data.seed)
        return [next(stream) for _ in range(count)]

    def collate(self, examples: list[Any]) -> Batch:
        inputs, targets = zip(*examples)
        return Batch(torch.stack(inputs), torch.stack(targets))

    def synthetic_batch(self, cfg: Any, generator: torch.Generator) -> Batch:
        size = int(cfg.train.micro_batch_size)
        model = cfg.model
        return Batch(torch.randn(size, model.in_len, model.num_series, generator=generator),
                     torch.randn(size, model.out_len, model.num_series, generator=generator))

    # ------------------------------------------------------------------ loss and metrics
    def num_targets(self, batch: Batch) -> int:
        return int(batch.labels.numel())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        forecast = model(batch.inputs).float()
        error = forecast - batch.labels.float()
        return {"loss_sum": float(error.square().sum()), "abs_sum": float(error.abs().sum()),
                "targets": float(error.numel())}

    def finish_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        targets = max(sums["targets"], 1.0)
        mse = sums["loss_sum"] / targets
        return {"loss": mse, "mse": mse, "mae": sums.get("abs_sum", float("nan")) / targets}

    def metrics_from_loss(self, loss: float) -> dict[str, float]:
        return {"mse": loss}

    def reference_values(self, cfg: Any) -> dict[str, float]:
        """The naive last-value forecast (repeat the last input step) on the validation split."""
        return naive_last_value(self.validation_examples(cfg))

    # ------------------------------------------------------------------ outliers and quantization
    def outlier_modules(self, model: nn.Module) -> dict[str, str]:
        names: dict[str, str] = {}
        for prefix, layers, modules in ((ENCODER_PREFIX, model.encoder, ENCODER_MODULES),
                                        (DECODER_PREFIX, model.decoder, DECODER_MODULES)):
            for j in range(len(layers)):
                for kind, suffix in modules.items():
                    names[f"{prefix}{j}" + (f".{suffix}" if suffix else "")] = kind
        return names

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return []  # Hopfield layers, not model.attention.MultiHeadAttention: no attention-sink metrics

    def ptq_fp32_modules(self, model: nn.Module) -> set[str]:
        """The per-segment prediction heads, whose summed outputs are the forecast (the LM head's counterpart)."""
        return {f"{DECODER_PREFIX}{j}.predict" for j in range(len(model.decoder))}

    # ------------------------------------------------------------------ cost
    def flops_per_example(self, cfg: Any) -> float:
        """Measured, not modelled: torch's FLOP counter over one forward (matmuls), times 3 for training."""
        key = repr(cfg.model)
        if key not in _FLOPS:
            _FLOPS[key] = _count_flops(cfg.model)
        return _FLOPS[key]


_FLOPS: dict[str, float] = {}  # model config repr -> training FLOPs of one example


def _count_flops(model_cfg: StanhopConfig) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from model.stanhop.model import STanHopNet

    with torch.random.fork_rng(devices=[]):  # building a model draws from the RNG a resumed run has just restored
        model = STanHopNet(model_cfg).eval().requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, model_cfg.in_len, model_cfg.num_series))
    return 3.0 * float(counter.get_total_flops())


def naive_last_value(examples: list[Any]) -> dict[str, float]:
    """MSE and MAE of forecasting every horizon step as the last input step."""
    squared = absolute = count = 0.0
    for inputs, targets in examples:
        error = targets - inputs[-1:]
        squared += float(error.square().sum())
        absolute += float(error.abs().sum())
        count += error.numel()
    return {"naive_last_mse": squared / max(count, 1.0), "naive_last_mae": absolute / max(count, 1.0)}
