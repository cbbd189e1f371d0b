"""`python -m benchmarks.gpu_check --quick`: every section of the GPU check at toy sizes on CPU (so the script
cannot rot between GPU loans), its JSON and markdown report, time-boxing and failure recording."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_report, gpu_sections  # noqa: E402
from benchmarks.gpu_check import FAULT_ENV  # noqa: E402
from benchmarks.gpu_sections import NO_CUDA  # noqa: E402

SECTIONS = ["env", "kernels", "attention", "training", "outliers", "resume"]


def _gpu_check(out: Path, *args: str, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("gpu_check")
    result = _gpu_check(out)
    assert (out / "report.json").exists(), result.stderr[-4000:]
    return out, json.loads((out / "report.json").read_text()), result


def test_quick_run_passes_every_section_within_its_limit(quick) -> None:
    out, report, result = quick
    assert result.returncode == 0, result.stderr[-4000:]
    assert report["ok"] and report["quick"] and report["failed"] == []
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] == "passed", (name, section.get("error"))
        assert 0 < section["wall_s"] <= section["limit_s"] and section["failures"] == []
        assert (out / section["log"]).stat().st_size > 0
    assert report["wall_s"] < report["deadline_s"]
    assert not (out / "work").exists()  # the scratch folder (data cache, runs, checkpoints) is removed
    assert "[6/6] resume" in result.stderr and "gpu_check: all passed" in result.stderr


def test_quick_sections_ran_the_code_and_mark_gpu_steps_skipped(quick) -> None:
    _, report, _ = quick
    sections = {name: s["results"] for name, s in report["sections"].items()}
    env = sections["env"]
    assert env["gpu"] == NO_CUDA and env["torch"] and env["deepspeed"] != "not installed"
    assert env["auto_backend_softmax1"] == "sdpa"

    kernels = sections["kernels"]  # a few kernel tests under Triton's interpreter
    assert kernels["passed"] >= 3 and kernels["failed"] == [] and NO_CUDA in kernels["mode"]

    attention = sections["attention"]
    rows = attention["rows"]
    assert len(rows) == 2 * 2 * 4  # head dims x lengths x methods
    for row in rows:
        if "triton" in row["method"]:
            assert row["skipped"] == NO_CUDA and "time_ms" not in row
        else:
            assert row["time_ms"] > 0 and row["tflops"] > 0 and row["peak_mib"] > 0
            assert row["batch"] * row["seq"] == attention["tokens_per_batch"]
    assert all(r["ratio"] == 1.0 for r in rows if r["method"] == "softmax (sdpa)")
    for key, exponents in attention["memory_exponent"].items():  # flash SDPA's memory is linear in T
        if key.startswith("softmax (sdpa)"):
            assert exponents and all(0.8 < x < 1.2 for x in exponents), (key, exponents)

    training = sections["training"]["rows"]
    assert [r["model"] for r in training[:3]] == ["ours (softmax)", "ours (softmax1)", "transformers (sdpa)"]
    assert len(training) == 9
    for row in training:
        assert row["tokens_per_s"] > 0 and row["mfu"] == NO_CUDA and row["peak_gib"] == NO_CUDA
        assert all(math.isfinite(x) for x in row["losses"]) and row["loss_last"] < row["loss_first"]

    outliers = sections["outliers"]
    assert outliers["val_blocks"] > 0 and outliers["calibration_blocks"] > 0 and outliers["eval_s"] > 0
    assert math.isfinite(outliers["w8a8_val_ppl"]) and math.isfinite(outliers["max_inf_norm"])

    resume = sections["resume"]
    assert len(resume["losses_straight"]) == len(resume["losses_resumed"]) == resume["steps"]
    assert resume["max_diff_after"] <= resume["tolerance"] and isinstance(resume["bit_identical"], bool)


def test_markdown_report_has_every_section(quick) -> None:
    out, report, result = quick
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# GPU check") and "all sections passed" in markdown
    for name, section in report["sections"].items():
        assert f"| {name} | {section['title']} | passed |" in markdown
    for heading in ("## Environment", "## Kernel tests", "## Attention", "## Training", "## Outlier", "## bf16 resume"):
        assert heading in markdown
    assert NO_CUDA in markdown
    assert result.stdout.strip() == markdown.strip()  # the table printed at the end is the report
    assert gpu_report.format_markdown(json.loads((out / "report.json").read_text())) == markdown.strip()


def test_failed_and_hung_sections_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    # env raises; attention (run after it all the same) hangs and is killed at the deadline, keeping its partial
    result = _gpu_check(tmp_path, "--only", "env", "attention", "--deadline", "10", "--json", timeout=120,
                        env={FAULT_ENV: "env:fail,attention:hang"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(result.stdout) == report  # --json prints the report instead of the tables
    assert result.returncode == 1, result.stderr[-3000:]
    assert list(report["sections"]) == ["env", "attention"] and report["failed"] == ["env", "attention"]
    env, attention = report["sections"]["env"], report["sections"]["attention"]
    assert env["error"] == f"RuntimeError: injected fault ({FAULT_ENV})"
    assert attention["error"].startswith("timed out after") and attention["results"] == {"injected": "hang"}
    assert attention["wall_s"] < 15
    assert "FAILED: env, attention" in (tmp_path / "report.md").read_text()
    assert "Traceback" in (tmp_path / env["log"]).read_text()  # the whole error is in the section's log


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    result = _gpu_check(tmp_path, "--only", "nope", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: unknown section(s) nope")


# ------------------------------------------------------------------------ helpers the GPU run relies on

def test_gpu_training_cases_read_the_published_shapes() -> None:
    cases = gpu_sections.train_cases(SimpleNamespace(cuda=True))  # the GPU branch, without a GPU
    assert [(c.name, c.seq, c.batch) for c in cases] == [("OPT-125m", 2048, 8), ("OPT-125m", 512, 32),
                                                         ("OPT-1.3B", 2048, 8)]
    small, large = cases[0], cases[2]
    assert small.shape == dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=50272) and small.lr == 4e-4
    assert large.shape == dict(layers=24, hidden=2048, heads=32, ffn=8192, vocab=50272) and large.lr == 2e-4
    assert small.dropout == large.dropout == 0.1


@pytest.mark.parametrize("cuda", [True, False])
def test_run_configs_are_offline_and_valid(cuda: bool, tmp_path: Path) -> None:
    """The outliers/resume sections' launcher config (GPU: the 125M model) reads only the bundled sample."""
    from launcher.config import load_config

    config, overrides = gpu_sections._run_overrides(SimpleNamespace(cuda=cuda, work=tmp_path), "run")
    cfg = load_config(REPO / config, overrides)
    assert cfg.data.source == "wiki_sample" and cfg.data.sources == [] and cfg.run_path == tmp_path / "runs" / "run"
    assert (cfg.model.num_layers, cfg.model.hidden_size) == ((12, 768) if cuda else (2, 32))


def test_loss_checks_and_memory_exponents() -> None:
    assert gpu_sections.loss_falls([10.0, 10.2, 9.0, 8.0]) and not gpu_sections.loss_falls([10.0, 9.0, 10.5, 10.1])
    assert gpu_sections.largest_difference({1: 1.0, 2: 2.0}, {1: 1.5, 2: 2.0}, range(1, 3)) == 0.5
    rows = [{"method": "m", "head_dim": 64, "seq": t, "batch": 16384 // t, "peak_mib": mib}
            for t, mib in [(1024, 100.0), (2048, 100.0), (4096, 200.0)]]
    # per sequence: 6.25, 12.5, 50 MiB -> linear, then quadratic
    assert gpu_sections.memory_exponents(rows) == {"m d=64": [1.0, 2.0]}
    rows = [{"method": "softmax1 (triton)", "head_dim": d, "seq": 2048, "ratio": r} for d, r in [(64, 1.05), (128, 1.3)]]
    assert gpu_sections.target_summary(rows) == ["d=64: 1.05x flash SDPA (target <= 1.1x: met)",
                                                 "d=128: 1.30x flash SDPA (target <= 1.1x: missed)"]


def test_markdown_of_a_gpu_shaped_report() -> None:
    """The GPU run's number formats (MFU in %, peak GiB, an unknown GPU's missing MFU), without a GPU."""
    row = {"case": "OPT-125m", "seq": 2048, "batch": 8, "model": "ours (softmax1)", "tokens_per_s": 123456.0,
           "ratio_to_transformers": 1.25, "model_tflops": 300.5, "mfu": 0.3038, "peak_gib": 12.5, "loss_first": 10.9,
           "loss_last": 7.25}
    report = {"quick": False, "started": "now", "ok": False, "failed": ["kernels"], "wall_s": 300.0,
              "deadline_s": 480.0, "sections": {
                  "env": {"title": "Environment", "status": "passed", "wall_s": 1.0, "budget_s": 20,
                          "results": {"gpu": "NVIDIA H200", "torch": "2.11.0"}},
                  "kernels": {"title": "Kernel tests", "status": "failed", "wall_s": 50.0, "budget_s": 110,
                              "error": "1 kernel test(s) failed | x", "results": {}},
                  "training": {"title": "Training", "status": "passed", "wall_s": 90.0, "budget_s": 150,
                               "results": {"optimizer": "AdamW", "warmup": 3, "steps": 20, "mfu": "ratio",
                                           "datasheet_bf16_tflops": 989.0,
                                           "rows": [row, {**row, "mfu": None, "peak_gib": None}]}}}}
    markdown = gpu_report.format_markdown(report)
    assert markdown.startswith("# GPU check, now: NVIDIA H200") and "FAILED: kernels" in markdown
    assert "| kernels | Kernel tests | failed | 50.0 | 110 | 1 kernel test(s) failed / x |" in markdown
    assert "| 123,456 | 1.25x | 300 | 30.4% | 12.50 | 10.900 -> 7.250 |" in markdown
    assert "| 123,456 | 1.25x | 300 | - | - | 10.900 -> 7.250 |" in markdown
