"""topk: the k components with the largest single effects (in the context's direction), at every size (the single
effects reused from the context; its wall time includes single's)."""

from __future__ import annotations

import numpy as np

from jaxtrace.engine.faithfulness import ranking_masks
from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register, top_circuits
from jaxtrace.engine.methods.single import single_effects, single_of
from jaxtrace.engine.objective import Objective


def topk(objective: Objective, k: int, single: np.ndarray | None = None, direction: str = "patch") -> np.ndarray:
    """Mask [L, C] of the k components with the largest single effects in `direction` (or the given scores
    [L, C])."""
    single = single_effects(objective, direction) if single is None else single
    return ranking_masks(single, [k])[0] > 0


def run(objective: Objective, context: MethodContext) -> MethodResult:
    return MethodResult(top_circuits(context, single_of(context)))


METHOD = register(Method("topk", run, ranking="single effects (= single)", ranked_as="single", search=True,
                         includes=("single",), report_order=30))
