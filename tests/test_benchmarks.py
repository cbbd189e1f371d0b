"""Smoke runs of the performance benchmarks at tiny sizes (their JSON output and what it must show)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO))


def _run(module: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", module, *args, "--json"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_attention_benchmark_json_memory_growth_and_eager_limit() -> None:
    out = _run("benchmarks.attention", "--seq", "32", "64", "128", "--heads", "2", "--head-dim", "16", "--reps", "1",
               "--eager-max-seq", "64", "--device", "cpu")
    assert out["auto_backend"] == "sdpa" and out["config"]["seq"] == [32, 64, 128]
    rows = {(r["seq"], r["method"]): r for r in out["results"]}
    assert {m for _, m in rows} == {"softmax (sdpa)", "softmax1 (auto)", "softmax1 (eager)", "softmax1 (sdpa zero key)"}
    eager_128 = rows.pop((128, "softmax1 (eager)"))
    assert "skipped" in eager_128 and "time_ms" not in eager_128
    for row in rows.values():
        assert row["time_ms"] > 0 and row["ratio"] > 0 and row["peak_mib"] > 0
    assert rows[(64, "softmax (sdpa)")]["ratio"] == 1.0

    def growth(method: str, t: int) -> float:
        return rows[(2 * t, method)]["peak_mib"] / rows[(t, method)]["peak_mib"]

    # doubling T: the fused paths' memory doubles (linear), the materialised reference's nearly quadruples
    assert 1.8 < growth("softmax1 (auto)", 64) < 2.2 and 1.8 < growth("softmax (sdpa)", 64) < 2.2
    assert growth("softmax1 (eager)", 32) > 3.0
    from benchmarks.attention import format_table

    table = format_table(out)
    assert "softmax1 (auto)" in table and "skipped" in table and "(^1.00)" in table


def test_throughput_benchmark_quick_json() -> None:
    out = _run("benchmarks.throughput", "--quick", "--device", "cpu")
    names = [r["model"] for r in out["results"]]
    assert names == ["ours (softmax)", "ours (softmax1)", "transformers (sdpa)"]
    assert out["flops_per_token"] > 0 and out["matmul_peak_tflops"] > 0
    for row in out["results"]:
        assert row["tokens_per_s"] > 0 and row["ratio_to_transformers"] > 0 and 0 < row["mfu"]
    assert out["results"][-1]["ratio_to_transformers"] == 1.0
    from benchmarks.throughput import format_table

    assert "vs transformers" in format_table(out)
