"""Attribution patching and integrated gradients on PGB-CT's objective: against finite differences and a plain
per-pair loop, completeness, the rank correlation against plain Python, the warm start and the CLI."""

import json
import math

import jax
import numpy as np
import pytest

from jaxtrace.cli import build_parser, main
from jaxtrace.cli.options import from_args
from jaxtrace.core import objective as core
from jaxtrace.core.search import SearchConfig, warm_start_z
from jaxtrace.engine.attribution import attribution_patching, ig_alphas, integrated_gradients
from jaxtrace.engine.loop import initial_state, run_search
from jaxtrace.engine.objective import DEFAULT_MEMORY_BUDGET, build_objective
from jaxtrace.runs import baselines
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

DATA = SHARED / "data"
ONE_POINT = 1  # a memory budget this small takes one gate point per call: few compiled programs for the tests


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny GPT-2 on 24 WinoBias pairs in batches of 16 (the second one padded)."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:24], tokenizer)
    return build_objective(model, task.replace_arrays(sign=-task.arrays.sign), "attn_pattern", batch_size=16,
                           memory_budget=ONE_POINT)


def test_atp_is_the_gradient_of_the_mean_effect_at_no_patch(objective):
    atp = attribution_patching(objective)
    # jax.grad of a plain loop over the pairs, one pair per call
    spec, batcher = objective.spec, objective.batcher
    grad = jax.jit(jax.grad(lambda z, b, c: core.batch_effects(spec, objective.params, z, b, c)[0]))
    zero = np.zeros(objective.shape, np.float32)
    looped = np.mean([grad(zero, *objective.inputs(np.array([i]), batcher.in_order_shape))
                      for i in range(len(objective.task))], axis=0)
    np.testing.assert_allclose(atp, looped, atol=1e-6)
    # central differences of the batched forward evaluation (float32: eps 1e-2, error ~1e-4)
    eps, steps = 1e-2, np.eye(objective.n_components, dtype=np.float32).reshape(-1, *objective.shape)
    effects = objective.evaluate_masks(np.concatenate([eps * steps, -eps * steps]))
    central = ((effects[: len(steps)] - effects[len(steps):]) / (2 * eps)).reshape(objective.shape)
    np.testing.assert_allclose(atp, central, atol=3e-4)
    assert np.abs(atp).max() > 1e-2


def test_ig_is_complete_and_chunking_does_not_change_it(objective):
    np.testing.assert_allclose(ig_alphas(2), [0.25, 0.75])
    full, none = objective.evaluate_masks(np.stack([np.ones(objective.shape), np.zeros(objective.shape)]))
    assert abs(none) < 1e-6
    errors = [abs(float(integrated_gradients(objective, m).sum()) - (full - none)) for m in (2, 8, 32)]
    print(f"IG completeness error for m = 2, 8, 32: {errors} (effect of all {full:.4f})")
    assert errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4 and errors[2] < 1e-3 * abs(full)
    np.testing.assert_allclose(integrated_gradients(objective.replace(memory_budget=DEFAULT_MEMORY_BUDGET), 2),
                               integrated_gradients(objective, 2), atol=1e-6)
    with pytest.raises(ValueError, match="at least 1 step"):
        ig_alphas(0)


def _plain_spearman(a, b):
    def ranks(xs):
        return [sum(y < x for y in xs) + (sum(y == x for y in xs) - 1) / 2 for x in xs]

    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_rank_correlation_matches_plain_python():
    rng = np.random.RandomState(0)
    for _ in range(5):
        a, b = rng.randint(0, 4, size=12).astype(float), rng.normal(size=12)  # ties in a
        b[3] = b[7]
        assert baselines.rank_correlation(a, b) == pytest.approx(_plain_spearman(a, b), abs=1e-12)
    grid = rng.normal(size=(2, 4))
    assert baselines.rank_correlation(grid, np.exp(grid)) == pytest.approx(1.0)
    assert baselines.rank_correlation(grid, -grid) == pytest.approx(-1.0)
    assert math.isnan(baselines.rank_correlation(grid, np.ones_like(grid)))
    with pytest.raises(ValueError, match="one size"):
        baselines.rank_correlation([1, 2, 3], [1, 2])


def test_attribution_baselines_select_their_top_scores(objective):
    mask, extras = baselines.run_baseline(objective, "atp", 3)
    scores = extras["scores"]
    np.testing.assert_allclose(scores, attribution_patching(objective), atol=1e-7)
    assert sorted(np.flatnonzero(mask)) == sorted(np.argsort(-scores, axis=None)[:3])
    single = baselines.single_effects(objective)
    np.testing.assert_allclose(extras["single_effects"], single, atol=1e-7)
    assert extras["score_correlation"] == pytest.approx(_plain_spearman(scores.ravel(), single.ravel()), abs=1e-9)
    print(f"atp rank correlation with single effects: {extras['score_correlation']:+.3f}")
    mask, extras = baselines.run_baseline(objective, "ig", 2, ig_steps=2, single_max=0)
    assert "single_effects" not in extras and "score_correlation" not in extras
    assert sorted(np.flatnonzero(mask)) == sorted(np.argsort(-extras["scores"], axis=None)[:2])
    with pytest.raises(ValueError, match="--ig-steps must be >= 1"):
        baselines.BaselineConfig(method="ig", ig_steps=0)


def test_warm_start_from_atp(objective):
    scores = np.array([[2.0, -1.0], [0.0, 1.0]])
    np.testing.assert_allclose(warm_start_z(scores, 0.5), [[0.75, 0.375], [0.5, 0.625]])
    np.testing.assert_allclose(warm_start_z(scores, 0.2), [[0.6, 0.15], [0.2, 0.4]])
    np.testing.assert_array_equal(warm_start_z(np.zeros((2, 3)), 0.3), np.full((2, 3), 0.3, np.float32))
    # a step too small to move the gates shows where the run started
    config = SearchConfig(epochs=1, lr=1e-9, lambda1=0.0, lambda2=0.0, warm_start="atp")
    expected = warm_start_z(attribution_patching(objective), config.init)
    assert np.ptp(expected) > 0.1
    np.testing.assert_allclose(run_search(objective, config).z, expected, atol=1e-6)
    given = np.linspace(0.1, 0.9, objective.n_components).reshape(objective.shape)
    np.testing.assert_allclose(run_search(objective, config, z0=given).z, given, atol=1e-6)
    np.testing.assert_array_equal(initial_state(objective, [config]).z, np.full((1, *objective.shape), 0.5))
    with pytest.raises(ValueError, match="unknown warm start"):
        SearchConfig(warm_start="ig")


def test_attribution_baselines_and_warm_start_cli(tiny_gpt2, tmp_path):
    folder, _, _ = tiny_gpt2
    common = ["--model", str(folder), "--task", "winogender", "--data", str(DATA), "--site", "head_out",
              "--memory-gb", "1e-9"]  # one gate point per call: fewer programs to compile
    for method, more in (("atp", []), ("ig", ["--ig-steps", "4", "--single-max", "0"])):
        out = tmp_path / method
        assert main(["baseline", *common, "--method", method, "--k", "2", *more, "--out", str(out)]) == 0
        circuit = json.loads((out / "circuit.json").read_text())
        scores = np.array(circuit["scores"])
        assert circuit["method"] == method and circuit["n_selected"] == 2 and (out / "scores.png").stat().st_size
        top = np.argsort(-scores, axis=None)[:2]
        assert sorted(circuit["selected"]) == sorted([list(np.unravel_index(i, scores.shape)) for i in top])
    assert circuit["search"]["ig_steps"] == 4 and circuit["single_effects"] is None
    atp = json.loads((tmp_path / "atp" / "circuit.json").read_text())
    assert atp["score_correlation"] == pytest.approx(baselines.rank_correlation(atp["scores"], atp["single_effects"]))
    assert (tmp_path / "atp" / "single_effects.png").stat().st_size > 0
    args = build_parser().parse_args(["trace", *common, "--warm-start", "atp", "--out", str(tmp_path / "warm")])
    assert from_args(SearchConfig, args).warm_start == "atp"
