"""Checks of a valid config against the machine it will run on, made before any process group, model or file
exists: the attention backend and precision on the device, the folders the run writes, and the periodic tasks
(lm-eval task names, a tokenizer lm-eval can export). launcher.pretrain runs it (prepare), launcher.study for
every variant before the first trains, launcher.submit before the job is queued (with the device the job's
nodes will have)."""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.writable import check_writable_dir
from launcher.config import RunConfig
from launcher.distributed import check_device  # noqa: F401 (its callers' old home)
from model.attention import resolve_backend
from common.errors import ConfigError


def expected_device() -> torch.device:
    """The device launcher.distributed.init_process_group will pick (CUDA when present, else CPU)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def preflight(cfg: RunConfig, device: torch.device | None = None) -> None:
    """Raise ConfigError/ProjectError (one line) for anything the run would fail on later. `device`: the device
    the run will get (default: this machine's, as launcher.distributed picks it)."""
    device = device or expected_device()
    try:
        resolve_backend(cfg.attention.backend, cfg.attention.variant, device)
    except ValueError as error:  # e.g. triton without a GPU or interpreter, sdpa with clipped softmax
        raise ConfigError("attention.backend", cfg.attention.backend, str(error)) from None
    if cfg.attention.backend == "triton" and getattr(cfg.model, "attention_dropout", 0.0) > 0:
        raise ConfigError("attention.backend", "triton", "the fused kernel has no attention dropout; set "
                          "model.attention_dropout=0 or another backend")
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16", "needs a CUDA GPU (on CPU use fp32 or bf16)")
    check_writable_dir(cfg.run_path, "logging.run_dir/run_name")
    if getattr(cfg.data, "cache_dir", None):  # the text families cache tokenizers and corpora there
        check_writable_dir(cfg.data.cache_dir, "data.cache_dir")
    check_periodic_lm_eval(cfg)


def check_periodic_lm_eval(cfg: RunConfig) -> None:
    """eval.lm_eval_tasks, checked now instead of at the first eval.lm_eval_interval (after hours of training):
    every task name known to lm-eval, and a tokenizer the harness can load (it runs on an exported copy)."""
    tasks = list(cfg.eval.lm_eval_tasks)
    if not tasks:
        return
    from launcher.lm_eval import check_task_names

    check_task_names(tasks, "eval.lm_eval_tasks")
    data = cfg.data
    if getattr(data, "tokenizer_type", None) == "char":
        raise ConfigError("eval.lm_eval_tasks", tasks, "lm-eval runs on a Hugging Face export, and "
                          "data.tokenizer_type=char has no Hugging Face tokenizer; use a SentencePiece tokenizer "
                          "(unigram, bpe) or eval.lm_eval_tasks=[]")
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer and not tokenizer.startswith("hf:"):  # an explicit SentencePiece model: an exportable kind?
        from data_pipeline.tokenizer import Tokenizer

        Tokenizer(tokenizer)  # exists and loads (ProjectError naming the path otherwise)
        kind = _sentencepiece_kind(tokenizer)
        if kind not in ("unigram", "bpe"):
            raise ConfigError("data.tokenizer", tokenizer, f"is a SentencePiece {kind} model; eval.lm_eval_tasks "
                              f"exports the tokenizer for lm-eval, which works for unigram and bpe models only")


def _sentencepiece_kind(path: str) -> str:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "unknown")
