"""OutEffHop Hopfield layers: the paper's retrieval claims checked numerically, and the layers' contracts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.attention import scaled_dot_product
from model.hopfield import (Hopfield, HopfieldLayer, HopfieldPooling, association, energy, hopfield_update,
                            modern_hopfield_energy, outeffhop_energy, retrieve, sparsemax)
from model.softmax import softmax1

SEPARATIONS = ("softmax", "softmax1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threading only adds overhead (10x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binary_patterns(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Random +-1/sqrt(dim) patterns: unit norm, nearly orthogonal for num << 2^dim."""
    signs = torch.randint(0, 2, (num, dim), generator=generator, dtype=torch.float64) * 2 - 1
    return signs / math.sqrt(dim)


# ----------------------------------------------------------------------------------------------- theory

@pytest.mark.parametrize("separation", SEPARATIONS)
@pytest.mark.parametrize("seed", range(5))
def test_energy_is_non_increasing_along_updates(separation: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for beta in (0.5, 2.0, 8.0):
        patterns = torch.randn(24, 12, generator=gen, dtype=torch.float64)
        x = 3 * torch.randn(6, 12, generator=gen, dtype=torch.float64)  # six independent states at once
        energies = [energy(x, patterns, beta, separation=separation)]
        for _ in range(20):
            x = hopfield_update(x, patterns, beta, separation=separation)
            energies.append(energy(x, patterns, beta, separation=separation))
        e = torch.stack(energies)  # [steps + 1, states]
        assert bool((e[1:] <= e[:-1] + 1e-6).all()), f"energy increased (beta={beta}): {(e[1:] - e[:-1]).max()}"
        # Fixed-point convergence: iterating on reaches a state that the update no longer moves
        # (these seeds need at most ~70 steps in all; metastable mixtures converge more slowly than patterns).
        fixed = retrieve(x, patterns, beta, steps=500, separation=separation, tol=1e-10)
        step = hopfield_update(fixed, patterns, beta, separation=separation) - fixed
        assert step.abs().max() < 1e-9
        assert bool((energy(fixed, patterns, beta, separation=separation) <= e[-1] + 1e-6).all())


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_update_is_a_stationary_point_iteration_of_the_energy(separation: str) -> None:
    # grad E(x) = x - Xi^T sep(beta Xi x): fixed points of the update are exactly the stationary points.
    gen = torch.Generator().manual_seed(3)
    patterns = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    energy(x, patterns, 1.5, separation=separation).sum().backward()
    expected = x.detach() - hopfield_update(x.detach(), patterns, 1.5, separation=separation)
    torch.testing.assert_close(x.grad, expected)


def test_energy_formulas() -> None:
    patterns = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    beta = 2.0
    sims = beta * (patterns @ x)
    torch.testing.assert_close(modern_hopfield_energy(x, patterns, beta),
                               -torch.log(torch.exp(sims).sum()) / beta + 0.5 * x @ x)
    torch.testing.assert_close(outeffhop_energy(x, patterns, beta),
                               -torch.log(1 + torch.exp(sims).sum()) / beta + 0.5 * x @ x)
    # Every pattern masked: OutEffHop's energy is 0.5 |x|^2 (minimum at the no-op x = 0).
    none = torch.zeros(2, dtype=torch.bool)
    torch.testing.assert_close(outeffhop_energy(x, patterns, beta, mask=none), 0.5 * x @ x)


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_retrieval_converges_to_stored_pattern_from_noisy_query(separation: str) -> None:
    gen = torch.Generator().manual_seed(0)
    dim, num, beta = 64, 32, 16.0
    patterns = binary_patterns(num, dim, gen)
    targets = torch.arange(8)
    flips = torch.rand(len(targets), dim, generator=gen) < 0.2  # 20% of the signs flipped
    queries = torch.where(flips, -patterns[targets], patterns[targets])
    distances = [(queries - patterns[targets]).norm(dim=-1).max()]
    x = queries
    for _ in range(3):
        x = hopfield_update(x, patterns, beta, separation=separation)
        distances.append((x - patterns[targets]).norm(dim=-1).max())
    assert distances[0] > 0.8  # 20% flipped signs: far from the pattern (unit norm)
    assert all(b < a for a, b in zip(distances, distances[1:])), distances  # each step gets closer
    assert distances[3] < 1e-3, distances  # three steps retrieve it
    # The fixed point it converges to is the stored pattern up to the tiny pull of the other patterns.
    fixed = retrieve(queries, patterns, beta, steps=100, separation=separation, tol=1e-12)
    assert (fixed - patterns[targets]).norm(dim=-1).max() < 1e-3
    assert (fixed - x).abs().max() < 1e-3


def test_softmax1_retrieves_noop_for_a_query_dissimilar_to_every_pattern() -> None:
    gen = torch.Generator().manual_seed(1)
    patterns = torch.rand(16, 8, generator=gen, dtype=torch.float64) + 0.5  # all in the positive orthant
    query = -torch.ones(8, dtype=torch.float64)  # <xi, x> <= -4 for every pattern
    beta = 8.0
    assert (beta * patterns @ query).max() < -40
    out1 = hopfield_update(query, patterns, beta, separation="softmax1")
    out0 = hopfield_update(query, patterns, beta, separation="softmax")
    assert out1.norm() < 1e-12, "softmax1 should output the no-op (~0)"
    torch.testing.assert_close(association(query, patterns, beta, separation="softmax").sum(),
                               torch.tensor(1.0, dtype=torch.float64))
    # softmax still returns a unit-mass mixture: the nearest pattern, at full norm.
    assert out0.norm() > 0.5 * patterns.norm(dim=-1).min()
    # The same at the layer level, pure retrieval (no projections, one head).
    layer = Hopfield(8, beta=beta, state_projection=False, stored_projection=False, value_projection=False,
                     output_projection=False).double()
    out, weights = layer(query[None], patterns, return_association=True)
    assert out.norm() < 1e-12 and weights.sum() < 1e-12


def test_softmax1_mass_with_zero_similarities_is_n_over_n_plus_1() -> None:
    num = 7
    patterns = torch.zeros(num, 6, dtype=torch.float64)
    patterns[:, :3] = torch.randn(num, 3, dtype=torch.float64)
    query = torch.zeros(6, dtype=torch.float64)
    query[3:] = torch.randn(3, dtype=torch.float64)  # orthogonal to every pattern
    weights1 = association(query, patterns, 5.0, separation="softmax1")
    weights0 = association(query, patterns, 5.0, separation="softmax")
    torch.testing.assert_close(weights1.sum(), torch.tensor(num / (num + 1), dtype=torch.float64))
    torch.testing.assert_close(weights1, torch.full((num,), 1 / (num + 1), dtype=torch.float64))
    torch.testing.assert_close(weights0.sum(), torch.tensor(1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- layers

def _manual_attention(layer: Hopfield, state: torch.Tensor, stored: torch.Tensor, *, backend: str,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    heads, hd = layer.num_heads, layer.hidden_size

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, hd).transpose(1, 2)

    q, k, v = split(layer.q_proj(state)), split(layer.k_proj(stored)), split(layer.v_proj(stored))
    ctx = scaled_dot_product(q, k, v, variant="softmax1", causal=False, backend=backend, attn_mask=attn_mask)
    return layer.out_proj(ctx.transpose(1, 2).reshape(state.shape[0], state.shape[1], heads * hd))


@pytest.mark.parametrize("backend", ("eager", "sdpa"))
def test_one_step_layer_equals_softmax1_attention(backend: str) -> None:
    torch.manual_seed(0)
    layer = Hopfield(32, num_heads=4)  # default beta = 1/sqrt(head_dim), the attention scale
    state, stored = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    torch.testing.assert_close(layer(state, stored), _manual_attention(layer, state, stored, backend=backend),
                               atol=1e-6, rtol=1e-5)
    # Self-association, and with a mask (padding of the stored set).
    torch.testing.assert_close(layer(state), _manual_attention(layer, state, state, backend=backend),
                               atol=1e-6, rtol=1e-5)
    keep = torch.rand(2, 9) > 0.3
    torch.testing.assert_close(layer(state, stored, stored_mask=keep),
                               _manual_attention(layer, state, stored, backend=backend,
                                                 attn_mask=keep[:, None, None, :]), atol=1e-6, rtol=1e-5)


def test_layer_without_projections_is_the_functional_update() -> None:
    gen = torch.Generator().manual_seed(2)
    patterns, x = torch.randn(3, 11, 6, generator=gen), torch.randn(3, 4, 6, generator=gen)
    for separation in ("softmax", "softmax1", "sparsemax"):
        for steps in (1, 3):
            layer = Hopfield(6, beta=0.7, update_steps=steps, separation=separation, state_projection=False,
                             stored_projection=False, value_projection=False, output_projection=False)
            expected = retrieve(x, patterns[:, None], 0.7, steps=steps, separation=separation)
            torch.testing.assert_close(layer(x, patterns), expected, atol=1e-5, rtol=1e-5)


def test_custom_separation_callable_matches_named() -> None:
    torch.manual_seed(0)
    named = Hopfield(8, num_heads=2, update_steps=2)
    custom = Hopfield(8, num_heads=2, update_steps=2, separation=lambda logits: softmax1(logits))
    custom.load_state_dict(named.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(custom(x), named(x), atol=1e-6, rtol=1e-5)


def test_sparsemax() -> None:
    probs = sparsemax(torch.tensor([[1.0, 0.5, -1.0], [2.0, float("-inf"), 1.9], [float("-inf")] * 3]))
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.25, 0.0], [0.55, 0.0, 0.45], [0.0, 0.0, 0.0]]))
    logits = torch.randn(4, 10, requires_grad=True)
    p = sparsemax(logits)
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    (p * torch.randn(4, 10)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def _assert_all_parameters_get_gradients(module: torch.nn.Module, out: torch.Tensor) -> None:
    (out * torch.randn_like(out)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("separation", ("softmax1", "softmax", "sparsemax"))
def test_gradients_flow_through_every_parameter(separation: str) -> None:
    torch.manual_seed(0)
    # Small beta keeps sparsemax's support wide enough that every pattern gets a gradient.
    beta = 0.05 if separation == "sparsemax" else None
    layer = Hopfield(12, 8, stored_size=10, projection_size=6, value_size=5, output_size=7, num_heads=3,
                     update_steps=2, normalize=True, separation=separation, beta=beta)
    out = layer(torch.randn(2, 4, 12), torch.randn(2, 6, 10), torch.randn(2, 6, 6),
                stored_mask=torch.tensor([[True] * 6, [True] * 4 + [False] * 2]))
    assert out.shape == (2, 4, 7)
    _assert_all_parameters_get_gradients(layer, out)

    lookup = HopfieldLayer(12, quantity=5, num_heads=2, output_size=3, normalize=True, separation=separation,
                           beta=beta)
    out = lookup(torch.randn(2, 4, 12))
    assert out.shape == (2, 4, 3)
    _assert_all_parameters_get_gradients(lookup, out)

    pool = HopfieldPooling(10, quantity=2, num_heads=2, output_size=4, normalize=True, update_steps=2,
                           separation=separation, beta=beta)
    out = pool(torch.randn(3, 7, 10))
    assert out.shape == (3, 2, 4)
    _assert_all_parameters_get_gradients(pool, out)


def test_masks() -> None:
    torch.manual_seed(0)
    layer = Hopfield(8, num_heads=2, update_steps=2)
    state, stored = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    keep = torch.tensor([[True, True, False, True, False], [True] * 5])
    masked = layer(state, stored, stored_mask=keep)
    # A masked stored pattern is as if it were not there.
    torch.testing.assert_close(masked[0], layer(state[:1], stored[:1, [0, 1, 3]])[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(masked[1], layer(state[1:], stored[1:])[0])
    # The association mask in all three accepted ranks gives the same result.
    assoc = torch.rand(3, 5) > 0.4
    ref = layer(state, stored, association_mask=assoc)
    torch.testing.assert_close(layer(state, stored, association_mask=assoc.expand(2, 3, 5)), ref)
    torch.testing.assert_close(layer(state, stored, association_mask=assoc.expand(2, 2, 3, 5)), ref)
    # Everything masked: softmax1 retrieves the no-op; the output is out_proj(0) = its bias.
    none = torch.zeros(2, 5, dtype=torch.bool)
    out, weights = layer(state, stored, stored_mask=none, return_association=True)
    torch.testing.assert_close(out, layer.out_proj.bias.expand(2, 3, 8))
    assert weights.abs().sum() == 0


def test_pooling_and_lookup_shapes_and_padding() -> None:
    torch.manual_seed(0)
    pool = HopfieldPooling(6, quantity=3, num_heads=2, update_steps=2)
    bags = torch.randn(2, 5, 6)
    keep = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    pooled = pool(bags, stored_mask=keep)
    assert pooled.shape == (2, 3, 6)
    padded = bags.clone()
    padded[0, 3:] = 100.0  # padding content must not matter
    torch.testing.assert_close(pool(padded, stored_mask=keep), pooled)
    torch.testing.assert_close(pool(bags[0, :3])[None], pooled[:1], atol=1e-6, rtol=1e-5)  # unbatched
    out, weights = pool(bags, return_association=True)
    assert weights.shape == (2, 2, 3, 5)

    lookup = HopfieldLayer(6, quantity=4, tie_values=True, num_heads=3)
    assert lookup(torch.randn(2, 7, 6)).shape == (2, 7, 6)
    assert lookup(torch.randn(7, 6)).shape == (7, 6)


def _one_line_value_error(fn, *needles: str) -> None:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_shape_and_argument_errors_are_one_line_and_name_the_argument() -> None:
    layer = Hopfield(8, num_heads=2)
    s, st = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    _one_line_value_error(lambda: layer(torch.randn(2, 3, 7)), "state", "(2, 3, 7)")
    _one_line_value_error(lambda: layer(torch.randn(3)), "state", "(3,)")
    _one_line_value_error(lambda: layer(s, torch.randn(3, 5, 8)), "stored", "(3, 5, 8)")
    _one_line_value_error(lambda: layer(s, torch.randn(5, 8)), "stored", "(5, 8)")
    _one_line_value_error(lambda: layer(s, st, torch.randn(2, 4, 8)), "projection", "(2, 4, 8)", "(2, 5, 8)")
    _one_line_value_error(lambda: layer(s, st, stored_mask=torch.ones(2, 4, dtype=torch.bool)),
                          "stored_mask", "(2, 4)")
    _one_line_value_error(lambda: layer(s, st, stored_mask=torch.ones(2, 5)), "stored_mask", "bool")
    _one_line_value_error(lambda: layer(s, st, association_mask=torch.ones(5, 3, dtype=torch.bool)),
                          "association_mask", "(5, 3)")
    _one_line_value_error(lambda: layer(s, st, association_mask=torch.ones(2, 3, 3, 5, dtype=torch.bool)),
                          "association_mask", "(2, 3, 3, 5)")
    _one_line_value_error(lambda: Hopfield(10, num_heads=3), "hidden_size", "10", "3")
    _one_line_value_error(lambda: Hopfield(8, separation="bogus"), "separation", "bogus")
    _one_line_value_error(lambda: Hopfield(8, beta=0.0), "beta")
    _one_line_value_error(lambda: Hopfield(8, update_steps=0), "update_steps")
    _one_line_value_error(lambda: Hopfield(8, hidden_size=4, state_projection=False), "input_size", "8", "4")
    _one_line_value_error(lambda: Hopfield(8, normalize=("keys",)), "normalize", "keys")
    _one_line_value_error(lambda: HopfieldPooling(8, quantity=0), "quantity")
    _one_line_value_error(lambda: hopfield_update(torch.randn(3), torch.randn(4, 5), 1.0), "x", "(3,)", "(4, 5)")
    _one_line_value_error(lambda: energy(torch.randn(5), torch.randn(4, 5), 1.0, separation="sparsemax"),
                          "separation")
    _one_line_value_error(lambda: association(torch.randn(5), torch.randn(4, 5), 1.0, mask=torch.ones(3).bool()),
                          "mask", "(3,)")


# ----------------------------------------------------------------------------------------------- scripts

def test_capacity_benchmark_smoke(tmp_path, capsys) -> None:
    from benchmarks import hopfield_capacity

    hopfield_capacity.main(["--dims", "8", "16", "--patterns", "2", "8", "--trials", "16", "--json",
                            "--out", str(tmp_path)])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 4 and {"softmax", "softmax1"} <= set(rows[0]["retrieval_acc"])
    assert (tmp_path / "hopfield_capacity.png").stat().st_size > 0
    assert (tmp_path / "hopfield_capacity.json").exists()


def test_mil_example_smoke(capsys) -> None:
    from examples import hopfield_mil

    result = hopfield_mil.main(["--epochs", "1", "--train-bags", "64", "--test-bags", "32"])
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert "accuracy" in capsys.readouterr().out
