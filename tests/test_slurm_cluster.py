"""End to end on a real local Slurm (two slurmd nodes on this host), each through the user's own command:
`sbatch slurm/<script>.sh --set ...` and `python -m launcher.submit`. Every job trains the tiny model as two
CPU ranks; losses are compared with a `deepspeed --num_gpus 2` run of the same config.

Needs Debian's slurmctld, slurmd, slurm-client and munge and root (`make test` installs them when it runs
as root, as CI does). Without them these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import REPO, run_pretrain, tiny_overrides
from slurm_cluster import SlurmCluster, add_node_names_to_hosts, catches_signal, job_processes, missing_requirements

pytestmark = pytest.mark.slow

STEPS = 300  # long enough (seconds) that a signal sent after step 2 lands mid-run, also on a loaded machine
# DP2 needs global = micro x 2; no periodic eval, outliers or checkpoints: only what a stop or the end writes.
# shard_by=blocks: the DP2 reference then reads the TP2 job's (one data-parallel rank's) global batches too.
RUN = {"train.steps": STEPS, "train.micro_batch_size": 2, "train.global_batch_size": 4, "eval.interval": STEPS,
       "train.checkpoint_interval": 1000, "eval.outlier_interval": "null", "data.shard_by": "blocks"}


def _strict_json(path: Path) -> dict[str, Any]:
    """summary.json parsed as JSON proper: a bare NaN/Infinity fails here (Python's json would accept it)."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl so far (a line being written is skipped)."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r["kind"] == "train"}


def _wait_until(condition: Callable[[], bool], what: str, cluster: SlurmCluster, job: str,
                timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = cluster.job(job)
        if state.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"):
            raise AssertionError(f"job {job} ended {state.get('JobState')} before {what}:\n{_log(state)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s (job {job} {state.get('JobState')})")
        time.sleep(0.2)


def _log(job: dict[str, str]) -> str:
    path = Path(job.get("StdOut", ""))
    return path.read_text(errors="replace")[-6000:] if path.is_file() else f"(no job log at {path})"


def _require_slurm() -> None:
    """Skip without a usable local Slurm, except under CI, where that is a failure (never a silent pass)."""
    add_node_names_to_hosts()
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    _require_slurm()
    # Jobs see this environment (sbatch exports it): no Slurm or torch.distributed variables of our own,
    # the venv's python for the scripts, and conftest's TORCH_EXTENSIONS_DIR (a built DeepSpeed op).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), env)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def reference(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of `deepspeed --num_gpus 2` on this machine, the same config as the jobs (DP2).
    Also builds DeepSpeed's CPU op into the shared cache before any job could be signalled during the build."""
    runs = tmp_path_factory.mktemp("reference")
    result = run_pretrain(tiny_overrides(data_cache, runs, **{**RUN, "logging.run_name": "reference"}), ranks=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = _losses(runs / "reference")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _sets(data_cache: Path, runs: Path, name: str, **extra: object) -> list[str]:
    return [x for o in tiny_overrides(data_cache, runs, **{**RUN, "logging.run_name": name, **extra})
            for x in ("--set", o)]


CPU_SCRIPT = str(REPO / "slurm" / "opt_tiny_cpu.sh")  # by absolute path: the tests submit from elsewhere


def test_sbatch_dp2_across_two_nodes_equals_deepspeed(cluster: SlurmCluster, reference: dict[int, float],
                                                      data_cache: Path, tmp_path: Path) -> None:
    # Submitted from a directory that is neither the repository nor has runs/ (the job log must still open).
    submit_dir = tmp_path / "elsewhere"
    submit_dir.mkdir()
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                         CPU_SCRIPT, *_sets(data_cache, tmp_path / "runs", "dp2"),
                         cwd=submit_dir)
    state = cluster.wait_finished(job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", _log(state)
    assert Path(state["StdOut"]) == submit_dir / f"slurm-opt_tiny_cpu-{job}.out"
    summary = _strict_json(tmp_path / "runs" / "dp2" / "summary.json")
    assert summary["world_size"] == 2 and summary["layout"] == {"tensor": 1, "pipeline": 1, "data": 2}, _log(state)
    assert summary["completed"] and summary["attempt"] == f"{job}.0"
    assert _losses(tmp_path / "runs" / "dp2") == pytest.approx(reference, rel=1e-6)
    log = _log(state)
    assert "2 rank(s) as TP1 x PP1 x DP2" in log
    assert f"[requeue] done: run dp2 completed at step {STEPS}: not requeued" in log


def test_gpu_script_on_cpu_partition_one_node_tp2(cluster: SlurmCluster, reference: dict[int, float],
                                                 data_cache: Path, tmp_path: Path) -> None:
    """The 8-GPU script as it is, on CPU nodes by options alone: 1 node x 2 tasks as TP2 (a layout, not DP)."""
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                         str(REPO / "slurm" / "opt_125m.sh"),
                         *_sets(data_cache, tmp_path / "runs", "tp2", **{"parallel.tensor": 2}),
                         cwd=tmp_path, env={"CONFIG": "configs/opt_tiny.yaml"})
    state = cluster.wait_finished(job)
    assert state["JobState"] == "COMPLETED", _log(state)
    summary = _strict_json(tmp_path / "runs" / "tp2" / "summary.json")
    assert summary["world_size"] == 2 and summary["layout"] == {"tensor": 2, "pipeline": 1, "data": 1}
    # TP2 reduces in another order than DP2: equal up to float rounding (tests/test_parallel.py: 1e-5).
    assert _losses(tmp_path / "runs" / "tp2") == pytest.approx(reference, rel=1e-4)


def test_usr1_mid_run_checkpoints_requeues_and_resumes(cluster: SlurmCluster, reference: dict[int, float],
                                                       data_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "stopped"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", CPU_SCRIPT,
                         *_sets(data_cache, tmp_path / "runs", "stopped"), cwd=tmp_path)
    _wait_until(lambda: len(_losses(run)) >= 2, "two training steps", cluster, job)
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait(job, lambda j: j.get("JobState") == "COMPLETED" or j.get("JobState") == "FAILED")
    log = _log(state)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    stopped = re.search(r"\[requeue\] requeued: run stopped stopped by SIGUSR1 at step (\d+) and checkpointed", log)
    assert stopped, log
    assert 2 <= int(stopped.group(1)) < STEPS
    resumed = [r for r in _records(run) if r["kind"] == "event" and "resumed_from" in r]
    assert [r["resumed_from"] for r in resumed] == [str(run / "checkpoints" / f"step_{stopped.group(1)}")]
    summary = _strict_json(run / "summary.json")
    assert summary["completed"] and summary["world_size"] == 2 and summary["attempt"] == f"{job}.1"
    assert _losses(run) == pytest.approx(reference, rel=1e-6)  # as if never interrupted


def test_signal_before_training_still_requeues(cluster: SlurmCluster, reference: dict[int, float],
                                               data_cache: Path, tmp_path: Path) -> None:
    """USR1 while the ranks are still starting (importing torch, before any process group): recorded, not
    fatal; every rank stops after its first step, checkpoints, and the job requeues and finishes the run."""
    run = tmp_path / "runs" / "early"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", CPU_SCRIPT,
                         *_sets(data_cache, tmp_path / "runs", "early"), cwd=tmp_path)

    def ranks_catch_usr1() -> bool:  # both ranks have run pretrain.py's first lines
        ranks = job_processes(job, "0", "launcher/pretrain.py")
        return len(ranks) == 2 and all(catches_signal(pid, signal.SIGUSR1) for pid in ranks)

    _wait_until(ranks_catch_usr1, "ranks with a SIGUSR1 handler", cluster, job)
    assert not (run / "config.yaml").exists()  # train() writes it once the process group is up: not yet
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait(job, lambda j: j.get("JobState") in ("COMPLETED", "FAILED"))
    log = _log(state)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    assert "[requeue] requeued: run early stopped by SIGUSR1 at step 1 and checkpointed" in log
    summary = _strict_json(run / "summary.json")
    assert summary["completed"] and summary["world_size"] == 2
    assert _losses(run) == pytest.approx(reference, rel=1e-6)


def test_crash_after_requeue_is_not_requeued_again(cluster: SlurmCluster, data_cache: Path, tmp_path: Path) -> None:
    """Stop (requeued), then make the next attempt crash: the earlier stop's summary must not requeue it again.

    The stop comes before the first log interval, so summary.json has no train loss yet: null, not NaN."""
    run = tmp_path / "runs" / "crash"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", CPU_SCRIPT,
                         *_sets(data_cache, tmp_path / "runs", "crash",
                                **{"train.steps": 10_000, "logging.log_interval": 10_000}), cwd=tmp_path)
    _wait_until(lambda: "rank(s) as TP1 x PP1 x DP2" in _log(cluster.job(job)), "training start", cluster, job)
    cluster.run("scancel", "--signal=USR1", job)
    # Requeued jobs wait ~10 s (cred_expire) before they start again: hold it there.
    cluster.wait(job, lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING", timeout=120)
    cluster.run("scontrol", "hold", job)
    summary = _strict_json(run / "summary.json")
    assert summary["stopped_by"] == "SIGUSR1" and not summary["completed"] and summary["train_loss"] is None
    assert summary["attempt"] == f"{job}.0"
    for shard in (Path(summary["checkpoint"])).glob("*.pt"):  # the resume will fail to load it: a crash
        shard.write_bytes(b"not a checkpoint")
    cluster.run("scontrol", "release", job)
    state = cluster.wait_finished(job)
    log = _log(state)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", log
    line = f"[requeue] done: attempt {job}.1 failed with exit status"
    assert sum(line in text for text in log.splitlines()) == 1, log
    assert "not requeued (a crash would fail the same way again" in log


def test_submitit_job_trains_and_survives_preemption(cluster: SlurmCluster, reference: dict[int, float],
                                                     data_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "submitit"
    args = ["--config", "configs/opt_tiny.yaml", "--nodes", "1", "--tasks-per-node", "2", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--timeout-min", "30", *_sets(data_cache, tmp_path / "runs", "submitit")]
    result = cluster.run(sys.executable, "-m", "launcher.submit", *args, cwd=REPO,
                         env={"PYTHONPATH": str(REPO)}, timeout=120)
    job = re.search(r"submitted job (\d+) \(slurm\)", result.stdout)
    assert job, result.stdout + result.stderr
    job_id = job.group(1)
    _wait_until(lambda: len(_losses(run)) >= 2, "two training steps", cluster, job_id)
    cluster.run("scancel", "--signal=USR2", job_id)  # submitit's preemption / time-limit signal
    state = cluster.wait(job_id, lambda j: j.get("JobState") in ("COMPLETED", "FAILED"))
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((run / "submitit").glob("*.out")))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", logs
    summary = _strict_json(run / "summary.json")
    assert summary["completed"] and summary["world_size"] == 2
    assert any(r["kind"] == "event" and "resumed_from" in r for r in _records(run))
    assert _losses(run) == pytest.approx(reference, rel=1e-6)


def _processes_mentioning(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (how the fixture's daemons are recognised)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_cluster_fixture_stops_every_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teardown leaves no daemon behind, also when start-up fails half-way (here: the nodes never report idle,
    after munged, slurmctld and both slurmd were started)."""
    _require_slurm()
    cluster = SlurmCluster.start(tmp_path / "own", dict(os.environ))
    assert len(_processes_mentioning(tmp_path / "own")) == 4  # munged, slurmctld, 2 slurmd
    cluster.stop()
    assert not _processes_mentioning(tmp_path / "own")
    monkeypatch.setattr(SlurmCluster, "_nodes_idle", lambda self: False)
    with pytest.raises(TimeoutError):
        SlurmCluster.start(tmp_path / "broken", dict(os.environ), timeout=1)
    assert not _processes_mentioning(tmp_path / "broken")
