"""The method registry: every way of finding circuits on PGB-CT's objective (PGB-CT itself and the baselines), what
it gives and how the evaluation report shows it, in one place.

A method is a `Method` made by `register`: its name, `run(objective, context) -> MethodResult`, what its ranking is
(the report's text) and flags saying what it gives. The built-in methods register themselves in
`jaxtrace.engine.methods`, one module each; `compare` (`jaxtrace.runs.curve`) runs every method with `compare` set,
in registration order, and `baseline` (`jaxtrace.runs.baselines`) offers every method with `baseline` set.

Methods compute; they never write files. What they share comes in a `MethodContext` (the objective, the sizes, the
options, a progress bar and a memo of intermediate results such as the single effects, computed once for single,
top-k and greedy); what each gives back is a `MethodResult` (circuits by size, ranking scores, wall time, extras).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ContextManager

import numpy as np

from jaxtrace.core.search import DIRECTIONS, SearchConfig
from jaxtrace.engine.faithfulness import ranking_masks
from jaxtrace.engine.loop import SearchResult, run_searches
from jaxtrace.engine.objective import Objective

OnStep = Callable[[int, dict], None]
Progress = Callable[[int, str], ContextManager[OnStep | None]]  # (steps, description) -> a bar's on_step, or None


def no_progress(total: int, desc: str) -> ContextManager[None]:
    """No progress bar (`MethodContext.progress`'s default)."""
    return contextlib.nullcontext(None)


@dataclasses.dataclass(frozen=True, eq=False)
class MethodContext:
    """What the methods of one evaluation share: the objective, the circuit sizes wanted, the options, a progress bar
    and a memo of intermediate results (`cached`), with every method's wall time so far (`seconds`).

    `direction`: the direction every method searches and scores its circuits in (`Objective.circuit_effects`):
    patch (IE(S) of patching S) or keep (IE(A) − IE(A \\ C), C kept clean and the rest patched: MIB's). A
    method's circuits are the sets it selects (kept, in the keep direction) and their effects are in that direction.
    `rankings`: whether a method should also give its ranking when that costs extra (greedy's needs the single
    effects; `baseline` does not ask). `measure`: whether circuits' mean effects are measured where that costs an
    extra evaluation (`baseline` scores its one circuit afterwards); a circuit not measured has effect None.
    `searches(objective, configs, **kwargs)`: what runs the methods' PGB-CT searches, as `run_searches` does (it,
    or compare's checkpointed one, which continues a killed search from its last epoch).
    """

    objective: Objective
    sizes: tuple[int, ...]                        # circuit sizes wanted, increasing
    direction: str = "patch"                      # patch or keep: what every method's circuits are searched for
    search: SearchConfig | None = None            # pgbct: the search (run in `direction`), its λ scaled by each of
                                                  # `lambda_factors`
    lambda_factors: Sequence[float] = (1.0,)
    greedy_max: int | None = None                 # greedy: largest size (default: the largest of `sizes`)
    greedy_candidates: int | None = None          # greedy: only over this many best single components (default: all)
    n_random: int = 100                           # random: subsets drawn per size
    seed: int = 0                                 # random: their seed
    ig_steps: int = 32                            # ig: integration steps
    swap_max: int = 0                             # pgbct_budgets: swap search on budgets up to this size (0: none)
    signed: bool = False                          # pgbct_budgets: also run against the behaviour, scored negative
    progress: Progress = no_progress
    searches: Callable[..., list[SearchResult]] = run_searches
    rankings: bool = True
    measure: bool = True
    memo: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # method -> its wall time (`run_method`)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")

    def replace(self, **changes) -> MethodContext:
        """A copy with `changes`, sharing the memo and the wall times."""
        return dataclasses.replace(self, **changes)

    def effects(self, masks) -> np.ndarray:
        """[M] mean effects of circuits [M, L, C] in the context's direction (`Objective.circuit_effects`)."""
        return self.objective.circuit_effects(masks, self.direction)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The memo's `key`, computed by `compute()` the first time it is asked for."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


Circuits = Mapping[int, tuple[np.ndarray, float | None]]  # size -> (mask [L, C] bool, mean effect or None)


@dataclasses.dataclass(frozen=True, eq=False)
class MethodResult:
    """What a method gives: its circuits by size (size -> (mask [L, C], mean effect)), its ranking scores [L, C]
    (larger first) or None, its wall time (set by `run_method`) and extras (reported by `compare` under their keys,
    which the method declares in `Method.extras`)."""

    circuits: Circuits = dataclasses.field(default_factory=dict)
    scores: np.ndarray | None = None
    seconds: float = 0.0
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method.

    name: its name (a key of the report's tables and of curve.json; `baseline --method`).
    run: `run(objective, context) -> MethodResult`.
    ranking: what its ranking is, in words (the report's methods table; "none" if it has none).
    scores: it gives its own ranking scores (its faithfulness curves, `rankings`, `--mib`).
    ranked_as: another method whose ranking stands for its own (topk: "single").
    circuits: it gives circuits by size (a column of the effect table and of the circuits' faithfulness).
    search: its wall time counts among the searches (`seconds` of curve.json).
    compare: `compare` runs it. baseline: `baseline --method` offers it (its circuit of size k: the one it gives,
      else the top k of its ranking).
    own_sizes: its circuits land at their own sizes, which join the sizes of the methods after it (pgbct).
    budgeted: it gives one circuit per budget at MIB's sizes, each of at most its budget (pgbct_budgets): compare
      also scores them as MIB's multiple-circuits submission.
    includes: methods whose wall time counts in its own (topk: single, whose effects it selects by).
    extras: the keys its extras add to compare's report, with their values until it has run.
    report_order: its place in the report's tables (smaller first; ties in registration order).
    """

    name: str
    run: Callable[[Objective, MethodContext], MethodResult]
    ranking: str = "none"
    scores: bool = False
    ranked_as: str | None = None
    circuits: bool = True
    search: bool = False
    compare: bool = True
    baseline: bool = True
    own_sizes: bool = False
    budgeted: bool = False
    includes: tuple[str, ...] = ()
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    report_order: float = math.inf

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a method name is letters, digits, '_' and '-', got {self.name!r}")
        if not callable(self.run):
            raise TypeError(f"method {self.name!r}: run must be callable")
        if self.scores and self.ranked_as is not None:
            raise ValueError(f"method {self.name!r} gives its own scores: it cannot be ranked as {self.ranked_as!r}")
        if self.baseline and not (self.circuits or self.scores):
            raise ValueError(f"method {self.name!r} gives neither circuits nor scores: it cannot be a baseline")

    @property
    def ranking_of(self) -> str | None:
        """The method whose ranking scores its faithfulness curves use: its own name, `ranked_as`, or None."""
        return self.name if self.scores else self.ranked_as


_METHODS: dict[str, Method] = {}
METHODS: typing.Mapping[str, Method] = MappingProxyType(_METHODS)  # name -> Method, in registration (= run) order


def register(method: Method) -> Method:
    """Add a method (refused if its name is taken, or it is ranked as or includes a method not registered)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    missing = [name for name in (method.ranked_as, *method.includes) if name is not None and name not in _METHODS]
    if missing:
        raise ValueError(f"method {method.name!r} refers to {', '.join(missing)}, not registered before it")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove a method and return it (refused while another method refers to it)."""
    method = method_of(name)
    users = [other.name for other in _METHODS.values() if name in (other.ranked_as, *other.includes)]
    if users:
        raise ValueError(f"method {name!r} is used by {', '.join(users)}")
    del _METHODS[name]
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """`register(method)` for the block, then `unregister` it."""
    register(method)
    try:
        yield method
    finally:
        unregister(method.name)


def method_of(name: str) -> Method:
    """The registered method called `name`."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def compare_methods() -> tuple[Method, ...]:
    """The methods `compare` runs, in the order it runs them (registration order)."""
    return tuple(method for method in _METHODS.values() if method.compare)


def baseline_methods() -> tuple[str, ...]:
    """The names `baseline --method` offers, in registration order."""
    return tuple(name for name, method in _METHODS.items() if method.baseline)


def report_order(methods: Sequence[Method]) -> tuple[Method, ...]:
    """`methods` in the report's order (`Method.report_order`, ties kept in their given order)."""
    return tuple(sorted(methods, key=lambda method: method.report_order))


def rankings_of(methods: Sequence[Method]) -> dict[str, str]:
    """{method: the method whose ranking its curves use}: the methods with their own scores, then those ranked as
    another's, each in the given order."""
    own = {method.name: method.name for method in methods if method.scores}
    return {**own, **{method.name: method.ranked_as for method in methods if method.ranked_as is not None}}


def run_method(method: Method, context: MethodContext) -> MethodResult:
    """`method.run` on the context's objective, timed: its wall time, plus that of the methods it `includes`, is
    the result's `seconds` and is recorded in `context.seconds`."""
    start = time.perf_counter()
    result = method.run(context.objective, context)
    seconds = time.perf_counter() - start + sum(context.seconds.get(name, 0.0) for name in method.includes)
    context.seconds[method.name] = seconds
    return dataclasses.replace(result, seconds=seconds)


def top_circuits(context: MethodContext, scores: np.ndarray) -> dict[int, tuple[np.ndarray, float | None]]:
    """{size: (mask, mean effect)}: the top `size` components of a ranking (scores [L, C], larger first, ties by
    flat index) at each of the context's sizes, their effects in its direction measured in one evaluation (None
    unless `measure`)."""
    masks = ranking_masks(scores, context.sizes)
    effects = (map(float, context.effects(masks)) if context.measure
               else [None] * len(context.sizes))
    return {size: (mask > 0, effect) for size, mask, effect in zip(context.sizes, masks, effects)}
