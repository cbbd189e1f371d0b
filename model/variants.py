"""One registry of attention variants: name -> eager probabilities, settings, learned parameters, backends.

Everything that knows a variant asks this registry: the config (`attention.variant` and the variant's
settings with their defaults and checks), the eager reference (`model.variants.probabilities`), backend
choice and dispatch (`model.attention`), the attention module's learned per-head parameters, and the
Hopfield layers' separation functions (`model.hopfield`).

A new variant is one `Variant` and one `register` call:

    register(Variant("softmax_n", softmax_n, settings=(Setting("n", 2.0, positive),)))

A variant outside this repository is named in a config by its import path, `attention.variant:
package.module:NAME` (NAME a Variant), imported and registered the first time it is looked up, in every
process (launcher.study's and launcher.pretrain's subprocesses and deepspeed ranks included). Settings that
AttentionConfig has no field for are given as `attention.params.<key>`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from common.errors import ConfigError, ProjectError
from common.plugins import find_registered, import_named
from model import kernels
from model.kernels import sdpa
from model.softmax import alpha_logit, entmax, sparsemax
from model.hf_remote import outeffhop_attention as shared

Check = Callable[[Any], "str | None"]  # the problem with a setting's value, or None when it is fine


@dataclass(frozen=True)
class Setting:
    """A config setting of a variant: `attention.<key>` (an AttentionConfig field) or `attention.params.<key>`."""

    key: str
    default: Any
    check: Check | None = None


@dataclass(frozen=True)
class HeadParam:
    """A learned per-head parameter the attention module holds under `name` (its state-dict name), passed to
    the eager function as a [heads, 1, 1] tensor. `required`: an eager call must pass it; otherwise its
    initial value stands in (e.g. a Hopfield separation without parameters)."""

    name: str
    init: Callable[[Mapping[str, Any]], float] = lambda settings: 0.0
    required: bool = False


@dataclass(frozen=True)
class Backend:
    """A fused implementation of one variant.

    run(q, k, v, *, causal, attn_mask, dropout_p, scale, **head_params) -> context ([batch, heads, seq, dim]).
    unavailable(device_type): why it cannot run on that device type in this process, or None.
    why_not(q, k, v, dropout_p=..., **head_params): why it cannot run this case, or None.
    auto_on: the device types on which backend `auto` picks it (None: every device).
    """

    run: Callable[..., torch.Tensor]
    unavailable: Callable[[str], "str | None"] = lambda device_type: None
    why_not: Callable[..., "str | None"] | None = None
    auto_on: tuple[str, ...] | None = None

    def runnable_on(self, device_type: str) -> bool:
        return self.unavailable(device_type) is None


@dataclass(frozen=True)
class Variant:
    """eager(logits, **keywords, **head_params) -> probabilities over the last dim (masked logits are -inf).

    settings: its config keys. keywords(settings, seq_length): the eager function's keyword arguments from
    the settings (default: the settings the function takes, as they are). backends: the fused ones by name
    ("sdpa", "triton"); eager always works. exportable: model/hf_remote/outeffhop_attention.py computes it."""

    name: str
    eager: Callable[..., torch.Tensor]
    settings: tuple[Setting, ...] = ()
    head_params: tuple[HeadParam, ...] = ()
    backends: Mapping[str, Backend] = field(default_factory=dict)
    to_keywords: Callable[[Mapping[str, Any], int], dict[str, Any]] | None = None
    exportable: bool = False

    @property
    def accepts(self) -> frozenset[str]:
        """The eager function's keyword arguments."""
        return frozenset(list(inspect.signature(self.eager).parameters)[1:])

    def default_settings(self) -> dict[str, Any]:
        return {s.key: s.default for s in self.settings}

    def keywords(self, settings: Mapping[str, Any], seq_length: int) -> dict[str, Any]:
        if self.to_keywords is not None:
            return self.to_keywords(settings, seq_length)
        return {key: value for key, value in settings.items() if key in self.accepts}

    def probabilities(self, logits: torch.Tensor, **params: Any) -> torch.Tensor:
        """The eager probabilities; `params` of other variants (shared call sites pass e.g. gamma, zeta to
        every variant) are ignored, missing ones take their defaults."""
        unknown = set(params) - _all_accepted()
        if unknown:
            raise ValueError(f"variant {self.name!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        kwargs = {key: value for key, value in params.items() if key in self.accepts and value is not None}
        for head in self.head_params:
            if head.name not in kwargs:
                if head.required:
                    raise ValueError(f"variant {self.name!r} needs {head.name} (one per head)")
                kwargs[head.name] = head.init(self.default_settings())
        return self.eager(logits, **kwargs)


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, name: str | None = None) -> Variant:
    """Make `variant` known under `name` (default variant.name); re-registering a name replaces it."""
    _REGISTRY[name or variant.name] = variant
    return variant


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Variant:
    """The variant registered as `name`, or `package.module:NAME` (imported and registered on first use)."""
    variant = find_registered(_REGISTRY, name, {}, lambda path: import_named(path, Variant, "attention.variant"))
    if variant is not None:
        return variant
    raise ConfigError("attention.variant", name, f"unknown softmax variant: must be one of {', '.join(_REGISTRY)} "
                      "or package.module:NAME")


def probabilities(logits: torch.Tensor, variant: str, **params: Any) -> torch.Tensor:
    """Attention probabilities of a registered variant: `params` are its settings (clipped: gamma, zeta) and
    learned per-head tensors (learnable_sink: sink_logit), broadcastable to the logits; settings of other
    variants are ignored, missing ones take their defaults."""
    return get(variant).probabilities(logits, **params)


def _all_accepted() -> frozenset[str]:
    return frozenset().union(*(v.accepts for v in _REGISTRY.values()))


# ---------------------------------------------------------------- the config's view

def _fields(cfg: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}


def settings_of(cfg: Any) -> dict[str, Any]:
    """The variant's settings from an AttentionConfig: its fields, or `params` for keys it has no field for."""
    fields = _fields(cfg)
    return {s.key: getattr(cfg, s.key) if s.key in fields else cfg.params.get(s.key, s.default)
            for s in get(cfg.variant).settings}


def check_config(cfg: Any) -> None:
    """ConfigError (one line) for an unknown variant or a bad setting. Settings that are AttentionConfig
    fields are checked whichever variant is chosen (a bad `attention.zeta` is an error with softmax1 too)."""
    variant = get(cfg.variant)
    fields = _fields(cfg)
    for setting in {s.key: s for v in _REGISTRY.values() for s in v.settings if s.key in fields}.values():
        _check(setting, getattr(cfg, setting.key), f"attention.{setting.key}")
    extra = {s.key: s for s in variant.settings if s.key not in fields}
    if not isinstance(cfg.params, dict):
        raise ConfigError("attention.params", cfg.params, "must be a mapping of setting -> value")
    for key, value in cfg.params.items():
        if key not in extra:
            raise ConfigError(f"attention.params.{key}", value, f"is not a setting of variant {cfg.variant!r} "
                              f"(its settings: {', '.join(extra) or 'none'})")
        _check(extra[key], value, f"attention.params.{key}")


def _check(setting: Setting, value: Any, key: str) -> None:
    problem = setting.check(value) if setting.check is not None else None
    if problem is not None:
        raise ConfigError(key, value, problem)


def initial_head_params(cfg: Any, num_heads: int) -> dict[str, torch.Tensor]:
    """The learned per-head parameters of an AttentionConfig's variant as a new model starts them, by name."""
    settings = settings_of(cfg)
    return {head.name: torch.full((num_heads,), float(head.init(settings))) for head in get(cfg.variant).head_params}


def head_param_names() -> frozenset[str]:
    """Every registered variant's per-head parameter names (state-dict leaf names, e.g. sink_logit): what a
    checkpoint may gain or lose when a run switches variants."""
    return frozenset(head.name for variant in _REGISTRY.values() for head in variant.head_params)


def keywords_of(cfg: Any, seq_length: int) -> dict[str, Any]:
    """The eager function's keyword arguments for an AttentionConfig at block length `seq_length`."""
    return get(cfg.variant).keywords(settings_of(cfg), seq_length)


# ---------------------------------------------------------------- checks for settings

def positive(value: Any) -> str | None:
    return None if isinstance(value, (int, float)) and value > 0 else "must be a positive number"


def _at_most_zero(value: float) -> str | None:
    return None if value <= 0.0 else "must be <= 0 (gamma > 0 can never reach probability 0)"


def _at_least_one(value: float) -> str | None:
    return None if value >= 1.0 else "must be >= 1 (zeta < 1 can never reach probability 1)"


def _none_or_non_negative(value: float | None) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def _open_unit_interval_above_one(value: float) -> str | None:
    return None if 1.0 < value < 2.0 else "must lie strictly between 1 (softmax) and 2 (sparsemax)"


# ---------------------------------------------------------------- built-in variants

def _clipped_keywords(settings: Mapping[str, Any], seq_length: int) -> dict[str, Any]:
    # `alpha` set: gamma = -alpha / seq_length (the QC paper's OPT recipe, alpha = 12); else gamma as given.
    alpha = settings["alpha"]
    return {"gamma": -alpha / seq_length if alpha is not None else settings["gamma"], "zeta": settings["zeta"]}


def _triton_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, attn_mask: torch.Tensor | None,
                dropout_p: float, scale: float, sink_logit: torch.Tensor | None = None) -> torch.Tensor:
    return kernels.softmax1_attention(q, k, v, causal=causal, scale=scale, sink_logit=sink_logit,
                                      attn_mask=attn_mask, dropout_p=dropout_p)


def _triton_unavailable(device_type: str) -> str | None:
    if kernels.runnable_on(device_type):
        return None
    if not kernels.triton_available():
        return "triton is not installed"
    return f"the kernels cannot run on {device_type!r} here (CPU needs TRITON_INTERPRET=1)"


# Fused FlashAttention-style sink kernels (model/kernels): auto picks them on CUDA only.
TRITON = Backend(_triton_run, unavailable=_triton_unavailable, why_not=kernels.unsupported_reason, auto_on=("cuda",))
SINK = HeadParam("sink_logit", required=True)

def exported(name: str, *, checks: Mapping[str, Check] | None = None, extra: tuple[Setting, ...] = (),
             **training: Any) -> Variant:
    """The variant model/hf_remote/outeffhop_attention.py defines as `name` (eager function, settings with their
    defaults, per-head parameter): its one definition, with what training alone adds (setting `checks`, `extra`
    settings, backends, to_keywords)."""
    spec = shared.VARIANTS[name]
    settings = tuple(Setting(key, default, (checks or {}).get(key))
                     for key, (_, default) in spec.settings.items()) + extra
    head_params = (HeadParam(spec.head_param, required=True),) if spec.head_param else ()
    return Variant(name, spec.probabilities, settings=settings, head_params=head_params, exportable=True, **training)


CLIP_CHECKS = {"gamma": _at_most_zero, "zeta": _at_least_one}
ALPHA = Setting("alpha", None, _none_or_non_negative)  # training's recipe for gamma; the export stores gamma

for _variant in (
    exported("softmax", backends={"sdpa": Backend(sdpa.softmax_attention)}),
    exported("softmax1", backends={"sdpa": Backend(sdpa.softmax1_attention), "triton": TRITON}),
    exported("clipped_softmax", checks=CLIP_CHECKS, extra=(ALPHA,), to_keywords=_clipped_keywords),
    exported("clipped_softmax1", checks=CLIP_CHECKS, extra=(ALPHA,), to_keywords=_clipped_keywords),
    exported("learnable_sink", backends={"triton": TRITON}),
    # STanHop-Net's normalisers (the entmax package): sparse attention / Hopfield retrieval; no export.
    Variant("sparsemax", sparsemax),
    Variant("entmax", entmax, settings=(Setting("entmax_alpha", 1.5, _open_unit_interval_above_one),),
            head_params=(HeadParam("alpha_logit", init=lambda settings: alpha_logit(settings["entmax_alpha"])),)),
):
    register(_variant)


# ---------------------------------------------------------------- config.json of an export

def export_settings(cfg: Any, seq_length: int) -> dict[str, Any]:
    """The config.json keys an export's outeffhop_attention.py reads, from an AttentionConfig (settings resolved
    at the training length `seq_length`, e.g. clipping's gamma from alpha); ProjectError for a variant the
    export file does not compute."""
    if not get(cfg.variant).exportable:
        raise ProjectError(f"attention.variant {cfg.variant} has no Hugging Face export: the exported attention file "
                           f"(outeffhop_attention.py) computes {', '.join(shared.VARIANTS)}")
    keywords = keywords_of(cfg, seq_length)
    fields = _fields(cfg)
    values = {key: keywords.get(keyword, getattr(cfg, keyword) if keyword in fields else default)
              for spec in shared.VARIANTS.values() for keyword, (key, default) in spec.settings.items()}
    gate = {key: getattr(cfg, field) for key, field in GATE_FIELDS.items()}
    return {"attention_variant": cfg.variant, **values, **gate, "train_seq_length": seq_length}


def imported_settings(stored: Mapping[str, Any]) -> dict[str, Any]:
    """AttentionConfig fields from the keys an export's config.json holds (the reverse of export_settings; a
    published model holds none). An exported gamma is the resolved one: alpha is unset then."""
    values = {keyword: stored[key] for spec in shared.VARIANTS.values()
              for keyword, (key, _) in spec.settings.items() if key in stored}
    values.update({field: stored[key] for key, field in GATE_FIELDS.items() if key in stored})
    return {**values, "alpha": None} if "gamma" in values else values


# The gate's config.json keys (outeffhop_attention.GATE_SETTINGS) -> AttentionConfig fields.
GATE_FIELDS = {"attention_gated": "gated", "gate_type": "gate_type", "gate_hidden": "gate_hidden",
               "gate_init_prob": "gate_init_prob"}
assert set(GATE_FIELDS) == set(shared.GATE_SETTINGS)


__all__ = ["Variant", "Setting", "HeadParam", "Backend", "register", "get", "names", "probabilities",
           "settings_of", "check_config", "keywords_of", "initial_head_params", "head_param_names", "positive",
           "exported", "export_settings", "imported_settings"]
