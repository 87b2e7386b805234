"""ig: integrated gradients along z = α·1 from no patch to all, the context's `ig_steps` midpoints
(`jaxtrace.engine.attribution`; the keep direction's path is the same path reversed, so the same scores); its
circuits are its top scores at every size, scored in the context's direction."""

from __future__ import annotations

from jaxtrace.engine.attribution import integrated_gradients
from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register, top_circuits
from jaxtrace.engine.objective import Objective


def run(objective: Objective, context: MethodContext) -> MethodResult:
    scores = integrated_gradients(objective, context.ig_steps)
    return MethodResult(top_circuits(context, scores), scores)


METHOD = register(Method("ig", run, ranking="IG score", scores=True, report_order=70))
