"""STanHop-Net (issue 16): windows and splits, the stream, bad CSVs, the block against model/hopfield.py's
functional retrieval, normalisers, W8A8 copy, and a short training run against the naive forecast."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from entmax import entmax_bisect

from common.errors import ConfigError
from model.family import spec_for
from model.hopfield import hopfield_update
from model.softmax import softmax1
from model.stanhop.config import StanhopConfig
from model.stanhop.data import (SplitWindows, StanhopDataConfig, WindowStream, bundled_path, load_table,
                                split_borders, split_rows)
from model.stanhop.model import STanHopBlock, STanHopNet
from model.stanhop.spec import naive_last_value

SPEC = spec_for("stanhop")


def write_csv(path: Path, rows: int, series: int = 2, seed: int = 0) -> np.ndarray:
    """An ETT-layout CSV (date, s0, s1, ...) with random values; returns the values."""
    values = np.random.default_rng(seed).normal(size=(rows, series)) * np.arange(1, series + 1) + 10
    dates = [f"2020-01-01 {i:05d}" for i in range(rows)]
    lines = ["date," + ",".join(f"s{j}" for j in range(series))]
    lines += [d + "," + ",".join(repr(float(v)) for v in row) for d, row in zip(dates, values)]
    path.write_text("\n".join(lines) + "\n")
    return values


def small_model(num_series: int = 2, variant: str = "softmax1", **kw: object) -> StanhopConfig:
    cfg = StanhopConfig(num_series=num_series, in_len=24, out_len=6, seg_len=4, merge_window=2, num_layers=2,
                        d_model=16, d_ff=32, num_heads=2, pool_queries=3, dropout=0.0, **kw)
    cfg.attention.variant = variant
    return cfg


def run_cfg(model: StanhopConfig, **data: object) -> SimpleNamespace:
    data_cfg = StanhopDataConfig(**data)
    data_cfg.validate()
    return SimpleNamespace(model=model, data=data_cfg)


# ----------------------------------------------------------------------------------------------- windows

def test_ratio_split_windows_match_hand_computed(tmp_path: Path) -> None:
    raw = write_csv(tmp_path / "series.csv", rows=100)
    table = load_table(StanhopDataConfig(path=str(tmp_path / "series.csv")), in_len=4, out_len=2)
    # Informer/Autoformer: train int(0.7 n) = 70, test int(0.2 n) = 20, validation the rest = 10 rows;
    # validation and test inputs start in_len = 4 rows before their part.
    assert table.borders == {"train": (0, 70), "validation": (66, 80), "test": (76, 100)}
    mean = raw[:70].sum(axis=0) / 70
    std = np.sqrt(((raw[:70] - mean) ** 2).sum(axis=0) / 70)  # population std, fitted on train rows only
    normalised = (raw - mean) / std
    for split, first, count in (("train", 0, 65), ("validation", 66, 9), ("test", 76, 19)):
        windows = SplitWindows(table, split, 4, 2)
        assert len(windows) == count  # rows - in_len - out_len + 1
        for i in (0, count - 1):
            inputs, targets = windows[i]
            np.testing.assert_allclose(inputs.numpy(), normalised[first + i:first + i + 4], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(targets.numpy(), normalised[first + i + 4:first + i + 6], rtol=1e-5, atol=1e-5)
    # The last test target is the file's last row; the first validation target is the first validation row.
    np.testing.assert_allclose(SplitWindows(table, "test", 4, 2)[18][1][-1].numpy(), normalised[99], atol=1e-5)
    np.testing.assert_allclose(SplitWindows(table, "validation", 4, 2)[0][1][0].numpy(), normalised[70], atol=1e-5)


def test_ett_splits_are_12_4_4_months() -> None:
    assert split_rows(17420, "auto", "/d/ETTh1.csv", (0.7, 0.1, 0.2)) == (8640, 2880, 2880)
    assert split_rows(69680, "auto", "/d/ETTm2.csv", (0.7, 0.1, 0.2)) == (34560, 11520, 11520)
    assert split_rows(1000, "auto", "/d/WTH.csv", (0.7, 0.1, 0.2)) == (700, 100, 200)
    # The Informer borders for ETTh1 at input 168 (its data_loader's border1s / border2s).
    assert split_borders((8640, 2880, 2880), 168) == {"train": (0, 8640), "validation": (8640 - 168, 11520),
                                                      "test": (11520 - 168, 14400)}


def test_bundled_series_is_vic_elec() -> None:
    assert bundled_path().name == "vic_elec.csv"
    table = load_table(StanhopDataConfig(), in_len=48, out_len=12)
    assert table.columns == ("Demand", "Temperature")  # the Holiday flag (bool) and the Date column are not series
    assert table.values.shape == (52608, 2)
    train_end = table.borders["train"][1]
    np.testing.assert_allclose(table.values[:train_end].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(table.values[:train_end].std(axis=0), 1.0, atol=1e-4)


def test_stream_shards_resumes_and_reshuffles(tmp_path: Path) -> None:
    write_csv(tmp_path / "s.csv", rows=60)
    windows = SplitWindows(load_table(StanhopDataConfig(path=str(tmp_path / "s.csv")), 4, 2), "train", 4, 2)
    n = len(windows)  # 37
    single = WindowStream(windows, seed=3)
    order = [single.window_index(g) for g in range(2 * n)]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:]) == list(range(n))
    assert order[:n] != order[n:]  # a new permutation every epoch
    # Two ranks interleave into the single process's order.
    ranks = [WindowStream(windows, seed=3, dp_rank=r, dp_world=2) for r in range(2)]
    merged = []
    for _ in range(n):
        for stream in ranks:
            merged.append(next(stream))
    expected = [windows[i] for i in order]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(merged, expected))
    assert ranks[0].state_dict() == ranks[1].state_dict()  # rank-independent state
    # Resume: a fresh stream restored from the state continues exactly (across the epoch boundary).
    restored = WindowStream(windows, seed=3, dp_rank=1, dp_world=2)
    restored.load_state_dict(ranks[0].state_dict())
    for _ in range(n):
        a, b = next(ranks[1]), next(restored)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(Exception, match="seed"):
        WindowStream(windows, seed=4).load_state_dict(single.state_dict())


# ----------------------------------------------------------------------------------------------- bad CSVs

def _bad(tmp_path: Path, text: str | None, match: str, key: str = "data.path", in_len: int = 4) -> None:
    path = tmp_path / "bad.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_table(StanhopDataConfig(path=str(path)), in_len=in_len, out_len=2)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config key '{key}'"), message


def test_bad_csvs_give_one_line(tmp_path: Path) -> None:
    _bad(tmp_path, None, "does not exist")
    _bad(tmp_path, "date,name\n2020-01-01,a\n2020-01-02,b\n", "no numeric columns")
    _bad(tmp_path, "date,x\n" + "".join(f"2020-01-{i:02d},{i}\n" for i in range(1, 30)), "too few rows for one window",
         in_len=20)
    _bad(tmp_path, "date,x,y\n" + "".join(f"d{i},{i},{'' if i == 7 else i}\n" for i in range(100)),
         "NaN value.*'y' at data row 8")
    _bad(tmp_path, "", "not a readable CSV")


def test_series_count_must_match_the_model(tmp_path: Path) -> None:
    write_csv(tmp_path / "s.csv", rows=200, series=3)
    with pytest.raises(ConfigError, match="model.num_series.*3 series"):
        SPEC.data(run_cfg(small_model(num_series=2), path=str(tmp_path / "s.csv")))


# ----------------------------------------------------------------------------------------------- model

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], heads, -1).transpose(-2, -3)  # [B, S, H*d] -> [B, H, S, d]


def _retrieve(hop: torch.nn.Module, state: torch.Tensor, stored: torch.Tensor, separation) -> torch.Tensor:
    """Hopfield module's output recomputed with model.hopfield.hopfield_update (functional API), head by head."""
    heads = hop.num_heads
    q, k, v = _heads(hop.q_proj(state), heads), _heads(hop.k_proj(stored), heads), _heads(hop.v_proj(stored), heads)
    # hopfield_update: values^T sep(beta Xi x) for every state x (patterns broadcast per head).
    out = hopfield_update(q, k[:, :, None], hop.beta, separation=separation, values=v[:, :, None])
    return hop.out_proj(out.transpose(1, 2).reshape(state.shape[0], state.shape[1], -1))


@pytest.mark.parametrize("variant", ["softmax1", "entmax"])
def test_block_equals_library_retrieval_steps(variant: str) -> None:
    torch.manual_seed(0)
    cfg = small_model(variant=variant)
    block = STanHopBlock(cfg, segments=5).eval()
    x = torch.randn(3, 2, 5, cfg.d_model)  # [B, N, S, D]
    if variant == "entmax":
        # Per head alpha = 1 + sigmoid(alpha_logit) (the registry's entmax), the bisection is the entmax package's.
        alpha = 1 + torch.sigmoid(block.time_hopfield.separation.head_params["alpha_logit"].detach())
        assert torch.allclose(alpha, torch.tensor(1.5))  # attention.entmax_alpha's initial value
        separation = lambda logits: entmax_bisect(logits, alpha.expand(*logits.shape[:-1], 1), dim=-1)  # noqa: E731
    else:
        separation = softmax1
    with torch.no_grad():
        time = x.reshape(6, 5, cfg.d_model)
        time = block.norm1(time + _retrieve(block.time_hopfield, time, time, separation))
        time = block.norm2(time + block.time_mlp(time))
        series = time.reshape(3, 2, 5, -1).transpose(1, 2).reshape(15, 2, -1)
        pool = block.series_pooling.hopfield
        queries = block.series_pooling.query.expand(15, -1, -1)  # learned states, no W_Q (identity)
        pooled = _retrieve(pool, queries, series, separation)
        assert pooled.shape == (15, cfg.pool_queries, cfg.d_model)
        series = block.norm3(series + _retrieve(block.series_hopfield, series, pooled, separation))
        series = block.norm4(series + block.series_mlp(series))
        expected = series.reshape(3, 5, 2, -1).transpose(1, 2)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["entmax", "softmax", "softmax1", "sparsemax", "clipped_softmax",
                                     "clipped_softmax1", "learnable_sink"])  # any registered variant
def test_every_normaliser_trains(variant: str) -> None:
    torch.manual_seed(0)
    model = STanHopNet(small_model(variant=variant, memory_patterns=4))
    x, y = torch.randn(4, 24, 2), torch.randn(4, 6, 2)
    assert model(x).shape == (4, 6, 2)
    loss = model(x, labels=y)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(model(x), y))
    loss.backward()
    if variant == "entmax":  # alpha is learned by every Hopfield layer
        alphas = [m for n, m in model.named_parameters() if n.endswith("alpha_logit")]
        assert len(alphas) == 2 * 3 + 2 + 3 * 4  # encoder: 3 per block + memory; decoder: 3 per block + cross
        assert alphas and all(p.grad is not None and p.grad.abs().sum() > 0 for p in alphas)
    if variant == "learnable_sink":  # its per-head sink logit is learned by every Hopfield layer too
        sinks = [p for n, p in model.named_parameters() if n.endswith("sink_logit")]
        assert len(sinks) == 20 and all(p.grad is not None for p in sinks)
    if variant == "sparsemax":
        _, weights = model.encoder[0].block.time_hopfield(torch.randn(2, 6, 16), return_association=True)
        assert (weights == 0).any()  # sparse retrieval


def test_tensor_and_pipeline_parallelism_are_rejected() -> None:
    cfg = small_model()
    SPEC.check_layout(cfg, 1, 1)
    for tensor, pipeline, key in ((2, 1, "parallel.tensor"), (1, 2, "parallel.pipeline")):
        with pytest.raises(ConfigError, match="no .* parallelism") as info:
            SPEC.check_layout(cfg, tensor, pipeline)
        assert str(info.value).startswith(f"config key '{key}'") and "\n" not in str(info.value)


def test_spec_metrics_and_outlier_modules(tmp_path: Path) -> None:
    write_csv(tmp_path / "s.csv", rows=300)
    cfg = run_cfg(small_model(), path=str(tmp_path / "s.csv"))
    model = SPEC.build(cfg.model).eval()
    batch = SPEC.collate(SPEC.validation_examples(cfg)[:8])
    assert batch.inputs.shape == (8, 24, 2) and batch.labels.shape == (8, 6, 2)
    with torch.no_grad():
        metrics = SPEC.finish_metrics(SPEC.eval_sums(model, batch))
        error = model(batch.inputs) - batch.labels
    assert math.isclose(metrics["mse"], float(error.square().mean()), rel_tol=1e-5)
    assert math.isclose(metrics["mae"], float(error.abs().mean()), rel_tol=1e-5)
    assert metrics["loss"] == metrics["mse"]
    names = SPEC.outlier_modules(model)
    assert names["encoder.0.block.time_hopfield"] == "time_hopfield"
    assert names["decoder.2.cross_hopfield"] == "cross_hopfield" and names["encoder.1"] == "layer_out"
    for name in names:
        model.get_submodule(name)
    assert SPEC.flops_per_example(cfg) > 0


def test_w8a8_copy_quantizes_the_hopfield_association_and_matches_with_quantizers_off() -> None:
    from model.hopfield import Hopfield
    from outliers.ptq import ActQuantizer, PTQSettings, QuantLinear, calibrate, quantize_w8a8

    torch.manual_seed(0)
    model = STanHopNet(small_model(variant="entmax", memory_patterns=4)).eval()
    x = torch.randn(8, 24, 2)
    with torch.no_grad():
        reference = model(x)
        off = quantize_w8a8(model, PTQSettings(quantize_weights=False))
        torch.testing.assert_close(off(x), reference, rtol=1e-5, atol=1e-5)  # quantizers off: the model itself
        qmodel = quantize_w8a8(model, PTQSettings())
        hopfields = [m for m in qmodel.modules() if isinstance(m, Hopfield)]
        assert all(isinstance(h.taps.scores, ActQuantizer) and isinstance(h.taps.probs, ActQuantizer)
                   and isinstance(h.taps.context, ActQuantizer) for h in hopfields)
        assert isinstance(qmodel.encoder[0].block.norm1.residual, ActQuantizer)  # residual sums (post-LN inputs)
        assert isinstance(qmodel.decoder[0].predict, torch.nn.Linear)  # the forecast heads stay fp32
        assert isinstance(qmodel.decoder[0].mlp[0], QuantLinear)
        assert not torch.equal(qmodel.enc_pos.weight, model.enc_pos.weight)  # learned positions quantized
        calibrate(qmodel, [x])
        error = float((qmodel(x) - reference).square().mean() / reference.square().mean())
    assert 0 < error < 0.05


@pytest.mark.slow
def test_short_training_beats_the_naive_forecast_on_bundled_validation() -> None:
    """100 steps of plain Adam (no launcher) on vic_elec: validation MSE far below repeating the last value."""
    torch.manual_seed(0)
    model_cfg = StanhopConfig(num_series=2, in_len=48, out_len=12, seg_len=6, merge_window=2, num_layers=2,
                              d_model=32, d_ff=64, num_heads=4, pool_queries=4, dropout=0.0)
    model_cfg.attention.variant = "softmax1"
    cfg = run_cfg(model_cfg, split="ratio", max_validation_windows=256)
    data = SPEC.data(cfg)
    model = SPEC.build(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        batch = SPEC.collate([next(data.train) for _ in range(32)])
        loss = model(batch.inputs, labels=batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        metrics = SPEC.finish_metrics(SPEC.eval_sums(model, SPEC.collate(data.validation)))
    naive = naive_last_value(data.validation)
    assert metrics["mse"] < 0.6 * naive["naive_last_mse"], (metrics, naive)
    assert metrics["mae"] < naive["naive_last_mae"], (metrics, naive)


def test_etth1_recipe_needs_only_the_csv_path(tmp_path: Path) -> None:
    """configs/stanhop_etth1.yaml on an ETTh1-shaped file (date + 7 series, 14,400 hourly rows): 12/4/4 months."""
    from launcher.config import load_config

    csv = tmp_path / "ETTh1.csv"
    write_csv(csv, rows=14400, series=7)
    cfg = load_config("configs/stanhop_etth1.yaml", overrides=[f"data.path={csv}"])
    assert (cfg.model.in_len, cfg.model.out_len, cfg.model.seg_len, cfg.model.num_layers) == (168, 24, 6, 11)
    assert (cfg.train.micro_batch_size, cfg.train.lr, cfg.model.attention.variant) == (128, 1e-4, "entmax")
    data = SPEC.data(cfg)
    assert len(data.train.windows) == 8640 - 168 - 24 + 1 and len(data.validation) == 2880 - 24 + 1
    assert len(SPEC.test_examples(cfg)) == 2880 - 24 + 1
    model = SPEC.build(cfg.model)
    batch = SPEC.collate([next(data.train) for _ in range(2)])
    with torch.no_grad():
        assert model(batch.inputs).shape == (2, 24, 7)
