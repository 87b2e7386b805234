"""greedy: forward selection in the context's direction (patch: add the component whose patching most raises the
effect; keep: the one whose keeping clean most restores the model, every other component patched), each round one
batch of masks (every remaining candidate added to the current circuit), up to the context's `greedy_max` (default:
the largest size) over its `greedy_candidates` best components by single effect (default: all), and at most to
their number. Its ranking: the order of addition, then the components it did not reach by single effect."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.methods.single import single_of
from jaxtrace.engine.objective import Objective


def greedy_path(objective: Objective, k: int, candidates: np.ndarray | None = None,
                direction: str = "patch") -> Iterator[tuple[np.ndarray, float]]:
    """Forward selection: yields (mask [L, C], mean effect) for sizes 1..k, each adding the candidate that
    maximises the mean effect in `direction` (`Objective.circuit_effects`).

    Every round evaluates all remaining candidates (default: every component; or the flat indices given, e.g. the
    best by single effect, to bound the cost) as one batch of masks, each from the candidate's layer (the layers
    below are the current circuit's, run once a round).
    """
    shape = objective.shape
    pool = np.zeros(objective.n_components, bool)
    pool[np.arange(objective.n_components) if candidates is None else candidates] = True
    if not 1 <= k <= pool.sum():
        raise ValueError(f"greedy size {k} needs between 1 and {int(pool.sum())} candidates")
    current = np.zeros(objective.n_components, np.float32)
    for _ in range(k):
        remaining = np.flatnonzero(pool & (current == 0))
        masks = np.repeat(current[None], len(remaining), axis=0)
        masks[np.arange(len(remaining)), remaining] = 1.0
        effects = objective.circuit_effects(masks.reshape(-1, *shape), direction, near=current.reshape(shape))
        best = int(np.argmax(effects))
        current = masks[best]
        yield current.reshape(shape) > 0, float(effects[best])


def greedy(objective: Objective, k: int, candidates: np.ndarray | None = None,
           direction: str = "patch") -> list[np.ndarray]:
    """Greedy masks of sizes 1..k (see `greedy_path`)."""
    return [mask for mask, _ in greedy_path(objective, k, candidates, direction)]


def greedy_ranking(order: list[int], single: np.ndarray) -> np.ndarray:
    """[L, C] scores n - rank of greedy's order of addition (flat indices), then of the remaining components by
    their single effects [L, C]."""
    n, added = single.size, set(order)
    rest = [int(i) for i in np.argsort(-single, axis=None, kind="stable") if int(i) not in added]
    scores = np.empty(n, np.float32)
    scores[np.array([*order, *rest], np.int64)] = n - np.arange(n, dtype=np.float32)
    return scores.reshape(single.shape)


def run(objective: Objective, context: MethodContext) -> MethodResult:
    sizes, candidates = context.sizes, context.greedy_candidates
    limit = min(context.greedy_max or max(sizes), max(sizes), candidates or objective.n_components)
    pool = None if candidates is None else np.argsort(-single_of(context), axis=None)[:candidates]
    order, previous, circuits = [], np.zeros(objective.shape, bool), {}
    for size, (mask, effect) in enumerate(greedy_path(objective, limit, pool, context.direction), 1):
        order.append(int(np.flatnonzero(mask & ~previous)[0]))
        previous = mask
        if size in sizes:
            circuits[size] = (mask, effect)
    scores = greedy_ranking(order, single_of(context)) if context.rankings else None
    return MethodResult(circuits, scores, extras={"greedy_max": limit})


METHOD = register(Method("greedy", run, ranking="order of addition, then single effects", scores=True, search=True,
                         extras={"greedy_max": None}, report_order=20))
