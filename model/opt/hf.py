"""OPT <-> transformers' OPTForCausalLM: parameter names, config, remote modeling file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common.errors import ProjectError
from model.hf_adapter import HFAdapter, HFSource, StateDict, attention_keys, load_remote, one_line, require

HF_PREFIX = "model."  # transformers' OPTForCausalLM keeps the decoder under `model.decoder.`
# transformers OPTConfig keys this project's decoder needs at these values: (value, what differs otherwise)
REQUIRED = {
    "do_layer_norm_before": (True, "post-LayerNorm blocks, as in facebook/opt-350m"),
    "_remove_final_layer_norm": (False, "no final LayerNorm"),
    "activation_function": ("relu", "another activation"),
    "enable_bias": (True, "linear layers without bias"),
    "layer_norm_elementwise_affine": (True, "LayerNorms without weights"),
}
ATTENTION_WEIGHTS = tuple(f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "out"))
ATTENTION_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in ("q", "k", "v", "out"))


class OPTAdapter(HFAdapter):
    remote_module = "model.hf_remote.modeling_outeffhop_opt"
    remote_class = "OutEffHopOPTForCausalLM"
    stock_class = "OPTForCausalLM"
    auto_class = "AutoModelForCausalLM"

    model_types = ("opt",)
    default_recipe = "configs/opt_125m.yaml"

    def read_source(self, folder: Path, config: dict[str, Any]) -> HFSource:
        """Pre-LayerNorm OPT without embedding projection (opt-125m, 1.3b, ...) or an export_hf folder: read
        through the remote class (transformers' OPT plus the variants' parameters)."""
        from transformers import OPTConfig

        from model.hf_remote.modeling_outeffhop_opt import OutEffHopOPTForCausalLM

        try:
            hf = OPTConfig.from_pretrained(str(folder))
        except Exception as error:
            raise ProjectError(f"cannot read {folder / 'config.json'}: {one_line(error, 200)}") from None
        require(folder / "config.json", hf, REQUIRED, "OPT is pre-LayerNorm with ReLU, biases and a final LayerNorm")
        if hf.word_embed_proj_dim != hf.hidden_size:
            raise ProjectError(f"{folder / 'config.json'}: word_embed_proj_dim={hf.word_embed_proj_dim} != hidden_size="
                               f"{hf.hidden_size} (project_in/project_out, as in facebook/opt-350m) is not supported")
        model = dict(
            num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
            ffn_hidden_size=hf.ffn_dim, max_position_embeddings=hf.max_position_embeddings, vocab_size=hf.vocab_size,
            pad_vocab_to_multiple_of=1, init_std=hf.init_std, dropout=float(hf.dropout),
            attention_dropout=float(hf.attention_dropout), layer_norm_eps=getattr(hf, "layer_norm_eps", 1e-5),
            tie_word_embeddings=hf.tie_word_embeddings, attention_bias=True)
        return HFSource(model, lambda: self._weights(OutEffHopOPTForCausalLM, folder, hf.tie_word_embeddings),
                        attention_keys(config), tokenizer_dir=folder)

    def _weights(self, model_class: Any, folder: Path, tied: bool) -> StateDict:
        hf_model, _ = load_remote(model_class, folder)
        return self.from_hf(hf_model.state_dict(), SimpleNamespace(tie_word_embeddings=tied, attention_bias=True))

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
