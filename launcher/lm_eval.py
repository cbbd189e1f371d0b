"""Run lm-evaluation-harness on any checkpoint through its Hugging Face export (remote code, every variant).

    python -m launcher.lm_eval --checkpoint runs/opt_tiny/checkpoints/step_300 --tasks outeffhop_wiki_ppl,outeffhop_wiki_cloze

The checkpoint (any layout, as launcher.export_hf takes it) is exported to a temporary Hugging Face folder and
evaluated by `lm_eval.simple_evaluate(model="hf", model_args={pretrained, trust_remote_code: True, max_length:
data.seq_length})`, offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE). Results go to `lm_eval.json` in the step
directory (or the weights-only folder).

Project tasks (launcher/lm_eval_tasks/*.yaml), built from the run's own validation split:
  outeffhop_wiki_ppl    rolling log-likelihood of whole documents: word/byte perplexity, bits per byte;
  outeffhop_wiki_cloze  4-way multiple choice: a document's next words against spans of other documents.
Any other lm-eval task name (or --include-path folder) works too where its data is available offline.
With outeffhop_wiki_ppl the result also holds `comparison`: the harness's word perplexity turned into a token
perplexity (ln ppl_token = ln ppl_word x words / tokens) next to this project's own validation perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from common.cli import ArgumentParser, run_command
from common.errors import ConfigError, ProjectError

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
PROJECT_TASKS = {path.stem: path for path in sorted(TASK_DIR.glob("*.yaml"))}
PPL_TASK, CLOZE_TASK = "outeffhop_wiki_ppl", "outeffhop_wiki_cloze"
RESULT_FILE = "lm_eval.json"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
CLOZE_CONTEXT_WORDS, CLOZE_ANSWER_WORDS, CLOZE_CHOICES = 24, 6, 4
DEFAULT_DOCS = 200  # validation documents the project tasks are built from (each task: at most this many items)
SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, its checkpoints/ dir (latest), a step_N dir, or a weights-only folder")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated lm-eval tasks; project tasks: {', '.join(PROJECT_TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS,
                        help=f"validation documents the project tasks use (default {DEFAULT_DOCS})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda if available)")
    parser.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    parser.add_argument("--out", default=None, help=f"result file (default: <checkpoint>/{RESULT_FILE})")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ project tasks

def validation_documents(cfg: Any, count: int) -> list[str]:
    """The first `count` non-empty documents of the run's validation split, in file order (cleaned text); a blend
    (data.sources) gives each source round(count x weight) of them."""
    from dataclasses import replace

    from data_pipeline.config import blend_parts
    from data_pipeline.sources import open_source

    shares = [(p.cfg, max(1, round(count * p.weight))) for p in blend_parts(cfg.data)] if cfg.data.sources \
        else [(cfg.data, count)]
    docs: list[str] = []
    for data, wanted in shares:
        taken = 0
        for text in open_source(replace(data, shuffle=False), "validation").documents(0):
            if text.strip():
                docs.append(text.strip())
                taken += 1
                if taken >= wanted:
                    break
    if not docs:
        raise ProjectError("no validation documents for the lm-eval tasks")
    return docs


def cloze_items(docs: list[str], fits: Callable[[str], bool] = lambda _: True, seed: int = SEED) -> list[dict[str, Any]]:
    """Deterministic 4-way continuation items: context = a document's first words, the answer its next words,
    distractors = spans of the same length from other documents. `fits(choice)`: whether a choice is short
    enough in tokens for the model's window (the harness refuses longer continuations)."""
    rng = random.Random(seed)
    words = [doc.split() for doc in docs]
    span = CLOZE_CONTEXT_WORDS + CLOZE_ANSWER_WORDS
    usable = [i for i, w in enumerate(words) if len(w) >= span]
    items = []
    for i in usable:
        answer = " ".join(words[i][CLOZE_CONTEXT_WORDS:span])
        others = [j for j in usable if j != i]
        if not fits(answer) or len(others) < CLOZE_CHOICES - 1:
            continue
        choices: list[str] = []
        for j in rng.sample(others, len(others)):
            start = rng.randrange(0, len(words[j]) - CLOZE_ANSWER_WORDS + 1)
            choice = " ".join(words[j][start:start + CLOZE_ANSWER_WORDS])
            if fits(choice) and choice != answer:
                choices.append(choice)
            if len(choices) == CLOZE_CHOICES - 1:
                break
        if len(choices) < CLOZE_CHOICES - 1:
            continue
        label = rng.randrange(CLOZE_CHOICES)
        choices.insert(label, answer)
        items.append({"context": " ".join(words[i][:CLOZE_CONTEXT_WORDS]), "choices": choices, "label": label})
    if not items:
        raise ProjectError(f"no validation document has {span} words that fit the model: cannot build {CLOZE_TASK}")
    return items


def project_task_configs(names: list[str], cfg: Any, folder: Path, docs: int) -> list[dict[str, Any]]:
    """The YAML configs of the requested project tasks with their jsonl data written into `folder`."""
    if not any(name in PROJECT_TASKS for name in names):
        return []
    from data_pipeline import load_or_train_tokenizer

    texts = validation_documents(cfg, docs)
    tokenizer = load_or_train_tokenizer(cfg.data)
    window = cfg.data.seq_length // 2  # every choice must leave room for context in one model window
    rows = {PPL_TASK: [{"text": text} for text in texts],
            CLOZE_TASK: cloze_items(texts, lambda choice: len(tokenizer.encode(" " + choice)) <= window)}
    configs = []
    for name in names:
        if name not in PROJECT_TASKS:
            continue
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[name]))
        config = yaml.safe_load(PROJECT_TASKS[name].read_text())
        config["dataset_kwargs"]["data_files"] = {"validation": str(data)}
        configs.append(config)
    return configs


# --------------------------------------------------------------------------------------------- comparison

def own_perplexity(cfg: Any, state: dict[str, Any], device: str) -> dict[str, float]:
    """This project's validation perplexity (the examples and model launcher.evaluate uses): token-weighted."""
    from outliers.report import family_metrics, model_from_state, validation_examples

    model = model_from_state(cfg, state, device)
    examples = validation_examples(cfg)
    result = family_metrics(model, examples, 8)
    return {"val_loss": result["loss"], "val_ppl": result["ppl"], "val_tokens": int(result["targets"])}


def compare(ppl_result: dict[str, float], texts: list[str], tokenizer: Any, own: dict[str, float]) -> dict[str, Any]:
    """The harness's word perplexity as a token perplexity: both are exp(total NLL / count), so
    ln ppl_token = ln ppl_word x words / tokens (words as the harness counts them, tokens of our tokenizer)."""
    import re

    words = sum(len(re.split(r"\s+", text)) for text in texts)
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    word_ppl = ppl_result["word_perplexity"]
    token_ppl = math.exp(math.log(word_ppl) * words / tokens)
    return {"documents": len(texts), "words": words, "tokens": tokens, "tokens_per_word": tokens / words,
            "harness_word_ppl": word_ppl, "harness_token_ppl": token_ppl, "own_val_ppl": own["val_ppl"],
            "own_val_tokens": own["val_tokens"], "ratio_harness_token_to_own": token_ppl / own["val_ppl"]}


# ---------------------------------------------------------------------------------------------------- run

def _scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results ("acc,none" -> "acc"; stderr dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            metric = key.split(",", 1)[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric \
                    and metric != "sample_len":
                values[metric] = float(value)
        out[task] = values
    return out


def run_lm_eval(checkpoint: str | Path, tasks: list[str], *, limit: int | None = None, docs: int = DEFAULT_DOCS,
                batch_size: int = 8, device: str | None = None, include_path: str | None = None,
                out: str | Path | None = None, compare_own: bool = True) -> dict[str, Any]:
    """Export, evaluate, write the result file; returns the result. Raises ProjectError on bad input."""
    import torch

    from launcher.export_hf import export
    from launcher.hf_checkpoint import load_full_state_dict, locate

    if not tasks or any(not name for name in tasks):
        raise ConfigError("--tasks", ",".join(tasks), "must name at least one lm-eval task")
    if limit is not None and limit <= 0:
        raise ConfigError("--limit", limit, "must be a positive integer")
    if docs <= 0:
        raise ConfigError("--docs", docs, "must be a positive integer")
    if batch_size <= 0:
        raise ConfigError("--batch-size", batch_size, "must be a positive integer")
    if include_path is not None and not Path(include_path).is_dir():
        raise ProjectError(f"--include-path folder not found: {include_path}")
    if out is not None:  # found before the evaluation, not after it
        from data_pipeline.writable import writable_dir_problem

        if Path(out).is_dir():
            raise ConfigError("--out", str(out), "is a folder; name the result file (e.g. lm_eval.json)")
        problem = writable_dir_problem(Path(out).absolute().parent)
        if problem is not None:
            raise ConfigError("--out", str(out), f"cannot be written: {problem}")
    from launcher.distributed import check_device

    device = str(check_device("--device", device)) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    _, folder = locate(checkpoint)
    manager = task_manager(tasks, include_path)
    cfg, state = load_full_state_dict(checkpoint)
    from model.family import family_of

    if family_of(cfg.model).causal_lm_export() is None:  # the harness loads the export as AutoModelForCausalLM
        raise ProjectError(f"lm-eval needs a causal LM; {folder} holds a {cfg.model.family} model")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="outeffhop-lm-eval-") as tmp:
        hf_dir = export(checkpoint, Path(tmp) / "hf")
        configs = project_task_configs(tasks, cfg, Path(tmp), docs)
        names = [name for name in tasks if name not in PROJECT_TASKS]
        with _offline():
            results = _evaluate(hf_dir, configs + names, cfg.data.seq_length, limit, batch_size, device, manager)
    scores = _scores(results)
    result: dict[str, Any] = {
        "checkpoint": str(folder), "step": _step_of(folder), "tasks": scores, "limit": limit,
        "model_args": {"max_length": cfg.data.seq_length, "trust_remote_code": True},
        "lm_eval_version": results.get("lm_eval_version") or _version(), "seconds": time.perf_counter() - start}
    if compare_own and PPL_TASK in scores:
        from data_pipeline import load_or_train_tokenizer

        texts = validation_documents(cfg, docs)[:limit] if limit else validation_documents(cfg, docs)
        result["comparison"] = compare(scores[PPL_TASK], texts, load_or_train_tokenizer(cfg.data),
                                       own_perplexity(cfg, state, device))
    path = Path(out) if out else folder / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)  # checked writable above
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["result_file"] = str(path)
    return result


def task_manager(tasks: list[str], include_path: str | None, key: str = "--tasks") -> Any:
    """lm-eval's task index (plus --include-path); ConfigError naming `key` and any task it does not know."""
    manager = _new_task_manager(include_path)
    check_task_names(tasks, key, manager.all_tasks)
    return manager


_MANAGERS: dict[str | None, Any] = {}  # lm-eval's task index per include path: built once per process (seconds)


def _new_task_manager(include_path: str | None) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ProjectError("lm-evaluation-harness is not installed: pip install lm-eval==0.4.13") from None
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    if include_path not in _MANAGERS:  # the index only reads task YAMLs; evaluations do not change it
        _MANAGERS[include_path] = TaskManager(include_path=include_path) if include_path else TaskManager()
    return _MANAGERS[include_path]


def check_task_names(tasks: list[str], key: str, known: Any = None) -> None:
    """ConfigError naming `key` and every task neither a project task nor in lm-eval's index. The index (seconds
    to build) is read only when a name is not a project task, and once per process."""
    if all(t in PROJECT_TASKS for t in tasks):
        if importlib.util.find_spec("lm_eval") is None:
            raise ProjectError("lm-evaluation-harness is not installed: pip install lm-eval==0.4.13")
        return
    if known is None:
        known = _new_task_manager(None).all_tasks
    unknown = [t for t in tasks if t not in PROJECT_TASKS and t not in known]
    if unknown:
        raise ConfigError(key, ",".join(unknown), f"unknown lm-eval task (project tasks: {', '.join(PROJECT_TASKS)})")


def _evaluate(hf_dir: Path, tasks: list[Any], max_length: int, limit: int | None, batch_size: int, device: str,
              manager: Any) -> dict[str, Any]:
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "trust_remote_code": True, "max_length": max_length,
                                    "dtype": "float32"},
            tasks=tasks, batch_size=batch_size, device=device, limit=limit, log_samples=False,
            task_manager=manager, verbosity="WARNING")
    except Exception as error:  # e.g. a hub task without its data offline: one line that says which
        text = " ".join(str(error).split())[:300]
        raise ProjectError(f"lm-eval failed: {type(error).__name__}: {text}") from error
    if not results:
        raise ProjectError("lm-eval returned no results")
    return results


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No hub access while the harness runs (its data is local); the previous settings come back after, so a
    training run that streams from the hub keeps doing so."""
    saved = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update({key: "1" for key in OFFLINE_ENV})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _step_of(folder: Path) -> int | None:
    tail = folder.name.split("_", 1)[-1]
    return int(tail) if folder.name.startswith("step_") and tail.isdigit() else None


def _version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"== lm-eval on {result['checkpoint']} ({result['seconds']:.0f}s) =="]
    for task, metrics in result["tasks"].items():
        lines.append(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if "comparison" in result:
        c = result["comparison"]
        lines.append(f"word ppl {c['harness_word_ppl']:.2f} over {c['words']} words = token ppl "
                     f"{c['harness_token_ppl']:.2f} over {c['tokens']} tokens ({c['tokens_per_word']:.2f} tokens/word); "
                     f"own validation ppl {c['own_val_ppl']:.2f} (ratio {c['ratio_harness_token_to_own']:.3f})")
    lines.append(f"results: {result['result_file']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.lm_eval", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    result = run_lm_eval(args.checkpoint, [t.strip() for t in args.tasks.split(",")], limit=args.limit,
                         docs=args.docs, batch_size=args.batch_size, device=args.device,
                         include_path=args.include_path, out=args.out)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
