"""PGB-CT at every budget: one circuit of at most k components per budget k, all budgets as the runs of one vmapped
program (one compilation), and one ranking of every component merged from them.

    config = SearchConfig(direction="keep", scale="effect")  # λ1 0 by default: the budgets bound the sizes
    result = run_budgets(objective, config, budget_list("mib", n))
    result.circuits[k]          # [L, C] the circuit of budget k
    result.ranking              # [L, C] scores, larger first: valid at every budget

Mechanism: each run projects its gates onto {0 <= z <= 1, sum z <= k} after every Adam step
(`jaxtrace.core.search.projection_capped_simplex`), with its own k passed as data (`RunInputs.budget`), so the
budgets differ only in an array and share the program. The projection enforces the budget at every step, where a
per-run multiplier only reaches its target size on average and would need its own schedule, and unlike sampled-k
nested masks (MAttr) each budget is optimised for itself. The circuits need not be nested; the ranking orders
components by the smallest budget whose circuit holds them (then by their mean final z over the runs), so its top k
is the circuit of budget k whenever the circuits below k are nested in it.

A small budget's run can end on a circuit the relaxation did not separate from its neighbours (the projection starts
every gate at k/n): `swap_search` then moves it, by evaluated effects, to a circuit no single exchange with the
ranking's best outsiders improves (compare's `pgbct_budgets` does so up to `--swap-max` components).

The same budgets run against the behaviour (`run_budgets(..., against=True)`: the data term's sign flipped, in the
same program) find the components whose clean activations lower the effect. `signed_ranking` gives them negative
scores, placed in the |score| order where they bring the faithfulness at MIB's sizes closest to 1: MIB's CMD ranks
by |score|, and a one-signed ranking whose circuits overshoot (f > 1) cannot come back to 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.faithfulness import MIB_FRACTIONS, faithfulness, mib_sizes
from jaxtrace.engine.loop import SearchResult, run_searches
from jaxtrace.engine.objective import Objective


def parse_budgets(text: str) -> str | list[int]:
    """`--budgets`: "mib", or the sizes of "1,2,5" (integers >= 1)."""
    if text.strip() == "mib":
        return "mib"
    try:
        budgets = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--budgets takes comma-separated circuit sizes such as 1,2,5 or mib, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise ValueError(f"--budgets takes circuit sizes >= 1, got {text!r}")
    return budgets


def budget_list(budgets: str | list[int], n_components: int) -> list[int]:
    """Budgets from "1,2,13", "mib" (MIB's sizes int(p·n) of the n components, zero dropped) or a list, sorted and
    distinct, each between 1 and n."""
    parsed = parse_budgets(budgets) if isinstance(budgets, str) else list(budgets)
    if parsed == "mib":
        parsed = [k for k in mib_sizes(n_components, MIB_FRACTIONS) if k > 0]
    elif not parsed or not all(1 <= k <= n_components for k in parsed):
        raise ValueError(f"--budgets: sizes between 1 and the {n_components} components, got {budgets!r}")
    return sorted(set(parsed))


@dataclasses.dataclass(frozen=True)
class BudgetedRuns:
    """The runs of every budget: `budgets` [K], each run's result, its circuit {k: mask [L, C]} and the merged
    ranking [L, C] (larger first); `against`: the same budgets' runs against the behaviour, if they ran."""

    budgets: list[int]
    results: list[SearchResult]
    circuits: dict[int, np.ndarray]
    ranking: np.ndarray
    against: BudgetedRuns | None = None

    @classmethod
    def of(cls, budgets: list[int], results: list[SearchResult]) -> BudgetedRuns:
        """The runs of `budgets` (one result each, in order; then as many against the behaviour, if given), their
        circuits and merged rankings."""
        own, against = results[: len(budgets)], results[len(budgets):]
        masks = np.stack([r.mask for r in own])
        return cls(list(budgets), list(own), dict(zip(budgets, masks)),
                   nested_ranking(budgets, masks, np.stack([r.z for r in own])),
                   cls.of(budgets, against) if against else None)


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


def budget_configs(config: SearchConfig, budgets: list[int], against: bool = False) -> list[SearchConfig]:
    """One run of `config` per budget (refused if `config` has its own budget); with `against`, then one per budget
    against the behaviour (`SearchConfig.sense`)."""
    if config.budget is not None:
        raise ValueError(f"--budget {config.budget} and --budgets: give one of them")
    configs = [config.replace(budget=k) for k in budgets]
    return configs + [c.replace(sense="against") for c in configs] if against else configs


def run_budgets(objective: Objective, config: SearchConfig, budgets: list[int],
                searches: Callable[..., list[SearchResult]] = run_searches, against: bool = False,
                **kwargs) -> BudgetedRuns:
    """One run of `config` per budget (with `against`, also one against the behaviour), all optimised together (one
    vmapped program) by `searches` (`run_searches`, or a checkpointed one); `kwargs` as `run_searches`."""
    return BudgetedRuns.of(budgets, searches(objective, budget_configs(config, budgets, against), **kwargs))


SWAP_CANDIDATES = 8  # outsiders a round of `swap_search` tries: a round evaluates (k + 1) · 8 circuits at most
SWAP_ROUNDS = 4


def swap_search(objective: Objective, circuit: np.ndarray, ranking: np.ndarray, budget: int, direction: str,
                effect: float | None = None, candidates: int = SWAP_CANDIDATES,
                rounds: int = SWAP_ROUNDS) -> tuple[np.ndarray, float]:
    """Local search from `circuit` [L, C] (at most `budget` components, mean effect `effect` in `direction` if
    known): each round evaluates, as one batch of masks, every circuit that exchanges one member for one of the
    `candidates` best outsiders by `ranking` [L, C] or, below the budget, adds one of them, and moves to the best
    if it raises the mean effect; at most `rounds` rounds. (circuit [L, C] bool, its mean effect)."""
    shape, flat = objective.shape, np.asarray(circuit, bool).ravel()
    if effect is None:
        effect = float(objective.circuit_effects(flat.reshape(1, *shape).astype(np.float32), direction)[0])
    order = np.argsort(-np.asarray(ranking, np.float64).ravel(), kind="stable")
    for _ in range(rounds):
        pool = order[~flat[order]][:candidates]
        moves = [(None, j) for j in pool] if flat.sum() < budget else []
        moves += [(i, j) for i in np.flatnonzero(flat) for j in pool]
        if not moves:
            break
        masks = np.repeat(flat[None], len(moves), axis=0)
        for row, (out, into) in zip(masks, moves):
            row[into] = True
            if out is not None:
                row[out] = False
        effects = objective.circuit_effects(masks.reshape(-1, *shape).astype(np.float32), direction,
                                            near=flat.reshape(shape))
        best = int(np.argmax(effects))
        if not effects[best] > effect:
            break
        flat, effect = masks[best], float(effects[best])
    return flat.reshape(shape), effect


SIGN_SPLITS = 8  # at most this many + 1 splits of a block between the two orders, evaluated together


def signed_ranking(objective: Objective, ranking: np.ndarray, against: np.ndarray, sizes: list[int],
                   splits: int = SIGN_SPLITS) -> np.ndarray:
    """[L, C] signed scores from the budgeted runs' ranking [L, C] (for the behaviour) and the ranking [L, C] of
    the runs against it: an order of |score| in which, at each of the `sizes`, the components added since the
    last size are the next of `ranking` or of `against` in the proportion (of at most `splits` + 1, evaluated
    together) whose circuit's MIB faithfulness f = (m(C) − m(∅)) / (m(N) − m(∅)) is closest to 1; the components
    taken from `against` score negative. By score the order is `ranking`'s without them (CPR), by |score| it keeps
    f near 1 where `ranking` alone overshoots (CMD: MIB ranks by |score|)."""
    shape, n = objective.shape, int(np.size(ranking))
    orders = [np.argsort(-np.asarray(scores, np.float64).ravel(), kind="stable") for scores in (ranking, against)]
    taken, negative, order = np.zeros(n, bool), np.zeros(n, bool), []
    for k in sorted({k for k in sizes if 0 < k < n}):
        need, blocks = k - len(order), []  # the block since the last size
        for b in np.unique(np.linspace(0, need, min(need, splits) + 1).round().astype(int)):
            from_against = orders[1][~taken[orders[1]]][:b]
            rest = orders[0][~taken[orders[0]] & ~np.isin(orders[0], from_against)][: need - b]
            blocks.append((rest, from_against))
        patches = np.repeat(~taken[None], len(blocks) + 1, axis=0)  # each split's complement, then every component
        patches[-1] = True
        for patch, (rest, from_against) in zip(patches, blocks):
            patch[rest] = patch[from_against] = False
        effects = objective.evaluate_masks(patches.reshape(-1, *shape).astype(np.float32),  # IE(A \ C), IE(A)
                                           reference=(~taken).reshape(shape).astype(np.float32))
        f = faithfulness(effects[:-1], effects[-1])
        rest, from_against = blocks[int(np.argmin(np.abs(1.0 - f)))]  # ties: fewest from `against`
        order += [*rest, *from_against]
        taken[rest] = taken[from_against] = negative[from_against] = True
    order += list(orders[0][~taken[orders[0]]])
    scores = np.empty(n, np.float32)
    scores[order] = n - np.arange(n, dtype=np.float32)
    return np.where(negative, -scores, scores).reshape(shape)
