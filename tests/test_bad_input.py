"""Every bad input is rejected before training starts: exit code 2, one `error:` line naming the culprit,
nothing on disk created or changed. One row per case; most run launcher.pretrain.main in-process
(rejected before any process group), a few run the real command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import REPO, run_pretrain, tiny_overrides
from launcher.pretrain import main

Setup = Callable[[Path, Path], dict[str, object]]  # (case folder, trained run) -> extra overrides


@dataclass
class Case:
    culprit: str  # must appear in the error line: the key, value or path at fault
    sets: dict[str, object] = field(default_factory=dict)
    setup: Setup | None = None  # files the case needs; may return more overrides
    args: list[str] = field(default_factory=list)  # extra command-line arguments ({case} = case folder)
    config: str = "configs/opt_tiny.yaml"


def _write(name: str, content: bytes) -> Setup:
    def setup(case: Path, run: Path) -> dict[str, object]:
        (case / name).write_bytes(content)
        return {}
    return setup


def _files(name: str, content: bytes, **extra: object) -> Setup:
    def setup(case: Path, run: Path) -> dict[str, object]:
        (case / name).write_bytes(content)
        return {"data.source": "files", "data.train_files": f"[{case / name}]",
                "data.validation_files": f"[{case / name}]", **extra}
    return setup


def _copy_run(damage: Callable[[Path], None] | None = None) -> Setup:
    def setup(case: Path, run: Path) -> dict[str, object]:
        shutil.copytree(run, case / "runs" / run.name)
        if damage is not None:
            damage(case / "runs" / run.name / "checkpoints")
        return {"logging.run_name": run.name}
    return setup


def _zero_all(checkpoints: Path) -> None:
    for model_file in checkpoints.glob("step_*/mp_rank_00_model_states.pt"):
        model_file.write_bytes(bytes(model_file.stat().st_size))


CASES: dict[str, Case] = {
    # --- config: types, ranges, finiteness ---
    "lr inf": Case("train.lr", {"train.lr": "inf"}),
    "lr nan": Case("train.lr", {"train.lr": "nan"}),
    "lr negative": Case("train.lr", {"train.lr": -1e-3}),
    "lr not a number": Case("train.lr", {"train.lr": "fast"}),
    "min_lr nan": Case("train.min_lr", {"train.min_lr": ".nan"}),
    "eps zero": Case("train.eps", {"train.eps": 0}),
    "eps negative": Case("train.eps", {"train.eps": -1e-8}),
    "layer_norm_eps zero": Case("model.layer_norm_eps", {"model.layer_norm_eps": 0}),
    "init_std inf": Case("model.init_std", {"model.init_std": ".inf"}),
    "grad_clip nan": Case("train.grad_clip", {"train.grad_clip": "nan"}),
    "weight_decay negative": Case("train.weight_decay", {"train.weight_decay": -0.1}),
    "beta1 one": Case("train.beta1", {"train.beta1": 1.0}),
    "steps fractional": Case("train.steps", {"train.steps": 1.5}),
    "steps boolean": Case("train.steps", {"train.steps": "true"}),
    "micro batch zero": Case("train.micro_batch_size", {"train.micro_batch_size": 0}),
    "warmup negative": Case("train.warmup_steps", {"train.warmup_steps": -1}),
    "seed negative": Case("train.seed", {"train.seed": -5}),
    "precision unknown": Case("train.precision", {"train.precision": "fp8"}),
    "nonfinite unknown": Case("train.nonfinite", {"train.nonfinite": "ignore"}),
    "max skips zero": Case("train.max_nonfinite_skips", {"train.max_nonfinite_skips": 0}),
    "keep negative": Case("train.keep_checkpoints", {"train.keep_checkpoints": -1}),
    "exit interval zero": Case("train.exit_interval", {"train.exit_interval": 0}),
    "global batch not multiple": Case("train.global_batch_size", {"train.global_batch_size": 6}),
    "heads do not divide": Case("model.num_heads", {"model.num_heads": 5}),
    "layers zero": Case("model.num_layers", {"model.num_layers": 0}),
    "dropout one": Case("model.dropout", {"model.dropout": 1.0}),
    "family unknown": Case("model.family", {"model.family": "gpt"}),
    "vocab below tokenizer": Case("model.vocab_size", {"model.vocab_size": 300}),
    "variant unknown": Case("attention.variant", {"attention.variant": "softmax2"}),
    "gamma nan": Case("attention.gamma", {"attention.gamma": "nan"}),
    "zeta inf": Case("attention.zeta", {"attention.zeta": "inf"}),
    "gate prob one": Case("attention.gate_init_prob", {"attention.gate_init_prob": 1.0}),
    "seq longer than positions": Case("data.seq_length", {"data.seq_length": 64}),
    "seq zero": Case("data.seq_length", {"data.seq_length": 0}),
    "source unknown": Case("data.source", {"data.source": "s3"}),
    "language unknown": Case("data.language", {"data.language": "xx"}),
    "data vocab too small": Case("data.vocab_size", {"data.vocab_size": 100}),
    "mlm fractions over one": Case("data.mlm_random_fraction", {"model.family": "bert",  # BERT's data section's key
                                                               "data.mlm_random_fraction": 0.5}),
    "log interval zero": Case("logging.log_interval", {"logging.log_interval": 0}),
    "peak tflops negative": Case("logging.peak_tflops", {"logging.peak_tflops": -1}),
    "run name dot dot": Case("logging.run_name", {"logging.run_name": ".."}),
    "run name with slash": Case("logging.run_name", {"logging.run_name": "a/b"}),
    "eval interval zero": Case("eval.interval", {"eval.interval": 0}),
    "percentile out of range": Case("eval.w8a8_act_percentile", {"eval.w8a8_act_percentile": 10}),
    "unknown key": Case("model.colour", {"model.colour": "blue"}),
    "unknown section": Case("optimiser", {"optimiser.lr": 1}),
    "override without value": Case("train.lr", args=["--set", "train.lr"]),
    # --- config combined with this machine ---
    "triton without gpu or interpreter": Case("attention.backend", {"attention.backend": "triton"}),
    "sdpa with clipped softmax": Case("attention.backend", {"attention.backend": "sdpa",
                                                            "attention.variant": "clipped_softmax"}),
    "fp16 without gpu": Case("train.precision", {"train.precision": "fp16"}),
    "run dir under a file": Case("logging.run_dir", {"logging.run_dir": "{case}/afile/runs"},
                                 setup=_write("afile", b"x")),
    "cache dir under a file": Case("data.cache_dir", {"data.cache_dir": "{case}/afile/cache"},
                                   setup=_write("afile", b"x")),
    # --- config files ---
    "config file missing": Case("nope.yaml", config="{case}/nope.yaml"),
    "config file empty": Case("empty.yaml", config="{case}/empty.yaml", setup=_write("empty.yaml", b"")),
    "config file a list": Case("list.yaml", config="{case}/list.yaml", setup=_write("list.yaml", b"- 1\n- 2\n")),
    "config file broken yaml": Case("bad.yaml", config="{case}/bad.yaml", setup=_write("bad.yaml", b"model: [1, 2\n")),
    # --- data ---
    "data file missing": Case("{case}/nowhere.txt", {"data.source": "files", "data.train_files": "[{case}/nowhere.txt]"}),
    "data file empty": Case("empty", setup=_files("empty.txt", b"\n\n")),
    "parquet unreadable": Case("bad.parquet", setup=_files("bad.parquet", b"PAR1 not really parquet")),
    "jsonl unreadable": Case("bad.jsonl", setup=_files("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n')),
    "jsonl without the text field": Case("text field 'text'", setup=_files("other.jsonl", b'{"body": "words"}\n')),
    "data file type unsupported": Case("data.csv", setup=_files("data.csv", b"text\nhello\n")),
    # --- tokenizer ---
    "tokenizer missing": Case("{case}/tok.model", {"data.tokenizer": "{case}/tok.model"}),
    "tokenizer garbage": Case("tok.model", {"data.tokenizer": "{case}/tok.model"}, setup=_write("tok.model", b"junk")),
    "hf tokenizer folder missing": Case("{case}/hf", {"data.tokenizer": "hf:{case}/hf"}),
    # --- checkpoints and resuming ---
    "resume path not a checkpoint": Case("{case}", args=["--resume", "{case}"]),
    "resume none over checkpoints": Case("already has checkpoints", setup=_copy_run()),
    "resume auto none intact": Case("no intact checkpoint", setup=_copy_run(_zero_all), args=["--resume", "auto"]),
    "resume with a changed shape": Case("model.hidden_size", {"model.hidden_size": 64}, setup=_copy_run(),
                                        args=["--resume", "auto"]),
    "resume an older step in place": Case("step_3", setup=_copy_run(),
                                          args=["--resume", "{case}/runs/base/checkpoints/step_3"]),
    "init_from missing": Case("{case}/weights", {"train.init_from": "{case}/weights"}),
    # --- layout ---
    "tensor parallel without ranks": Case("parallel.tensor", {"parallel.tensor": 2}),
    "pipeline deeper than the model": Case("parallel.pipeline", {"parallel.pipeline": 4}),
    "zero stage unknown": Case("parallel.zero_stage", {"parallel.zero_stage": 4}),
    "zero 2 with a pipeline": Case("parallel.zero_stage", {"parallel.zero_stage": 2, "parallel.pipeline": 2}),
    "partition method unknown": Case("parallel.partition_method", {"parallel.partition_method": "random"}),
    "outlier eval with zero 3": Case("eval.outlier_interval", {"parallel.zero_stage": 3}),
}


def _fill(value: object, case: Path) -> str:
    return str(value).replace("{case}", str(case))


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def warm_cache(trained_run: Path, data_cache: Path) -> Path:
    return data_cache  # the trained run built the tokenizer and sample caches: cases only read them


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name: str, warm_cache: Path, trained_run: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = CASES[name]
    extra = case.setup(tmp_path, trained_run) if case.setup else {}
    sets = tiny_overrides(warm_cache, tmp_path / "runs", **{"logging.run_name": "run", **extra,
                                                             **{k: _fill(v, tmp_path) for k, v in case.sets.items()}})
    args = ["--config", _fill(case.config, tmp_path)] + [x for o in sets for x in ("--set", o)]
    args += [_fill(a, tmp_path) for a in case.args]
    watched = (tmp_path, warm_cache)
    before = _snapshot(*watched)
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _fill(case.culprit, tmp_path) in lines[0], lines[0]
    assert not torch.distributed.is_initialized()  # rejected before any process group
    assert _snapshot(*watched) == before


def test_the_command_line_shows_only_the_error_line(warm_cache: Path, tmp_path: Path) -> None:
    # A real process: no library warnings, no traceback, before or after the one line.
    result = run_pretrain(tiny_overrides(warm_cache, tmp_path, **{"train.lr": "nan"}))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "train.lr" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag,culprit", [("--out", "afile/tok.model"), ("--cache-dir", "afile/cache")])
def test_train_tokenizer_rejects_an_unwritable_path(tmp_path: Path, flag: str, culprit: str) -> None:
    (tmp_path / "afile").write_text("x")
    args = {"--out": str(tmp_path / "out.model"), "--cache-dir": str(tmp_path / "cache"), flag: str(tmp_path / culprit)}
    result = subprocess.run([sys.executable, "-m", "data_pipeline.train_tokenizer", "--vocab-size", "300",
                             *[x for item in args.items() for x in item]], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / culprit) in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
