"""Import a Hugging Face OPT folder (e.g. a downloaded facebook/opt-125m) to continue pretraining it.

    python -m launcher.import_hf --model DIR --out CKPT [--variant softmax1] [--gated] \\
        [--config configs/opt_125m.yaml] [--set key=value ...]
    python -m launcher.pretrain --config CKPT/config.yaml

CKPT is a weights-only checkpoint: model.safetensors (this project's parameter names), tokenizer/ (the
model's own tokenizer, e.g. OPT's GPT-2 BPE, used through `data.tokenizer: hf:CKPT/tokenizer`) and
config.yaml: the --config recipe with the model shape taken from DIR, the chosen attention variant and
`train.init_from: CKPT`, so a run started from it loads these weights with a fresh optimizer and data
stream. Switching the variant (e.g. softmax -> softmax1) keeps every weight; parameters only the new
variant has (sink logits, gate) start from their initialisation.

Supported: pre-LayerNorm OPT without embedding projection (opt-125m, 1.3b, 2.7b, 6.7b, ...) and folders
written by launcher.export_hf. facebook/opt-350m (post-LayerNorm, project_in/out) is rejected.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from launcher.config import RunConfig, config_from_dict, load_config
from checkpoint.weights import variant_param
from launcher.hf_checkpoint import check_shapes, expected_shapes, from_hf, save_weights_checkpoint
from model.config import SOFTMAX_VARIANTS
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# transformers OPTConfig keys this project's decoder needs at these values: (value, what differs otherwise)
REQUIRED = {
    "do_layer_norm_before": (True, "post-LayerNorm blocks, as in facebook/opt-350m"),
    "_remove_final_layer_norm": (False, "no final LayerNorm"),
    "activation_function": ("relu", "another activation"),
    "enable_bias": (True, "linear layers without bias"),
    "layer_norm_elementwise_affine": (True, "LayerNorms without weights"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local Hugging Face OPT folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder (weights-only checkpoint)")
    parser.add_argument("--variant", choices=SOFTMAX_VARIANTS, default=None,
                        help="attention variant to continue with (default: the model's own, softmax for OPT)")
    parser.add_argument("--gated", action="store_true", help="add gated attention heads (new, initialised gates)")
    parser.add_argument("--config", default="configs/opt_125m.yaml",
                        help="recipe for data/train/eval settings (the model shape comes from --model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the written config, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder if --model has none")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return parser.parse_args(argv)


def read_hf_config(folder: Path) -> Any:
    """The folder's OPTConfig, checked against what this project's decoder can represent."""
    from transformers import OPTConfig

    path = folder / "config.json"
    if not path.is_file():
        raise ProjectError(f"not a Hugging Face model folder (no config.json): {folder}")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise ProjectError(f"not valid JSON: {path}") from None
    if model_type != "opt":
        raise ProjectError(f"{path}: model_type {model_type!r} is not supported (OPT checkpoints only)")
    try:
        config = OPTConfig.from_pretrained(str(folder))
    except Exception as error:
        raise ProjectError(f"cannot read {path}: {' '.join(str(error).split())[:200]}") from None
    for key, (value, meaning) in REQUIRED.items():
        if getattr(config, key) != value:
            raise ProjectError(f"{path}: {key}={getattr(config, key)!r} ({meaning}) is not supported: this "
                               f"project's OPT is pre-LayerNorm with ReLU, biases and a final LayerNorm")
    if config.word_embed_proj_dim != config.hidden_size:
        raise ProjectError(f"{path}: word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size="
                           f"{config.hidden_size} (project_in/project_out, as in facebook/opt-350m) is not supported")
    return config


def run_config(hf: Any, args: argparse.Namespace, out: Path) -> RunConfig:
    """The --config recipe with the model section from the HF config and the chosen variant."""
    raw = load_config(args.config).to_dict()
    raw["model"].update(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.ffn_dim, max_position_embeddings=hf.max_position_embeddings, vocab_size=hf.vocab_size,
        pad_vocab_to_multiple_of=1, init_std=hf.init_std, dropout=float(hf.dropout),
        attention_dropout=float(hf.attention_dropout), layer_norm_eps=getattr(hf, "layer_norm_eps", 1e-5),
        tie_word_embeddings=hf.tie_word_embeddings)
    source_variant = getattr(hf, "attention_variant", "softmax")  # set in folders from launcher.export_hf
    attention = raw["attention"]
    attention.update(variant=args.variant or source_variant, gated=args.gated or getattr(hf, "attention_gated", False))
    if hasattr(hf, "attention_variant"):
        attention.update(gamma=hf.clip_gamma, zeta=hf.clip_zeta, alpha=None, gate_type=hf.gate_type,
                         gate_hidden=hf.gate_hidden, gate_init_prob=hf.gate_init_prob)
    raw["data"].update(seq_length=min(raw["data"]["seq_length"], hf.max_position_embeddings), tokenizer=None)
    raw["logging"]["run_name"] = out.name
    cfg = config_from_dict(raw, args.overrides)
    # Set after validation: the tokenizer folder and weights are written once everything checked out.
    cfg.data.tokenizer = f"hf:{out / TOKENIZER_DIR}"
    cfg.train.init_from = str(out)
    return cfg


def import_model(args: argparse.Namespace) -> tuple[Path, RunConfig]:
    try:
        from transformers import AutoTokenizer

        # transformers' OPT plus the variants' parameters: also reads folders from launcher.export_hf
        from model.hf_remote.modeling_outeffhop_opt import OutEffHopOPTForCausalLM
    except ImportError:
        raise ProjectError("import needs transformers: pip install transformers==5.23.0") from None
    folder, out = Path(args.model), Path(args.out).absolute()
    if not folder.is_dir():
        raise ProjectError(f"model folder not found: {folder}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise ProjectError(f"output folder exists and is not empty: {out} (pass --force to write into it)")
    hf_config = read_hf_config(folder)
    cfg = run_config(hf_config, args, out)
    tokenizer_dir = Path(args.tokenizer or folder)
    # transformers builds an empty tokenizer for a folder without tokenizer files: look for them first
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ProjectError(f"no tokenizer in {tokenizer_dir} (none of {', '.join(TOKENIZER_FILES)}); "
                           f"pass --tokenizer DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as error:
        raise ProjectError(f"cannot load the tokenizer in {tokenizer_dir}: {' '.join(str(error).split())[:200]}") from None
    if len(tokenizer) > cfg.model.vocab_size:
        raise ProjectError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                           f"vocab_size {cfg.model.vocab_size}")
    try:
        hf_model, info = OutEffHopOPTForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                 output_loading_info=True)
    except Exception as error:
        raise ProjectError(f"cannot load weights from {folder}: {' '.join(str(error).split())[:300]}") from None
    if info["missing_keys"] or info["mismatched_keys"]:
        first = sorted(info["missing_keys"]) or [str(k) for k in info["mismatched_keys"]]
        raise ProjectError(f"weights in {folder} are incomplete or do not match its config.json "
                           f"(first: {first[0]})")
    state = from_hf(hf_model.state_dict(), cfg.model.tie_word_embeddings)
    expected = expected_shapes(cfg)
    # parameters of the source's variant that the chosen one lacks are dropped (e.g. sink -> softmax1)
    state = {key: value for key, value in state.items() if key in expected or not variant_param(key)}
    check_shapes(state, expected, str(folder), allow_variant_changes=True)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    save_weights_checkpoint(out, cfg, state, metadata={"source": str(folder.absolute())})
    return out, cfg


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.import_hf", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out, cfg = import_model(args)
    attention = cfg.attention.variant + (" + gate" if cfg.attention.gated else "")
    print(f"imported {args.model} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) with attention "
          f"{attention} -> {out}\ncontinue pretraining: python -m launcher.pretrain --config {out / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
