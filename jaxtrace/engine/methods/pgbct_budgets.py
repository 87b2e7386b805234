"""Budgeted PGB-CT as a method of the report: one run per budget (MIB's sizes of the components below all of them),
all in one vmapped program (`jaxtrace.engine.budgets`), in the context's direction (compare's default, keep: the
circuit kept clean, everything else patched, MIB's faithfulness) with the scale-free data term; the budget sets each
circuit's size, so the L1 penalty is off unless λ1 is given. The circuits of budgets up to the context's `swap_max`
are then moved by swap search (`budgets.swap_search`: exchanges with the merged ranking's best outsiders, by
evaluated effects), where a small budget's relaxation leaves its circuit short of the best; its circuits land at
their budgets; its ranking is the budgets' merged order (`budgets.nested_ranking`, of the swapped circuits). With
the context's `signed`, the same budgets also run against the behaviour, in the same program, and those components
score negative where, by |score|, they bring the faithfulness at MIB's sizes closest to 1
(`budgets.signed_ranking`)."""

from __future__ import annotations

import numpy as np

from jaxtrace.engine.budgets import budget_list, nested_ranking, run_budgets, signed_ranking, swap_search
from jaxtrace.engine.methods.registry import Method, MethodContext, MethodResult, register
from jaxtrace.engine.objective import Objective


def run(objective: Objective, context: MethodContext) -> MethodResult:
    if context.search is None:
        raise ValueError("pgbct_budgets needs a search config (MethodContext.search)")
    config = context.search.replace(direction=context.direction, scale="effect", budget=None)
    n = objective.n_components
    budgets = [k for k in budget_list("mib", n) if k < n] or [n]  # MIB's 100 % is the whole model: no run
    with context.progress(config.epochs * len(objective.batcher.in_order), "PGB-CT budgets") as on_step:
        result = run_budgets(objective, config, budgets, on_step=on_step, searches=context.searches,
                             against=context.signed)
    masks = np.stack([result.circuits[k] for k in budgets])
    effects = context.effects(masks.astype(np.float32)).astype(np.float64)
    for i, k in enumerate(budgets):
        if k <= context.swap_max:
            masks[i], effects[i] = swap_search(objective, masks[i], result.ranking, k, context.direction,
                                               float(effects[i]))
    ranking = nested_ranking(budgets, masks, np.stack([run.z for run in result.results]))
    if result.against is not None:
        ranking = signed_ranking(objective, ranking, result.against.ranking, budgets)
    circuits = {}
    for mask, effect in zip(masks, effects):  # a run below its budget: the best of its size
        size = int(mask.sum())
        if size and float(effect) > circuits.get(size, (None, -np.inf))[1]:
            circuits[size] = (mask, float(effect))
    return MethodResult(circuits, ranking, extras={"pgbct_budgets": budgets})


METHOD = register(Method("pgbct_budgets", run, ranking="budgeted circuits merged (MIB's sizes)",
                         scores=True, search=True, baseline=False, own_sizes=True, budgeted=True,
                         extras={"pgbct_budgets": []}, report_order=11))
