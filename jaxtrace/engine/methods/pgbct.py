"""PGB-CT as a method of the report: one vmapped sweep of (λ1, λ2) scaled by each of the context's `lambda_factors`
(`MethodContext.searches`), in the context's direction (keep: the gates keep components clean). Each run's circuit
lands at its own size (the best of the runs of a size); the sizes join those of the methods after it. Its ranking:
the mean of the runs' final z (a component kept under stronger penalties ranks higher; with one λ, that run's z)."""

from __future__ import annotations

import numpy as np

from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.objective import Objective


def run(objective: Objective, context: MethodContext) -> MethodResult:
    if context.search is None:
        raise ValueError("pgbct needs a search config (MethodContext.search)")
    search = context.search.replace(direction=context.direction).resolve(objective.site, objective.metric)
    configs = [search.replace(lambda1=search.lambda1 * f, lambda2=search.lambda2 * f) for f in context.lambda_factors]
    with context.progress(search.epochs * len(objective.batcher.in_order), "PGB-CT sweep") as on_step:
        runs = context.searches(objective, configs, on_step=on_step)
    masks = np.stack([r.mask for r in runs]).astype(np.float32)
    circuits, records = {}, []
    for result, effect in zip(runs, context.effects(masks)):
        size = int(result.mask.sum())
        records.append({"lambda1": result.config.lambda1, "lambda2": result.config.lambda2, "size": size,
                        "effect": float(effect)})
        if size and float(effect) > circuits.get(size, (None, -np.inf))[1]:
            circuits[size] = (result.mask, float(effect))
    return MethodResult(circuits, np.mean([r.z for r in runs], axis=0), extras={"pgbct_runs": records})


METHOD = register(Method("pgbct", run, ranking="mean final z of the λ sweep", scores=True, search=True,
                         baseline=False, own_sizes=True, extras={"pgbct_runs": []}, report_order=10))
