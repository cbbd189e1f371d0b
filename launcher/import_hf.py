"""Import a published model (OPT, BERT, ViT) to evaluate it or continue pretraining it with another attention variant.

    python -m launcher.import_hf --model DIR --out CKPT [--variant softmax1] [--gated] \\
        [--config RECIPE.yaml] [--set key=value ...]
    python -m launcher.evaluate --checkpoint CKPT --quant w8a8      # outliers + W8A8, no training
    python -m launcher.pretrain --config CKPT/config.yaml           # continue pretraining

DIR is a local folder as the hub serves it; its family is read from config.json and the family's Hugging Face
adapter (model/<family>/hf.py) checks that this project's model computes it and maps the weights:
  - OPT: transformers' OPTForCausalLM (pre-LayerNorm: opt-125m, 1.3b, 2.7b, ...; opt-350m is refused);
  - BERT: transformers' BertForMaskedLM, or a headless BertModel (e.g. a sentence encoder), whose MLM head is
    initialised as a new model's (said in one line);
  - ViT: transformers' ViTForImageClassification, or timm's hub folder (config.json with `architecture`, e.g.
    timm/vit_small_patch16_224.augreg_in21k_ft_in1k) of a plain VisionTransformer;
  - folders written by launcher.export_hf (any variant) for all three.
STanHop-Net has no published weights: a stanhop recipe is refused.

CKPT is a weights-only checkpoint: model.safetensors (this project's parameter names), config.yaml and, for a
text model, tokenizer/ (the model's own tokenizer, used through `data.tokenizer: hf:CKPT/tokenizer`). The
config is the recipe (default: the family's published-size recipe) with the model shape from DIR, the chosen
attention variant and `train.init_from: CKPT`, so a run started from it loads these weights with a fresh
optimizer and data stream. Switching the variant keeps every weight; parameters only the new variant has
(sink logits, gate) start from their initialisation (model/variants.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from checkpoint.weights import variant_param
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from launcher.config import RunConfig, config_from_dict, load_config
from launcher.hf_checkpoint import check_shapes, expected_shapes, save_weights_checkpoint
from model import variants
from model.config import SOFTMAX_VARIANTS
from model.family import known_families, spec_for
from model.hf_adapter import HFAdapter, HFSource

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face / timm model folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder (weights-only checkpoint)")
    parser.add_argument("--variant", choices=SOFTMAX_VARIANTS, default=None,
                        help="attention variant to continue with (default: the model's own, softmax when published)")
    parser.add_argument("--gated", action="store_true", help="add gated attention heads (new, initialised gates)")
    parser.add_argument("--config", default=None,
                        help="recipe for data/train/eval settings; the model shape comes from --model (default: "
                             "the family's, e.g. configs/bert_base.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the written config, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder if --model has none")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return parser.parse_args(argv)


def adapters() -> dict[str, HFAdapter]:
    """Every family's Hugging Face adapter that imports, by family name."""
    return {name: spec_for(name).hf for name in known_families()
            if spec_for(name).hf is not None and spec_for(name).hf.model_types}


def source_family(folder: Path) -> tuple[str, dict[str, Any]]:
    """(family, parsed config.json) of a model folder: transformers' `model_type`, or timm's `architecture`."""
    path = folder / "config.json"
    if not path.is_file():
        raise ProjectError(f"not a Hugging Face model folder (no config.json): {folder}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ProjectError(f"not valid JSON: {path}") from None
    if not isinstance(config, dict):
        raise ProjectError(f"{path} is not a model config (a JSON object)")
    known = adapters()
    model_type = config.get("model_type")
    if model_type is None and "architecture" in config:  # timm's hub format
        model_type = "vit" if str(config["architecture"]).startswith(("vit_", "deit_")) else config["architecture"]
    for family, adapter in known.items():
        if model_type in adapter.model_types:
            return family, config
    supported = ", ".join(t for adapter in known.values() for t in adapter.model_types)
    raise ProjectError(f"{path}: model_type {model_type!r} is not supported (importable: {supported}, and timm "
                       f"vit_* folders)")


def recipe(args: argparse.Namespace, family: str, adapter: HFAdapter) -> dict[str, Any]:
    path = args.config or adapter.default_recipe
    raw = load_config(path).to_dict()
    recipe_family = raw["model"]["family"]
    if recipe_family == "stanhop":
        raise ProjectError(f"--config {path}: STanHop-Net has no published weights to import (train it from "
                           f"scratch: python -m launcher.pretrain --config {path})")
    if recipe_family != family:
        raise ProjectError(f"--config {path} is a model.family {recipe_family} recipe, but {args.model} holds a "
                           f"{family} model")
    return raw


def run_config(raw: dict[str, Any], source: HFSource, args: argparse.Namespace, out: Path) -> RunConfig:
    """The recipe with the model section from the source, its data normalisation and the chosen variant."""
    raw["model"].update(source.model)
    attention = raw["attention"]
    stored = source.attention  # set in folders from launcher.export_hf
    attention.update(variant=args.variant or stored.get("attention_variant", "softmax"))
    attention.update(variants.imported_settings(stored))  # the export file's table, read backwards
    attention["gated"] = bool(args.gated or stored.get("attention_gated", False))
    raw["data"].update(source.data)
    if source.tokenizer_dir is not None:
        raw["data"].update(seq_length=min(raw["data"]["seq_length"], source.model["max_position_embeddings"]),
                           tokenizer=None)
    raw["logging"]["run_name"] = out.name
    cfg = config_from_dict(raw, args.overrides)
    spec = spec_for(cfg.model.family)
    spec.check_layout(cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline)  # e.g. heads that TP cannot split
    # Set after validation: the tokenizer folder and weights are written once everything checked out.
    if source.tokenizer_dir is not None:
        cfg.data.tokenizer = f"hf:{out / TOKENIZER_DIR}"
    cfg.train.init_from = str(out)
    return cfg


def load_tokenizer(tokenizer_dir: Path, cfg: RunConfig) -> Any:
    from transformers import AutoTokenizer

    # transformers builds an empty tokenizer for a folder without tokenizer files: look for them first
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ProjectError(f"no tokenizer in {tokenizer_dir} (none of {', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as error:
        raise ProjectError(f"cannot load the tokenizer in {tokenizer_dir}: {' '.join(str(error).split())[:200]}") from None
    if len(tokenizer) > cfg.model.vocab_size:
        raise ProjectError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                           f"vocab_size {cfg.model.vocab_size}")
    return tokenizer


def new_head(cfg: RunConfig, keys: list[str]) -> dict[str, torch.Tensor]:
    """A freshly initialised model's values of `keys` (seeded by train.seed, so an import is reproducible)."""
    spec = spec_for(cfg.model.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        fresh = spec.build(cfg.model, seq_length=spec.example_length(cfg)).state_dict()
    return {key: fresh[key].clone() for key in keys}


def import_model(args: argparse.Namespace) -> tuple[Path, RunConfig, list[str]]:
    """Write the weights-only checkpoint; (its folder, its config, notes to print). Bad input: ProjectError."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ProjectError("import needs transformers: pip install transformers==5.23.0") from None
    folder, out = Path(args.model), Path(args.out).absolute()
    if not folder.is_dir():
        raise ProjectError(f"model folder not found: {folder}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise ProjectError(f"output folder exists and is not empty: {out} (pass --force to write into it)")
    family, config = source_family(folder)
    adapter = adapters()[family]
    raw = recipe(args, family, adapter)
    source = adapter.read_source(folder, config)
    cfg = run_config(raw, source, args, out)
    tokenizer = None
    if source.tokenizer_dir is not None:
        tokenizer = load_tokenizer(Path(args.tokenizer or source.tokenizer_dir), cfg)
    state = source.weights()
    expected = expected_shapes(cfg)
    # parameters of the source's variant that the chosen one lacks are dropped (e.g. sink -> softmax1)
    state = {key: value for key, value in state.items() if key in expected or not variant_param(key)}
    notes = []
    if source.head is not None:
        name, prefixes = source.head
        missing = [key for key in expected if key.startswith(prefixes) and key not in state]
        if missing:
            state.update(new_head(cfg, missing))
            count = sum(expected[key].numel() for key in missing)
            notes.append(f"note: {folder} has no {name}: initialised as a new model's ({len(missing)} tensors, "
                         f"{count:,} parameters, seed train.seed={cfg.train.seed})")
    check_shapes(state, expected, str(folder), allow_variant_changes=True)
    if tokenizer is not None:
        adapter.prepare_tokenizer(tokenizer)  # e.g. BERT names [CLS]/[SEP]/[MASK]
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    save_weights_checkpoint(out, cfg, state, metadata={"source": str(folder.absolute())})
    return out, cfg, notes


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.import_hf", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out, cfg, notes = import_model(args)
    attention = cfg.attention.variant + (" + gate" if cfg.attention.gated else "")
    for note in notes:
        print(note)
    print(f"imported {args.model} ({cfg.model.family}, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) "
          f"with attention {attention} -> {out}\n"
          f"evaluate (outliers + W8A8): python -m launcher.evaluate --checkpoint {out} --quant w8a8\n"
          f"continue pretraining:       python -m launcher.pretrain --config {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
