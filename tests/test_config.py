"""Config loading, dotted overrides and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.config import config_from_dict, load_config, save_config
from common.errors import ConfigError, ProjectError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("opt_*.yaml"))
PUBLISHED_SHAPES = {  # OPT paper, table 1: layers, heads, d_model
    "opt_125m": (12, 12, 768), "opt_350m": (24, 16, 1024), "opt_1b3": (24, 32, 2048),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_validate(path: Path) -> None:
    cfg = load_config(path)
    if path.stem in PUBLISHED_SHAPES:
        assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.hidden_size) == PUBLISHED_SHAPES[path.stem]
        assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size


def test_overrides_are_typed_and_reach_nested_sections() -> None:
    cfg = load_config(CONFIGS[0], ["train.lr=3e-4", "attention.variant=softmax", "attention.gated=true",
                                   "data.train_files=[a.txt]", "eval.max_blocks=null"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.attention.variant == "softmax" and cfg.model.attention.gated is True
    assert cfg.eval.max_blocks is None


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0], ["attention.variant=clipped_softmax", "attention.alpha=12"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == ["model", "attention", "data", "parallel", "train", "logging", "eval"]
    assert config_from_dict(saved) == cfg


@pytest.mark.parametrize("override,key", [
    ("attention.variant=softmax2", "attention.variant"),
    ("model.num_heads=5", "model.num_heads"),
    ("train.steps=0", "train.steps"),
    ("train.steps=-3", "train.steps"),
    ("train.lr=fast", "train.lr"),
    ("train.global_batch_size=12", "train.global_batch_size"),
    ("model.dropout=1.5", "model.dropout"),
    ("attention.backend=cuda", "attention.backend"),
    ("train.lr_schedule=exp", "train.lr_schedule"),
    ("model.colour=blue", "model.colour"),
    ("data.seq_length=100000", "data.seq_length"),
])
def test_invalid_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS[0], [override])
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        config_from_dict({"optimiser": {}})
    with pytest.raises(ProjectError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ProjectError, match="not valid YAML"):
        load_config(bad)


def test_masking_keys_are_berts_and_an_older_opt_config_with_them_still_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.mlm_* moved from the shared text data section to BERT's (model/bert/data_config.py): a BERT run reads
    them, and an OPT config.yaml written before the move (every checkpoint's carries them) loads silently; a value
    someone set on an OPT run is said in one note."""
    bert = load_config("configs/bert_tiny.yaml", ["data.mlm_probability=0.2"])
    assert type(bert.data).__name__ == "BertDataConfig" and bert.data.mlm_probability == 0.2
    raw = yaml.safe_load(Path("configs/opt_tiny.yaml").read_text())
    raw["data"].update(mlm_probability=0.15, mlm_mask_fraction=0.8, mlm_random_fraction=0.1, mlm_eval_seed=2024)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    opt = load_config(tmp_path / "old.yaml")
    assert not hasattr(opt.data, "mlm_probability")
    assert capsys.readouterr().err == ""  # the values every older config.yaml carries: nothing to say
    load_config(tmp_path / "old.yaml", ["data.mlm_probability=0.3"])  # a value someone set on an OPT run
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: data.mlm_probability ignored") \
        and "model.family=bert" in lines[0]
    with pytest.raises(ConfigError, match="unknown key"):  # a key that never existed is still an error
        load_config(tmp_path / "old.yaml", ["data.mlm_colour=1"])
