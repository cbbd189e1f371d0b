"""`launcher.study`: variant names, the comparison table/plot/json, --jobs and --resume (training replaced by a
stub; the real runs are the README's studies)."""

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
    run.mkdir(parents=True, exist_ok="auto" in args)  # --resume auto: the run may exist
    gated = sets["attention.gated"] == "true"
    ppl, w8a8, kurt = (20.0, 21.0, 5.0) if gated else (20.5, 30.0, 50.0)
    evals = [{"kind": "outliers", "step": s, "val_ppl": ppl + 10 / s, "w8a8_val_ppl": w8a8 + 10 / s,
              "avg_kurtosis": kurt * s / 4, "max_kurtosis": 2 * kurt, "max_inf_norm": kurt, "ffn_max_inf_norm": 1.0,
              "layer_max_inf_norm": 2.0, "worst_module": "decoder.layers.0", "sink_head_share": 0.25 * s,
              "max_residual_norm_ratio": 3.0 * s} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in evals) + "\n")
    (run / "summary.json").write_text(json.dumps({"steps": int(sets["train.steps"])}))
    return subprocess.CompletedProcess(args, 0)


class FakePopen:
    """subprocess.Popen for launcher.study: the stub run happens at start; `calls` records the command lines."""

    calls: list[list[str]] = []

    def __init__(self, args: list[str], **_: Any) -> None:
        FakePopen.calls.append(args)
        self.returncode = _fake_training(args).returncode

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode

    def terminate(self) -> None:
        pass


@pytest.fixture
def fake_popen(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    FakePopen.calls = []
    monkeypatch.setattr(study.subprocess, "Popen", FakePopen)
    return FakePopen.calls


def test_study_writes_table_plot_and_json(tmp_path: Path, fake_popen: list[list[str]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
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


def test_study_accepts_the_bert_config(tmp_path: Path, fake_popen: list[list[str]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    calls = fake_popen
    out = tmp_path / "bert_study"
    code = study.main(["--config", "configs/bert_tiny.yaml", "--variants", "softmax,softmax1,clipped_softmax",
                       "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert all("configs/bert_tiny.yaml" in args for args in calls) and len(calls) == 3
    assert not any("attention.alpha=12" in args for args in calls)  # BERT's clipped recipe is gamma = -0.025
    assert "(bert, MLM perplexities)" in (out / "study.md").read_text()


def test_jobs_and_resume_keep_the_named_order_and_continue(tmp_path: Path, fake_popen: list[list[str]],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["--config", "configs/opt_tiny.yaml", "--variants", "gated,softmax", "--steps", "4", "--out", str(out)]
    assert study.main(args + ["--jobs", "2"]) == 0, capsys.readouterr().err
    assert list(json.loads((out / "study.json").read_text())["variants"]) == ["gated", "softmax"]
    assert not any("--resume" in call for call in fake_popen)
    assert study.main(args + ["--resume"]) == 0, capsys.readouterr().err  # the runs exist: each continues
    assert all(call[call.index("--resume") + 1] == "auto" for call in fake_popen[2:]) and len(fake_popen) == 4


def test_backcopy_study_reports_the_sink_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def with_sink(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        done = _fake_training(args)
        sets = dict(a.split("=", 1) for a in args if "=" in a)
        metrics = Path(sets["logging.run_dir"]) / sets["logging.run_name"] / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        sink = sets["attention.variant"] == "softmax"
        for r in records:
            r.update(bos_mass_non_trigger=(0.2 * r["step"] if sink else 0.01), bos_mass_trigger=0.05,
                     backcopy_loss=1.0 / r["step"], bos_value_norm=4.0 / r["step"] if sink else 4.0,
                     backcopy=[{"layer": 0, "bos_residual_norm": 10.0 * r["step"], "bos_mass_non_trigger": [0.5]}])
        metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        return done

    FakePopen.calls = []
    monkeypatch.setattr(study.subprocess, "Popen", type("SinkPopen", (FakePopen,), {
        "__init__": lambda self, args, **kw: setattr(self, "returncode", with_sink(args).returncode)}))
    out = tmp_path / "sink"
    assert study.main(["--config", "configs/opt_backcopy_sink.yaml", "--variants", "softmax,softmax1", "--steps", "4",
                       "--out", str(out)]) == 0, capsys.readouterr().err
    saved = json.loads((out / "study.json").read_text())["variants"]
    assert saved["softmax"]["bos_mass_non_trigger"] == 0.8 and saved["softmax1"]["bos_mass_non_trigger"] == 0.01
    assert [p["bos_value_norm"] for p in saved["softmax"]["trajectory"]] == [2.0, 1.0]
    assert [p["backcopy_layers"][0]["bos_residual_norm"] for p in saved["softmax"]["trajectory"]] == [20.0, 40.0]
    assert "| softmax | 0.800 | 0.050 |" in (out / "study.md").read_text()
    assert (out / "emergence.png").read_bytes()[:4] == b"\x89PNG"


def test_study_rejects_bad_input_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--variants", "softmax,bogus"], ["--variants", "softmax,softmax"], ["--steps", "0"],
                 ["--set", "eval.outlier_interval=null"], ["--set", "attention.nope=1"], ["--jobs", "0"]):
        assert study.main(["--config", "configs/opt_tiny.yaml", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (args, err)
    assert not (tmp_path / "x").exists()
