"""random: at each size, the best (in the context's direction) of the context's `n_random` uniformly random
subsets (seeded by its `seed`)."""

from __future__ import annotations

import numpy as np

from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.objective import Objective


def random_best(objective: Objective, k: int, n_samples: int, seed: int = 0, with_effect: bool = False,
                direction: str = "patch") -> np.ndarray | tuple[np.ndarray, float]:
    """The best of `n_samples` uniformly random subsets of size k (seeded) by the mean effect in `direction`, with
    that effect if asked."""
    rng = np.random.default_rng(seed)
    shape = objective.shape
    masks = np.zeros((n_samples, objective.n_components), np.float32)
    for row in masks:
        row[rng.choice(objective.n_components, size=k, replace=False)] = 1.0
    effects = objective.circuit_effects(masks.reshape(-1, *shape), direction)
    best = int(np.argmax(effects))
    mask = masks[best].reshape(shape) > 0
    return (mask, float(effects[best])) if with_effect else mask


def run(objective: Objective, context: MethodContext) -> MethodResult:
    return MethodResult({size: random_best(objective, size, context.n_random, context.seed, True, context.direction)
                         for size in context.sizes})


METHOD = register(Method("random", run, search=True, report_order=40))
