"""Every parallel layout against the single-process run (OPT and BERT), layout validation, and consolidation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
from model.config import ModelConfig
from model.errors import ConfigError
from parallel.layout import validate_layout

WORKER = Path(__file__).with_name("parallel_worker.py")


def _losses(tmp_path: Path, *, ranks: int, tp: int = 1, pp: int = 1, zero: int = 0) -> dict[str, list[float]]:
    out = tmp_path / f"losses_{ranks}_{tp}_{pp}_{zero}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TP=str(tp), PP=str(pp), ZERO=str(zero), OUT=str(out), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), str(WORKER)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    return _losses(tmp_path_factory.mktemp("single"), ranks=1)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,tp,pp,zero", [(2, 2, 1, 0), (2, 1, 2, 1), (4, 2, 2, 1), (2, 1, 1, 1)],
                         ids=["TP2", "PP2", "TP2xPP2", "DP2-ZeRO1"])
def test_layout_matches_single_process(single_process: dict[str, list[float]], tmp_path: Path, ranks: int, tp: int,
                                       pp: int, zero: int) -> None:
    got = _losses(tmp_path, ranks=ranks, tp=tp, pp=pp, zero=zero)
    for variant, expected in single_process.items():
        assert len(got[variant]) == len(expected) == 10
        assert got[variant] == pytest.approx(expected, rel=1e-4), variant
        assert expected[-1] < expected[0]  # it trained


def _validate(**overrides: int) -> None:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=102)
    args = dict(tensor=1, pipeline=1, zero_stage=0, world_size=4, micro_batch_size=1, global_batch_size=4)
    args.update(overrides)
    validate_layout(cfg, **args)


@pytest.mark.parametrize("overrides,key", [
    (dict(tensor=3, world_size=3, global_batch_size=1), "parallel.tensor"),  # 3 does not divide 4 heads
    (dict(tensor=4), "parallel.tensor"),  # a 102-token vocabulary does not split 4 ways
    (dict(pipeline=4), "parallel.pipeline"),  # more stages than layers
    (dict(pipeline=2, zero_stage=2), "parallel.zero_stage"),
    (dict(tensor=2, world_size=5), "parallel.tensor"),  # world not divisible by tp*pp
    (dict(tensor=2, global_batch_size=3), "train.global_batch_size"),
])
def test_invalid_layouts_fail_with_one_line(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _validate(**overrides)
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)
