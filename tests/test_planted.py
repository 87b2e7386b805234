"""Planted ground truth: a tiny GPT-2 in which only three of its eight heads can affect the output (every other
head's output projection is zero), recovered exactly by exhaustive search, greedy and PGB-CT and ranked first by
single, AtP and IG (ROC-AUC 1)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.attribution import attribution_scores
from jaxtrace.engine.batcher import Batcher
from jaxtrace.engine.faithfulness import roc_auc
from jaxtrace.engine.loop import run_search
from jaxtrace.engine.objective import build_objective
from jaxtrace.runs import baselines
from jaxtrace.runs.curve import greedy_ranking
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

PLANTED = [(0, 1), (0, 2), (1, 2)]  # of the 2 x 4 heads
ONE_MASK = 1  # a memory budget this small evaluates one mask per call: one compiled program for every method


def plant_heads(model, heads):
    """A copy of `model` in which only `heads` write to the residual stream: every other head's output projection
    o[l, h] ([Dh, D] of o [L, H, Dh, D]) is zero, so patching it changes nothing."""
    planted = nnx.clone(model)
    keep = np.zeros((model.config.n_layers, model.config.n_heads, 1, 1), np.float32)
    for layer, head in heads:
        keep[layer, head] = 1.0
    o = planted.blocks.o[...]
    planted.blocks.o[...] = o * jnp.asarray(keep, o.dtype)
    return planted


@pytest.fixture(scope="module")
def planted(tiny_gpt2):
    """(objective, truth [L, H]): 24 WinoBias pairs, each pair's sign set so that patching the planted heads
    together has a positive effect on it (the ungated cache does not depend on the signs: it is reused)."""
    _, model, tokenizer = tiny_gpt2
    original = np.asarray(model.blocks.o[...]).copy()
    task = encode_pairs(load_pairs("winobias", SHARED / "data", split="dev")[:24], tokenizer)
    objective = build_objective(plant_heads(model, PLANTED), task, "attn_pattern", batch_size=24,
                                metric="logit_difference", memory_budget=ONE_MASK)
    np.testing.assert_array_equal(np.asarray(model.blocks.o[...]), original)  # the fixture's model is untouched
    truth = np.zeros(objective.shape, bool)
    truth[tuple(zip(*PLANTED))] = True
    together = objective.mask_effects(truth[None].astype(np.float32))[0]
    sign = task.arrays.sign * np.where(together >= 0, 1, -1).astype(task.arrays.sign.dtype)
    flipped = task.replace_arrays(sign=sign)
    return dataclasses.replace(objective, batcher=Batcher(flipped, objective.batcher.batch_size)), truth


def test_planted_heads_are_recovered_and_ranked_first(planted):
    objective, truth = planted
    k = int(truth.sum())
    single = baselines.single_effects(objective)
    print(f"single effects:\n{np.round(single, 4)}")
    assert (single[truth] > 0.05).all()  # each planted head alone has a strong positive effect
    assert (single[~truth] == 0).all()   # patching any other head does nothing

    assert np.array_equal(baselines.exhaustive(objective, k)[-1], truth)
    greedy_path = baselines.greedy(objective, k)
    assert np.array_equal(greedy_path[-1], truth)
    # λ 0.1 on the scale-free data term: the weakest planted head, (1, 2), carries about a sixth of the planted
    # circuit's effect, and the default λ 0.5 prunes it (a smaller circuit is what a larger λ asks for)
    result = run_search(objective, SearchConfig(epochs=5, lambda1=0.1, lambda2=0.1))
    print(f"PGB-CT z:\n{np.round(result.z, 3)}")
    assert np.array_equal(result.mask, truth)

    order = [int(np.flatnonzero(b & ~a)[0]) for a, b in zip([np.zeros_like(truth), *greedy_path], greedy_path)]
    rankings = {"single": single, "atp": attribution_scores(objective, "atp"),
                "ig": attribution_scores(objective, "ig", 8), "greedy": greedy_ranking(order, single),
                "pgbct": result.z}
    aucs = {name: roc_auc(scores, truth) for name, scores in rankings.items()}
    print("ROC-AUC against the planted heads: " + ", ".join(f"{n} {a:.3f}" for n, a in aucs.items()))
    for name, scores in rankings.items():
        assert aucs[name] == 1.0, name
        assert sorted(np.argsort(-scores, axis=None)[:k]) == sorted(np.flatnonzero(truth)), name
