"""Export a checkpoint as a Hugging Face model folder.

    python -m launcher.export_hf --checkpoint runs/NAME[/checkpoints[/step_N]] --out DIR [--dtype bfloat16]

DIR gets config.json, model.safetensors, the tokenizer (tokenizer.json: `AutoTokenizer.from_pretrained(DIR)`
encodes like the run's SentencePiece tokenizer) and the family's remote modeling file, registered through
`auto_map`, so every attention variant loads without this project installed:
  - model.family opt: modeling_outeffhop_opt.py, `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`;
    config.json is an OPTConfig (model_type "opt");
  - model.family bert: modeling_outeffhop_bert.py, `AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)`;
    config.json is a BertConfig (model_type "bert"), and the tokenizer names [CLS]/[SEP]/[MASK] as its
    cls/sep/mask tokens where it has them.
The attention settings are extra config keys; a plain-softmax model without gate also loads as stock
`OPTForCausalLM` / `BertForMaskedLM` (no remote code), any other variant names the remote file's attention
implementation so that the stock class refuses it rather than computing the wrong attention.

The checkpoint may also be a weights-only folder from `launcher.import_hf`. The padded embedding
(model.pad_vocab_to_multiple_of) is exported whole, so HF vocab_size = the padded size and logits,
losses and perplexities equal the training code's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from launcher.config import RunConfig
from launcher.hf_checkpoint import load_full_state_dict, locate, to_hf
from common.errors import ProjectError
from model import variants

REMOTE_FILE = Path(__file__).resolve().parent / "hf_remote" / "modeling_outeffhop_opt.py"
REMOTE_MODULE = REMOTE_FILE.stem
BERT_REMOTE_FILE = REMOTE_FILE.with_name("modeling_outeffhop_bert.py")
BERT_REMOTE_MODULE = BERT_REMOTE_FILE.stem
SHARED_ATTENTION_FILE = REMOTE_FILE.with_name("outeffhop_attention.py")  # variant math both modeling files import
# family -> (remote modeling file, its model class, transformers' own class, the Auto class that loads it)
FAMILIES = {
    "opt": (REMOTE_FILE, "OutEffHopOPTForCausalLM", "OPTForCausalLM", "AutoModelForCausalLM"),
    "bert": (BERT_REMOTE_FILE, "OutEffHopBertForMaskedLM", "BertForMaskedLM", "AutoModelForMaskedLM"),
}
# BERT's special tokens, named on the exported tokenizer where its vocabulary has them
BERT_SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]"}
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


def is_stock(cfg: RunConfig) -> bool:
    """True when transformers' own class of the model's family computes exactly this model."""
    if cfg.model.family == "bert":  # BertConfig carries layer_norm_eps itself
        return cfg.attention.variant == "softmax" and not cfg.attention.gated
    return is_stock_opt(cfg)


def _attention_settings(cfg: RunConfig) -> dict[str, Any]:
    """The extra config.json keys both remote modeling files read (see DEFAULTS there)."""
    a = cfg.attention
    if not variants.get(a.variant).exportable:
        raise ProjectError(f"attention.variant {a.variant} has no Hugging Face export: the exported attention file "
                           f"({SHARED_ATTENTION_FILE.name}) computes "
                           f"{', '.join(v for v in variants.names() if variants.get(v).exportable)}")
    clip = a.variant_params(cfg.data.seq_length)  # alpha resolved against the training block length
    return dict(attention_variant=a.variant, clip_gamma=clip.get("gamma", a.gamma), clip_zeta=clip.get("zeta", a.zeta),
                attention_gated=a.gated, gate_type=a.gate_type, gate_hidden=a.gate_hidden,
                gate_init_prob=a.gate_init_prob, train_seq_length=cfg.data.seq_length)


def hf_config(cfg: RunConfig, special_ids: dict[str, int | None]) -> Any:
    """transformers' OPTConfig (or BertConfig for model.family bert) with this project's attention settings
    as extra keys."""
    if cfg.model.family == "bert":
        return bert_config(cfg, special_ids)
    from transformers import OPTConfig

    m = cfg.model
    config = OPTConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        ffn_dim=m.ffn_hidden_size, num_attention_heads=m.num_heads, max_position_embeddings=m.max_position_embeddings,
        do_layer_norm_before=True, word_embed_proj_dim=m.hidden_size, dropout=m.dropout,
        attention_dropout=m.attention_dropout, activation_function="relu", enable_bias=True,
        layer_norm_elementwise_affine=True, layerdrop=0.0, init_std=m.init_std,
        tie_word_embeddings=m.tie_word_embeddings, **special_ids,
        # read by modeling_outeffhop_opt.py (see DEFAULTS there); transformers' OPT fixes eps at 1e-5
        layer_norm_eps=m.layer_norm_eps, **_attention_settings(cfg))
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.OutEffHopOPTForCausalLM"}
    return config


def bert_config(cfg: RunConfig, special_ids: dict[str, int | None]) -> Any:
    """transformers' BertConfig of model/bert.py's BertForMaskedLM (post-LN, exact GELU, tied decoder)."""
    from transformers import BertConfig

    m = cfg.model
    config = BertConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.ffn_hidden_size, hidden_act="gelu",
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
        max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
        initializer_range=m.init_std, layer_norm_eps=m.layer_norm_eps, tie_word_embeddings=True,
        is_decoder=False, **special_ids,
        **_attention_settings(cfg))  # read by modeling_outeffhop_bert.py (see DEFAULTS there)
    config.auto_map = {"AutoModelForMaskedLM": f"{BERT_REMOTE_MODULE}.OutEffHopBertForMaskedLM"}
    return config


def _finish_config(out: Path, stock: bool, family: str = "opt") -> None:
    """Edit what save_pretrained wrote into config.json: a stock-compatible model names transformers' own
    class (vLLM & co. pick it by `architectures`); any other names the remote file's attention
    implementation, so the stock class refuses the folder instead of computing plain softmax attention
    (transformers does not save that key itself)."""
    remote = importlib.import_module(f"launcher.hf_remote.{FAMILIES[family][0].stem}")
    path = out / "config.json"
    config = json.loads(path.read_text())
    if stock:
        config["architectures"] = [FAMILIES[family][2]]
    else:
        config["attn_implementation"] = remote.ATTN_IMPLEMENTATION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_tokenizer(cfg: RunConfig, spec: str | None) -> Any:
    """The run's tokenizer as a transformers tokenizer (converted from SentencePiece, or an hf: folder)."""
    from data_pipeline.config import HF_TOKENIZER_PREFIX
    from data_pipeline.tokenizer import cached_tokenizer_path
    from launcher.hf_tokenizer import sentencepiece_to_hf

    if spec is None and cfg.data.tokenizer_type == "char":
        raise ProjectError("the run uses data.tokenizer_type=char (a fixed character vocabulary), which has no "
                           "Hugging Face tokenizer export yet; pass --tokenizer PATH to ship another one")
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


def name_bert_special_tokens(tok: Any) -> None:
    """Name [CLS]/[SEP]/[MASK] (and [PAD] when there is no pad token) as the tokenizer's cls/sep/mask/pad
    tokens where its vocabulary has them (the project's SentencePiece models do, as user-defined pieces),
    so fill-mask pipelines and collators find them; no id changes and text without them encodes as before.

    transformers splits named special tokens off before normalisation, and the SentencePiece conversion
    then starts the next segment with a word-start "▁" of its own: the tokens strip the spaces around
    them, so "The [MASK] of" encodes as ▁The [MASK] ▁of, as a masked word looks in training (the
    SentencePiece model itself gives ▁The ▁ [MASK] ▁of)."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    named = {attribute: AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=True)
             for attribute, token in BERT_SPECIAL_TOKENS.items()
             if token in vocab and getattr(tok, attribute) is None}
    if named:
        tok.add_special_tokens(named)
    if tok.cls_token_id is not None and tok.sep_token_id is not None:
        # Every training example is [CLS] text [SEP] (token type 0): encode text the same way by default.
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.cls_token} $A {tok.sep_token}", pair=f"{tok.cls_token} $A {tok.sep_token} $B:1 {tok.sep_token}:1",
            special_tokens=[(tok.cls_token, tok.cls_token_id), (tok.sep_token, tok.sep_token_id)])


def export(checkpoint: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "auto",
           force: bool = False) -> Path:
    """Write the Hugging Face folder; returns it. Raises ProjectError on bad input."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ProjectError("export needs transformers: pip install transformers==5.23.0") from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ProjectError(f"output folder exists and is not empty: {out} (pass --force to write into it)")
    cfg, state = load_full_state_dict(checkpoint)
    tok = export_tokenizer(cfg, tokenizer)
    if len(tok) > cfg.model.padded_vocab_size:
        raise ProjectError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary "
                           f"({cfg.model.padded_vocab_size}): wrong --tokenizer?")
    family = cfg.model.family
    if family == "bert":
        name_bert_special_tokens(tok)
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = hf_config(cfg, special)
    remote_file, remote_class = FAMILIES[family][:2]
    model_class = getattr(importlib.import_module(f"launcher.hf_remote.{remote_file.stem}"), remote_class)
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(to_hf(state, cfg.model.tie_word_embeddings, family), strict=True, assign=True)
    if dtype != "auto":
        model.to(DTYPES[dtype])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for path in (remote_file, SHARED_ATTENTION_FILE):  # the modeling file imports the shared one (relative)
        shutil.copyfile(path, out / path.name)
    _finish_config(out, is_stock(cfg), family)
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
    auto_class = FAMILIES[json.loads((out / "config.json").read_text())["model_type"]][3]  # model_type = family
    print(f"exported {weights} -> {out}\n"
          f"load: {auto_class}.from_pretrained({str(out)!r}, trust_remote_code=True); "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
