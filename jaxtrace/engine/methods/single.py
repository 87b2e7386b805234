"""single: every component's mean effect alone (every one-hot mask, one batch) in the context's direction: patch,
the effect of patching it alone; keep, the effect of keeping it alone clean with every other component patched
(IE(A) − IE(A \\ {c}), the circuit of size 1 in that direction). Its ranking is those effects, which top-k selects
by and greedy's candidates and ranking use (computed once per context: `single_of`)."""

from __future__ import annotations

import numpy as np

from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.objective import Objective

SINGLE_EFFECTS = "single_effects"  # the memo's key


def one_hot(shape: tuple[int, int], flat: np.ndarray) -> np.ndarray:
    """[len(flat), L, C] masks, each with the one component of its flat index."""
    masks = np.zeros((len(flat), shape[0] * shape[1]), np.float32)
    masks[np.arange(len(flat)), flat] = 1.0
    return masks.reshape(len(flat), *shape)


def single_effects(objective: Objective, direction: str = "patch") -> np.ndarray:
    """[L, C] mean effect of each component alone in a direction (every one-hot circuit, batched)."""
    shape = objective.shape
    masks = one_hot(shape, np.arange(objective.n_components))
    return objective.circuit_effects(masks, direction).reshape(shape)


def single_of(context: MethodContext) -> np.ndarray:
    """The single effects of the context's objective in its direction, computed the first time they are asked for."""
    return context.cached(SINGLE_EFFECTS, lambda: single_effects(context.objective, context.direction))


def run(objective: Objective, context: MethodContext) -> MethodResult:
    return MethodResult(scores=single_of(context))


METHOD = register(Method("single", run, ranking="effect alone", scores=True, circuits=False, report_order=50))
