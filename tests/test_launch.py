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
from checkpoint.store import read_latest, resolve_checkpoint, save_checkpoint
from launcher.distributed import export_torch_env, world_from_env
from launcher.slurm import expand_nodelist, launch_command, tasks_per_node
from common.errors import ProjectError


def test_nodelist_expansion() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_slurm_scripts_parse() -> None:
    for script in sorted((REPO / "slurm").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _fake_slurm_env(**extra: str) -> dict[str, str]:
    """A batch step's environment as Slurm sets it for `--nodes=2 --ntasks-per-node=8 --gpus-per-node=8`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NODELIST="gpu[01-02]", SLURM_TASKS_PER_NODE="8(x2)", SLURM_NTASKS="16",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="12", SLURM_JOB_ID="4242", DRY_RUN="1",
               PYTHON=sys.executable, PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def test_sbatch_script_builds_hostfile_and_deepspeed_command(tmp_path: Path) -> None:
    """Run from another directory by path (no sbatch here: the script finds the repository from $0)."""
    env = _fake_slurm_env()
    run_dir = tmp_path / "runs"
    result = subprocess.run(["bash", str(REPO / "slurm" / "opt_1b3.sh"), "--set", f"logging.run_dir={run_dir}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    hostfile = run_dir / "opt_1b3" / "hostfile-4242"
    # The ranks' environment: threads from --cpus-per-task, rank 0's host and a port from the job id.
    assert f"env OMP_NUM_THREADS=12 MASTER_ADDR=gpu01 MASTER_PORT=14242 SRUN_CPUS_PER_TASK=12 deepspeed --hostfile " \
           f"{hostfile} --master_addr gpu01 --master_port 14242 --no_ssh_check --force_multi --launcher slurm " \
           f"launcher/pretrain.py --config configs/opt_1b3.yaml --resume auto --set logging.run_dir={run_dir}" in line
    assert hostfile.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"


def test_cpu_allocation_gets_slots_from_tasks(tmp_path: Path) -> None:
    """`--gpus-per-node=0 --ntasks-per-node=2` on CPU nodes: two slots per node (slots=0 made srun fail)."""
    env = _fake_slurm_env(SLURM_JOB_NODELIST="n[1-2]", SLURM_TASKS_PER_NODE="2(x2)", SLURM_NTASKS="4",
                          SLURM_GPUS_ON_NODE="0", SLURM_CPUS_PER_TASK="3")
    cmd = launch_command("configs/opt_tiny.yaml", [f"logging.run_dir={tmp_path}", "train.micro_batch_size=2"],
                         tmp_path / "hostfile", env=env)
    assert (tmp_path / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    assert cmd[:3] == ["env", "OMP_NUM_THREADS=3", "MASTER_ADDR=n1"]
    assert tasks_per_node({**env, "SLURM_JOB_NODELIST": "a[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}) == [2, 2, 1]


@pytest.mark.parametrize("extra, message", [
    # 3 nodes x 8 ranks: 512 is not a multiple of micro-batch 8 x 24 data-parallel ranks
    ({"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_TASKS_PER_NODE": "8(x3)"},
     "error: config key 'train.global_batch_size' = 512: must be a multiple of micro_batch_size x data-parallel "
     "ranks = 192"),
    ({"SLURM_TASKS_PER_NODE": "1(x2)"}, "error: 8 GPUs but 1 task(s) on the first node: one rank per GPU"),
])
def test_sbatch_script_checks_the_real_world_before_launching(tmp_path: Path, extra: dict[str, str],
                                                            message: str) -> None:
    result = subprocess.run(["bash", "slurm/opt_1b3.sh", "--set", f"logging.run_dir={tmp_path}"], cwd=REPO,
                            env=_fake_slurm_env(**extra), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "deepspeed" not in result.stdout


def _summary(run: Path, **values: object) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(json.dumps({"steps": 3, **values}))


def test_requeue_decision_trusts_only_this_attempt(tmp_path: Path) -> None:
    from launcher.config import load_config
    from launcher.slurm import requeue_decision

    cfg = load_config("configs/opt_tiny.yaml", [f"logging.run_dir={tmp_path}"])
    run = tmp_path / "opt_tiny"
    first, second = {"SLURM_JOB_ID": "77"}, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    _summary(run, completed=False, stopped_by="SIGUSR1", attempt="77.0")
    assert requeue_decision(cfg, 0, first)[0]  # stopped on a signal and checkpointed: requeue
    # The requeued attempt crashed, or ended without a summary of its own: the old stop does not count.
    assert requeue_decision(cfg, 1, second) == (False, "attempt 77.1 failed with exit status 1: not requeued (a "
                                                "crash would fail the same way again; fix it and resubmit)")
    assert not requeue_decision(cfg, 0, second)[0]
    # Killed by the stop signal before the handler existed (interpreter start-up): a stop, not a crash.
    assert requeue_decision(cfg, 138, second)[0]
    _summary(run, completed=True, stopped_by=None, attempt="77.1")
    assert requeue_decision(cfg, 0, second) == (False, "run opt_tiny completed at step 3: not requeued")
    _summary(run, completed=False, stopped_by="SIGTERM", attempt="77.1")
    assert not requeue_decision(cfg, 2, second)[0]  # failed after writing its summary (e.g. a rank crashed)


def test_requeue_if_unfinished_calls_scontrol_only_to_requeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from launcher import slurm
    from launcher.config import load_config

    calls: list[list[str]] = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, check: calls.append(cmd))
    cfg = load_config("configs/opt_tiny.yaml", [f"logging.run_dir={tmp_path}"])
    _summary(tmp_path / "opt_tiny", completed=False, stopped_by="SIGUSR1", attempt="77.0")
    assert slurm.requeue_if_unfinished(cfg, 0, {"SLURM_JOB_ID": "77"})
    assert not slurm.requeue_if_unfinished(cfg, 1, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert calls == [["scontrol", "requeue", "77"]]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[requeue] requeued: run opt_tiny stopped by SIGUSR1 at step 3")
    assert lines[1].startswith("[requeue] done: attempt 77.1 failed with exit status 1")

    def refuse(cmd: list[str], check: bool) -> None:
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(slurm.subprocess, "run", refuse)  # e.g. a cluster with JobRequeue=0
    with pytest.raises(ProjectError, match="scontrol requeue 77 failed .*; resubmit the same command"):
        slurm.requeue_if_unfinished(cfg, 0, {"SLURM_JOB_ID": "77"})


def test_slurm_command_needs_an_allocation(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="SLURM_JOB_NODELIST"):
        launch_command("configs/opt_1b3.yaml", [], tmp_path / "hostfile", env={})


def test_world_from_srun_environment() -> None:
    """DeepSpeed's `--launcher slurm` starts `srun -n N python ...`: the rank layout comes from Slurm's variables."""
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_JOB_ID": "20007", "SLURM_STEP_NODELIST": "n[7-8]"}
    world = world_from_env(step)
    assert (world.rank, world.world_size, world.local_rank) == (3, 4, 1)
    env = dict(step)
    export_torch_env(world, env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("n7", "10007")  # task 0's node; 10000 + job id % 20000
    # A launcher's own variables win (deepspeed's local launch or torchrun inside an allocation).
    assert world_from_env({**step, "RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}).world_size == 8
    assert world_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).world_size == 1  # batch step, one task


def test_trainer_outside_srun_in_a_multi_task_job_stops_with_one_line(tmp_path: Path) -> None:
    """The batch step of a 2-task job (SLURM_NTASKS=2, no srun step): never train alone as a world of one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_JOB_ID="5", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "launcher.pretrain", "--config", "configs/opt_tiny.yaml", "--set",
                             f"logging.run_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: this Slurm job has SLURM_NTASKS=2 tasks but the trainer was started once, outside "
                      "srun: start one rank per task with srun (as slurm/*.sh do) or submit with --ntasks=1"]
    assert not (tmp_path / "opt_tiny").exists()


def test_process_group_of_another_size_stops_with_one_line(tmp_path: Path) -> None:
    """A group that exists already with another size than the launcher intended (here 1 vs SLURM_NTASKS=2)."""
    code = f"""
import torch.distributed as dist
from launcher.distributed import WorldInfo, init_process_group
from common.errors import ProjectError
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
try:
    init_process_group(WorldInfo(rank=0, world_size=2, local_rank=0, source="srun (SLURM_PROCID/SLURM_NTASKS)"))
except ProjectError as error:
    print(error)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip().splitlines()[-1] == (
        "process group has rank 0 of 1 but the launcher intended rank 0 of 2 (srun (SLURM_PROCID/SLURM_NTASKS)): "
        "refusing to train in a different world"), result.stderr[-2000:]


def test_summary_json_is_strict_json() -> None:
    from launcher.json_safe import dumps

    text = dumps({"train_loss": float("nan"), "nested": [float("inf"), 1.5, {"x": -float("inf")}], "n": 3})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}")) == {
        "train_loss": None, "nested": [None, 1.5, {"x": None}], "n": 3}


def test_graceful_stop_hands_a_signal_on_only_after_a_normal_return() -> None:
    from launcher.signals import GracefulStop

    seen: list[int] = []

    def theirs(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, theirs)
    try:
        with GracefulStop.installed() as stopper:
            with GracefulStop.installed() as inner:  # one handler per process: nested callers share it
                assert inner is stopper and GracefulStop.install() is stopper
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stopper.received == signal.SIGUSR1 and not seen  # recorded, not passed on yet
        assert seen == [signal.SIGUSR1]  # the previous handler (e.g. submitit's requeue) got it afterwards
        with pytest.raises(RuntimeError):
            with GracefulStop.installed():
                os.kill(os.getpid(), signal.SIGUSR1)
                raise RuntimeError("crash")
        assert seen == [signal.SIGUSR1]  # a crash is not handed on as a stop
        assert signal.getsignal(signal.SIGUSR1) is theirs and GracefulStop._current is None  # restored
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _NoState:
    """A checkpoint component with nothing to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
    save_checkpoint(_CrashingEngine(crash=False), tmp_path, 3, 0, {"data": _NoState()}, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_CrashingEngine(crash=True), tmp_path, 6, 0, {"data": _NoState()}, keep=2)
    assert read_latest(tmp_path) == "step_3"
    assert resolve_checkpoint(tmp_path, world_size=1) == (tmp_path, "step_3")
    with pytest.raises(ProjectError, match="incomplete"):
        resolve_checkpoint(tmp_path / "step_6", world_size=1)
    save_checkpoint(_CrashingEngine(crash=False), tmp_path, 6, 0, {"data": _NoState()}, keep=2)  # retried cleanly
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
    done = subprocess.run([sys.executable, "-m", "launcher.consolidate", "--checkpoint", str(run / "checkpoints"),
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
