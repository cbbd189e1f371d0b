"""ViT <-> transformers' ViTForImageClassification and timm's VisionTransformer: names, configs, the export folder.

An export folder holds
  - config.json + model.safetensors + modeling_outeffhop_vit.py + outeffhop_attention.py: transformers'
    `AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)` runs every variant
    (a softmax model is transformers' stock ViTForImageClassification and needs no remote code);
  - timm/ (softmax without gate only: timm computes nothing else): timm's own `save_for_hf` folder, loaded with
    `timm.create_model("local-dir:<folder>/timm")`.
Both compute the project's model exactly: pre-LN blocks, exact GELU, the class token's final-normed state into
the classifier. Neither needs this project installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from common.errors import ProjectError
from model.hf_adapter import HFAdapter, HFSource, StateDict, attention_keys, load_remote, one_line, require
import model.vit.timm_names as timm_names

# Project name (regex) -> transformers' ViTForImageClassification name; the rest of a block keeps its suffix.
_TO_HF = [
    (r"^patch_embed\.proj\.", "vit.embeddings.patch_embeddings.projection."),
    (r"^cls_token$", "vit.embeddings.cls_token"),
    (r"^pos_embed$", "vit.embeddings.position_embeddings"),
    (r"^blocks\.(\d+)\.norm1\.", r"vit.layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"vit.layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"vit.layers.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.attn\.", r"vit.layers.\1.attention."),  # q/k/v_proj, sink_logit, gate.*
    (r"^blocks\.(\d+)\.mlp\.", r"vit.layers.\1.mlp."),
    (r"^norm\.", "vit.layernorm."),
    (r"^head\.", "classifier."),
]
_FROM_HF = [
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^vit\.layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.out_proj."),
    (r"^vit\.layers\.(\d+)\.attention\.", r"blocks.\1.attn."),
    (r"^vit\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
REMOTE_FILE = Path(__file__).resolve().parents[1] / "hf_remote" / "modeling_outeffhop_vit.py"
TIMM_ARCHITECTURE = "vit_small_patch16_224"  # a registered timm name; model_args set every dimension
# transformers ViTConfig keys this project's ViT needs at these values: (value, what differs otherwise)
REQUIRED = {
    "hidden_act": ("gelu", "another activation than exact GELU"),
    "qkv_bias": (True, "attention projections without bias"),
}
CLASSIFIER = ("classifier", ("head.",))


def _renamed(state: StateDict, rules: list[tuple[str, str]], what: str) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            raise ProjectError(f"unexpected parameter '{key}' (not part of a {what} ViT)")
    return out


class ViTAdapter(HFAdapter):
    remote_module = "model.hf_remote.modeling_outeffhop_vit"
    remote_class = "OutEffHopViTForImageClassification"
    stock_class = "ViTForImageClassification"
    auto_class = "AutoModelForImageClassification"
    has_tokenizer = False

    model_types = ("vit",)
    default_recipe = "configs/vit_s16.yaml"

    def read_source(self, folder: Path, config: dict[str, Any]) -> HFSource:
        """transformers' ViTForImageClassification (or a headless ViTModel: the classifier is initialised) folder,
        or timm's hub folder (config.json with `architecture`, as timm's save_for_hf / push_to_hf_hub write it)."""
        if "architecture" in config and "model_type" not in config:
            return read_timm_source(folder, config)
        from transformers import ViTConfig

        try:
            hf = ViTConfig.from_pretrained(str(folder))
        except Exception as error:
            raise ProjectError(f"cannot read {folder / 'config.json'}: {one_line(error, 200)}") from None
        require(folder / "config.json", hf, REQUIRED, "ViT has exact GELU and biased q/k/v projections")
        model = dict(image_size=hf.image_size, patch_size=hf.patch_size, in_chans=hf.num_channels,
                     num_classes=hf.num_labels, num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                     num_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
                     init_std=hf.initializer_range, dropout=float(hf.hidden_dropout_prob),
                     attention_dropout=float(hf.attention_probs_dropout_prob), layer_norm_eps=hf.layer_norm_eps)
        return HFSource(model, lambda: self._weights(folder), attention_keys(config), data=_preprocessor(folder),
                        head=CLASSIFIER)

    def _weights(self, folder: Path) -> StateDict:
        from model.hf_remote.modeling_outeffhop_vit import OutEffHopViTForImageClassification

        hf_model, missing = load_remote(OutEffHopViTForImageClassification, folder, allowed_missing=("classifier.",))
        state = self.from_hf(hf_model.state_dict(), None)
        return {k: v for k, v in state.items() if not k.startswith(CLASSIFIER[1])} if missing else state

    def to_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        return _renamed(state, _TO_HF, "this project's")

    def from_hf(self, state: StateDict, model_cfg: Any) -> StateDict:
        return _renamed(state, _FROM_HF, "transformers'")

    def config(self, cfg: Any, special_ids: dict[str, int | None], attention: dict[str, Any]) -> Any:
        """transformers' ViTConfig of model/vit's VisionTransformer (+ the attention keys the remote file reads)."""
        from transformers import ViTConfig

        m = cfg.model
        config = ViTConfig(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            intermediate_size=m.ffn_hidden_size, hidden_act="gelu", hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.attention_dropout, initializer_range=m.init_std,
            layer_norm_eps=m.layer_norm_eps, image_size=m.image_size, patch_size=m.patch_size,
            num_channels=m.in_chans, qkv_bias=True, num_labels=m.num_classes, **attention)
        config.auto_map = {self.auto_class: f"{self.remote_module.rsplit('.', 1)[1]}.{self.remote_class}"}
        return config

    def attention_settings(self, cfg: Any) -> dict[str, Any]:
        """The extra config.json keys outeffhop_attention.py reads (clipping resolved for patches + class token)."""
        from model import variants

        return variants.export_settings(cfg.model.attention, cfg.model.seq_length)

    def export_folder(self, cfg: Any, state: StateDict, out: Any, dtype: Any = None) -> Path:
        return export_folder(cfg, state, out, dtype)

    def is_stock(self, cfg: Any) -> bool:
        return cfg.model.attention.variant == "softmax" and not cfg.model.attention.gated

    def is_timm_compatible(self, cfg: Any) -> bool:
        return self.is_stock(cfg) and cfg.model.layer_norm_eps == 1e-6  # timm's ViT fixes eps at 1e-6

    def write_timm(self, cfg: Any, state: StateDict, out: Path) -> Path:
        """timm's own export (save_for_hf) of the same weights into `out`."""
        from model.vit.torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        import timm
        from timm.models import save_for_hf

        kwargs = timm_names.timm_kwargs(cfg.model)
        model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **kwargs)
        model.load_state_dict(timm_names.to_timm(state), strict=True)
        d = cfg.data
        save_for_hf(model, str(out), model_args=kwargs, safe_serialization=True,
                    model_config={"pretrained_cfg": {"tag": "outeffhop"}},  # not the architecture's own weights
                    data_config={"input_size": (cfg.model.in_chans, cfg.model.image_size, cfg.model.image_size),
                                 "interpolation": d.interpolation, "mean": tuple(d.mean), "std": tuple(d.std),
                                 "crop_pct": d.crop_pct, "crop_mode": "center"})
        return out


def _preprocessor(folder: Path) -> dict[str, Any]:
    """The data normalisation of transformers' preprocessor_config.json, when the folder has one."""
    import json

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        pre = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ProjectError(f"not valid JSON: {path}") from None
    return {key: list(pre[name]) for key, name in (("mean", "image_mean"), ("std", "image_std")) if name in pre}


def read_timm_source(folder: Path, config: dict[str, Any]) -> HFSource:
    """timm's VisionTransformer from its hub folder, checked to be the plain ViT this project computes (class-token
    pooling, learned positions on the patches and the class token, exact GELU, no layer scale, qk-norm or
    register tokens); the architecture's other settings show up as unexpected parameters on import."""
    from model.vit.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm
    from timm.models.vision_transformer import VisionTransformer

    path = folder / "config.json"
    try:
        model = timm.create_model(f"local-dir:{folder.absolute()}", pretrained=False)
    except Exception as error:
        raise ProjectError(f"cannot build timm model {config.get('architecture')!r} from {path}: {one_line(error)}") from None
    if type(model) is not VisionTransformer:
        raise ProjectError(f"{path}: timm architecture {config['architecture']!r} is a {type(model).__name__}, not "
                           f"timm's plain VisionTransformer")
    block, embed = model.blocks[0], model.patch_embed
    act = getattr(block.mlp, "act", None)
    checks = {
        "global_pool": (model.global_pool, "token", "pooling other than the class token"),
        "class_token": (model.cls_token is not None, True, "no class token"),
        "reg_tokens": (model.num_reg_tokens, 0, "register tokens"),
        "no_embed_class": (model.no_embed_class, False, "positions without the class token"),
        "dynamic_img_size": (model.dynamic_img_size, False, "dynamic image size"),
        "pre_norm": (type(model.norm_pre).__name__, "Identity", "a LayerNorm before the blocks"),
        "fc_norm": (type(model.fc_norm).__name__, "Identity", "a LayerNorm after pooling"),
        "act_layer": ((type(act).__name__, getattr(act, "approximate", "none")), ("GELU", "none"),
                      "another activation than exact GELU"),
        "block": (type(block).__name__, "Block", "another block type"),
        "img_size": (embed.img_size[0] == embed.img_size[1] and embed.patch_size[0] == embed.patch_size[1], True,
                     "non-square images or patches"),
    }
    for key, (value, wanted, meaning) in checks.items():
        if value != wanted:
            raise ProjectError(f"{path}: {key}={value!r} ({meaning}) is not supported: this project's ViT is timm's "
                               f"plain VisionTransformer")
    section = dict(image_size=embed.img_size[0], patch_size=embed.patch_size[0], in_chans=embed.proj.in_channels,
                   num_classes=model.num_classes, num_layers=len(model.blocks), hidden_size=model.embed_dim,
                   num_heads=block.attn.num_heads, ffn_hidden_size=block.mlp.fc1.out_features,
                   layer_norm_eps=model.norm.eps)
    pretrained = config.get("pretrained_cfg", {})
    data = {key: list(pretrained[key]) for key in ("mean", "std") if key in pretrained}
    data.update({key: pretrained[key] for key in ("interpolation", "crop_pct") if key in pretrained})

    def weights() -> StateDict:
        from timm.models import load_checkpoint

        files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
        if not files:
            raise ProjectError(f"no weights in {folder} (model.safetensors or pytorch_model.bin)")
        try:
            load_checkpoint(model, str(files[0]), strict=True)
        except Exception as error:
            raise ProjectError(f"weights in {files[0]} do not match timm's {config['architecture']}: "
                               f"{one_line(error)}") from None
        return timm_names.from_timm({k: v.float() for k, v in model.state_dict().items()})

    return HFSource(section, weights, {}, data=data)


def export_folder(cfg: Any, state: StateDict, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the export folder (see the module docstring) of a run config and its full state dict; `dtype`
    casts the transformers weights (None: as trained; the timm copy stays fp32)."""
    import json

    from model.hf_remote.modeling_outeffhop_vit import ATTN_IMPLEMENTATION, OutEffHopViTForImageClassification

    adapter, out = ViTAdapter(), Path(out)
    config = adapter.config(cfg, {}, adapter.attention_settings(cfg))
    with torch.device("meta"):
        model = OutEffHopViTForImageClassification(config)
    model.load_state_dict(adapter.to_hf(state, cfg.model), strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    shutil.copyfile(REMOTE_FILE, out / REMOTE_FILE.name)
    attention_file = Path(__file__).resolve().parents[1] / "hf_remote" / "outeffhop_attention.py"
    shutil.copyfile(attention_file, out / attention_file.name)
    path = out / "config.json"
    written = json.loads(path.read_text())
    if adapter.is_stock(cfg):
        written["architectures"] = [adapter.stock_class]
    else:
        written["attn_implementation"] = ATTN_IMPLEMENTATION
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if adapter.is_timm_compatible(cfg):
        adapter.write_timm(cfg, state, out / "timm")
    return out
