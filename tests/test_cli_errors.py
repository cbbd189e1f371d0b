"""Every command meets bad input the same way (common/cli.py): one `error:` line naming the flag, key, path or
value, exit code 2, nothing on disk created or changed, no library log line and no traceback on the terminal.
One row per case, over every command module: launcher.*, data_pipeline.*, benchmarks.*. Each row calls the
command's main(argv) in this process; the terminal is captured at the file-descriptor level (capfd), so lines a
library prints through a handler of its own are seen too. tests/test_bad_input.py holds pretrain's config rows.

Also here: a study with a variant that cannot run stops before the first variant trains, a run with a bad
periodic task stops before step 1, a failing --local job is one line, and images keep their levels."""

from __future__ import annotations

import importlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, tiny_overrides

Setup = Callable[[Path], None]  # writes the files a case needs into its folder


@dataclass
class Row:
    module: str  # the command, e.g. "launcher.plan"
    args: list[str]  # {case}: the case folder, {run}: a trained run (copied), {cache}: the shared data cache
    culprit: str  # must appear in the error line
    setup: Setup | None = None
    code: int = 2
    tiny: bool = False  # append tiny_overrides (a 2-layer OPT on 32-token blocks, run dir under {case})
    extra: list[str] = field(default_factory=list)  # --set overrides after the tiny ones


def _file(name: str, content: bytes) -> Setup:
    def setup(case: Path) -> None:
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(content)
    return setup


def _images(*, classes: tuple[str, ...] = ("ant", "bee"), corrupt_val: bool = False) -> Setup:
    """An ImageNet-style folder {case}/img: 8x8 RGB PNGs, train/<class>/ and val/<class>/."""
    def setup(case: Path) -> None:
        rng = np.random.default_rng(0)
        for split, count in (("train", 4), ("val", 2)):
            for name in classes:
                (case / "img" / split / name).mkdir(parents=True)
                for i in range(count):
                    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(
                        case / "img" / split / name / f"{i}.png")
        if corrupt_val:
            (case / "img" / "val" / classes[-1] / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return setup


LONG = "n" * 300  # longer than any file system's name limit (255 bytes)
VIT = ["--config", "configs/vit_tiny.yaml", "--set", "train.steps=2", "--set", "logging.run_dir={case}/runs",
       "--set", "logging.progress=false", "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4",
       "--set", "eval.interval=1", "--set", "data.cache_dir={cache}"]
IMAGEFOLDER = VIT + ["--set", "data.source=imagefolder", "--set", "data.path={case}/img", "--set",
                     "data.validation_split=validation", "--set", "model.num_classes=2", "--set", "eval.max_blocks=4"]
BLEND = "data.sources=[{source: wiki_sample, weight: %s}, {source: wiki_sample, language: fr, weight: 1}]"
OPT = ["--config", "configs/opt_tiny.yaml"]
SMALL_HOPFIELD = ["--dims", "4", "--patterns", "2", "--trials", "2"]  # seconds where the bad value is not refused

ROWS: dict[str, Row] = {
    # --- launcher.pretrain: periodic tasks, blends, enumerated options, folders, library noise ---
    "pretrain: unknown lm-eval task stops before step 1": Row(
        "launcher.pretrain", OPT, "eval.lm_eval_tasks", tiny=True,
        extra=["eval.lm_eval_tasks=[no_such_task]", "eval.lm_eval_interval=3"]),
    "pretrain: lm-eval with a tokenizer it cannot export": Row(
        "launcher.pretrain", OPT, "data.tokenizer_type=char", tiny=True,
        extra=["eval.lm_eval_tasks=[outeffhop_wiki_ppl]", "eval.lm_eval_interval=3", "data.source=bigram_backcopy",
               "data.tokenizer_type=char", "model.vocab_size=67", "data.vocab_size=67"]),
    "pretrain: blend weight inf": Row("launcher.pretrain", OPT, "data.sources[0].weight", tiny=True,
                                      extra=[BLEND % ".inf"]),
    "pretrain: blend key of the wrong type": Row(
        "launcher.pretrain", OPT, "data.sources[1].hub_holdout", tiny=True,
        extra=["data.sources=[{source: wiki_sample, weight: 1}, {source: wiki_sample, language: fr, weight: 1, "
               "hub_holdout: half}]"]),
    "pretrain: cache dir name too long": Row("launcher.pretrain", OPT, "data.cache_dir", tiny=True,
                                             extra=[f"data.cache_dir={{case}}/{LONG}"]),
    "pretrain: run dir name too long": Row("launcher.pretrain", OPT, "logging.run_dir", tiny=True,
                                           extra=[f"logging.run_dir={{case}}/{LONG}"]),
    "pretrain: parquet unreadable, no datasets log lines": Row(
        "launcher.pretrain", OPT, "bad.parquet", _file("bad.parquet", b"PAR1 not really parquet"), tiny=True,
        extra=["data.source=files", "data.train_files=[{case}/bad.parquet]", "data.validation_files=[{case}/bad.parquet]"]),
    "pretrain: jsonl unreadable, no datasets log lines": Row(
        "launcher.pretrain", OPT, "bad.jsonl", _file("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n'), tiny=True,
        extra=["data.source=files", "data.train_files=[{case}/bad.jsonl]", "data.validation_files=[{case}/bad.jsonl]"]),
    "pretrain: unknown flag": Row("launcher.pretrain", OPT + ["--bogus", "auto"], "--bogus"),
    "pretrain: auto_augment by prefix only": Row("launcher.pretrain", VIT + ["--set", "data.auto_augment=randaugment"],
                                                 "data.auto_augment"),
    "pretrain: auto_augment unknown policy": Row("launcher.pretrain", VIT + ["--set", "data.auto_augment=originalx"],
                                                 "data.auto_augment"),
    "pretrain: corrupt validation image": Row("launcher.pretrain", IMAGEFOLDER, "img/val/bee/1.png",
                                              _images(corrupt_val=True)),
    "pretrain: one-class image folder": Row("launcher.pretrain", IMAGEFOLDER, "fewer than two class folders",
                                            _images(classes=("ant",))),
    # --- launcher.study ---
    "study: a later variant cannot run the backend": Row(
        "launcher.study", OPT + ["--variants", "softmax,clipped_softmax", "--out", "{case}/study"],
        "variant 'clipped_softmax'", tiny=True, extra=["attention.backend=sdpa", "eval.outlier_interval=6"]),
    "study: out under a file": Row("launcher.study", OPT + ["--variants", "softmax", "--out", "{case}/afile/study"],
                                   "afile", _file("afile", b"x"), tiny=True, extra=["eval.outlier_interval=6"]),
    "study: a variant's folder already has checkpoints": Row(
        "launcher.study", OPT + ["--variants", "softmax", "--out", "{case}/study"], "already has checkpoints",
        _file("study/softmax/checkpoints/latest", b"step_3"), tiny=True, extra=["eval.outlier_interval=6"]),
    "study: steps not a number": Row("launcher.study", OPT + ["--steps", "many"], "--steps"),
    # --- launcher.submit ---
    "submit: --tasks 0": Row("launcher.submit", OPT + ["--local", "--tasks", "0"], "--tasks", tiny=True),
    "submit: --nodes 0": Row("launcher.submit", OPT + ["--nodes", "0"], "--nodes", tiny=True),
    "submit: --port 80": Row("launcher.submit", OPT + ["--local", "--port", "80"], "--port", tiny=True),
    "submit: --gpus-per-node -1": Row("launcher.submit", OPT + ["--gpus-per-node", "-1"], "--gpus-per-node", tiny=True),
    "submit: backend the job cannot run, before queueing": Row(
        "launcher.submit", OPT + ["--local"], "attention.backend", tiny=True, extra=["attention.backend=triton"]),
    "submit: bad periodic task, before queueing": Row(
        "launcher.submit", OPT + ["--local"], "eval.lm_eval_tasks", tiny=True,
        extra=["eval.lm_eval_tasks=[no_such_task]", "eval.lm_eval_interval=3"]),
    # --- launcher.plan ---
    "plan: --gpus not a number": Row("launcher.plan", OPT + ["--gpus", "x"], "--gpus"),
    "plan: --memory-gib negative": Row("launcher.plan", OPT + ["--memory-gib", "-5"], "--memory-gib"),
    "plan: --peak-tflops inf": Row("launcher.plan", OPT + ["--peak-tflops", "inf"], "--peak-tflops"),
    "plan: --mfu nan": Row("launcher.plan", OPT + ["--mfu", "nan"], "--mfu"),
    # --- launcher.evaluate ---
    "evaluate: --device cuda without CUDA": Row("launcher.evaluate", ["--checkpoint", "{run}", "--device", "cuda"],
                                                "--device"),
    "evaluate: --device unknown": Row("launcher.evaluate", ["--checkpoint", "{run}", "--device", "tpu"], "--device"),
    "evaluate: --quant unknown": Row("launcher.evaluate", ["--checkpoint", "{run}", "--quant", "int4"], "--quant"),
    # --- launcher.lm_eval ---
    "lm_eval: --out under a file": Row(  # a missing folder is made; one that cannot be is refused up front
        "launcher.lm_eval", ["--checkpoint", "{run}", "--tasks", "outeffhop_wiki_ppl", "--limit", "2", "--docs", "4",
                             "--out", "{case}/afile/lm.json"], "--out", _file("afile", b"x")),
    "lm_eval: --out is a folder": Row(
        "launcher.lm_eval", ["--checkpoint", "{run}", "--tasks", "outeffhop_wiki_ppl", "--limit", "2", "--docs", "4",
                             "--out", "{case}"], "--out"),
    "lm_eval: --batch-size 0": Row(
        "launcher.lm_eval", ["--checkpoint", "{run}", "--tasks", "outeffhop_wiki_ppl", "--limit", "2", "--docs", "4",
                             "--batch-size", "0"], "--batch-size"),
    "lm_eval: --device cuda without CUDA": Row(
        "launcher.lm_eval", ["--checkpoint", "{run}", "--tasks", "outeffhop_wiki_ppl", "--device", "cuda"], "--device"),
    "lm_eval: --limit not a number": Row("launcher.lm_eval", ["--checkpoint", "{run}", "--tasks", "x", "--limit", "a"],
                                         "--limit"),
    # --- launcher.consolidate, export_hf, import_hf, slurm ---
    "consolidate: --out missing": Row("launcher.consolidate", ["--checkpoint", "{run}/checkpoints"], "--out"),
    "export_hf: --dtype unknown": Row("launcher.export_hf", ["--checkpoint", "{run}", "--out", "{case}/hf",
                                                            "--dtype", "fp8"], "--dtype"),
    "import_hf: unknown flag": Row("launcher.import_hf", ["--model", "{case}", "--out", "{case}/o", "--bogus"],
                                   "--bogus"),
    "slurm: unknown action": Row("launcher.slurm", ["launch", "--config", "configs/opt_tiny.yaml"], "launch"),
    # --- data_pipeline.train_tokenizer ---
    "train_tokenizer: --vocab-size 0": Row("data_pipeline.train_tokenizer", ["--vocab-size", "0", "--out",
                                                                           "{case}/tok.model"], "--vocab-size"),
    "train_tokenizer: --out name too long": Row(
        "data_pipeline.train_tokenizer", ["--vocab-size", "300", "--sample-docs", "50", "--cache-dir", "{cache}",
                                          "--out", f"{{case}}/{LONG[:250]}.model"], "--out"),
    "train_tokenizer: --out is a folder": Row(
        "data_pipeline.train_tokenizer", ["--vocab-size", "300", "--sample-docs", "50", "--cache-dir", "{cache}",
                                          "--out", "{case}/tok"], "--out", _file("tok.model/keep", b"")),
    "train_tokenizer: --type unknown": Row("data_pipeline.train_tokenizer", ["--type", "word", "--out",
                                                                           "{case}/tok.model"], "--type"),
    # --- benchmarks ---
    "attention: --seq 0": Row("benchmarks.attention", ["--seq", "0", "--reps", "1"], "--seq"),
    "attention: --device cuda without CUDA": Row("benchmarks.attention", ["--device", "cuda", "--seq", "8"], "--device"),
    "attention: --heads not a number": Row("benchmarks.attention", ["--heads", "x"], "--heads"),
    "throughput: unknown variant": Row("benchmarks.throughput", ["--quick", "--variants", "softmax3"], "softmax3"),
    "throughput: --lr nan": Row("benchmarks.throughput", ["--quick", "--lr", "nan"], "--lr"),
    "throughput: heads do not divide hidden": Row("benchmarks.throughput", ["--hidden", "30", "--heads", "4"],
                                                  "--heads"),
    "hopfield_capacity: --beta inf": Row("benchmarks.hopfield_capacity", ["--beta", "inf", *SMALL_HOPFIELD, "--out", "{case}/h"],
                                         "--beta"),
    "hopfield_capacity: --noise nan": Row("benchmarks.hopfield_capacity", ["--noise", "nan", *SMALL_HOPFIELD, "--out", "{case}/h"],
                                          "--noise"),
    "hopfield_capacity: --out under a file": Row("benchmarks.hopfield_capacity", [
        "--dims", "4", "--patterns", "2", "--trials", "2", "--out", "{case}/afile/h"], "afile", _file("afile", b"x")),
    "gpu_check: --deadline negative": Row("benchmarks.gpu_check", ["--quick", "--deadline", "-5", "--out",
                                                                   "{case}/g"], "--deadline"),
    "gpu_check: --out under a file": Row("benchmarks.gpu_check", ["--quick", "--out", "{case}/afile/g"], "afile",
                                         _file("afile", b"x")),
    "planner_check: --steps 0": Row("benchmarks.planner_check", ["--steps", "0"], "--steps"),
    "recompute_memory: --micro 0": Row("benchmarks.recompute_memory", ["--micro", "0"], "--micro"),
    "data: --mfu nan": Row("benchmarks.data", ["--mfu", "nan"], "--mfu"),
    "data: unknown --gpu": Row("benchmarks.data", ["--gpu", "X99"], "X99"),
    "gpu_report: report missing": Row("benchmarks.gpu_report", ["{case}/report.json"], "report.json"),
    "gpu_report: report not JSON": Row("benchmarks.gpu_report", ["{case}/report.json"], "report.json",
                                       _file("report.json", b"{not json")),
}

def _fill(text: str, case: Path, run: Path, cache: Path) -> str:
    return text.replace("{case}", str(case)).replace("{run}", str(run)).replace("{cache}", str(cache))


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name: str, data_cache: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          request: pytest.FixtureRequest) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(REPO)
    row = ROWS[name]
    case = tmp_path / "case"
    case.mkdir()
    # Only the rows that read a checkpoint wait for the (session-wide) trained run.
    trained_run = request.getfixturevalue("trained_run") if "{run}" in " ".join(row.args) else case
    if row.setup is not None:
        row.setup(case)
    args = [_fill(a, case, trained_run, data_cache) for a in row.args]
    if row.tiny or row.extra:
        sets = tiny_overrides(data_cache, case / "runs") if row.tiny else []
        args += [x for o in sets + [_fill(e, case, trained_run, data_cache) for e in row.extra] for x in ("--set", o)]
    watched = (tmp_path, trained_run, data_cache)
    before = _snapshot(*watched)
    capfd.readouterr()
    code = importlib.import_module(row.module).main(args)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == row.code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # no library log line, no traceback
    assert _fill(row.culprit, case, trained_run, data_cache) in lines[0], lines[0]
    assert not torch.distributed.is_initialized()
    assert _snapshot(*watched) == before


def test_a_runtime_failure_is_one_line_with_the_traceback_in_a_file(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    from common.cli import run_command, set_crash_dir

    def broken(argv: list[str] | None) -> int:
        set_crash_dir(tmp_path)
        raise RuntimeError("disk on fire")

    assert run_command("launcher.example", broken, []) == 1
    line = capfd.readouterr().err.strip()
    assert line == f"error: launcher.example failed: RuntimeError: disk on fire (traceback in {tmp_path}/example-crash.log)"
    assert "raise RuntimeError" in (tmp_path / "example-crash.log").read_text()


def test_a_failing_local_job_is_one_line(data_cache: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Passes every up-front check, fails in the job (the data file is unreadable): the job's own line, exit 1,
    # instead of submitit's UncompletedJobError traceback.
    from launcher import submit

    monkeypatch.chdir(REPO)
    (tmp_path / "bad.jsonl").write_text('{"text": broken\n')
    sets = tiny_overrides(data_cache, tmp_path / "runs", **{
        "data.source": "files", "data.train_files": f"[{tmp_path / 'bad.jsonl'}]",
        "data.validation_files": f"[{tmp_path / 'bad.jsonl'}]"})
    code = submit.main(["--config", "configs/opt_tiny.yaml", "--local"] + [x for o in sets for x in ("--set", o)])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("error: job ") and "bad.jsonl" in lines[0], lines


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_and_palette_images_keep_their_levels() -> None:
    from model.vit.data import decode

    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # 0 .. 63000 of 65535
    grey = np.asarray(decode({"bytes": _png(Image.fromarray(levels))}, "16-bit"))
    expected = np.round(levels / 65535 * 255)
    assert grey.shape == (8, 8, 3) and np.abs(grey[..., 0].astype(float) - expected).max() <= 1
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=16)
    assert np.array_equal(np.asarray(decode({"bytes": _png(palette)}, "palette")), np.asarray(palette.convert("RGB")))
    with pytest.raises(Exception, match="mode F"):
        decode(Image.fromarray(np.ones((4, 4), dtype=np.float32)), "float image")
