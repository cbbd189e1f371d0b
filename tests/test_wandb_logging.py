"""logging.wandb: an offline W&B run, read back with wandb's own reader (`wandb leet inspect --json`), holds what
TensorBoard and metrics.jsonl get (scalars, the run config, the outlier image and table); a resumed run appends to
the same W&B run id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_pretrain, tiny_overrides
from launcher.config import load_config

wandb = pytest.importorskip("wandb")


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of one offline run directory (run-<id>.wandb), as wandb's reader prints them."""
    cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_offline_wandb_run_has_the_scalars_config_and_outliers_and_resume_continues_it(
        data_cache: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{
        "logging.run_name": "wb", "logging.wandb.mode": "offline", "logging.wandb.project": "outeffhop-test",
        "logging.wandb.tags": "[tiny, softmax1]", "train.exit_interval": 3, "eval.outlier_interval": 3,
        "eval.calibration_batches": 1})
    first = run_pretrain(overrides, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(overrides, resume="auto", timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]

    run_path = tmp_path / "wb"
    run_id = (run_path / "wandb_run_id").read_text().strip()
    segments = sorted((run_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2, list((run_path / "wandb").iterdir())  # one per start, both the same W&B run
    records = [wandb_records(segment) for segment in segments]
    starts = [next(r["run"] for r in segment if r["type"] == "run") for segment in records]
    assert [s["run_id"] for s in starts] == [run_id, run_id] and starts[1].get("resume") is True
    assert starts[0]["project"] == "outeffhop-test" and starts[0]["tags"] == ["tiny", "softmax1"]

    # the config is the resolved run config, as config.yaml holds it
    config = starts[0]["config"]["update"]
    cfg = load_config(run_path / "config.yaml")
    assert config["model"]["hidden_size"] == cfg.model.hidden_size == 32
    assert config["attention"]["variant"] == cfg.attention.variant
    assert config["logging"]["wandb"]["mode"] == "offline"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "config/text_summary" in EventAccumulator(str(run_path / "tb")).Reload().Tags()["tensors"]  # TB has it too

    # every train/val scalar of metrics.jsonl, at its step, in the segment that logged it
    rows = [history(segment) for segment in records]
    logged = {(row["step"], key): value for segment in rows for row in segment for key, value in row.items()}
    for line in (run_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in ("train", "val"):
            for key in ("loss", "ppl", "lr"):
                if key in record:
                    assert logged[(record["step"], f"{record['kind']}/{key}")] == pytest.approx(record[key])
    assert {row["step"] for row in rows[0] if "train/loss" in row} == {1, 2, 3}
    assert {row["step"] for row in rows[1] if "train/loss" in row} == {4, 5, 6}  # appended by the resumed start

    # the outlier evaluation at step 3: summary scalars, per-module scalars, the per-layer image and the table
    outliers = next(json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "outliers")
    at_3 = {key: value for row in rows[0] if row["step"] == 3 for key, value in row.items()}
    assert at_3["outliers/avg_kurtosis"] == pytest.approx(outliers["avg_kurtosis"])
    assert any(key.startswith("outliers_kurtosis/") for key in at_3)
    # media are stored as files; the reader flattens their history entries into dotted keys
    assert at_3["outliers/per_layer._type"] == "image-file" and at_3["outliers/per_layer.format"] == "png"
    assert at_3["outliers/worst_module_activations._type"] == "histogram"
    assert at_3["outliers/modules._type"] == "table-file" and at_3["outliers/modules.nrows"] == len(outliers["modules"])
    table = json.loads((segments[0] / "files" / at_3["outliers/modules.path"]).read_text())
    assert [row[0] for row in table["data"]] == list(outliers["modules"])


def test_wandb_is_off_by_default_and_bad_settings_name_their_key() -> None:
    from common.errors import ConfigError

    assert load_config("configs/opt_tiny.yaml").logging.wandb.mode == "disabled"
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config("configs/opt_tiny.yaml", ["logging.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match="logging.wandb.project"):
        load_config("configs/opt_tiny.yaml", ["logging.wandb.project=a/b"])
