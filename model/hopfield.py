"""OutEffHop Hopfield layers: modern Hopfield associative memories with a pluggable separation function.

Modern Hopfield retrieval (Ramsauer et al., 2021) with stored patterns Xi and a state (query) x is

    x_new = Xi^T sep(beta * Xi x)        (patterns are the rows of Xi here, the columns in the papers)

With sep = softmax this is the classic update; with sep = softmax1 (the default) it is the outlier-efficient
update of OutEffHop (Hu et al., 2024): softmax1 has an implicit extra logit 0, a "no-op" pattern of zeros,
so a query that matches no stored pattern retrieves ~0 instead of a forced unit-mass mixture. One update
with projections W_Q, W_K, W_V is exactly softmax1 attention (`model.attention.scaled_dot_product`).

Two layers of API:
  * functions for theory and notebooks: `energy`, `modern_hopfield_energy`, `outeffhop_energy`,
    `association`, `hopfield_update`, `retrieve`, `sparsemax` (no parameters, any leading dims);
  * modules in the style of ml-jku's hopfield-layers: `Hopfield` (state, stored patterns and pattern
    projection are inputs), `HopfieldLayer` (stored patterns are learnable: a lookup-table memory) and
    `HopfieldPooling` (the state is learnable: pools a set to `quantity` vectors).

Masks are bool with True = keep/attend, the project's convention (hopfield-layers uses True = ignore).
Shapes are batch-first: [batch, seq, features]; a 2-D input is treated as one unbatched sample.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionTaps, scaled_dot_product
from model import variants
from model.softmax import sparsemax  # noqa: F401 (part of this module's API)

Separation = Callable[[torch.Tensor], torch.Tensor]
SeparationSpec = Union[str, Separation]
NORMALIZE_TARGETS = ("state", "stored", "projection")


def resolve_separation(separation: SeparationSpec) -> tuple[str | None, Separation]:
    """(name, function) for a separation given by name (an attention variant of model/variants.py, its
    learned parameters at their initial values: e.g. `sparsemax`, `entmax` with alpha 1.5) or as a callable
    logits -> weights (over the last dim)."""
    if callable(separation):
        return None, separation
    if separation not in variants.names():
        raise ValueError(f"separation: unknown {separation!r}; use one of {', '.join(variants.names())} or a callable")
    return separation, variants.get(separation).probabilities


SEPARATIONS: dict[str, Separation] = {name: resolve_separation(name)[1] for name in variants.names()}


def _fused(separation: str | None) -> bool:
    """Separations that model.attention runs with its fused backends (sdpa/triton); others run eagerly here."""
    variant = variants.get(separation) if separation is not None else None
    return variant is not None and bool(variant.backends) and not variant.head_params


def _fmt(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}")


def _similarities(x: torch.Tensor, patterns: torch.Tensor, beta: float,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """beta * <xi_i, x> over the last dim of x against patterns [..., N, d] -> [..., N], masked to -inf."""
    _check_beta(beta)
    if patterns.dim() < 2:
        raise ValueError(f"patterns: expected [..., num_patterns, dim], got shape {_fmt(patterns)}")
    if x.dim() < 1 or x.shape[-1] != patterns.shape[-1]:
        raise ValueError(f"x: last dim must equal the pattern dim {patterns.shape[-1]}; "
                         f"got x {_fmt(x)}, patterns {_fmt(patterns)}")
    logits = beta * torch.einsum("...d,...nd->...n", x, patterns)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: must be bool (True = stored pattern present), got {mask.dtype}")
        if mask.shape[-1] != patterns.shape[-2]:
            raise ValueError(f"mask: last dim must equal num_patterns {patterns.shape[-2]}; "
                             f"got mask {_fmt(mask)}, patterns {_fmt(patterns)}")
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------------------
# Functional API: energies and the retrieval dynamics.
# Shapes: x [..., d] (a state, or many), patterns [..., N, d]; leading dims broadcast right-aligned like
# torch, so B memories with Q queries each are x [B, Q, d] with patterns [B, 1, N, d].
# ---------------------------------------------------------------------------------------------------------

def modern_hopfield_energy(x: torch.Tensor, patterns: torch.Tensor, beta: float,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ramsauer et al.'s energy E(x) = -lse(beta, Xi x) + 0.5 <x, x>, lse(beta, z) = log(sum exp(beta z)) / beta.

    The paper adds the constant beta^-1 log N + 0.5 M^2 (M = max pattern norm) so that E >= 0; it does not
    depend on x and is left out. Returns [...] (one energy per state).
    """
    logits = _similarities(x, patterns, beta, mask)
    return -torch.logsumexp(logits, dim=-1) / beta + 0.5 * (x * x).sum(-1)


def outeffhop_energy(x: torch.Tensor, patterns: torch.Tensor, beta: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """OutEffHop energy E1(x) = -(1/beta) log(1 + sum_i exp(beta <xi_i, x>)) + 0.5 <x, x>.

    The "1" is the no-op pattern's zero logit; its CCCP update is x <- Xi^T softmax1(beta Xi x). Finite even
    when every pattern is masked (then E1 = 0.5 <x, x>, minimised by x = 0: the no-op).
    """
    logits = _similarities(x, patterns, beta, mask)
    with_noop = torch.cat([logits.new_zeros(*logits.shape[:-1], 1), logits], dim=-1)
    return -torch.logsumexp(with_noop, dim=-1) / beta + 0.5 * (x * x).sum(-1)


ENERGIES: dict[str, Callable[..., torch.Tensor]] = {"softmax": modern_hopfield_energy,
                                                    "softmax1": outeffhop_energy}


def energy(x: torch.Tensor, patterns: torch.Tensor, beta: float, *, separation: str = "softmax1",
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """The energy whose CCCP minimisation is the retrieval update with `separation` (softmax or softmax1)."""
    if separation not in ENERGIES:
        raise ValueError(f"separation: energy is defined for {', '.join(ENERGIES)}, got {separation!r}")
    return ENERGIES[separation](x, patterns, beta, mask)


def association(x: torch.Tensor, patterns: torch.Tensor, beta: float, *, separation: SeparationSpec = "softmax1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Retrieval weights sep(beta * Xi x) -> [..., N]. With softmax1, 1 - sum is the no-op pattern's weight."""
    _, sep = resolve_separation(separation)
    return sep(_similarities(x, patterns, beta, mask))


def hopfield_update(x: torch.Tensor, patterns: torch.Tensor, beta: float, *,
                    separation: SeparationSpec = "softmax1", mask: torch.Tensor | None = None,
                    values: torch.Tensor | None = None) -> torch.Tensor:
    """One retrieval step x <- values^T sep(beta * Xi x) (values default to the patterns) -> [..., d_v]."""
    weights = association(x, patterns, beta, separation=separation, mask=mask)
    values = patterns if values is None else values
    if values.shape[-2] != patterns.shape[-2]:
        raise ValueError(f"values: need one row per pattern ({patterns.shape[-2]}); "
                         f"got values {_fmt(values)}, patterns {_fmt(patterns)}")
    return torch.einsum("...n,...nd->...d", weights, values)


def retrieve(x: torch.Tensor, patterns: torch.Tensor, beta: float, *, steps: int = 1,
             separation: SeparationSpec = "softmax1", mask: torch.Tensor | None = None,
             tol: float | None = None) -> torch.Tensor:
    """Iterate `hopfield_update` up to `steps` times; stop early once no entry moves by more than `tol`."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    for _ in range(steps):
        x_new = hopfield_update(x, patterns, beta, separation=separation, mask=mask)
        converged = tol is not None and bool((x_new - x).abs().max() <= tol)
        x = x_new
        if converged:
            break
    return x


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------

def _normalize_targets(normalize: bool | Iterable[str]) -> frozenset[str]:
    if isinstance(normalize, bool):
        return frozenset(NORMALIZE_TARGETS) if normalize else frozenset()
    targets = frozenset(normalize)
    unknown = targets - set(NORMALIZE_TARGETS)
    if unknown:
        raise ValueError(f"normalize: unknown target(s) {sorted(unknown)}; use a bool or a subset of "
                         f"{', '.join(NORMALIZE_TARGETS)}")
    return targets


def _default_hidden_size(input_size: int, num_heads: int, hidden_size: int | None) -> int:
    """Per-head association size: given, or input_size split evenly over the heads (as attention does)."""
    if hidden_size is not None:
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: must be an int >= 1, got {hidden_size!r}")
        return hidden_size
    if num_heads < 1 or input_size % num_heads:
        raise ValueError(f"hidden_size: input_size {input_size} is not divisible by num_heads {num_heads}; "
                         "pass hidden_size (per-head size) explicitly")
    return input_size // num_heads


class Hopfield(nn.Module):
    """Modern Hopfield association: state patterns retrieve from stored patterns (hopfield-layers style).

    forward(state [B, S, input_size], stored [B, N, stored_size], projection [B, N, projection_size]):
        q = W_Q state, k = W_K stored, v = W_V projection     (each optional: `*_projection=False` = identity)
        repeat update_steps - 1 times:  q <- sep(beta q k^T) k     (retrieval dynamics in the key space)
        out = W_O concat_heads(sep(beta q k^T) v)                 -> [B, S, output_size]
    `stored` defaults to `state` (self-association) and `projection` to `stored`. With update_steps=1 and
    separation softmax1 this is exactly softmax1 attention (non-causal), with beta the attention scale.

    Args:
        input_size: state feature size. hidden_size: per-head size of the association (q, k) space;
            default input_size // num_heads. value_size: per-head value size; default hidden_size.
        stored_size / projection_size: feature sizes of the other inputs (default input_size / stored_size).
        output_size: default input_size; with output_projection=False it must be num_heads * value_size.
        beta: inverse temperature; default 1 / sqrt(hidden_size), the attention scale.
        update_steps: number of retrieval steps (>= 1). separation: "softmax1" (default), "softmax",
            "sparsemax" or a callable on logits (masked entries are -inf).
        normalize: LayerNorm on the raw inputs: True (all), False, or a subset of ("state", "stored", "projection").
        dropout: on the final retrieval weights, in training mode.
        backend: model.attention backend for softmax/softmax1 ("auto", "eager", "sdpa", "triton").
    """

    def __init__(self, input_size: int, hidden_size: int | None = None, *, stored_size: int | None = None,
                 projection_size: int | None = None, value_size: int | None = None,
                 output_size: int | None = None, num_heads: int = 1, beta: float | None = None,
                 update_steps: int = 1, separation: SeparationSpec = "softmax1",
                 normalize: bool | Iterable[str] = False, state_projection: bool = True,
                 stored_projection: bool = True, value_projection: bool = True, output_projection: bool = True,
                 bias: bool = True, dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("num_heads", num_heads), ("update_steps", update_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        hidden_size = _default_hidden_size(input_size, num_heads, hidden_size)
        value_size = hidden_size if value_size is None else value_size
        stored_size = input_size if stored_size is None else stored_size
        projection_size = stored_size if projection_size is None else projection_size
        heads_hidden, heads_value = num_heads * hidden_size, num_heads * value_size
        output_size = (input_size if output_projection else heads_value) if output_size is None else output_size
        # Without a projection the raw input is used in the association space: its size must already fit.
        for flag, name, size, needed in ((state_projection, "input_size", input_size, heads_hidden),
                                         (stored_projection, "stored_size", stored_size, heads_hidden),
                                         (value_projection, "projection_size", projection_size, heads_value),
                                         (output_projection, "output_size", output_size, heads_value)):
            if not flag and size != needed:
                raise ValueError(f"{name}: is {size} but must equal num_heads * per-head size = {needed} "
                                 f"when its projection is disabled")
        if beta is not None:
            _check_beta(beta)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must lie in [0, 1), got {dropout}")
        self.separation_name, self.separation = resolve_separation(separation)
        self.input_size, self.stored_size, self.projection_size = input_size, stored_size, projection_size
        self.hidden_size, self.value_size, self.output_size = hidden_size, value_size, output_size
        self.num_heads, self.update_steps = num_heads, update_steps
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(hidden_size)
        self.dropout, self.backend = dropout, backend
        # The eager path's scores, weights and retrieved context: what quantized evaluation intercepts (model/taps.py).
        self.taps = AttentionTaps(gated=False)
        targets = _normalize_targets(normalize)
        self.norm_state = nn.LayerNorm(input_size) if "state" in targets else nn.Identity()
        self.norm_stored = nn.LayerNorm(stored_size) if "stored" in targets else nn.Identity()
        self.norm_projection = nn.LayerNorm(projection_size) if "projection" in targets else nn.Identity()
        self.q_proj = nn.Linear(input_size, heads_hidden, bias=bias) if state_projection else nn.Identity()
        self.k_proj = nn.Linear(stored_size, heads_hidden, bias=bias) if stored_projection else nn.Identity()
        self.v_proj = nn.Linear(projection_size, heads_value, bias=bias) if value_projection else nn.Identity()
        self.out_proj = nn.Linear(heads_value, output_size, bias=bias) if output_projection else nn.Identity()

    def extra_repr(self) -> str:
        sep = self.separation_name or getattr(self.separation, "__name__", "custom")
        return (f"heads={self.num_heads}, hidden={self.hidden_size}, value={self.value_size}, beta={self.beta:.4g}, "
                f"update_steps={self.update_steps}, separation={sep}")

    # -- input validation ----------------------------------------------------------------------------------

    def _check_inputs(self, state: torch.Tensor, stored: torch.Tensor, projection: torch.Tensor) -> None:
        if state.dim() != 3:
            raise ValueError(f"state: expected [batch, seq, {self.input_size}] or [seq, {self.input_size}], "
                             f"got shape {_fmt(state)}")
        batch = state.shape[0]
        for name, t, size in (("state", state, self.input_size), ("stored", stored, self.stored_size),
                              ("projection", projection, self.projection_size)):
            if t.dim() != 3 or t.shape[-1] != size or t.shape[0] != batch:
                raise ValueError(f"{name}: expected [batch={batch}, *, {size}], got shape {_fmt(t)} "
                                 f"(state {_fmt(state)})")
        if projection.shape[1] != stored.shape[1]:
            raise ValueError(f"projection: needs one row per stored pattern ({stored.shape[1]}); "
                             f"got projection {_fmt(projection)}, stored {_fmt(stored)}")

    def _build_mask(self, batch: int, seq: int, num_stored: int, stored_mask: torch.Tensor | None,
                    association_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Combine both masks into one bool mask broadcastable to [batch, heads, seq, num_stored]."""
        mask = None
        if stored_mask is not None:
            if stored_mask.dtype != torch.bool:
                raise ValueError(f"stored_mask: must be bool (True = keep), got {stored_mask.dtype}")
            if tuple(stored_mask.shape) != (batch, num_stored):
                raise ValueError(f"stored_mask: expected shape ({batch}, {num_stored}) = [batch, num_stored], "
                                 f"got {_fmt(stored_mask)}")
            mask = stored_mask[:, None, None, :]
        if association_mask is not None:
            if association_mask.dtype != torch.bool:
                raise ValueError(f"association_mask: must be bool (True = attend), got {association_mask.dtype}")
            am = association_mask
            if am.dim() == 2:
                am = am[None, None]
            elif am.dim() == 3:
                am = am[:, None]
            target = (batch, self.num_heads, seq, num_stored)
            if am.dim() != 4 or any(a not in (1, t) for a, t in zip(am.shape, target)) or am.shape[-2:] != target[-2:]:
                raise ValueError(f"association_mask: expected [seq, num_stored], [batch, seq, num_stored] or "
                                 f"[batch, heads, seq, num_stored] matching {target}, got {_fmt(association_mask)}")
            mask = am if mask is None else mask & am
        return mask

    # -- forward ---------------------------------------------------------------------------------------------

    def _split(self, x: torch.Tensor, per_head: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, per_head).transpose(1, 2)

    def _weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.beta
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return self.separation(logits)

    def _associate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   dropout_p: float) -> torch.Tensor:
        if _fused(self.separation_name):
            # Reuse the project's attention so one step is *the same computation* as softmax1 attention.
            return scaled_dot_product(q, k, v, variant=self.separation_name, causal=False, backend=self.backend,
                                      attn_mask=mask, dropout_p=dropout_p, scale=self.beta)
        logits = self.taps.scores(torch.matmul(q, k.transpose(-1, -2)) * self.beta)  # tapped before masking
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = self.taps.probs(self.separation(logits))
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return self.taps.context(torch.matmul(weights, v))

    def forward(self, state: torch.Tensor, stored: torch.Tensor | None = None,
                projection: torch.Tensor | None = None, *, stored_mask: torch.Tensor | None = None,
                association_mask: torch.Tensor | None = None,
                return_association: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Retrieve for every state pattern -> [B, S, output_size] (or ([B, S, out], weights [B, H, S, N])).

        stored_mask: bool [B, N], True = stored pattern present (padding of variable-size sets).
        association_mask: bool [S, N], [B, S, N] or [B, H, S, N], True = this state may see this pattern.
        return_association: also return the final retrieval weights (with softmax1, 1 - sum = no-op mass).
        """
        stored = state if stored is None else stored
        projection = stored if projection is None else projection
        unbatched = state.dim() == 2
        if unbatched:
            if stored.dim() != 2 or projection.dim() != 2:
                raise ValueError(f"stored: with an unbatched state {_fmt(state)} stored and projection must be "
                                 f"2-D too, got stored {_fmt(stored)}, projection {_fmt(projection)}")
            state, stored, projection = state[None], stored[None], projection[None]
            stored_mask = stored_mask[None] if stored_mask is not None and stored_mask.dim() == 1 else stored_mask
        self._check_inputs(state, stored, projection)
        batch, seq, num_stored = state.shape[0], state.shape[1], stored.shape[1]
        mask = self._build_mask(batch, seq, num_stored, stored_mask, association_mask)

        q = self._split(self.q_proj(self.norm_state(state)), self.hidden_size)
        k = self._split(self.k_proj(self.norm_stored(stored)), self.hidden_size)
        v = self._split(self.v_proj(self.norm_projection(projection)), self.value_size)
        for _ in range(self.update_steps - 1):
            q = self._associate(q, k, k, mask, dropout_p=0.0)
        dropout_p = self.dropout if self.training else 0.0
        context = self._associate(q, k, v, mask, dropout_p)
        out = self.out_proj(context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.value_size))
        if unbatched:
            out = out[0]
        if not return_association:
            return out
        weights = self._weights(q, k, mask)
        return out, (weights[0] if unbatched else weights)


class HopfieldLayer(nn.Module):
    """A lookup-table memory: state patterns retrieve from `quantity` learnable stored patterns.

    The stored patterns (keys) and their projections (values) are parameters living directly in the
    association space (no W_K, W_V: a projection of a free parameter adds nothing). forward(state
    [B, S, input_size]) -> [B, S, output_size]. `tie_values=True` uses the stored patterns as values too,
    which is the pure Hopfield memory x <- Xi^T sep(beta Xi W_Q x). Other arguments as in `Hopfield`.
    """

    def __init__(self, input_size: int, quantity: int, *, hidden_size: int | None = None,
                 value_size: int | None = None, output_size: int | None = None, num_heads: int = 1,
                 beta: float | None = None, update_steps: int = 1, separation: SeparationSpec = "softmax1",
                 normalize: bool | Iterable[str] = False, state_projection: bool = True,
                 output_projection: bool = True, tie_values: bool = False, bias: bool = True,
                 dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(quantity, int) or quantity < 1:
            raise ValueError(f"quantity: must be an int >= 1 (number of stored patterns), got {quantity!r}")
        hidden_size = _default_hidden_size(input_size, num_heads, hidden_size)
        value_size = hidden_size if value_size is None else value_size
        if tie_values and value_size != hidden_size:
            raise ValueError(f"value_size: tie_values needs value_size == hidden_size, "
                             f"got {value_size} != {hidden_size}")
        self.hopfield = Hopfield(input_size, hidden_size, stored_size=num_heads * hidden_size,
                                 projection_size=num_heads * value_size, value_size=value_size,
                                 output_size=output_size, num_heads=num_heads, beta=beta, update_steps=update_steps,
                                 separation=separation, normalize=normalize,
                                 state_projection=state_projection, stored_projection=False, value_projection=False,
                                 output_projection=output_projection, bias=bias, dropout=dropout, backend=backend)
        self.quantity, self.tie_values = quantity, tie_values
        # std 1/sqrt(dim): patterns of norm ~1, so beta sets the sharpness as it does for attention logits.
        self.stored = nn.Parameter(torch.randn(quantity, num_heads * hidden_size) / math.sqrt(hidden_size))
        self.values = (None if tie_values else
                       nn.Parameter(torch.randn(quantity, num_heads * value_size) / math.sqrt(value_size)))

    def forward(self, state: torch.Tensor, *, association_mask: torch.Tensor | None = None,
                return_association: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """state [B, S, input_size] or [S, input_size] -> [B, S, output_size] (see Hopfield.forward)."""
        values = self.stored if self.values is None else self.values
        if state.dim() == 3:
            stored = self.stored.expand(state.shape[0], -1, -1)
            values = values.expand(state.shape[0], -1, -1)
        else:
            stored = self.stored
        return self.hopfield(state, stored, values, association_mask=association_mask,
                             return_association=return_association)


class HopfieldPooling(nn.Module):
    """Pools a set to `quantity` vectors: `quantity` learnable state patterns (queries) retrieve from the set.

    forward(stored [B, N, input_size], stored_mask [B, N]) -> [B, quantity, output_size]; flatten the last
    two dims for a fixed-size set representation. The queries live directly in the association space (no W_Q),
    so `normalize` applies to the set ("stored", "projection"); "state" is ignored.
    With softmax1, a set containing nothing a query looks for pools to ~0 (the no-op) for that query.
    """

    def __init__(self, input_size: int, quantity: int = 1, *, hidden_size: int | None = None,
                 value_size: int | None = None, output_size: int | None = None, num_heads: int = 1,
                 beta: float | None = None, update_steps: int = 1, separation: SeparationSpec = "softmax1",
                 normalize: bool | Iterable[str] = False, stored_projection: bool = True,
                 value_projection: bool = True, output_projection: bool = True, bias: bool = True,
                 dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(quantity, int) or quantity < 1:
            raise ValueError(f"quantity: must be an int >= 1 (number of pooled vectors), got {quantity!r}")
        hidden_size = _default_hidden_size(input_size, num_heads, hidden_size)
        value_size = hidden_size if value_size is None else value_size
        if output_size is None:
            output_size = input_size if output_projection else num_heads * value_size
        self.hopfield = Hopfield(num_heads * hidden_size, hidden_size, stored_size=input_size,
                                 projection_size=input_size, value_size=value_size, output_size=output_size,
                                 num_heads=num_heads, beta=beta, update_steps=update_steps, separation=separation,
                                 normalize=_normalize_targets(normalize) - {"state"}, state_projection=False,
                                 stored_projection=stored_projection, value_projection=value_projection,
                                 output_projection=output_projection, bias=bias, dropout=dropout, backend=backend)
        self.quantity = quantity
        self.query = nn.Parameter(torch.randn(quantity, num_heads * hidden_size) / math.sqrt(hidden_size))

    def forward(self, stored: torch.Tensor, projection: torch.Tensor | None = None, *,
                stored_mask: torch.Tensor | None = None,
                return_association: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """stored [B, N, input_size] (or [N, input_size]) -> [B, quantity, output_size] (see Hopfield.forward)."""
        query = self.query.expand(stored.shape[0], -1, -1) if stored.dim() == 3 else self.query
        return self.hopfield(query, stored, projection, stored_mask=stored_mask,
                             return_association=return_association)


__all__ = ["Hopfield", "HopfieldLayer", "HopfieldPooling", "SEPARATIONS", "ENERGIES", "association", "energy",
           "hopfield_update", "modern_hopfield_energy", "outeffhop_energy", "resolve_separation", "retrieve",
           "sparsemax"]
