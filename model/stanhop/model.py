"""STanHop-Net: a Crossformer-style hierarchical encoder-decoder built from Hopfield layers.

Reads top to bottom like the official code (github.com/MAGICS-LAB/STanHop, OutEffHop's STanHop_time_seeries):

    series [B, L, N] --segment embedding + learned positions--> [B, N, S, D]
    encoder: num_layers STanHop blocks, segment merging between scales (merge_window > 1)
    decoder: num_layers + 1 layers over learned output positions, layer i reads encoder scale i;
             each layer predicts every output segment, the predictions are summed   -> [B, out_len, N]

A STanHop block is two tandem Hopfield sub-blocks (the paper's TimeGSH and SeriesGSH):
    time:   every series' segments associate with each other           (Hopfield, self-association)
    series: `pool_queries` learned queries pool the series of a segment (HopfieldPooling), then every series
            retrieves from the pooled patterns                          (Hopfield, series -> pooled)
each followed by residual + LayerNorm + MLP + LayerNorm (post-LN, as Crossformer and STanHop). The series stage
follows the paper and Crossformer's router; the released STanHop code instead retrieves each series from learned
keys and adds series self-association (its `HopfieldPooling` takes the series as queries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from model.taps import Tap

from model.stanhop.config import StanhopConfig
from model.stanhop.normaliser import make_separation


def _mlp(d_model: int, d_ff: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


class ResidualNorm(nn.Module):
    """Post-LN: the LayerNorm of a residual sum. The sum is tapped: W8A8 evaluation quantizes it (model/taps.py)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.residual = Tap()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.residual(x))


class LearnedPositions(nn.Module):
    """Learned per-series, per-segment positions [1, N, S, D] added to the input (a module with a `weight`,
    so W8A8 evaluation quantizes it like an embedding table)."""

    def __init__(self, num_series: int, segments: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_series, segments, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class SegmentEmbedding(nn.Module):
    """[B, L, N] -> [B, N, S, D]: each series is cut into S segments of seg_len steps, each linearly embedded.
    An input length that is not a multiple of seg_len is padded in front with the first step (as STanHop)."""

    def __init__(self, seg_len: int, d_model: int, in_len: int) -> None:
        super().__init__()
        self.seg_len = seg_len
        self.pad = -(-in_len // seg_len) * seg_len - in_len
        self.linear = nn.Linear(seg_len, d_model)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        if self.pad:
            series = torch.cat([series[:, :1].expand(-1, self.pad, -1), series], dim=1)
        batch, length, num_series = series.shape
        segments = series.transpose(1, 2).reshape(batch, num_series, length // self.seg_len, self.seg_len)
        return self.linear(segments)


class SegmentMerging(nn.Module):
    """Merge `window` neighbouring segments into one (coarser scale): [B, N, S, D] -> [B, N, ceil(S/w), D].
    S is padded at the end by repeating the last segments, as Crossformer/STanHop do."""

    def __init__(self, d_model: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(window * d_model)
        self.linear = nn.Linear(window * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -x.shape[2] % self.window
        if pad:
            x = torch.cat([x, x[:, :, -pad:]], dim=2)
        merged = torch.cat([x[:, :, i::self.window] for i in range(self.window)], dim=-1)
        return self.linear(self.norm(merged))


class STanHopBlock(nn.Module):
    """The STanHop block on [B, N, S, D] -> [B, N, S, D] (see the module docstring)."""

    def __init__(self, cfg: StanhopConfig, segments: int) -> None:
        super().__init__()
        d, heads, p = cfg.d_model, cfg.num_heads, cfg.dropout
        backend, attention = cfg.attention.backend, cfg.attention
        self.time_hopfield = Hopfield(d, num_heads=heads, separation=make_separation(attention, heads, segments),
                                      dropout=p, backend=backend)
        self.series_pooling = HopfieldPooling(d, quantity=cfg.pool_queries, num_heads=heads, dropout=p,
                                              separation=make_separation(attention, heads, cfg.num_series),
                                              backend=backend)
        self.series_hopfield = Hopfield(d, num_heads=heads, dropout=p, backend=backend,
                                        separation=make_separation(attention, heads, cfg.pool_queries))
        self.dropout = nn.Dropout(p)
        self.norm1, self.norm2, self.norm3, self.norm4 = (ResidualNorm(d) for _ in range(4))
        self.time_mlp, self.series_mlp = _mlp(d, cfg.d_ff), _mlp(d, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_series, segments, d = x.shape
        time = x.reshape(batch * num_series, segments, d)
        time = self.norm1(time + self.dropout(self.time_hopfield(time)))
        time = self.norm2(time + self.dropout(self.time_mlp(time)))
        series = time.reshape(batch, num_series, segments, d).transpose(1, 2).reshape(batch * segments, num_series, d)
        pooled = self.series_pooling(series)  # [B*S, pool_queries, D]
        series = self.norm3(series + self.dropout(self.series_hopfield(series, pooled)))
        series = self.norm4(series + self.dropout(self.series_mlp(series)))
        return series.reshape(batch, segments, num_series, d).transpose(1, 2)


class MemoryPlugin(nn.Module):
    """Tune-and-Play external memory (STanHop Sec. 4.3): every segment retrieves from `patterns` learned memory
    patterns (a HopfieldLayer), added as a residual: [B, N, S, D] -> [B, N, S, D]."""

    def __init__(self, cfg: StanhopConfig) -> None:
        super().__init__()
        self.memory = HopfieldLayer(cfg.d_model, cfg.memory_patterns, num_heads=cfg.num_heads,
                                    separation=make_separation(cfg.attention, cfg.num_heads, cfg.memory_patterns),
                                    dropout=cfg.dropout,
                                    backend=cfg.attention.backend)
        self.norm = ResidualNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_series, segments, d = x.shape
        flat = x.reshape(batch, num_series * segments, d)
        return self.norm(flat + self.memory(flat)).reshape(batch, num_series, segments, d)


class EncoderScale(nn.Module):
    """One scale of the encoder: optional segment merging, a STanHop block, optional memory plug-in."""

    def __init__(self, cfg: StanhopConfig, merge: bool, segments: int) -> None:
        super().__init__()
        self.merge = SegmentMerging(cfg.d_model, cfg.merge_window) if merge else None
        self.block = STanHopBlock(cfg, segments)
        self.memory = MemoryPlugin(cfg) if cfg.memory_patterns else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge is not None:
            x = self.merge(x)
        x = self.block(x)
        return self.memory(x) if self.memory is not None else x


class DecoderLayer(nn.Module):
    """A STanHop block on the decoder state, then every output segment retrieves from its series' encoder
    segments at one scale (cross Hopfield), MLP, and a linear head that predicts seg_len steps per segment."""

    def __init__(self, cfg: StanhopConfig, memory_segments: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.block = STanHopBlock(cfg, cfg.out_segments)
        self.cross_hopfield = Hopfield(d, num_heads=cfg.num_heads, dropout=cfg.dropout, backend=cfg.attention.backend,
                                       separation=make_separation(cfg.attention, cfg.num_heads, memory_segments))
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm1, self.norm2 = ResidualNorm(d), ResidualNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.predict = nn.Linear(d, cfg.seg_len)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, S_out, D], memory (an encoder scale) [B, N, S_in, D] -> (x, prediction [B, N, S_out, seg_len])."""
        batch, num_series, segments, d = x.shape
        x = self.block(x).reshape(batch * num_series, segments, d)
        memory = memory.reshape(batch * num_series, memory.shape[2], d)
        x = self.norm1(x + self.dropout(self.cross_hopfield(x, memory)))
        x = self.norm2(x + self.mlp(x)).reshape(batch, num_series, segments, d)
        return x, self.predict(x)


class STanHopNet(nn.Module):
    """forward(series [B, in_len, N]) -> forecasts [B, out_len, N]; with labels [B, out_len, N]: the mean MSE."""

    def __init__(self, cfg: StanhopConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.d_model
        self.embed = SegmentEmbedding(cfg.seg_len, d, cfg.in_len)
        self.enc_pos = LearnedPositions(cfg.num_series, cfg.in_segments, d)
        self.pre_norm = ResidualNorm(d)
        segments = cfg.scale_segments()  # per encoder scale, the embedding's first
        self.encoder = nn.ModuleList(EncoderScale(cfg, merge=i > 0 and cfg.merge_window > 1, segments=segments[i + 1])
                                     for i in range(cfg.num_layers))
        self.dec_pos = LearnedPositions(cfg.num_series, cfg.out_segments, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg, memory_segments=segments[i]) for i in range(cfg.num_layers + 1))

    def forecast(self, series: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if series.dim() != 3 or tuple(series.shape[1:]) != (cfg.in_len, cfg.num_series):
            raise ValueError(f"series: expected [batch, in_len={cfg.in_len}, num_series={cfg.num_series}], "
                             f"got {tuple(series.shape)}")
        x = self.pre_norm(self.enc_pos(self.embed(series)))
        scales = [x]
        for scale in self.encoder:
            x = scale(x)
            scales.append(x)
        y = self.dec_pos.weight.expand(series.shape[0], -1, -1, -1)
        prediction = 0
        for layer, memory in zip(self.decoder, scales):
            y, layer_prediction = layer(y, memory)
            prediction = prediction + layer_prediction
        batch, num_series = series.shape[0], cfg.num_series
        steps = prediction.reshape(batch, num_series, cfg.out_segments * cfg.seg_len).transpose(1, 2)
        return steps[:, :cfg.out_len]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, series: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        forecast = self.forecast(series)
        if labels is None:
            return forecast
        return F.mse_loss(forecast.float(), labels.float())
