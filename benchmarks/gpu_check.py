"""One prepared GPU check: validate every CUDA path of this project and measure its speed, in one command.

    python -m benchmarks.gpu_check [--out DIR] [--quick] [--only SECTION ...] [--deadline SECONDS] [--json]

Sections, in order (budgets in seconds on one H100/H200; 480 in all):
  env        20   GPU, driver, CUDA, torch, triton, deepspeed, megatron-core and transformers versions
  kernels   110   tests/test_kernels.py compiled for the GPU (not the interpreter): softmax1 and the learnable
                  sink, forward and backward, fp32/bf16/fp16, causal and not, masks, against the eager reference
  attention  70   bf16 causal fwd+bwd, head dims 64 and 128, T = 1k, 2k, 4k, 8k (16k tokens per batch): softmax1
                  and the learnable sink through the Triton kernel, softmax1 through SDPA's extra zero key, and
                  vanilla softmax through torch's flash SDPA (the baseline); time, ratio, TFLOP/s, peak memory
  training  150   bf16 training steps of OPT-125m (T=2048 and T=512) and OPT-1.3B (T=2048), 20 timed after 3
                  warm-up, for this project's softmax and softmax1 (auto) and transformers' OPT (sdpa): tokens/s,
                  MFU against the datasheet bf16 peak, peak memory; every loss must be finite and fall
  outliers   50   one periodic outlier + W8A8 evaluation (outliers/periodic.py) of the 125M model, timed
  resume     80   launcher.pretrain in bf16: 10 steps, stop, resume, 10 more, against 20 straight; the largest
                  loss difference (bf16 need not be bit-identical)

Each section runs in its own process (a CUDA fault or a hang cannot take the others down) under a time limit:
its budget plus whatever the sections before it left unused, never past --deadline. A section that fails is
recorded with its one-line error and the next one runs; the exit code is 1 if any section failed. Each
section saves partial results as it goes, so one killed at its limit still reports what it measured.

--quick runs the same code at toy sizes on CPU (what `make test` runs); GPU-only steps read "skipped: no CUDA".

Output: DIR/report.json (everything, with per-section wall times), DIR/report.md (the tables), DIR/logs/
(each section's full output) and DIR/sections/ (per-section JSON). DIR defaults to runs/gpu_check/<UTC time>.
Scratch (data cache, tokenizer, runs, checkpoints: a few GB on the GPU) lives in DIR/work and is deleted at
the end unless --keep-work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_report import format_markdown, summary_lines
from common.cli import ArgumentParser, finite_number, run_command
from common.errors import ProjectError
from data_pipeline.writable import check_writable_dir
from launcher import json_safe

if TYPE_CHECKING:
    from benchmarks.gpu_sections import Context, Section

REPO = Path(__file__).resolve().parents[1]
MIN_SECTION_S = 5.0  # below this much time left, a section is not started
# For tests of the failure handling: "SECTION:fail" (raise) or "SECTION:hang" (never return), comma-separated.
FAULT_ENV = "GPU_CHECK_FAULT"
DEFAULT_DEADLINE = {False: 480.0, True: 420.0}  # --quick: generous, the CPU may be shared


def _sections() -> list[Section]:
    from benchmarks.gpu_sections import SECTIONS  # imports torch: not needed to parse arguments

    return SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/gpu_check/<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="toy sizes on CPU: the same code paths, in about a minute")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run these sections only (e.g. a rerun)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for all sections together (default 480; --quick 420)")
    parser.add_argument("--keep-work", action="store_true", help="keep DIR/work (data cache, runs, checkpoints)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the tables")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one section in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- one section

def run_worker(args: argparse.Namespace) -> int:
    """Run one section in this process and write DIR/sections/<name>.json."""
    from benchmarks.gpu_sections import Context, one_line

    section = next(s for s in _sections() if s.name == args.worker)
    ctx = Context(section.name, args.quick, args.out, args.work, time.monotonic() + args.budget)
    start = time.perf_counter()
    status, error = "passed", None
    try:
        _inject_fault(ctx)
        skipped = section.run(ctx)
        if skipped:
            status, error = "skipped", skipped
    except Exception as exc:  # noqa: BLE001 - recorded as the section's one-line error; the traceback goes to the log
        import traceback

        traceback.print_exc()
        status, error = "failed", one_line(exc)
    if ctx.failures and status != "failed":
        status = "failed"
        error = ctx.failures[0] + (f" (and {len(ctx.failures) - 1} more)" if len(ctx.failures) > 1 else "")
    ctx.save(status=status, error=error, wall_s=time.perf_counter() - start)
    return 0


def _inject_fault(ctx: Context) -> None:
    faults = dict(item.split(":", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if ":" in item)
    if faults.get(ctx.name) == "fail":
        raise RuntimeError(f"injected fault ({FAULT_ENV})")
    if faults.get(ctx.name) == "hang":
        ctx.results["injected"] = "hang"
        ctx.save()  # a partial result, which the orchestrator must keep when it kills this process
        time.sleep(10**6)


# ------------------------------------------------------------------------------------------- orchestration

def _pump(stream: TextIO, log: TextIO, echo: TextIO) -> None:
    """Copy a worker's output into its log; echo its progress lines."""
    from benchmarks.gpu_sections import PROGRESS

    for line in stream:
        log.write(line)
        if line.startswith(PROGRESS):
            echo.write(f"    {line[len(PROGRESS):]}")
            echo.flush()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # keep what the caller put on PYTHONPATH (e.g. wheels unpacked for the GPU machine)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def run_section(name: str, budget: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One section in a child process, killed (with everything it started) after `budget` seconds."""
    from benchmarks.gpu_sections import section_file

    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", name, "--out", str(args.out),
           "--work", str(work), "--budget", str(budget)] + (["--quick"] if args.quick else [])
    log_path = args.out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    section_file(args.out, name).unlink(missing_ok=True)
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, sys.stderr), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and the processes it started
            proc.wait()
        pump.join(timeout=10)
    wall = time.perf_counter() - start
    path = section_file(args.out, name)
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"results": {}, "failures": []}
    if timed_out:
        record.update(status="failed", error=f"timed out after {budget:.0f} s (its time limit); partial results kept")
    elif record.get("status") in (None, "running"):
        record.update(status="failed", error=f"exited {proc.returncode} without a result: {_last_line(log_path)}")
    record.update(wall_s=wall, limit_s=budget, log=str(log_path.relative_to(args.out)))
    return record


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    sections = [s for s in _sections() if not args.only or s.name in args.only]
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline if args.deadline is not None else DEFAULT_DEADLINE[args.quick]
    report: dict[str, Any] = {"report": "gpu_check", "quick": args.quick, "argv": sys.argv[1:],
                              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "deadline_s": deadline, "sections": {}}
    start = time.perf_counter()
    planned = 0.0  # the sum of the budgets so far: what a section did not use, the next one may
    for index, section in enumerate(sections, 1):
        planned += section.quick_budget_s if args.quick else section.budget_s
        elapsed = time.perf_counter() - start
        limit = min(planned, deadline) - elapsed
        print(f"[{index}/{len(sections)}] {section.name}: {section.title} (limit {limit:.0f} s)", file=sys.stderr,
              flush=True)
        if limit < MIN_SECTION_S:
            record = {"status": "failed", "error": f"not run: {elapsed:.0f} s of the {deadline:.0f} s deadline used",
                      "results": {}, "failures": [], "wall_s": 0.0, "limit_s": max(limit, 0.0)}
        else:
            record = run_section(section.name, limit, args, work)
        record["title"] = section.title
        record["budget_s"] = section.quick_budget_s if args.quick else section.budget_s
        report["sections"][section.name] = record
        print(f"    -> {record['status']} in {record['wall_s']:.1f} s"
              + (f": {record['error']}" if record.get("error") else ""), file=sys.stderr, flush=True)
    report["wall_s"] = time.perf_counter() - start
    report["failed"] = [name for name, r in report["sections"].items() if r["status"] == "failed"]
    report["ok"] = not report["failed"]
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json_safe.dumps(report, indent=2) + "\n")
    md_path.write_text(format_markdown(report) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    return run_command("benchmarks.gpu_check", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.out is None:
        args.out = REPO / "runs" / "gpu_check" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out = args.out.resolve()
    if not args.quick:
        import torch

        if not torch.cuda.is_available():
            raise ProjectError("no CUDA device; run with --quick for the CPU smoke run of the same code")
    names = [s.name for s in _sections()]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise ProjectError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    finite_number("--deadline", args.deadline, low=0, low_open=True)
    check_writable_dir(args.out, "--out")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_all(args)
    json_path, md_path = write_report(report, args.out)
    print(json.dumps(json_safe.finite_or_none(report), indent=2) if args.json else format_markdown(report))
    print("\n".join(summary_lines(report, json_path, md_path)), file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
