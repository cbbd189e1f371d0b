"""Slurm/submitit launch logic, graceful stop on signals, crash-safe checkpoints, and consolidation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_pretrain, tiny_overrides, train_losses
from launcher.checkpoint import read_latest, resolve_checkpoint, save_checkpoint
from launcher.slurm import expand_nodelist, launch_command
from model.errors import ProjectError


def test_nodelist_expansion() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_slurm_scripts_parse() -> None:
    for script in sorted((REPO / "slurm").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _fake_slurm_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(REPO), DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
    return env


def test_sbatch_script_builds_hostfile_and_deepspeed_command(tmp_path: Path) -> None:
    env = _fake_slurm_env(tmp_path)
    run_dir = tmp_path / "runs"
    result = subprocess.run(["bash", "slurm/opt_1b3.sh", "--set", f"logging.run_dir={run_dir}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    hostfile = run_dir / "opt_1b3" / "hostfile-4242"
    assert f"deepspeed --hostfile {hostfile} --master_addr gpu01 --master_port 29500 --force_multi --launcher slurm " \
           f"launcher/pretrain.py --config configs/opt_1b3.yaml --resume auto --set logging.run_dir={run_dir}" in line
    assert hostfile.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"


def test_requeue_only_after_a_signal_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher import slurm

    calls: list[list[str]] = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, check: calls.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    sets = [f"logging.run_dir={tmp_path}"]
    run = tmp_path / "opt_tiny"
    run.mkdir()
    assert not slurm.requeue_if_unfinished("configs/opt_tiny.yaml", sets)  # crashed before a summary
    (run / "summary.json").write_text(json.dumps({"completed": False, "stopped_by": "SIGUSR1"}))
    assert slurm.requeue_if_unfinished("configs/opt_tiny.yaml", sets)
    assert calls == [["scontrol", "requeue", "77"]]
    (run / "summary.json").write_text(json.dumps({"completed": True, "stopped_by": None}))
    assert not slurm.requeue_if_unfinished("configs/opt_tiny.yaml", sets)


def test_slurm_command_needs_an_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ProjectError, match="SLURM_JOB_NODELIST"):
        launch_command("configs/opt_1b3.yaml", [], tmp_path / "hostfile")


class _CrashingEngine:
    """Writes part of a checkpoint, then dies: what a kill during checkpoint writing leaves behind."""

    def __init__(self, crash: bool) -> None:
        self.crash = crash

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert save_latest is False  # DeepSpeed must never move `latest` itself
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if self.crash:
            raise KeyboardInterrupt("killed while writing")


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(_CrashingEngine(crash=False), tmp_path, 3, 0, {"data": {}}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_CrashingEngine(crash=True), tmp_path, 6, 0, {"data": {}}, keep=2)
    assert read_latest(tmp_path) == "step_3"
    assert resolve_checkpoint(tmp_path, world_size=1) == (tmp_path, "step_3")
    with pytest.raises(ProjectError, match="incomplete"):
        resolve_checkpoint(tmp_path / "step_6", world_size=1)
    save_checkpoint(_CrashingEngine(crash=False), tmp_path, 6, 0, {"data": {}}, keep=2)  # retried cleanly
    assert read_latest(tmp_path) == "step_6" and (tmp_path / "step_6" / "complete").is_file()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues(data_cache: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.steps": 400, "train.checkpoint_interval": 1000,
                                                          "eval.interval": 1000, "logging.run_name": "stopped"})
    args = ["--config", "configs/opt_tiny.yaml"] + [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "launcher.pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(train_losses(tmp_path / "stopped")) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and not summary["completed"]
    stopped_at = summary["steps"]
    assert read_latest(tmp_path / "stopped" / "checkpoints") == f"step_{stopped_at}"
    resumed = run_pretrain(overrides[:-1] + ["logging.run_name=stopped", f"train.exit_interval={stopped_at + 2}"],
                           resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = train_losses(tmp_path / "stopped")
    assert max(losses) == stopped_at + 2 and stopped_at + 1 in losses


@pytest.mark.slow
def test_tp2_pp2_checkpoint_consolidates_into_one_process(data_cache: Path, tmp_path: Path) -> None:
    from launcher.hf_checkpoint import load_full_state_dict
    from launcher.config import load_config
    from data_pipeline import load_or_train_tokenizer, validation_blocks
    from model.opt import OPTForCausalLM

    extra = {"train.steps": 3, "parallel.tensor": 2, "parallel.pipeline": 2, "parallel.zero_stage": 1,
             "train.micro_batch_size": 2, "eval.max_blocks": 8, "logging.run_name": "tp2pp2"}
    result = run_pretrain(tiny_overrides(data_cache, tmp_path, **extra), ranks=4, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run = tmp_path / "tp2pp2"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layout"] == {"tensor": 2, "pipeline": 2, "data": 1}

    out = tmp_path / "consolidated"
    done = subprocess.run([sys.executable, "-m", "parallel.consolidate", "--checkpoint", str(run / "checkpoints"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg, state = load_full_state_dict(out)
    model = OPTForCausalLM(cfg.model, seq_length=cfg.data.seq_length).eval()
    model.load_state_dict(state)
    # The same validation blocks as the TP2xPP2 run's final evaluation: the loss (a function of every
    # logit) of the consolidated single-process model equals the pipeline's.
    cfg.data.cache_dir = str(data_cache)
    blocks = validation_blocks(cfg.data, load_or_train_tokenizer(cfg.data), max_blocks=cfg.eval.max_blocks)
    with torch.no_grad():
        batch = torch.stack(blocks)
        loss = float(model(batch, labels=batch))
    assert loss == pytest.approx(summary["val_loss"], rel=1e-5)
    # the training checkpoint itself also loads through the same path (merging the shards on the fly)
    _, direct = load_full_state_dict(run / "checkpoints")
    assert all(torch.equal(direct[k], v) for k, v in state.items())


@pytest.mark.slow
def test_submitit_local_job_trains(data_cache: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.steps": 2, "eval.outlier_interval": "null"})
    args = ["--config", "configs/opt_tiny.yaml", "--local", "--tasks", "1"] + [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "launcher.submit", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "opt_tiny" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 2
