"""lm-evaluation-harness on exported tiny models (softmax and softmax1), offline: the standalone command, the
in-training hook, and the harness's word perplexity recomputed from this project's own model."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_pretrain, tiny_overrides

from launcher import lm_eval as project_lm_eval

TASKS = "outeffhop_wiki_ppl,outeffhop_wiki_cloze"


@pytest.fixture(scope="module")
def softmax_run(data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step plain-softmax run that evaluates both project tasks at steps 3 and 6 during training."""
    run_dir = tmp_path_factory.mktemp("lm_eval_run")
    overrides = tiny_overrides(data_cache, run_dir, **{
        "logging.run_name": "softmax", "attention.variant": "softmax", "eval.outlier_interval": "null",
        "eval.lm_eval_tasks": f"[{TASKS}]", "eval.lm_eval_interval": 3, "eval.lm_eval_limit": 4})
    result = run_pretrain(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "softmax"


def test_in_training_scores_logged(softmax_run: Path) -> None:
    records = [json.loads(line) for line in (softmax_run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if r["kind"] == "lm_eval"}
    assert sorted(logged) == [3, 6]
    for record in logged.values():
        assert 0.0 <= record["outeffhop_wiki_cloze/acc"] <= 1.0
        assert record["outeffhop_wiki_ppl/word_perplexity"] > 1.0
    saved = json.loads((softmax_run / "checkpoints" / "step_6" / "lm_eval.json").read_text())
    assert saved["tasks"]["outeffhop_wiki_cloze"]["acc"] == logged[6]["outeffhop_wiki_cloze/acc"]
    assert saved["limit"] == 4 and saved["step"] == 6


def _reference_word_perplexity(checkpoint: Path, texts: list[str]) -> float:
    """The harness's rolling word perplexity recomputed with this project's model (not the export): each
    document scored from an EOS prefix in disjoint windows of data.seq_length tokens, NLL summed over words."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from data_pipeline import load_or_train_tokenizer
    from launcher.hf_checkpoint import load_full_state_dict
    from outliers.report import model_from_state

    cfg, state = load_full_state_dict(checkpoint)
    model = model_from_state(cfg, state, "cpu")
    tokenizer = load_or_train_tokenizer(cfg.data)
    nll, words = 0.0, 0
    with torch.no_grad():
        for text in texts:
            windows = get_rolling_token_windows(token_list=tokenizer.encode(text), prefix_token=tokenizer.eos_id,
                                                max_seq_len=cfg.data.seq_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                ids = torch.tensor([(context + continuation)[:-1]])  # as the harness: at most seq_length inputs
                logprobs = torch.log_softmax(model(ids)[0, -len(continuation):].float(), dim=-1)
                nll -= float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
            words += len(re.split(r"\s+", text))
    return math.exp(nll / words)


@pytest.mark.parametrize("variant", ["softmax", "softmax1"])
def test_standalone_two_variants(variant: str, softmax_run: Path, trained_run: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(softmax_run if variant == "softmax" else trained_run, run)
    assert json.loads((run / "summary.json").read_text())["attention_variant"] == variant
    code = project_lm_eval.main(["--checkpoint", str(run), "--tasks", TASKS, "--limit", "6", "--docs", "24",
                                 "--device", "cpu", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads((run / "checkpoints" / "step_6" / "lm_eval.json").read_text())
    assert f"results: {run / 'checkpoints' / 'step_6' / 'lm_eval.json'}" in out
    cloze, ppl = result["tasks"]["outeffhop_wiki_cloze"], result["tasks"]["outeffhop_wiki_ppl"]
    assert 0.0 <= cloze["acc"] <= 1.0 and 0.0 <= cloze["acc_norm"] <= 1.0
    # The harness, through the exported folder's remote code, computes what this project's model computes.
    from launcher.hf_checkpoint import load_full_state_dict

    cfg, _ = load_full_state_dict(run)
    texts = project_lm_eval.validation_documents(cfg, 24)[:6]
    # (NLL per word to 1e-3 nats: fp32 sums over padded batches vs one window at a time)
    assert math.log(ppl["word_perplexity"]) == pytest.approx(math.log(_reference_word_perplexity(run, texts)),
                                                             abs=1e-3)
    comparison = result["comparison"]
    assert comparison["words"] == sum(len(re.split(r"\s+", t)) for t in texts)
    assert math.log(comparison["harness_token_ppl"]) == pytest.approx(
        math.log(ppl["word_perplexity"]) * comparison["words"] / comparison["tokens"])


def test_bad_input_is_one_line(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert project_lm_eval.main(["--checkpoint", str(trained_run), "--tasks", "no_such_task"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: config key '--tasks' = 'no_such_task': unknown lm-eval task")
    assert project_lm_eval.main(["--checkpoint", str(trained_run / "nowhere"), "--tasks", TASKS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("overrides,message", [
    (["eval.lm_eval_tasks=[outeffhop_wiki_ppl]"], "config key 'eval.lm_eval_interval' = None: must be set"),
    (["eval.lm_eval_tasks=[outeffhop_wiki_ppl]", "eval.lm_eval_interval=0"], "'eval.lm_eval_interval' = 0"),
    (["eval.lm_eval_tasks=[outeffhop_wiki_ppl]", "eval.lm_eval_interval=5", "model.family=bert"],
     "needs a causal LM (model.family=opt), not bert"),
])
def test_config_rejects_bad_lm_eval_settings(overrides: list[str], message: str) -> None:
    from launcher.config import load_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/opt_tiny.yaml", overrides)
