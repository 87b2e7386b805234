"""exhaustive: the best mask of each size, in the context's direction, over all subsets up to the largest size
(refused above 100,000 masks); a baseline only."""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import numpy as np

from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.objective import Objective

MAX_MASKS = 100_000


def count_subsets(n: int, k: int) -> int:
    """Number of non-empty subsets of size at most k."""
    return sum(math.comb(n, size) for size in range(1, k + 1))


def exhaustive_path(objective: Objective, k: int, max_masks: int = MAX_MASKS,
                    direction: str = "patch") -> Iterator[tuple[np.ndarray, float]]:
    """(mask [L, C], mean effect) of the best mask of each size 1..k over all subsets, by the mean effect in
    `direction` (`Objective.circuit_effects`); refused when there are more than `max_masks`."""
    n = objective.n_components
    total = count_subsets(n, k)
    if total > max_masks:
        raise ValueError(f"exhaustive search up to size {k} over {n} components means {total:,} masks, over the "
                         f"limit of {max_masks:,}: lower --k or use greedy")
    shape = objective.shape
    for size in range(1, k + 1):
        subsets = np.array(list(itertools.combinations(range(n), size)))
        masks = np.zeros((len(subsets), n), np.float32)
        np.put_along_axis(masks, subsets, 1.0, axis=1)
        effects = objective.circuit_effects(masks.reshape(-1, *shape), direction)
        best = int(np.argmax(effects))
        yield masks[best].reshape(shape) > 0, float(effects[best])


def exhaustive(objective: Objective, k: int, max_masks: int = MAX_MASKS, direction: str = "patch") -> list[np.ndarray]:
    """The best mask of each size 1..k over all subsets in `direction`; refused when there are more than
    `max_masks`."""
    return [mask for mask, _ in exhaustive_path(objective, k, max_masks, direction)]


def run(objective: Objective, context: MethodContext) -> MethodResult:
    best = exhaustive_path(objective, max(context.sizes), direction=context.direction)
    return MethodResult({size: found for size, found in enumerate(best, 1) if size in context.sizes})


METHOD = register(Method("exhaustive", run, ranking="none", compare=False))
