"""One writer per run directory: a second run stops with one line; a killed run leaves no stale lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_pretrain, tiny_overrides, train_losses
from checkpoint.runlock import LOCK_FILE, RunDirInUse, RunLock


def _hold(run_path: Path, ready: multiprocessing.synchronize.Event) -> None:
    RunLock(run_path).acquire()
    ready.set()
    time.sleep(60)


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunDirInUse, match=f"run directory {tmp_path} is in use by another run \\(pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        holder.join()
    lock = RunLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead holder's lock: nothing stale
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    lock.release()


@pytest.mark.slow
def test_second_run_on_the_same_directory_stops_with_one_line(data_cache: Path, tmp_path: Path) -> None:
    # The first run must still be training when the second starts, however fast the machine: it is given far
    # more steps than it can run in the test, and SIGTERM ends it.
    overrides = tiny_overrides(data_cache, tmp_path, **{"train.steps": 1_000_000, "train.checkpoint_interval": 10**7,
                                                          "eval.interval": 10**7, "eval.outlier_interval": "null",
                                                          "logging.run_name": "shared"})
    args = ["--config", "configs/opt_tiny.yaml"] + [x for o in overrides for x in ("--set", o)]
    first = subprocess.Popen([sys.executable, "-m", "launcher.pretrain", *args], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    run = tmp_path / "shared"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and train_losses(run)):
            time.sleep(0.5)
        second = run_pretrain(overrides)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"run directory {run} is in use by another run" in errors[0], errors
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    assert first.returncode == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no second series interleaved
