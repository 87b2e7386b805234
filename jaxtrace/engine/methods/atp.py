"""atp: attribution patching, the gradient of the mean effect with respect to the gates at no patch (keep
direction: at every component patched, the gradient of the kept effect; on edges, EAP, at no patch in both
directions: `jaxtrace.engine.attribution`); its circuits are its top scores at every size."""

from __future__ import annotations

from jaxtrace.engine.attribution import attribution_patching
from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register, top_circuits
from jaxtrace.engine.objective import Objective


def run(objective: Objective, context: MethodContext) -> MethodResult:
    scores = attribution_patching(objective, context.direction)
    return MethodResult(top_circuits(context, scores), scores)


METHOD = register(Method("atp", run, scores=True, report_order=60,
                         ranking="AtP score (gradient at nothing patched; keep: at nothing kept; edges: EAP, at "
                                 "nothing patched)"))
