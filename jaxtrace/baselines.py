"""Baseline searches on exactly PGB-CT's objective, each built on batched mask evaluation.

All maximise the mean indirect effect of a binary mask over the task's pairs.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Iterator

import numpy as np

from jaxtrace.objective import Objective

METHODS = ("single", "topk", "greedy", "random", "exhaustive")


def _one_hot(shape: tuple[int, int], flat: np.ndarray) -> np.ndarray:
    masks = np.zeros((len(flat), shape[0] * shape[1]), np.float32)
    masks[np.arange(len(flat)), flat] = 1.0
    return masks.reshape(len(flat), *shape)


def single_effects(objective: Objective, memory_budget: int = 2 << 30) -> np.ndarray:
    """[L, N] mean effect of each component alone (every one-hot mask, batched)."""
    shape = (objective.n_layers, objective.n_per_layer)
    masks = _one_hot(shape, np.arange(objective.n_components))
    return objective.mask_effects(masks, memory_budget).mean(1).reshape(shape)


def topk(objective: Objective, k: int, single: np.ndarray | None = None, memory_budget: int = 2 << 30) -> np.ndarray:
    """Mask [L, N] of the k components with the largest single effects."""
    single = single_effects(objective, memory_budget) if single is None else single
    order = np.argsort(-single, axis=None, kind="stable")[:k]
    return _one_hot(single.shape, order).sum(0) > 0


def greedy_path(objective: Objective, k: int, memory_budget: int = 2 << 30,
                candidates: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """Forward selection: yields (mask [L, N], mean effect) for sizes 1..k, each adding the candidate that
    maximises the mean effect.

    Every round evaluates all remaining candidates (default: every component; or the flat indices given, e.g. the
    best by single effect, to bound the cost) as one batch of masks.
    """
    shape = (objective.n_layers, objective.n_per_layer)
    pool = np.zeros(objective.n_components, bool)
    pool[np.arange(objective.n_components) if candidates is None else candidates] = True
    if not 1 <= k <= pool.sum():
        raise ValueError(f"greedy size {k} needs between 1 and {int(pool.sum())} candidates")
    current = np.zeros(objective.n_components, np.float32)
    for _ in range(k):
        remaining = np.flatnonzero(pool & (current == 0))
        masks = np.repeat(current[None], len(remaining), axis=0)
        masks[np.arange(len(remaining)), remaining] = 1.0
        effects = objective.mask_effects(masks.reshape(-1, *shape), memory_budget).mean(1)
        best = int(np.argmax(effects))
        current = masks[best]
        yield current.reshape(shape) > 0, float(effects[best])


def greedy(objective: Objective, k: int, memory_budget: int = 2 << 30,
           candidates: np.ndarray | None = None) -> list[np.ndarray]:
    """Greedy masks of sizes 1..k (see `greedy_path`)."""
    return [mask for mask, _ in greedy_path(objective, k, memory_budget, candidates)]


def random_best(objective: Objective, k: int, n_samples: int, seed: int = 0, memory_budget: int = 2 << 30,
                with_effect: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """The best of `n_samples` uniformly random subsets of size k (seeded), with its mean effect if asked."""
    rng = np.random.default_rng(seed)
    shape = (objective.n_layers, objective.n_per_layer)
    masks = np.zeros((n_samples, objective.n_components), np.float32)
    for row in masks:
        row[rng.choice(objective.n_components, size=k, replace=False)] = 1.0
    effects = objective.mask_effects(masks.reshape(-1, *shape), memory_budget).mean(1)
    best = int(np.argmax(effects))
    mask = masks[best].reshape(shape) > 0
    return (mask, float(effects[best])) if with_effect else mask


def count_subsets(n: int, k: int) -> int:
    """Number of non-empty subsets of size at most k."""
    return sum(math.comb(n, size) for size in range(1, k + 1))


def exhaustive(objective: Objective, k: int, max_masks: int = 100_000,
               memory_budget: int = 2 << 30) -> list[np.ndarray]:
    """The best mask of each size 1..k over all subsets; refused when there are more than `max_masks`."""
    n = objective.n_components
    total = count_subsets(n, k)
    if total > max_masks:
        raise ValueError(f"exhaustive search up to size {k} over {n} components means {total:,} masks, over the "
                         f"limit of {max_masks:,}: lower --k or use greedy")
    shape = (objective.n_layers, objective.n_per_layer)
    best = []
    for size in range(1, k + 1):
        subsets = np.array(list(itertools.combinations(range(n), size)))
        masks = np.zeros((len(subsets), n), np.float32)
        np.put_along_axis(masks, subsets, 1.0, axis=1)
        effects = objective.mask_effects(masks.reshape(-1, *shape), memory_budget).mean(1)
        best.append(masks[int(np.argmax(effects))].reshape(shape) > 0)
    return best


def run_baseline(objective: Objective, method: str, k: int, n_samples: int = 100, seed: int = 0,
                 memory_budget: int = 2 << 30) -> tuple[np.ndarray, dict]:
    """(mask [L, N] of size k, extras) for one method; `single` selects like `topk` and returns the effect map."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    if not 1 <= k <= objective.n_components:
        raise ValueError(f"--k must be between 1 and {objective.n_components}, got {k}")
    start = time.perf_counter()
    extras: dict = {}
    if method in ("single", "topk"):
        single = single_effects(objective, memory_budget)
        extras["single_effects"] = single
        mask = topk(objective, k, single)
    elif method == "greedy":
        mask = greedy(objective, k, memory_budget)[-1]
    elif method == "random":
        mask = random_best(objective, k, n_samples, seed, memory_budget)
    else:
        mask = exhaustive(objective, k, memory_budget=memory_budget)[-1]
    extras["seconds"] = time.perf_counter() - start
    return mask, extras
