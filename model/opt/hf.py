"""OPT <-> transformers' OPTForCausalLM: parameter names, config, remote modeling file."""

from __future__ import annotations

from typing import Any

from common.errors import ProjectError
from model.hf_adapter import HFAdapter, StateDict

HF_PREFIX = "model."  # transformers' OPTForCausalLM keeps the decoder under `model.decoder.`
ATTENTION_WEIGHTS = tuple(f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "out"))
ATTENTION_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in ("q", "k", "v", "out"))


class OPTAdapter(HFAdapter):
    remote_module = "model.hf_remote.modeling_outeffhop_opt"
    remote_class = "OutEffHopOPTForCausalLM"
    stock_class = "OPTForCausalLM"
    auto_class = "AutoModelForCausalLM"

    def to_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        """`decoder.` -> `model.decoder.`; the head is `lm_head.weight` (the tied embedding when tied)."""
        out: StateDict = {}
        for key, value in state.items():
            if key == "lm_head":  # untied head: a bare Parameter here, a Linear there
                out["lm_head.weight"] = value
            elif key.startswith("decoder."):
                out[HF_PREFIX + key] = value
            else:
                raise ProjectError(f"unexpected parameter '{key}' (not part of an OPT decoder)")
        if model_cfg.tie_word_embeddings:
            out["lm_head.weight"] = out[HF_PREFIX + "decoder.embed_tokens.weight"]
        if not model_cfg.attention_bias:  # transformers' OPT has them (enable_bias): zeros compute the same
            for key in [k for k in out if k.endswith(ATTENTION_WEIGHTS)]:
                out[key[:-len("weight")] + "bias"] = out[key].new_zeros(out[key].shape[0])
        return out

    def from_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        out: StateDict = {}
        for key, value in state.items():
            if not model_cfg.attention_bias and key.endswith(ATTENTION_BIASES):
                if value.count_nonzero():
                    raise ProjectError(f"'{key}' is not zero, but model.attention_bias is false")
                continue
            if key == "lm_head.weight":
                if not model_cfg.tie_word_embeddings:  # the tied head is not stored twice
                    out["lm_head"] = value
            elif key.startswith(HF_PREFIX + "decoder."):
                out[key[len(HF_PREFIX):]] = value
            else:
                raise ProjectError(f"unexpected parameter '{key}' in the Hugging Face model")
        return out

    def is_stock(self, cfg: Any) -> bool:
        """transformers' OPT fixes LayerNorm eps at 1e-5."""
        return super().is_stock(cfg) and cfg.model.layer_norm_eps == 1e-5

    def config(self, cfg: Any, special_ids: dict[str, int | None], attention: dict[str, Any]) -> Any:
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
            layer_norm_eps=m.layer_norm_eps, **attention)
        config.auto_map = {self.auto_class: f"{self.remote_module.rsplit('.', 1)[1]}.{self.remote_class}"}
        return config
