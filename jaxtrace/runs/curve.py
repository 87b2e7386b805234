"""The evaluation report (`compare`): every method on one objective — PGB-CT (through a λ sweep and through one run
per budget), greedy, top-k, random, single, AtP and IG — run and scored in one direction (`--direction`), with
effect against circuit size, the effect-share and faithfulness curves of every ranking with MIB's CPR and CMD
(`jaxtrace.engine.faithfulness`), the faithfulness of every circuit, each method's wall time, and a method's ranking
and thresholded circuits in MIB's submission layout.

Direction (`CurveConfig.direction`, recorded in curve.json, the report and the run's identity). keep (the default,
MIB's scorecard): a circuit C is kept clean and every other component patched; its effect is IE(all) − IE(all \\ C)
(f(C) · IE(all), f MIB's faithfulness) and every search looks for that (greedy adds the component whose keeping most
restores the model, PGB-CT's gates keep components clean, single and AtP score keeping one component alone). patch
(the reference's): a circuit S is patched and its effect is IE(S). Rankings' curves and circuits' faithfulness are
measured the same way in both directions (`jaxtrace.engine.faithfulness`). A curve.json without "direction" (from
an older jaxtrace) is in the patch direction.

The methods are those registered in `jaxtrace.engine.methods` with `compare` set: `compare` runs each in
registration order on one shared `MethodContext` (single effects computed once) and returns a `CompareResult`
(`to_dict()`: curve.json); the report's tables list them by `Method.report_order`. A method registered there is
compared, reported and exportable without any change here.

The run writes into its folder curve.json and curve.png after every method (a killed comparison keeps what it
measured), then curve.md (the effect table), faithfulness.png, mib/ and report.md (the report, with the plots
embedded; written last, its presence marks a finished run). Under checkpoints/ it keeps every finished method and
every PGB-CT search's epochs, from which `--resume` continues a killed comparison (`compare_run`).

Rankings (scores [L, C], larger first) that give faithfulness curves: `single` (each component's effect alone;
`topk` selects by it, so its curve is single's), `atp`, `ig` (their scores), `greedy` (its order of addition,
then the components it did not reach by single effect) and `pgbct` (the mean of its sweep's final z: a component
kept under stronger penalties ranks higher; with one λ, that run's z). `random` has no ranking.

MIB layout (`mib/`, for the methods of `--mib`), as MIB's `run_evaluation.py` looks circuits up
(`<circuit_dir>/<method>_<ablation>_<level>/<task>_<model>/`, ablation `patching`: the counterfactual, level `node`,
or `edge` for the `edges` site, whose n counts MIB's edges):
a folder holds either importances or fixed circuits, never both (`jaxtrace.io.export.write_mib_submission`):

    mib/<method>_patching_node/<task>_<model>/importances.json            every node scored by the ranking
    mib/<method>-circuits_patching_node/<task>_<model>/circuit_<p>.json   its top int(p·n) nodes, p = 0.001 ... 0.5

n counts MIB's nodes (`input`, every head, every MLP block), all scored: `input` first, the ranking's components in
its order, the untraced kind as zeros; distinct scores, so MIB's unstable sort keeps the ranking's order. MIB ranks
by the signed score by default (CPR; the leaderboard's CMD run by |score|), and its k = 0 circuit keeps `input`.
<task> and <model> are MIB's names (`ioi`; `gpt2`, `qwen2.5`, `gemma2`, `llama3`), else jaxtrace's (the task's name,
the model's folder-safe name `model_slugs`), said in one line in report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

from jaxtrace.core.options import option
from jaxtrace.core.search import DIRECTIONS, SearchConfig
from jaxtrace.engine.faithfulness import (MIB_FRACTIONS, FaithfulnessCurve, MibScore, budget_faithfulness,
                                          circuit_faithfulness, curve_masks, fraction_sizes, mib_masks,
                                          mib_multiple_circuits, mib_score_of, mib_sizes, ranking_curves)
from jaxtrace.engine.loop import resolve
from jaxtrace.engine.mesh import is_writer
from jaxtrace.engine.methods import (Method, MethodContext, MethodResult, compare_methods, rankings_of, report_order,
                                     run_method)
from jaxtrace.engine.methods.greedy import greedy_ranking  # noqa: F401  (re-exported)
from jaxtrace.engine.objective import Objective
from jaxtrace.io import plots
from jaxtrace.io.export import mib_folder, write_mib_submission
from jaxtrace.io.files import write_json, write_text
from jaxtrace.io.checkpoints import FinishedMethods
from jaxtrace.runs.common import Provenance, checkpointed_searches, field_defaults, progress_bar, result_folder
from jaxtrace.runs.model_sweep import model_slugs


def ranking_of() -> dict[str, str]:
    """{method: the method whose ranking its curves use} of the registered methods `compare` runs, in the report's
    order (those with their own scores, then those ranked as another's: topk as single)."""
    return rankings_of(report_order(compare_methods()))


def size_list(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4)."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated integers such as 1,2,4,8, got {text!r}") from None


def method_list(text: str) -> tuple[str, ...]:
    """"pgbct,atp" -> ("pgbct", "atp") (each once); "" -> ()."""
    return tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """Which direction and sizes the curve runs, how much of each method's search, and what is exported."""

    direction: str = option("keep", "keep: every method keeps its circuit clean and patches the rest (MIB's "
                            "faithfulness, the scorecard's); patch: every method patches its circuit (the "
                            "reference's). Methods search, and circuits are scored, in this direction",
                            choices=DIRECTIONS)
    sizes: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), "comma-separated circuit sizes for the baselines (PGB-CT's "
                                    "own sizes are added)", parse=size_list)
    n_lambdas: int = option(6, "PGB-CT runs in the vmapped λ sweep")
    lambda_range: tuple[float, float] = option((0.1, 10.0), "smallest and largest factor applied to --lambda1 and "
                                               "--lambda2, as LOW,HIGH", parse=lambda t: tuple(map(float, t.split(","))))
    greedy_max: int | None = option(None, "largest greedy size (default: the largest size)")
    greedy_candidates: int | None = option(None, "greedy only over this many best components by single effect, "
                                           "so up to that size (default: all)")
    samples: int = option(100, "random subsets drawn per size")
    random_seed: int = option(0, "random subsets' seed")
    ig_steps: int = option(32, "ig: integration steps (midpoint rule)")
    swap_max: int = option(8, "pgbct_budgets: move the circuits of budgets up to this size by swap search (each "
                           "round (k + 1) · 8 circuits evaluated, at most 4 rounds; 0: none)")
    signed: bool = option(True, "pgbct_budgets: also run every budget against the behaviour (the data term's sign "
                          "flipped, in the same program) and score those components negative where, by |score|, they "
                          "bring f at MIB's sizes closest to 1 (MIB's CMD ranks by |score|; --no-signed: one-signed)")
    mib: tuple[str, ...] = option(("pgbct",), "comma-separated methods whose ranking and thresholded circuits are "
                                  "written in MIB's layout under mib/ (empty: none; the default when pgbct is not "
                                  "run)", parse=method_list)
    methods: tuple[str, ...] = option((), "comma-separated methods to run (default: every method of the report); "
                                      "e.g. atp,ig,random on edges, where single effects cost one mask an edge",
                                      parse=method_list)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if len(self.lambda_range) != 2 or not 0 < self.lambda_range[0] <= self.lambda_range[1] < float("inf"):
            raise ValueError(f"--lambda-range takes LOW,HIGH with 0 < LOW <= HIGH, got {self.lambda_range}")
        if self.n_lambdas < 1 or self.samples < 1 or self.ig_steps < 1:
            raise ValueError("--n-lambdas, --samples and --ig-steps must be >= 1")
        if self.swap_max < 0:
            raise ValueError(f"--swap-max must be >= 0 (0: no swap search), got {self.swap_max}")
        if not self.sizes:
            raise ValueError("--sizes needs at least one size")
        for name in ("greedy_max", "greedy_candidates"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        greedy_to = self.greedy_max or max(self.sizes)
        if self.greedy_candidates is not None and self.greedy_candidates < greedy_to:
            raise ValueError(f"--greedy-candidates {self.greedy_candidates} cannot reach greedy size {greedy_to} "
                             "(--greedy-max, else the largest of --sizes): give at least that many")
        if any(size < 1 for size in self.sizes):
            raise ValueError(f"--sizes takes circuit sizes >= 1, got {','.join(map(str, self.sizes))}")
        rankings = ranking_of()
        unknown = [name for name in self.mib if name not in rankings]
        if unknown:
            raise ValueError(f"--mib: {', '.join(unknown)} has no ranking; rankings: {', '.join(rankings)}")
        if self.methods and self.mib == ("pgbct",) and "pgbct" not in self.methods:
            object.__setattr__(self, "mib", ())  # the default export is PGB-CT's when it runs
        known = {method.name: method for method in compare_methods()}
        unknown = [name for name in self.methods if name not in known]
        if unknown:
            raise ValueError(f"--methods: no method {', '.join(unknown)}; methods: {', '.join(known)}")
        for name in self.methods:
            if known[name].ranked_as not in (None, *self.methods):
                raise ValueError(f"--methods: {name} is ranked by {known[name].ranked_as}'s scores: add it")
        if self.methods and not set(self.mib) <= set(self.methods):
            raise ValueError(f"--mib {','.join(self.mib)}: not all of them in --methods {','.join(self.methods)}")

    def running(self) -> tuple[Method, ...]:
        """The methods this comparison runs, in run order (`--methods`, default all of `compare_methods`)."""
        return tuple(method for method in compare_methods() if not self.methods or method.name in self.methods)


# CurveConfig settings whose default does more than a comparison saved before the setting existed: the value that
# does what it did, so that resuming such a run with the default is refused, naming the setting.
BEFORE_SETTING = {"swap_max": 0, "signed": False}


@dataclasses.dataclass(frozen=True)
class MibCircuits:
    """A budgeted method's circuits as MIB's multiple-circuits submission: their faithfulness at MIB's sizes up to
    50 % (`budget_faithfulness`) and MIB's areas with the full model appended at f = 1."""

    faithfulness: list[float]
    cpr: float
    cmd: float


@dataclasses.dataclass(frozen=True, eq=False)
class RankingFaithfulness:
    """The faithfulness curves of every ranking at MIB's fractions, jaxtrace's variant (`curves`: at least one
    component per size) and MIB's exact scoring (`mib`: sizes int(p·n), CPR signed, CMD absolute), by method (topk's
    being single's); the budgeted methods' circuits as MIB's multiple-circuits submission (`mib_circuits`); and
    the time it took to score them with every circuit."""

    fractions: list[float]
    sizes: list[int]
    seconds: float
    curves: Mapping[str, FaithfulnessCurve]
    mib: Mapping[str, MibScore]
    mib_circuits: Mapping[str, MibCircuits]

    def to_dict(self) -> dict:
        return {"fractions": list(self.fractions), "sizes": list(self.sizes), "seconds": self.seconds,
                "curves": {name: dataclasses.asdict(curve) for name, curve in self.curves.items()},
                "mib": {name: dataclasses.asdict(score) for name, score in self.mib.items()},
                "mib_circuits": {name: dataclasses.asdict(score) for name, score in self.mib_circuits.items()}}


@dataclasses.dataclass(frozen=True, eq=False)
class CompareResult:
    """The evaluation so far: every method's result (in the order they ran), the sizes, and once every method has
    run, the rankings' faithfulness curves and each circuit's faithfulness. `to_dict()` is curve.json's content."""

    methods: tuple[Method, ...]              # the methods compared, in the report's order
    sizes: tuple[int, ...]                   # the circuit sizes (PGB-CT's own included once it has run)
    results: Mapping[str, MethodResult]      # method -> its result, in the order they ran
    effect_all: float
    n_components: int
    n_pairs: int
    site: str
    metric: str
    direction: str = "patch"                 # what the circuits' effects are (`Objective.circuit_effects`)
    greedy_candidates: int | None = None
    n_random: int = 100
    ig_steps: int = 32
    faithfulness: RankingFaithfulness | None = None
    circuit_faithfulness: Mapping[tuple[str, int], float] | None = None  # (method, size) -> f of its circuit

    @property
    def columns(self) -> tuple[str, ...]:
        """The methods that give circuits by size (the effect table's columns)."""
        return tuple(method.name for method in self.methods if method.circuits)

    @property
    def ranking_names(self) -> tuple[str, ...]:
        """The methods with their own ranking scores, in the report's order."""
        return tuple(method.name for method in self.methods if method.scores)

    @property
    def ranking_of(self) -> dict[str, str]:
        """{method: the method whose ranking its curves use}."""
        return rankings_of(self.methods)

    def effect(self, name: str, size: int) -> float | None:
        """The mean effect of a method's circuit of `size` (None: none, or not run yet)."""
        circuit = self.results[name].circuits.get(size) if name in self.results else None
        return None if circuit is None else circuit[1]

    @property
    def rows(self) -> list[dict]:
        """[{size, method: mean effect of its circuit of that size}] (the effect table)."""
        return [{"size": s, **{n: self.effect(n, s) for n in self.columns}} for s in self.sizes]

    @property
    def faithfulness_rows(self) -> list[dict]:
        """[{size, method: f of its circuit of that size}] ([] until the circuits are scored)."""
        if self.circuit_faithfulness is None:
            return []
        return [{"size": s, **{n: self.circuit_faithfulness.get((n, s)) for n in self.columns}} for s in self.sizes]

    @property
    def method_seconds(self) -> dict[str, float]:
        """Every method's wall time, in the order they ran."""
        return {name: result.seconds for name, result in self.results.items()}

    @property
    def seconds(self) -> dict[str, float]:
        """The searches' wall times (`Method.search`)."""
        search = {method.name for method in self.methods if method.search}
        return {name: result.seconds for name, result in self.results.items() if name in search}

    @property
    def extras(self) -> dict[str, Any]:
        """The methods' extras under their keys (`Method.extras`: their values until the method has run)."""
        extras = {key: value for method in self.methods for key, value in method.extras.items()}
        for result in self.results.values():
            extras.update(result.extras)
        return extras

    @property
    def rankings(self) -> dict[str, np.ndarray]:
        """{method: its ranking scores [L, C]} of the methods with their own, in the order they ran."""
        own = {method.name for method in self.methods if method.scores}
        return {name: result.scores for name, result in self.results.items()
                if name in own and result.scores is not None}

    def to_dict(self) -> dict:
        """curve.json's content: the direction, rows, seconds, method_seconds, the methods' extras (pgbct_runs,
        greedy_max), the options, IE(all) and the objective's sizes, faithfulness, faithfulness_rows and rankings
        (the last three once every method has run)."""
        done = self.faithfulness is not None
        return {"direction": self.direction, "rows": self.rows, "seconds": self.seconds,
                "method_seconds": self.method_seconds, **self.extras,
                "greedy_candidates": self.greedy_candidates, "n_random": self.n_random, "ig_steps": self.ig_steps,
                "effect_all": self.effect_all, "n_components": self.n_components, "n_pairs": self.n_pairs,
                "site": self.site, "metric": self.metric,
                "faithfulness": self.faithfulness.to_dict() if done else None,
                "faithfulness_rows": self.faithfulness_rows,
                "rankings": {name: np.asarray(scores, np.float32).tolist() for name, scores in self.rankings.items()}
                if done else {}}


def compare(context: MethodContext, report: Callable[[CompareResult], None] | None = None,
            finished: Mapping[str, MethodResult] = MappingProxyType({}),
            running: tuple[Method, ...] | None = None) -> CompareResult:
    """Every method of `running` (default: every registered method of the report, `compare_methods`, in
    registration order) on the context's objective, in the context's direction: its circuits by size, its
    ranking's faithfulness curves, and its wall time.

    A method with `own_sizes` (PGB-CT: one vmapped sweep of (λ1, λ2) scaled by the context's `lambda_factors`) puts
    its circuits at their own sizes, which join the context's sizes so the methods after it are measured there too.
    The single effects are computed once (the context's memo), for single, top-k and greedy's candidates and ranking.
    `report(result)` is called after every method with the result so far, and once more at the end with the
    rankings' curves and every circuit's faithfulness (the rankings' top-k circuits and every method's circuits
    scored in one evaluation). `finished`: the results of methods that an earlier run of this comparison finished,
    kept as they are (a resumed comparison, `compare_run`).
    """
    objective = context.objective
    ones = np.ones((1, *objective.shape), np.float32)
    effect_all = float(objective.mask_effects(ones).mean())
    if effect_all == 0:
        raise ValueError("the effect of all components is 0: there is no effect to compare circuits on")
    sizes = tuple(sorted({s for s in context.sizes if 1 <= s <= objective.n_components}))
    if not sizes:
        raise ValueError(f"--sizes {','.join(map(str, context.sizes))}: no size between 1 and the "
                         f"{objective.n_components} components")
    context = context.replace(sizes=sizes)
    running = compare_methods() if running is None else running
    results: dict[str, MethodResult] = {}
    result = CompareResult(report_order(running), sizes, results, effect_all, objective.n_components,
                           len(objective.task), objective.site, objective.metric.name, context.direction,
                           context.greedy_candidates, context.n_random, context.ig_steps)
    for method in running:
        if method.name in finished:
            results[method.name] = finished[method.name]
            context.seconds[method.name] = finished[method.name].seconds
        else:
            results[method.name] = run_method(method, context)
        if method.own_sizes:
            context = context.replace(sizes=tuple(sorted(set(context.sizes) | set(results[method.name].circuits))))
        result = dataclasses.replace(result, sizes=context.sizes, results=dict(results))
        if report is not None:
            report(result)

    start = time.perf_counter()  # the rankings' curves (both scorings) and every circuit in one evaluation
    curve_sizes = fraction_sizes(objective.n_components, MIB_FRACTIONS)
    exact_sizes = mib_sizes(objective.n_components, MIB_FRACTIONS)
    rankings = result.rankings
    empty = np.zeros((0, *objective.shape), np.float32)
    ranked_masks = curve_masks(rankings, curve_sizes) if rankings else empty
    exact_masks = (np.concatenate([mib_masks(scores, exact_sizes) for scores in rankings.values()]) if rankings
                   else empty)
    listed = [(name, size, mask) for name in result.columns for size, (mask, _) in results[name].circuits.items()]
    circuits = np.asarray([mask for _, _, mask in listed], np.float32).reshape(-1, *objective.shape)
    scored = circuit_faithfulness(objective, np.concatenate([ranked_masks, exact_masks, circuits]))
    ranked = ranking_curves(list(rankings), MIB_FRACTIONS, curve_sizes, scored)
    exact_f = scored.faithfulness[len(ranked_masks): len(ranked_masks) + len(exact_masks)]
    exact = {name: mib_score_of(MIB_FRACTIONS, exact_sizes, f)
             for name, f in zip(rankings, np.split(exact_f, max(len(rankings), 1)))}
    by_circuit = {(name, size): float(f) for (name, size, _), f in
                  zip(listed, scored.faithfulness[len(ranked_masks) + len(exact_masks):])}
    budgeted = {}
    for method in result.methods:
        if method.budgeted and method.name in results:
            f = budget_faithfulness({size: by_circuit[(method.name, size)] for size in results[method.name].circuits},
                                    objective.n_components)
            budgeted[method.name] = MibCircuits(f, *mib_multiple_circuits(f))
    faithfulness = RankingFaithfulness(list(MIB_FRACTIONS), curve_sizes, time.perf_counter() - start,
                                       {name: ranked[of] for name, of in result.ranking_of.items()},
                                       {name: exact[of] for name, of in result.ranking_of.items()}, budgeted)
    result = dataclasses.replace(result, faithfulness=faithfulness, circuit_faithfulness=by_circuit)
    if report is not None:
        report(result)
    return result


EFFECT_OF = {"patch": "IE(S), the mean effect of patching the circuit S",
             "keep": "IE(all) − IE(all \\ C), what keeping the circuit C clean while every other component is "
                     "patched takes back of patching them all (f(C) · IE(all))"}  # a circuit's effect by direction


def _cells(values, digits: int = 4) -> str:
    return " | ".join("–" if v is None else f"{v:+.{digits}f}" for v in values)


def _table(columns, rows) -> list[str]:
    return ["| size | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns),
            *(f"| {row['size']} | " + _cells(row[n] for n in columns) + " |" for row in rows)]


def table_markdown(result: CompareResult) -> str:
    """The curve as a Markdown table (effects to 4 decimals, '–' where a method has no circuit of that size)."""
    lines = _table(result.columns, result.rows)
    lines.append("")
    lines.append(f"all {result.n_components} components: {result.effect_all:+.4f}")
    lines.append(f"direction {result.direction}: a circuit's effect is {EFFECT_OF[result.direction]}")
    lines.append("wall time: " + ", ".join(f"{n} {s:.1f} s" for n, s in result.method_seconds.items()))
    return "\n".join(lines)


def methods_markdown(result: CompareResult) -> str:
    """Every method's wall time, ranking and faithfulness areas (MIB's exact scoring and jaxtrace's variant), and the
    budgeted methods' circuits as MIB's multiple-circuits submission, as Markdown."""
    faith = result.faithfulness
    curves, exact = (faith.curves, faith.mib) if faith is not None else ({}, {})
    seconds = result.method_seconds
    lines = ["| method | wall time (s) | ranking | CPR ↑ (MIB) | CMD ↓ (MIB) | CPR, ≥ 1 per size "
             "| CMD, ≥ 1 per size |", "|---|---:|---|---:|---:|---:|---:|"]
    for method in result.methods:
        curve, score, took = curves.get(method.name), exact.get(method.name), seconds.get(method.name)
        lines.append(f"| {method.name} | {'–' if took is None else f'{took:.1f}'} | {method.ranking} | "
                     + ("– | –" if score is None else f"{score.cpr:.4f} | {score.cmd:.4f}") + " | "
                     + ("– | –" if curve is None else f"{curve.cpr:.4f} | {curve.cmd:.4f}") + " |")
    for name, circuits in (faith.mib_circuits.items() if faith is not None else ()):
        lines += ["", f"{name}'s circuits as MIB's multiple-circuits submission (one per budget, at most int(p·n) "
                  f"components at p = 0.001 … 0.5, the full model at 1): CPR {circuits.cpr:.4f}, CMD "
                  f"{circuits.cmd:.4f}; f = " + ", ".join(f"{f:+.3f}" for f in circuits.faithfulness) + "."]
    return "\n".join(lines)


def curves_markdown(result: CompareResult, field: str) -> str:
    """The rankings' `field` ("faithfulness" or "share") at MIB's fractions, as a Markdown table."""
    faith = result.faithfulness
    names = list(result.ranking_names)
    lines = ["| fraction | size | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for i, (p, size) in enumerate(zip(faith.fractions, faith.sizes)):
        lines.append(f"| {p:g} | {size} | " + _cells(getattr(faith.curves[n], field)[i] for n in names) + " |")
    return "\n".join(lines)


def report_markdown(result: CompareResult, provenance: Provenance, mib: tuple[str, ...] = ()) -> str:
    """report.md: the methods, effect against size, the rankings' curves and the circuits' faithfulness."""
    described = provenance.describe()
    circuit_rows = _table(result.columns, result.faithfulness_rows)
    lines = [f"# jaxtrace evaluation: {described['model'] or 'model'} on {described['task'] or 'task'}", "",
             f"{result.n_pairs} pairs, {result.n_components} {result.site} components, metric "
             f"{result.metric}; IE(all) = {result.effect_all:+.4f} (the mean effect of patching every "
             "component from the counterfactual).", "",
             f"Direction: {result.direction}. Every method searched for, and is scored by, "
             + ("circuits kept clean with every other component patched (MIB's)" if result.direction == "keep"
                else "circuits patched from the counterfactual (the reference's)")
             + f"; a circuit's effect is {EFFECT_OF[result.direction]}.", "",
             "## Methods", "", methods_markdown(result), "",
             "CPR and CMD are MIB's areas under f and under |1 − f| over the fractions 0.001 … 1 of the components "
             "(trapezoids on the linear fraction axis; see `jaxtrace.engine.faithfulness`). MIB's columns score as "
             "its `evaluate_area_under_curve` does: the top int(p·n) components (an empty circuit scores f = 0), CPR "
             "by the signed ranking, CMD by |score|. The '≥ 1 per size' columns are jaxtrace's variant: at least one "
             "component at every fraction, both areas by the signed ranking (the curves below).", "",
             "## Effect against circuit size", "", table_markdown(result), "",
             "![effect against circuit size](curve.png)", "",
             "## Faithfulness of the rankings", "",
             "At each fraction p the circuit S is the top max(1, int(p·n)) of the method's ranking. Effect share "
             "IE(S) / IE(all): the effect of patching S alone. Faithfulness f = 1 − IE(all \\ S) / IE(all): MIB's "
             "(m(S) − m(∅)) / (m(all) − m(∅)), S kept clean while every other component is patched.", "",
             "![effect share and faithfulness](faithfulness.png)", "",
             "### Faithfulness f", "", curves_markdown(result, "faithfulness"), "",
             "### Effect share", "", curves_markdown(result, "share"), "",
             "## Faithfulness of the circuits", "",
             "f of each method's circuit of each size (PGB-CT's: its sweep's best circuit of that size).", "",
             *circuit_rows, "",
             f"Curves and circuits scored in {result.faithfulness.seconds:.1f} s."]
    if mib:
        folder, notes = mib_submission_folder(provenance)
        level, items = ("edge", "edges") if result.site == "edges" else ("node", "nodes")
        lines += ["", "## MIB submission layout", "",
                  f"EAP-IG graph JSON, {level} level, counterfactual patching: "
                  + ", ".join(f"`mib/{name}_patching_{level}/{folder}/importances.json`" for name in mib)
                  + f" (the ranking, every {level} scored: MIB's top-n at every fraction) and "
                  + ", ".join(f"`mib/{name}-circuits_patching_{level}/{folder}/`" for name in mib)
                  + f" (circuit_<p>.json: its top int(p·n) {items} at p ≤ 0.5, MIB's fixed circuits).",
                  *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write_mib(path: Path, objective: Objective, result: CompareResult, methods: tuple[str, ...],
              provenance: Provenance) -> None:
    """The rankings of `methods` as MIB's files under `path` (module docstring)."""
    folder, _ = mib_submission_folder(provenance)
    config = dataclasses.asdict(objective.spec.config)
    about = {"model": provenance.model, "task": provenance.describe()["task"]}
    for method in methods:
        scores = np.asarray(result.rankings[result.ranking_of[method]], np.float64)
        write_mib_submission(path, method, folder, config, objective.site, scores, MIB_FRACTIONS,
                             {**about, "method": method})


def mib_submission_folder(provenance: Provenance) -> tuple[str, list[str]]:
    """`<task>_<model>` with MIB's names, and a line for each name MIB lacks (`jaxtrace.io.export.mib_folder`)."""
    slug = model_slugs([provenance.model])[provenance.model] if provenance.model else "model"
    return mib_folder(provenance.describe()["task"], provenance.model, slug)


def write_curve_plot(result: CompareResult, path) -> None:
    plots.plot_effect_curve(result.rows, result.columns, result.effect_all, path,
                            f"{result.site}: effect against circuit size")


def curve_context(objective: Objective, search: SearchConfig, config: CurveConfig,
                  progress: bool = True) -> MethodContext:
    """The methods' context of a comparison: `config`'s direction (the search's too), sizes and options, PGB-CT's λ
    factors spaced geometrically over `lambda_range`, and a progress bar when `progress`."""
    if search.sense != "for":
        raise ValueError("compare scores circuits for the behaviour: a search against it (sense "
                         f"{search.sense!r}) is pgbct_budgets' --signed, not a comparison")
    return MethodContext(objective, tuple(config.sizes), direction=config.direction,
                         search=search.replace(direction=config.direction),
                         lambda_factors=np.geomspace(*config.lambda_range, config.n_lambdas),
                         greedy_max=config.greedy_max, greedy_candidates=config.greedy_candidates,
                         n_random=config.samples, seed=config.random_seed, ig_steps=config.ig_steps,
                         swap_max=config.swap_max, signed=config.signed,
                         progress=functools.partial(progress_bar, enabled=progress))


def compare_run(objective: Objective, search: SearchConfig, config: CurveConfig, *,
                out: str | Path | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
                provenance: Provenance = Provenance()) -> CompareResult:
    """The evaluation of every method on `objective` in `config.direction` (which the search's direction follows);
    with `out`, curve.json and curve.png are rewritten after every method (a killed comparison keeps what it
    measured), then curve.md, faithfulness.png, mib/ and report.md (last) are published.

    With `out`, every finished method is saved (`checkpoints/methods/`, `FinishedMethods`) and every PGB-CT search
    checkpointed after each epoch (`checkpoints/search-<digest>/`, `checkpointed_searches`). `resume` continues the
    comparison the folder holds (a killed one, or a finished one re-reported; the same run only): its finished
    methods are kept, a killed search continues from its last epoch, and the results are an uninterrupted run's
    (wall times aside). `overwrite` replaces it."""
    search = search.replace(direction=config.direction)
    settings = {"search": {k: v for k, v in dataclasses.asdict(resolve(objective, [search])[0]).items()},
                "curve": dataclasses.asdict(config)}
    defaults = {"search": field_defaults(SearchConfig), "curve": {**field_defaults(CurveConfig), **BEFORE_SETTING}}
    with result_folder(out, "compare", objective, provenance, settings, resume, overwrite,
                       finished="report.md", defaults=defaults) as folder:
        context = curve_context(objective, search, config, progress)
        finished: dict[str, MethodResult] = {}
        if folder is not None:  # what the folder holds of this run: nothing unless it is resumed
            store = FinishedMethods(folder.checkpoints / "methods")
            finished, memo = store.load()
            context.memo.update(memo)
            context = context.replace(searches=checkpointed_searches(folder.checkpoints))
        saved = set(finished)

        def report(result: CompareResult) -> None:
            if folder is None or not is_writer():
                return
            for name in result.results.keys() - saved:
                store.save(name, result.results[name], context.memo)
                saved.add(name)
            write_json(folder.path / "curve.json", {**provenance.describe(), **result.to_dict()})
            write_curve_plot(result, folder.path / "curve.png")

        result = compare(context, report=report, finished=finished, running=config.running())
        if folder is not None:
            writers = {
                "curve.md": lambda path: write_text(path, table_markdown(result) + "\n"),
                "faithfulness.png": lambda path: plots.plot_faithfulness_curves(
                    {name: dataclasses.asdict(result.faithfulness.curves[name]) for name in result.ranking_names},
                    path, f"{result.site}: effect share and faithfulness of each ranking"),
                "report.md": lambda path: write_text(path, report_markdown(result, provenance, config.mib)),
            }
            if config.mib:
                writers["mib"] = lambda path: write_mib(path, objective, result, config.mib, provenance)
            folder.publish(writers)
    return result
