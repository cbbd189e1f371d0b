"""`launcher.study`: variant names, the comparison table/plot/json (training replaced by a stub)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher import study
from common.errors import ProjectError


def test_variant_names_map_to_config_overrides() -> None:
    assert study.variant_overrides("softmax1", []) == ["attention.variant=softmax1", "attention.gated=false"]
    assert study.variant_overrides("gated", []) == ["attention.variant=softmax", "attention.gated=true"]
    assert study.variant_overrides("softmax1+gated", [])[:2] == ["attention.variant=softmax1", "attention.gated=true"]
    assert "attention.alpha=12" in study.variant_overrides("clipped_softmax", [])
    assert "attention.alpha=12" not in study.variant_overrides("clipped_softmax", ["attention.gamma=-0.1"])
    assert "attention.alpha=12" not in study.variant_overrides("clipped_softmax", [], family="bert")
    with pytest.raises(ProjectError, match="softmax2"):
        study.variant_overrides("softmax2", [])


def _fake_training(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
    """Stands in for `python -m launcher.pretrain`: writes the files a run leaves behind."""
    sets = dict(a.split("=", 1) for a in args if "=" in a)
    run = Path(sets["logging.run_dir"]) / sets["logging.run_name"]
    run.mkdir(parents=True)
    gated = sets["attention.gated"] == "true"
    ppl, w8a8, kurt = (20.0, 21.0, 5.0) if gated else (20.5, 30.0, 50.0)
    evals = [{"kind": "outliers", "step": s, "val_ppl": ppl + 10 / s, "w8a8_val_ppl": w8a8 + 10 / s,
              "avg_kurtosis": kurt * s / 4, "max_kurtosis": 2 * kurt, "max_inf_norm": kurt, "ffn_max_inf_norm": 1.0,
              "layer_max_inf_norm": 2.0, "worst_module": "decoder.layers.0", "sink_head_share": 0.25 * s,
              "max_residual_norm_ratio": 3.0 * s} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in evals) + "\n")
    (run / "summary.json").write_text(json.dumps({"steps": int(sets["train.steps"])}))
    return subprocess.CompletedProcess(args, 0)


def test_study_writes_table_plot_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(study.subprocess, "run", _fake_training)
    out = tmp_path / "study"
    code = study.main(["--config", "configs/opt_tiny.yaml", "--variants", "softmax,gated", "--steps", "4",
                       "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = (out / "study.md").read_text()
    assert "| softmax | 23.00 | 32.50 | +41.30% | 50.00 |" in table
    assert "| gated | 22.50 | 23.50 | +4.44% | 5.00 |" in table
    saved = json.loads((out / "study.json").read_text())
    assert saved["steps"] == 4 and [p["step"] for p in saved["variants"]["gated"]["trajectory"]] == [2, 4]
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "emergence.png").read_bytes()[:4] == b"\x89PNG"
    assert [p["sink_head_share"] for p in saved["variants"]["softmax"]["trajectory"]] == [0.5, 1.0]
    missing = study._series(saved["variants"]["softmax"]["trajectory"], "max_inf_norm_rest")  # not logged: NaN
    assert len(missing) == 2 and all(math.isnan(v) for v in missing)


def test_study_accepts_the_bert_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(study.subprocess, "run", lambda args, **kw: calls.append(args) or _fake_training(args))
    out = tmp_path / "bert_study"
    code = study.main(["--config", "configs/bert_tiny.yaml", "--variants", "softmax,softmax1,clipped_softmax",
                       "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert all("configs/bert_tiny.yaml" in args for args in calls) and len(calls) == 3
    assert not any("attention.alpha=12" in args for args in calls)  # BERT's clipped recipe is gamma = -0.025
    assert "(bert, MLM perplexities)" in (out / "study.md").read_text()


def test_study_rejects_bad_input_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--variants", "softmax,bogus"], ["--variants", "softmax,softmax"], ["--steps", "0"],
                 ["--set", "eval.outlier_interval=null"], ["--set", "attention.nope=1"]):
        assert study.main(["--config", "configs/opt_tiny.yaml", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (args, err)
    assert not (tmp_path / "x").exists()
