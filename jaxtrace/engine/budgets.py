"""PGB-CT at every budget: one circuit of at most k components per budget k, all budgets as the runs of one vmapped
program (one compilation), and one ranking of every component merged from them.

    result = run_budgets(objective, SearchConfig(direction="keep", scale="effect"), budget_list("mib", n))
    result.circuits[k]          # [L, C] the circuit of budget k
    result.ranking              # [L, C] scores, larger first: valid at every budget

Mechanism: each run projects its gates onto {0 <= z <= 1, sum z <= k} after every Adam step
(`jaxtrace.core.search.projection_capped_simplex`), with its own k passed as data (`RunInputs.budget`), so the
budgets differ only in an array and share the program. The projection enforces the budget at every step, where a
per-run multiplier only reaches its target size on average and would need its own schedule, and unlike sampled-k
nested masks (MAttr) each budget is optimised for itself. The circuits need not be nested; the ranking orders
components by the smallest budget whose circuit holds them (then by their mean final z over the runs), so its top k
is the circuit of budget k whenever the circuits below k are nested in it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.faithfulness import MIB_FRACTIONS, mib_sizes
from jaxtrace.engine.loop import SearchResult, run_searches
from jaxtrace.engine.objective import Objective


def budget_list(text: str | list[int], n_components: int) -> list[int]:
    """Budgets from "1,2,5,13" or "mib" (MIB's sizes int(p·n) of the n components, zero dropped), sorted and
    distinct, each between 1 and n."""
    if isinstance(text, str) and text.strip() == "mib":
        budgets = mib_sizes(n_components, MIB_FRACTIONS)
    else:
        try:
            budgets = [int(item) for item in text.split(",") if item.strip()] if isinstance(text, str) else list(text)
        except ValueError:
            raise ValueError(f"--budgets takes comma-separated circuit sizes such as 1,2,5 or mib, got {text!r}") \
                from None
        outside = [k for k in budgets if not 1 <= k <= n_components]
        if outside or not budgets:
            raise ValueError(f"--budgets: sizes between 1 and the {n_components} components, got {text!r}")
    return sorted({k for k in budgets if k > 0})


@dataclasses.dataclass(frozen=True)
class BudgetedRuns:
    """The runs of every budget: `budgets` [K], each run's result, its circuit {k: mask [L, C]} and the merged
    ranking [L, C] (larger first)."""

    budgets: list[int]
    results: list[SearchResult]
    circuits: dict[int, np.ndarray]
    ranking: np.ndarray


def nested_ranking(budgets: list[int], masks: np.ndarray, z: np.ndarray) -> np.ndarray:
    """[L, C] scores n − position of the order: components by the smallest budget whose circuit (masks [K, L, C])
    holds them, then by their mean final z over the runs (z [K, L, C]), then by flat index."""
    masks, z = np.asarray(masks, bool), np.asarray(z, np.float64)
    n = masks[0].size
    first = np.full(n, len(budgets), np.int64)  # index of the first budget holding each component
    for i in reversed(range(len(budgets))):
        first[masks[i].ravel()] = i
    mean_z = z.mean(0).ravel()
    order = np.lexsort((np.arange(n), -mean_z, first))
    scores = np.empty(n, np.float32)
    scores[order] = n - np.arange(n, dtype=np.float32)
    return scores.reshape(masks[0].shape)


def run_budgets(objective: Objective, config: SearchConfig, budgets: list[int],
                searches: Callable[..., list[SearchResult]] = run_searches, **kwargs) -> BudgetedRuns:
    """One run of `config` per budget, all optimised together (one vmapped program) by `searches` (`run_searches`,
    or a checkpointed one); `kwargs` as `run_searches`."""
    results = searches(objective, [config.replace(budget=k) for k in budgets], **kwargs)
    masks = np.stack([r.mask for r in results])
    return BudgetedRuns(list(budgets), results, dict(zip(budgets, masks)),
                        nested_ranking(budgets, masks, np.stack([r.z for r in results])))
