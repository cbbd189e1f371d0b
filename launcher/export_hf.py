"""Export a checkpoint as a Hugging Face model folder.

    python -m launcher.export_hf --checkpoint runs/NAME[/checkpoints[/step_N]] --out DIR [--dtype bfloat16]

DIR gets config.json, model.safetensors, the tokenizer (tokenizer.json: `AutoTokenizer.from_pretrained(DIR)`
encodes like the run's SentencePiece tokenizer) and modeling_outeffhop_opt.py, registered through
`auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads every attention
variant without this project installed. config.json is an OPTConfig (model_type "opt") with the
attention settings as extra keys; a plain-softmax model without gate also loads as stock
`OPTForCausalLM` (no remote code), any other variant names the remote file's attention
implementation so that stock OPT refuses it rather than computing the wrong attention.

The checkpoint may also be a weights-only folder from `launcher.import_hf`. The padded embedding
(model.pad_vocab_to_multiple_of) is exported whole, so HF vocab_size = the padded size and logits,
losses and perplexities equal the training code's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from launcher.config import RunConfig
from launcher.hf_checkpoint import load_full_state_dict, locate, to_hf
from model.errors import ProjectError

REMOTE_FILE = Path(__file__).resolve().parent / "hf_remote" / "modeling_outeffhop_opt.py"
REMOTE_MODULE = REMOTE_FILE.stem
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, its checkpoints/ dir (follows 'latest'), a step_N dir, or an import_hf folder")
    parser.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model or hf:<dir> (default: the run's data.tokenizer or cached model)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype in the export (auto: as stored in the checkpoint)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return parser.parse_args(argv)


def is_stock_opt(cfg: RunConfig) -> bool:
    """True when transformers' own OPT computes exactly this model (plain softmax, no gate, eps 1e-5)."""
    return cfg.attention.variant == "softmax" and not cfg.attention.gated and cfg.model.layer_norm_eps == 1e-5


def hf_config(cfg: RunConfig, special_ids: dict[str, int | None]) -> Any:
    """transformers' OPTConfig with this project's attention settings as extra keys."""
    from transformers import OPTConfig

    m, a = cfg.model, cfg.attention
    clip = a.variant_params(cfg.data.seq_length)  # alpha resolved against the training block length
    config = OPTConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        ffn_dim=m.ffn_hidden_size, num_attention_heads=m.num_heads, max_position_embeddings=m.max_position_embeddings,
        do_layer_norm_before=True, word_embed_proj_dim=m.hidden_size, dropout=m.dropout,
        attention_dropout=m.attention_dropout, activation_function="relu", enable_bias=True,
        layer_norm_elementwise_affine=True, layerdrop=0.0, init_std=m.init_std,
        tie_word_embeddings=m.tie_word_embeddings, **special_ids,
        # read by modeling_outeffhop_opt.py (see DEFAULTS there)
        attention_variant=a.variant, clip_gamma=clip.get("gamma", a.gamma), clip_zeta=clip.get("zeta", a.zeta),
        attention_gated=a.gated, gate_type=a.gate_type, gate_hidden=a.gate_hidden, gate_init_prob=a.gate_init_prob,
        layer_norm_eps=m.layer_norm_eps, train_seq_length=cfg.data.seq_length)
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.OutEffHopOPTForCausalLM"}
    return config


def _finish_config(out: Path, stock: bool) -> None:
    """Edit what save_pretrained wrote into config.json: a stock-compatible model names transformers' own
    class (vLLM & co. pick it by `architectures`); any other names the remote file's attention
    implementation, so stock OPT refuses the folder instead of computing plain softmax attention
    (transformers does not save that key itself)."""
    from launcher.hf_remote.modeling_outeffhop_opt import ATTN_IMPLEMENTATION

    path = out / "config.json"
    config = json.loads(path.read_text())
    if stock:
        config["architectures"] = ["OPTForCausalLM"]
    else:
        config["attn_implementation"] = ATTN_IMPLEMENTATION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_tokenizer(cfg: RunConfig, spec: str | None) -> Any:
    """The run's tokenizer as a transformers tokenizer (converted from SentencePiece, or an hf: folder)."""
    from data_pipeline.config import HF_TOKENIZER_PREFIX
    from data_pipeline.tokenizer import cached_tokenizer_path
    from launcher.hf_tokenizer import sentencepiece_to_hf

    spec = spec or cfg.data.tokenizer or str(cached_tokenizer_path(cfg.data))
    if spec.startswith(HF_TOKENIZER_PREFIX):
        from transformers import AutoTokenizer

        folder = Path(spec[len(HF_TOKENIZER_PREFIX):])
        if not folder.is_dir():
            raise ProjectError(f"tokenizer folder not found: {folder}")
        return AutoTokenizer.from_pretrained(str(folder))
    if not Path(spec).is_file():
        raise ProjectError(f"tokenizer not found: {spec} (the run's SentencePiece model; pass --tokenizer PATH)")
    return sentencepiece_to_hf(spec, model_max_length=cfg.model.max_position_embeddings)


def export(checkpoint: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "auto",
           force: bool = False) -> Path:
    """Write the Hugging Face folder; returns it. Raises ProjectError on bad input."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ProjectError("export needs transformers: pip install transformers==5.23.0") from None
    from launcher.hf_remote.modeling_outeffhop_opt import OutEffHopOPTForCausalLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ProjectError(f"output folder exists and is not empty: {out} (pass --force to write into it)")
    cfg, state = load_full_state_dict(checkpoint)
    tok = export_tokenizer(cfg, tokenizer)
    if len(tok) > cfg.model.padded_vocab_size:
        raise ProjectError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary "
                           f"({cfg.model.padded_vocab_size}): wrong --tokenizer?")
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = hf_config(cfg, special)
    with torch.device("meta"):
        model = OutEffHopOPTForCausalLM(config)
    model.load_state_dict(to_hf(state, cfg.model.tie_word_embeddings), strict=True, assign=True)
    if dtype != "auto":
        model.to(DTYPES[dtype])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copyfile(REMOTE_FILE, out / REMOTE_FILE.name)
    _finish_config(out, is_stock_opt(cfg))
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.force)
        _, weights = locate(args.checkpoint)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {weights} -> {out}\n"
          f"load: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True); "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
