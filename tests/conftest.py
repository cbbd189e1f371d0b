"""Shared fixtures: a tiny end-to-end training setup on the bundled Wikipedia sample."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# DeepSpeed compiles its CPU communication op on first multi-process use (1.5-3 min). Every multi-process
# test and every job of the local Slurm (sbatch passes the environment on) shares one build cache of the
# tests' own, kept in the clone's .cache/ (git-ignored): built once per CI run, reused locally. The venv's
# bin/ goes first on PATH, as in an activated venv: every process builds with the same `ninja` (pip's and
# the system's write incompatible logs, and alternating between them rebuilds the op every time).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def tiny_overrides(cache_dir: Path, run_dir: Path, **extra: object) -> list[str]:
    """A 2-layer, 32-wide OPT on 32-token blocks: seconds per run on CPU."""
    values: dict[str, object] = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_heads": 4, "model.ffn_hidden_size": 64,
        "model.max_position_embeddings": 32, "model.vocab_size": 512, "model.dropout": 0.0,
        "data.vocab_size": 512, "data.seq_length": 32, "data.tokenizer_sample_docs": 400,
        "data.cache_dir": str(cache_dir), "train.steps": 6, "train.micro_batch_size": 4,
        "train.global_batch_size": 4, "train.warmup_steps": 2, "train.lr": 3e-3, "train.checkpoint_interval": 3,
        "eval.interval": 3, "eval.max_blocks": 8, "logging.log_interval": 1, "logging.run_dir": str(run_dir),
        "logging.progress": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def without_project_prelude() -> str:
    """Python source that hides this project from a child interpreter, even where it is pip-installed in
    editable mode (setuptools' finder + repo paths): exported folders must load with transformers alone."""
    return f"""
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != {str(REPO)!r}]
sys.path_importer_cache.clear()
assert all(importlib.util.find_spec(m) is None for m in ("model", "launcher", "data_pipeline", "parallel"))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """A test that trains in-process leaves neither its process group nor its rendezvous variables behind: an
    in-process launcher.pretrain.main sets them, and every later child process would inherit and listen on them."""
    from launcher.distributed import RENDEZVOUS_ENV

    saved = {key: os.environ.get(key) for key in RENDEZVOUS_ENV}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_pretrain(overrides: list[str], *, resume: str = "none", ranks: int = 1,
                 config: str = "configs/opt_tiny.yaml", timeout: int = 300,
                 fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m launcher.pretrain` (or `deepspeed` for ranks > 1); `fault`: (kind, step) for
    tests/fault_injection.py, one process only."""
    args = ["--config", config, "--resume", resume] + [x for o in overrides for x in ("--set", o)]
    from launcher.distributed import RENDEZVOUS_ENV  # an inherited rendezvous would join another run's group
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
    env["PYTHONPATH"] = str(REPO)
    if ranks > 1:  # N ranks on a 2-core machine: one thread each, or they thrash
        env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        assert ranks == 1
        cmd = [sys.executable, str(REPO / "tests" / "fault_injection.py"), fault[0], str(fault[1]), "--", *args]
    elif ranks == 1:
        cmd = [sys.executable, "-m", "launcher.pretrain", *args]
    else:
        launcher = shutil.which("deepspeed", path=str(VENV_BIN)) or "deepspeed"
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "launcher/pretrain.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wiki_sample parquet + a 512-piece tokenizer, built once for every training test."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_run(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step tiny run (checkpoints step_3 and step_6). Tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("trained")
    result = run_pretrain(tiny_overrides(data_cache, run_dir, **{"logging.run_name": "base"}))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "base"


def prepare_config(path: Path, cache_dir: Path, **data: object) -> Path:
    """A run config whose data section is the bundled English sample with the fixed character tokenizer (nothing
    to train, 67 tokens: any test model's vocabulary holds it)."""
    values = {"source": "wiki_sample", "language": "en", "tokenizer_type": "char", "cache_dir": str(cache_dir), **data}
    path.write_text("data:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in values.items()))
    return path


@pytest.fixture(scope="session")
def prepared_chars(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample's first 400 train documents and its validation split, prepared (data_pipeline.prepare)
    in 4 shards with the character tokenizer: the folder of its one source."""
    from data_pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    prepare(str(prepare_config(root / "data.yaml", data_cache)), root / "out", num_shards=4, max_documents=400,
            progress=False)
    return root / "out" / "wiki_sample_en"
