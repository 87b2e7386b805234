"""Planted ground truth: a tiny GPT-2 in which only three of its eight heads can affect the output (every other
head's output projection is zero), recovered exactly by exhaustive search, greedy and PGB-CT and ranked first by
single, AtP and IG (ROC-AUC 1); and one in which only five of its 110 edges can, recovered by greedy and budgeted
PGB-CT and ranked first by single effects, EAP, EAP-IG and PGB-CT's merged ranking."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrace.core import edges
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.attribution import attribution_scores
from jaxtrace.engine.batcher import Batcher
from jaxtrace.engine.budgets import run_budgets
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
    return signed_by(objective, task, truth), truth


def signed_by(objective, task, truth):
    """`objective` with each pair's sign set so that patching the components of `truth` together has a positive
    effect on it."""
    together = objective.mask_effects(truth[None].astype(np.float32))[0]
    sign = task.arrays.sign * np.where(together >= 0, 1, -1).astype(task.arrays.sign.dtype)
    return dataclasses.replace(objective, batcher=Batcher(task.replace_arrays(sign=sign), objective.batcher.batch_size))


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


PLANTED_EDGES = ["input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->logits", "a0.h1->logits"]


@pytest.fixture(scope="module")
def planted_edges(tiny_gpt2):
    """(objective on the `edges` site, truth [1, E]): only head a0.h1 and the embeddings write anything that differs
    between the prompts (every other head's output projection and both MLPs' are zero; their biases are the same in
    both runs), and only a0.h1 and the logits read what reaches the output, so the five edges input -> a0.h1<q, k,
    v>, input -> logits and a0.h1 -> logits are the only ones that can move it; signs as in `planted`."""
    _, model, tokenizer = tiny_gpt2
    planted = plant_heads(model, [(0, 1)])
    planted.blocks.down[...] = planted.blocks.down[...] * 0
    task = encode_pairs(load_pairs("winobias", SHARED / "data", split="dev")[:24], tokenizer)
    objective = build_objective(planted, task, "edges", batch_size=24, metric="logit_difference",
                                memory_budget=ONE_MASK)
    truth = np.isin(edges.edge_names(model.config), PLANTED_EDGES)[None]
    return signed_by(objective, task, truth), truth


def test_planted_edges_are_recovered_and_ranked_first(planted_edges):
    objective, truth = planted_edges
    names = np.asarray(edges.edge_names(objective.spec.config))[None]
    k = int(truth.sum())
    full = float(objective.circuit_effects(truth[None].astype(np.float32))[0])
    single = baselines.single_effects(objective)
    print(f"planted edges' single effects {np.round(single[truth], 4)}, together {full:.4f}")
    assert (single[truth] > 0.01).all() and (np.abs(single[~truth]) < 1e-6).all()
    scores = {"single": single, "atp": attribution_scores(objective, "atp"),
              "ig": attribution_scores(objective, "ig", 8)}
    for name, score in scores.items():  # attribution: exactly 0 off the planted edges (their deltas or paths are 0)
        assert (np.abs(score[truth]) > 1e-3).all() and (np.abs(score[~truth]) < 1e-6).all(), name
        assert roc_auc(np.abs(score), truth) == 1.0, name

    path = list(baselines.greedy_path(objective, k))
    best_mask, best_effect = max(path, key=lambda step: step[1])
    print("greedy: " + "; ".join(f"{', '.join(names[m])} {e:.4f}" for m, e in path))
    assert best_effect == pytest.approx(full, abs=1e-5) and not (best_mask & ~truth).any()

    budgeted = {direction: run_budgets(objective, SearchConfig(epochs=15, lambda1=0.0, direction=direction),
                                       [1, 2, k]) for direction in ("patch", "keep")}
    for direction, runs in budgeted.items():
        print(f"budgeted PGB-CT ({direction}): " + "; ".join(f"{b}: {', '.join(names[c])}"
                                                            for b, c in runs.circuits.items()))
        for circuit in runs.circuits.values():  # never an edge that cannot move the output
            assert circuit.any() and not (circuit & ~truth).any(), direction
    assert np.array_equal(budgeted["patch"].circuits[k], truth)
    assert sorted(np.argsort(-budgeted["patch"].ranking, axis=None)[:k]) == sorted(np.flatnonzero(truth))
    traced = run_search(objective, SearchConfig(epochs=5, lambda1=0.1, lambda2=0.1))
    assert np.array_equal(traced.mask, truth)
