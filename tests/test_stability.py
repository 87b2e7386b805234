"""Stability sweeps: K seeds x B bootstrap resamples in one vmapped sweep equal to the runs alone; normal runs
unchanged bit for bit; selection frequency, Jaccard similarity and the percentile interval against plain Python;
the CLI."""

import itertools
import json

import jax
import numpy as np
import pytest

from jaxtrace.cli import main
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import run_searches
from jaxtrace.engine.objective import build_objective
from jaxtrace.runs.stability import (StabilityConfig, StabilityResult, bootstrap_resamples, mean_jaccard,
                                     percentile_interval, selection_frequency, stability, summary)
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

DATA = SHARED / "data"


def plain_jaccard(circuits):
    sets = [set(map(tuple, c)) for c in circuits]
    pairs = list(itertools.combinations(sets, 2))
    return sum(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs) / len(pairs)


def plain_percentile(values, q):
    """numpy's default (linear) percentile: the value at rank q/100 * (n - 1) of the sorted values."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def test_frequency_jaccard_and_interval_match_plain_python():
    rng = np.random.RandomState(0)
    masks = rng.uniform(size=(5, 2, 3)) > 0.6
    masks[0] = masks[1] = False  # two empty circuits count as identical
    circuits = [[(l, i) for l in range(2) for i in range(3) if m[l, i]] for m in masks]
    frequency = selection_frequency(masks)
    for l, i in itertools.product(range(2), range(3)):
        assert frequency[l, i] == pytest.approx(sum((l, i) in c for c in circuits) / 5)
    assert mean_jaccard(masks) == pytest.approx(plain_jaccard(circuits), abs=1e-12)
    assert mean_jaccard(np.ones((3, 2, 2), bool)) == 1.0
    values = rng.normal(size=11).tolist()
    low, high = percentile_interval(values, 0.9)
    assert low == pytest.approx(plain_percentile(values, 5)) and high == pytest.approx(plain_percentile(values, 95))
    resamples = bootstrap_resamples(7, 3, seed=4)
    assert resamples.shape == (3, 7) and resamples.min() >= 0 and resamples.max() < 7
    np.testing.assert_array_equal(resamples, bootstrap_resamples(7, 3, seed=4))
    with pytest.raises(ValueError, match="at least 2 circuits"):
        mean_jaccard(masks[:1])
    with pytest.raises(ValueError, match="at least 2 runs"):
        StabilityConfig(seeds=1, resamples=1)


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny GPT-2 on 16 WinoBias pairs in batches of 8 (signs flipped so that patching helps)."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:16], tokenizer)
    return build_objective(model, task.replace_arrays(sign=-task.arrays.sign), "attn_pattern", batch_size=8)


@pytest.mark.slow
def test_sweep_equals_runs_alone_and_normal_runs_are_unchanged(objective):
    n = len(objective.task)
    key = jax.random.key(3)
    for epoch in (0, 1):  # all pairs as a run's index set: the very same batches
        for mine, normal in zip(objective.batcher.epoch(key, epoch, np.arange(n)), objective.batcher.epoch(key, epoch)):
            np.testing.assert_array_equal(mine, normal)
    resample = bootstrap_resamples(n, 1, seed=2)[0]
    assert sorted(np.concatenate(objective.batcher.epoch(key, 0, resample))) == sorted(resample)

    search = SearchConfig(epochs=2, lambda1=0.01, lambda2=0.01, seed=5)
    config = StabilityConfig(seeds=2, resamples=2, bootstrap_seed=1)
    result = stability(objective, search, config, progress=False)
    resamples = bootstrap_resamples(n, 2, seed=1)
    assert [(r.seed, r.resample) for r in result.runs] == [(5, 0), (5, 1), (6, 0), (6, 1)]
    np.testing.assert_array_equal(result.resample_indices, resamples)
    for run in result.runs:
        alone = run_searches(objective, [search.replace(seed=run.seed)], pairs=[resamples[run.resample]])[0]
        np.testing.assert_allclose(run.z, alone.z, atol=1e-5)
        assert sorted(map(tuple, run.selected)) == sorted(zip(*map(list, np.nonzero(alone.mask))))
        assert run.effect == pytest.approx(float(objective.effects(alone.mask.astype(np.float32)).mean()), abs=1e-5)
    assert len({r.z.tobytes() for r in result.runs}) == 4  # seeds and resamples do change the runs
    circuits = [r.selected for r in result.runs]
    assert result.mean_jaccard == pytest.approx(plain_jaccard(circuits), abs=1e-12)
    frequency = result.selection_frequency
    assert frequency[0, 1] == pytest.approx(sum([0, 1] in c for c in circuits) / 4)
    effects = [r.effect for r in result.runs]
    assert result.effect_interval == pytest.approx((plain_percentile(effects, 2.5), plain_percentile(effects, 97.5)))
    record = result.to_dict()  # stability.json's record: plain JSON, and read back to the same result
    assert list(record) == ["site", "metric", "n_pairs", "n_components", "seeds", "resamples", "confidence",
                            "seconds", "runs", "selection_frequency", "mean_jaccard", "effect_mean",
                            "effect_interval", "size_mean", "resample_indices"]
    assert list(record["runs"][0]) == ["seed", "resample", "size", "effect", "selected", "selected_names", "z"]
    assert json.loads(json.dumps(record)) == record
    assert StabilityResult.from_dict(json.loads(json.dumps(record))).to_dict() == record
    assert "jaccard" in summary(result)

    configs = [search.replace(seed=s) for s in (5, 6)]
    normal = run_searches(objective, configs)
    every = run_searches(objective, configs, pairs=[np.arange(n)] * 2)
    for a, b in zip(normal, every):
        np.testing.assert_array_equal(a.z, b.z)  # bit for bit
    with pytest.raises(ValueError, match="integer pair indices"):
        run_searches(objective, configs, pairs=[np.arange(n)])
    with pytest.raises(ValueError, match=r"in \[0, 16\)"):
        run_searches(objective, configs, pairs=[np.arange(n) + 1] * 2)


@pytest.mark.slow
def test_stability_cli(tiny_gpt2, tmp_path):
    folder, _, _ = tiny_gpt2
    out = tmp_path / "stable"
    assert main(["stability", "--model", str(folder), "--task", "winogender", "--data", str(DATA), "--site",
                 "head_out", "--epochs", "1", "--seeds", "2", "--resamples", "1", "--no-progress",
                 "--out", str(out)]) == 0
    result = json.loads((out / "stability.json").read_text())
    assert len(result["runs"]) == 2 and result["task"] == "winogender"
    assert np.asarray(result["selection_frequency"]).shape == (2, 4)
    assert (out / "selection_frequency.png").stat().st_size > 0
    assert main(["stability", "--model", str(folder), "--task", "winogender", "--data", str(DATA), "--site",
                 "head_out", "--epochs", "1", "--seeds", "2", "--resamples", "1", "--no-progress",
                 "--out", str(out)]) == 2  # a finished run is not overwritten unasked
