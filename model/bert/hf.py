"""BERT <-> transformers' BertForMaskedLM: parameter names, config, remote modeling file, special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import ProjectError
from model.hf_adapter import HFAdapter, HFSource, StateDict, attention_keys, load_remote, one_line, rename, require

# This project's attention projections -> transformers' BertForMaskedLM names (the rest is identical).
BERT_TO_HF = {".attention.self.q_proj.": ".attention.self.query.",
              ".attention.self.k_proj.": ".attention.self.key.",
              ".attention.self.v_proj.": ".attention.self.value.",
              ".attention.self.out_proj.": ".attention.output.dense."}
BERT_ROOTS = ("bert.", "cls.")
# transformers' BertForMaskedLM decoder, tied to the word embeddings and the head's bias: written, never read
BERT_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"}
# BERT's special tokens, named on the exported tokenizer where its vocabulary has them
BERT_SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]"}
# transformers BertConfig keys this project's BERT needs at these values: (value, what differs otherwise)
REQUIRED = {
    "hidden_act": ("gelu", "another activation than exact GELU"),
    "position_embedding_type": ("absolute", "relative position embeddings"),
    "is_decoder": (False, "a causal decoder"),
    "add_cross_attention": (False, "cross-attention layers"),
    "tie_word_embeddings": (True, "an MLM decoder separate from the word embeddings"),
}
MLM_HEAD = ("MLM head", ("cls.",))


class BertAdapter(HFAdapter):
    remote_module = "model.hf_remote.modeling_outeffhop_bert"
    remote_class = "OutEffHopBertForMaskedLM"
    stock_class = "BertForMaskedLM"
    auto_class = "AutoModelForMaskedLM"

    model_types = ("bert",)
    default_recipe = "configs/bert_base.yaml"

    def read_source(self, folder: Path, config: dict[str, Any]) -> HFSource:
        """A transformers BERT folder: BertForMaskedLM (the head is kept) or a headless BertModel (e.g. a sentence
        encoder; the MLM head is initialised), read through the remote class (stock BERT + variant parameters)."""
        from transformers import BertConfig

        try:
            hf = BertConfig.from_pretrained(str(folder))
        except Exception as error:
            raise ProjectError(f"cannot read {folder / 'config.json'}: {one_line(error, 200)}") from None
        require(folder / "config.json", hf, REQUIRED, "BERT is a post-LN encoder with exact GELU, absolute "
                "positions and the MLM decoder tied to the word embeddings")
        model = dict(
            num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
            ffn_hidden_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
            vocab_size=hf.vocab_size, pad_vocab_to_multiple_of=1, type_vocab_size=hf.type_vocab_size,
            init_std=hf.initializer_range, dropout=float(hf.hidden_dropout_prob),
            attention_dropout=float(hf.attention_probs_dropout_prob), layer_norm_eps=hf.layer_norm_eps,
            tie_word_embeddings=True)
        return HFSource(model, lambda: self._weights(folder), attention_keys(config), tokenizer_dir=folder,
                        head=MLM_HEAD)

    def _weights(self, folder: Path) -> StateDict:
        from model.hf_remote.modeling_outeffhop_bert import OutEffHopBertForMaskedLM

        hf_model, missing = load_remote(OutEffHopBertForMaskedLM, folder, allowed_missing=MLM_HEAD[1])
        state = self.from_hf(hf_model.state_dict(), None)
        if missing:  # a headless encoder: transformers' random head is dropped, import initialises the whole head
            state = {key: value for key, value in state.items() if not key.startswith(MLM_HEAD[1])}
        return state

    def to_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        """Attention projections renamed, the tied decoder written out (BERT's decoder is always tied)."""
        out: StateDict = {}
        for key, value in state.items():
            if not key.startswith(BERT_ROOTS) or key in BERT_TIED:
                raise ProjectError(f"unexpected parameter '{key}' (not part of a BERT masked LM)")
            out[rename(key, BERT_TO_HF)] = value
        for tied, source in BERT_TIED.items():
            if source in out:
                out[tied] = out[source]
        return out

    def from_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        back = {new: old for old, new in BERT_TO_HF.items()}
        out: StateDict = {}
        for key, value in state.items():
            if key in BERT_TIED:  # the same tensors as the word embeddings and the head's bias
                continue
            if not key.startswith(BERT_ROOTS):
                raise ProjectError(f"unexpected parameter '{key}' in the Hugging Face model")
            out[rename(key, back)] = value
        return out

    def config(self, cfg: Any, special_ids: dict[str, int | None], attention: dict[str, Any]) -> Any:
        """transformers' BertConfig of model/bert's BertForMaskedLM (post-LN, exact GELU, tied decoder)."""
        from transformers import BertConfig

        m = cfg.model
        config = BertConfig(
            vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.ffn_hidden_size, hidden_act="gelu",
            hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
            max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
            initializer_range=m.init_std, layer_norm_eps=m.layer_norm_eps, tie_word_embeddings=True,
            is_decoder=False, **special_ids,
            **attention)  # read by modeling_outeffhop_bert.py (see DEFAULTS there)
        config.auto_map = {self.auto_class: f"{self.remote_module.rsplit('.', 1)[1]}.{self.remote_class}"}
        return config

    def prepare_tokenizer(self, tok: Any) -> None:
        """Name [CLS]/[SEP]/[MASK] (and [PAD] when there is no pad token) as the tokenizer's cls/sep/mask/pad
        tokens where its vocabulary has them (the project's SentencePiece models do, as user-defined pieces),
        so fill-mask pipelines and collators find them; no id changes and text without them encodes as before.

        transformers splits named special tokens off before normalisation, and the SentencePiece conversion
        then starts the next segment with a word-start "▁" of its own: the tokens strip the spaces around
        them, so "The [MASK] of" encodes as ▁The [MASK] ▁of, as a masked word looks in training (the
        SentencePiece model itself gives ▁The ▁ [MASK] ▁of)."""
        from tokenizers import AddedToken, processors

        vocab = tok.get_vocab()
        named = {attribute: AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=True)
                 for attribute, token in BERT_SPECIAL_TOKENS.items()
                 if token in vocab and getattr(tok, attribute) is None}
        if named:
            tok.add_special_tokens(named)
        if tok.cls_token_id is not None and tok.sep_token_id is not None:
            # Every training example is [CLS] text [SEP] (token type 0): encode text the same way by default.
            tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{tok.cls_token} $A {tok.sep_token}",
                pair=f"{tok.cls_token} $A {tok.sep_token} $B:1 {tok.sep_token}:1",
                special_tokens=[(tok.cls_token, tok.cls_token_id), (tok.sep_token, tok.sep_token_id)])
