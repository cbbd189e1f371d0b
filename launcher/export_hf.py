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
from launcher.hf_checkpoint import hf_adapter, load_full_state_dict, locate
from common.cli import ArgumentParser, run_command
from common.errors import ProjectError
from model import variants
from model.hf_adapter import HFAdapter

SHARED_ATTENTION_FILE = "outeffhop_attention.py"  # the variant math both remote modeling files import
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run dir, its checkpoints/ dir (follows 'latest'), a step_N dir, or an import_hf folder")
    parser.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece .model or hf:<dir> (default: the run's data.tokenizer or cached model)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype in the export (auto: as stored in the checkpoint)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    return parser.parse_args(argv)


def is_stock(cfg: RunConfig) -> bool:
    """True when transformers' own class of the model's family computes exactly this model."""
    return _adapter(cfg).is_stock(cfg)


def _adapter(cfg: RunConfig) -> HFAdapter:
    return hf_adapter(cfg.model.family)


def remote_file(adapter: HFAdapter) -> Path:
    """The family's self-contained remote modeling file."""
    return Path(importlib.import_module(adapter.remote_module).__file__ or "")


def remote_files(adapter: HFAdapter) -> list[Path]:
    """Every file an export ships for trust_remote_code: the family's modeling file and, next to it, the shared
    attention file it imports (transformers copies a remote file's relative imports from the same folder)."""
    modeling = remote_file(adapter)
    return [modeling, modeling.with_name(SHARED_ATTENTION_FILE)]


def _attention_settings(cfg: RunConfig) -> dict[str, Any]:
    """The extra config.json keys the remote modeling files read (model.variants.export_settings: from the
    export file's own table, alpha resolved against the training block length)."""
    return variants.export_settings(cfg.attention, cfg.data.seq_length)


def hf_config(cfg: RunConfig, special_ids: dict[str, int | None]) -> Any:
    """transformers' config of the family's exported model with this project's attention settings as extra keys."""
    return _adapter(cfg).config(cfg, special_ids, _attention_settings(cfg))


def _finish_config(out: Path, stock: bool, adapter: HFAdapter) -> None:
    """Edit what save_pretrained wrote into config.json: a stock-compatible model names transformers' own
    class (vLLM & co. pick it by `architectures`); any other names the remote file's attention
    implementation, so the stock class refuses the folder instead of computing plain softmax attention
    (transformers does not save that key itself)."""
    remote = importlib.import_module(adapter.remote_module)
    path = out / "config.json"
    config = json.loads(path.read_text())
    if stock:
        config["architectures"] = [adapter.stock_class]
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
    written = _adapter(cfg).export_folder(cfg, state, out, DTYPES.get(dtype))  # a family's own folder (ViT)
    if written is not None:
        return written
    tok = export_tokenizer(cfg, tokenizer)
    if len(tok) > cfg.model.padded_vocab_size:
        raise ProjectError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary "
                           f"({cfg.model.padded_vocab_size}): wrong --tokenizer?")
    adapter = _adapter(cfg)
    adapter.prepare_tokenizer(tok)  # e.g. BERT names [CLS]/[SEP]/[MASK]
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = hf_config(cfg, special)
    model_class = getattr(importlib.import_module(adapter.remote_module), adapter.remote_class)
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(adapter.to_hf(state, cfg.model), strict=True, assign=True)
    if dtype != "auto":
        model.to(DTYPES[dtype])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for path in remote_files(adapter):
        shutil.copyfile(path, out / path.name)
    _finish_config(out, is_stock(cfg), adapter)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command("launcher.export_hf", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.force)
    _, weights = locate(args.checkpoint)
    auto_class = next(iter(json.loads((out / "config.json").read_text()).get("auto_map", {"AutoModel": ""})))
    tokenizer = f"; AutoTokenizer.from_pretrained({str(out)!r})" if (out / "tokenizer_config.json").is_file() else ""
    print(f"exported {weights} -> {out}\n"
          f"load: {auto_class}.from_pretrained({str(out)!r}, trust_remote_code=True){tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
