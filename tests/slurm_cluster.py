"""A real two-node Slurm (Debian's Slurm 22.05 daemons) on localhost for the end-to-end launch tests.

`SlurmCluster.start(folder)` writes a slurm.conf into `folder`, starts `munged` (own key and socket),
`slurmctld` and two `slurmd -N n1|n2` in the foreground as child processes, and waits until both nodes
are idle; `stop()` cancels every job, waits for it to leave, then terminates and waits for each daemon
(killing it if it does not exit). Nothing is installed here: `make test` installs the packages.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def missing_requirements() -> str | None:
    """Why a local Slurm cannot run here (None when it can)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}); `make test` installs Debian's slurmctld "
                f"slurmd slurm-client munge when run as root")
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts jobs as their user)"
    unresolved = [node for node in NODES if not _resolves_to_loopback(node)]
    if unresolved:
        return f"node names {', '.join(unresolved)} do not resolve to 127.0.0.1 (add them to /etc/hosts)"
    return None


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def add_node_names_to_hosts(hosts: Path = Path("/etc/hosts")) -> None:
    """Make n1, n2 resolve to 127.0.0.1 (idempotent; only root can write /etc/hosts)."""
    missing = [node for node in NODES if not _resolves_to_loopback(node)]
    if missing and os.access(hosts, os.W_OK):
        with hosts.open("a") as handle:
            handle.write(f"127.0.0.1 {' '.join(missing)}  # outeffhop test Slurm nodes\n")


def catches_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/<pid>/status): False if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(caught and int(caught.group(1), 16) >> (signum - 1) & 1)


def job_processes(job_id: str, step: str, command_part: str) -> list[int]:
    """PIDs on this host of a job step's processes (SLURM_JOB_ID / SLURM_STEP_ID in their environment) whose
    command line contains `command_part`; only read, never signalled (scancel does that)."""
    marks = (f"SLURM_JOB_ID={job_id}\0".encode(), f"SLURM_STEP_ID={step}\0".encode())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ, cmdline = (proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if all(mark in environ for mark in marks) and command_part.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def slurm_conf(folder: Path, ctld_port: int, node_ports: list[int]) -> str:
    lines = [
        "ClusterName=outeffhop-test", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root", f"AuthInfo=socket={folder / 'munge.socket'},cred_expire=10",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={folder / 'jobcomp.txt'}", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        # Job ids (and so the jobs' rendezvous ports, 10000 + id) differ between clusters running at once.
        f"FirstJobId={random.randrange(1000, 19000)}", "JobRequeue=1", "ReturnToService=2", "MpiDefault=none",
        "MailProg=/bin/true",
        "SchedulerParameters=sched_interval=2,bf_interval=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
        "KillWait=10", "InactiveLimit=0", "MinJobAge=300", "SlurmctldDebug=info", "SlurmdDebug=info",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool-%n'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd-%n.log'}",
        *(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN"
          for node, port in zip(NODES, node_ports)),
        f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    folder: Path
    env: dict[str, str]  # the environment every client command (and so every job) sees
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def start(cls, folder: Path, env: dict[str, str], timeout: float = 60) -> SlurmCluster:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state").mkdir(exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        conf = folder / "slurm.conf"
        conf.write_text(slurm_conf(folder, ctld_port, node_ports))
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        cluster = cls(folder, {**env, "SLURM_CONF": str(conf)})
        try:
            cluster._spawn("munged", [_daemon("munged"), "-F", "--force", f"--key-file={key}",
                                      f"--socket={folder / 'munge.socket'}", f"--pid-file={folder / 'munged.pid'}",
                                      f"--seed-file={folder / 'munged.seed'}", f"--log-file={folder / 'munged.log'}"])
            cluster._wait_for(lambda: (folder / "munge.socket").exists(), timeout, "munged's socket")
            cluster._spawn("slurmctld", [_daemon("slurmctld"), "-D", "-i", "-f", str(conf)])
            for node in NODES:
                cluster._spawn(f"slurmd-{node}", [_daemon("slurmd"), "-D", "-N", node, "-f", str(conf)])
            cluster._wait_for(cluster._nodes_idle, timeout, "both nodes idle")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.folder / f"{name}.out").open("wb")
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def _wait_for(self, condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [name for name, proc in self.processes.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in NODES)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit as a user does (`sbatch [options] script [script args]`); returns the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} once it is purged."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, condition, timeout: float = 300) -> dict[str, str]:  # type: ignore[no-untyped-def]
        """Poll the job until `condition(job)` holds; a TimeoutError names the last state and the logs."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.get('JobState')} (Restarts={job.get('Restarts')}) "
                                   f"after {timeout:.0f} s:\n{self.logs(15)}")
            time.sleep(0.5)

    def wait_finished(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return self.wait(job_id, lambda job: job.get("JobState") in FINISHED, timeout)

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job and wait for it to leave, then stop each daemon and wait for it."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # squeue lists pending, running and completing jobs
                if not self.run("squeue", "-h", check=False).stdout.strip():
                    break
                time.sleep(0.5)
        for name in sorted(self.processes, key=lambda n: ("slurmd" not in n, n != "slurmctld")):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self.processes.clear()
