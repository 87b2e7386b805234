"""Budgeted PGB-CT in both directions (issue 21): the capped-simplex projection against brute force, every budget
in one vmapped program, circuits equal to exhaustive search's at small budgets, the keep direction's objective, and
the scale-free data term."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace.core.metrics import get_metric
from jaxtrace.core.search import SearchConfig, gates_of, projection_capped_simplex
from jaxtrace.engine.budgets import budget_configs, budget_list, run_budgets
from jaxtrace.engine.loop import data_scale, run_searches
from jaxtrace.runs import baselines
from test_planted import planted  # noqa: F401  (the fixture)


def _projection_by_brute_force(x: np.ndarray, k: float) -> np.ndarray:
    """argmin |p - x|² over 0 <= p <= 1, Σp <= k, from the KKT form p = clip(x - τ, 0, 1): τ = 0 if feasible, else
    the τ >= 0 where Σp = k, bracketed on a fine grid and refined by bisection in float64."""
    p = np.clip(x, 0, 1)
    if p.sum() <= k:
        return p
    low, high = 0.0, float(x.max())
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if np.clip(x - middle, 0, 1).sum() > k else (low, middle)
    return np.clip(x - high, 0, 1)


def test_capped_simplex_projection_is_the_closest_feasible_point():
    rng = np.random.RandomState(0)
    for k in (1, 2, 3.5, 7):
        for _ in range(20):
            x = rng.normal(0.5, 0.8, size=12).astype(np.float32)
            p = np.asarray(projection_capped_simplex(jnp.asarray(x), k))
            assert p.min() >= 0 and p.max() <= 1 and p.sum() <= k + 1e-5
            np.testing.assert_allclose(p, _projection_by_brute_force(x.astype(np.float64), k), atol=1e-5)
            # no feasible point on a grid of random directions is closer
            for direction in rng.normal(size=(20, 12)):
                q = np.clip(p + 0.05 * direction, 0, 1)
                if q.sum() <= k:
                    assert np.sum((q - x) ** 2) >= np.sum((p - x) ** 2) - 1e-5
    inside = np.array([0.2, 0.9, -0.3, 1.4], np.float32)  # Σ clip = 2.1 <= 3: the box projection, bit for bit
    np.testing.assert_array_equal(np.asarray(projection_capped_simplex(jnp.asarray(inside), 3.0)),
                                  np.clip(inside, 0, 1))


def test_every_budget_in_one_program_matches_exhaustive_search(planted):  # noqa: F811
    """Budgets 1, 2, 3 as three runs of one vmapped program (one compilation): each circuit has at most its budget
    and is exhaustive search's best of that size; at 3 it is the planted circuit."""
    objective, truth = planted
    config = SearchConfig(epochs=8, lambda1=0.0, lambda2=1.0)  # the binary penalty drives z to a vertex
    budgets = budget_list("1,3,2,2", objective.n_components)
    assert budgets == [1, 2, 3] and budget_list("mib", 270) == [1, 2, 5, 13, 27, 54, 135, 270]
    result = run_budgets(objective, config, budgets)
    assert objective.programs.traces["training_step"] == 1
    best = baselines.exhaustive(objective, 3)
    for k, run, expected in zip(budgets, result.results, best):
        assert run.mask.sum() <= k and run.z.sum() <= k + 1e-4
        assert np.array_equal(run.mask, expected), (k, np.round(run.z, 3))
    assert np.array_equal(result.circuits[3], truth)
    # the merged ranking: its top k is the circuit of budget k (these circuits are nested)
    order = np.argsort(-result.ranking, axis=None, kind="stable")
    for k in budgets:
        top = np.zeros(objective.n_components, bool)
        top[order[:k]] = True
        assert np.array_equal(top.reshape(objective.shape), result.circuits[k]), k
    with pytest.raises(ValueError, match="--budgets"):
        budget_list("0,2", objective.n_components)


def test_keep_direction_keeps_the_planted_circuit_clean(planted):  # noqa: F811
    """Keep direction: patch weights 1 - z; at budget 3 the circuit whose complement's effect is smallest is the
    planted one (patching every other head changes nothing), found from any start."""
    objective, truth = planted
    config = SearchConfig(epochs=6, lambda1=0.0, lambda2=0.05, direction="keep", budget=3)
    run = run_searches(objective, [config])[0]
    assert np.array_equal(run.mask, truth), np.round(run.z, 3)
    kept = gates_of(run.mask.astype(np.float32), "keep")
    assert abs(float(objective.evaluate_masks(kept[None])[0])) < 1e-6  # the rest patched: no effect
    complements = [np.ones(objective.shape, np.float32) for _ in range(3)]
    for c, (layer, head) in zip(complements, list(zip(*np.nonzero(truth)))):
        c[layer, head] = 0.0  # keeping only two planted heads clean leaves an effect
    assert (np.abs(objective.evaluate_masks(np.stack(complements))) > 1e-3).all()
    assert run.history[-1].effect == pytest.approx(float(objective.evaluate_masks(kept[None])[0]), abs=1e-7)


def test_scale_free_data_term(planted):  # noqa: F811
    """`scale="effect"` divides the data term by |t(IE(all)) - t(0)|: the step's data term is the unscaled one over
    that number, and the gradients, hence the gates, follow the rescaled loss."""
    objective, _ = planted
    base = SearchConfig(epochs=1, lambda1=0.0, lambda2=0.0, transform="neg", scale="none").resolve(objective.site,
                                                                                                   objective.metric)
    scale, measured = data_scale(objective, base.replace(scale="effect"))
    effect_all = float(objective.evaluate_masks(np.ones((1, *objective.shape), np.float32))[0])
    assert scale == pytest.approx(abs(effect_all), rel=1e-6) and measured == effect_all
    assert data_scale(objective, base) == (1.0, None)
    plain, scaled = (run_searches(objective, [base.replace(scale=mode)])[0] for mode in ("none", "effect"))
    for a, b in zip(plain.steps, scaled.steps):
        assert b.metric == pytest.approx(a.metric / scale, rel=1e-5)


def test_budget_options_are_checked():
    with pytest.raises(ValueError, match="--budget must be >= 1"):
        SearchConfig(budget=0)
    with pytest.raises(ValueError, match="--direction"):
        SearchConfig(direction="sideways")
    assert SearchConfig(max_components=5, budget=3).cap == 3 and SearchConfig().cap is None
    assert SearchConfig(budget=2).select(np.array([[0.9, 0.8, 0.7]])).tolist() == [[True, True, False]]


def test_a_budget_turns_the_default_l1_penalty_off():
    """The budget bounds a circuit's size, so λ1 left at its default resolves to 0 (an L1 penalty would shrink the
    circuit below its budget, to nothing in the keep direction), also for a budget given after the config was made
    (`run_budgets`' configs); λ2 and a λ1 given keep their values."""
    def resolved(config):
        return config.resolve("head_out", get_metric("logit_difference"))

    for budgeted in (SearchConfig(budget=3), *budget_configs(SearchConfig(), [1, 2])):
        assert resolved(budgeted).lambda1 == 0.0 and resolved(budgeted).lambda2 == resolved(SearchConfig()).lambda2
    assert resolved(SearchConfig()).lambda1 == 0.5 and resolved(SearchConfig(scale="none")).lambda1 == 0.05
    assert resolved(SearchConfig(budget=3, lambda1=0.2)).lambda1 == 0.2
