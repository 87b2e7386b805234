"""The evaluation report (`compare`): every method on one objective — PGB-CT (through a λ sweep), greedy, top-k,
random, single, AtP and IG — with effect against circuit size, the effect-share and faithfulness curves of every
ranking with MIB's CPR and CMD (`jaxtrace.engine.faithfulness`), the faithfulness of every circuit, each method's
wall time, and a method's ranking and thresholded circuits in MIB's submission layout.

The run writes into its folder curve.json and curve.png after every method (a killed comparison keeps what it
measured), then curve.md (the effect table), faithfulness.png, mib/ and report.md (the report, with the plots
embedded; written last, its presence marks a finished run).

Rankings (scores [L, C], larger first) that give faithfulness curves: `single` (each component's effect alone;
`topk` selects by it, so its curve is single's), `atp`, `ig` (their scores), `greedy` (its order of addition,
then the components it did not reach by single effect) and `pgbct` (the mean of its sweep's final z: a component
kept under stronger penalties ranks higher; with one λ, that run's z). `random` has no ranking.

MIB layout (`mib/`, for the methods of `--mib`), as MIB's `run_evaluation.py` looks circuits up
(`<circuit_dir>/<method>_<ablation>_<level>/<task>_<model>/importances.json`, ablation `patching`: the
counterfactual, level `node`):

    mib/<method>_patching_node/<task>_<model>/importances.json     every node scored by the ranking, all in graph
    mib/<method>_patching_node/<task>_<model>/circuit_<p>.json     the top max(1, int(p·n)) components in graph,
                                                                  p = 0.001 ... 1 (MIB's fractions)

each an EAP-IG graph JSON (`jaxtrace.io.export.eap_graph`; traced nodes scored by the ranking). <task> is the
task's name with "_" as "-", <model> the model's folder-safe name (`model_slugs`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxtrace.core.options import option
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.attribution import attribution_scores
from jaxtrace.engine.faithfulness import (MIB_FRACTIONS, circuit_faithfulness, curve_masks, fraction_sizes,
                                          ranking_curves, ranking_masks)
from jaxtrace.engine.loop import resolve, run_searches
from jaxtrace.engine.mesh import is_writer
from jaxtrace.engine.objective import Objective
from jaxtrace.io import plots
from jaxtrace.io.export import eap_graph, write_graph
from jaxtrace.io.files import write_json, write_text
from jaxtrace.runs import baselines
from jaxtrace.runs.common import Provenance, progress_bar, result_folder
from jaxtrace.runs.model_sweep import model_slugs

METHOD_NAMES = ("pgbct", "greedy", "topk", "random", "atp", "ig")  # circuits by size: the effect table's columns
SEARCHES = ("pgbct", "greedy", "topk", "random")  # whose wall times `seconds` holds (every method's: method_seconds)
REPORT_METHODS = ("pgbct", "greedy", "topk", "random", "single", "atp", "ig")
RANKINGS = ("pgbct", "greedy", "single", "atp", "ig")  # scored rankings; topk ranks by single
RANKING_OF = {**{name: name for name in RANKINGS}, "topk": "single"}
RANKING_NOTES = {"pgbct": "mean final z of the λ sweep", "greedy": "order of addition, then single effects",
                 "topk": "single effects (= single)", "random": "none", "single": "effect alone",
                 "atp": "AtP score (gradient at no patch)", "ig": "IG score"}


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
    """Which sizes and how much of each method's search the curve runs, and what is exported."""

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
    mib: tuple[str, ...] = option(("pgbct",), "comma-separated methods whose ranking and thresholded circuits are "
                                  "written in MIB's layout under mib/ (empty: none)", parse=method_list)

    def __post_init__(self):
        if len(self.lambda_range) != 2 or not 0 < self.lambda_range[0] <= self.lambda_range[1] < float("inf"):
            raise ValueError(f"--lambda-range takes LOW,HIGH with 0 < LOW <= HIGH, got {self.lambda_range}")
        if self.n_lambdas < 1 or self.samples < 1 or self.ig_steps < 1:
            raise ValueError("--n-lambdas, --samples and --ig-steps must be >= 1")
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
        unknown = [name for name in self.mib if name not in RANKING_OF]
        if unknown:
            raise ValueError(f"--mib: {', '.join(unknown)} has no ranking; rankings: {', '.join(RANKING_OF)}")


def greedy_ranking(order: list[int], single: np.ndarray) -> np.ndarray:
    """[L, C] scores n - rank of greedy's order of addition (flat indices), then of the remaining components by
    their single effects [L, C]."""
    n, added = single.size, set(order)
    rest = [int(i) for i in np.argsort(-single, axis=None, kind="stable") if int(i) not in added]
    scores = np.empty(n, np.float32)
    scores[np.array([*order, *rest], np.int64)] = n - np.arange(n, dtype=np.float32)
    return scores.reshape(single.shape)


def compare(objective: Objective, config: SearchConfig, sizes: list[int], lambda_factors: np.ndarray,
            greedy_max: int | None = None, greedy_candidates: int | None = None, n_random: int = 100,
            seed: int = 0, progress: bool = True, ig_steps: int = 32,
            report: Callable[[dict], None] | None = None) -> dict:
    """Every method's circuits by size, its ranking's faithfulness curves, and its wall time.

    PGB-CT runs one vmapped sweep of (λ1, λ2) scaled by `lambda_factors`; its circuits land at their own sizes,
    which join `sizes` so the other methods are measured there too. The single effects are computed once, for
    single, top-k and greedy's candidates. Greedy runs up to `greedy_max` (default: the largest size), over the
    `greedy_candidates` best components by single effect (default: all), and at most to their number.
    `report(result)` is called after every method with the result so far (methods not yet run are None).
    Returns {"rows": [{size, pgbct, greedy, topk, random, atp, ig}] (mean effects), "seconds": the wall time of
    each of pgbct, greedy, topk (with the single effects) and random, "method_seconds": every method's,
    "faithfulness": {fractions, sizes, seconds, curves: {ranking: FaithfulnessCurve fields}},
    "faithfulness_rows": [{size, method: f of its circuit}], "rankings": {ranking: scores [L][C]}, ...}.
    """
    seconds, method_seconds = {}, {}
    curves = {name: {} for name in METHOD_NAMES}    # size -> mean effect of the method's circuit
    circuits = {name: {} for name in METHOD_NAMES}  # size -> its mask [L, C]
    rankings: dict[str, np.ndarray] = {}
    ones = np.ones((1, *objective.shape), np.float32)
    result = {"rows": [], "seconds": seconds, "method_seconds": method_seconds, "greedy_max": None,
              "greedy_candidates": greedy_candidates, "n_random": n_random, "ig_steps": ig_steps,
              "effect_all": float(objective.mask_effects(ones).mean()), "n_components": objective.n_components,
              "n_pairs": len(objective.task), "site": objective.site, "metric": objective.metric.name,
              "pgbct_runs": [], "faithfulness": None, "faithfulness_rows": [], "rankings": {}}
    if result["effect_all"] == 0:
        raise ValueError("the effect of all components is 0: there is no effect to compare circuits on")
    all_sizes = sorted({s for s in sizes if 1 <= s <= objective.n_components})
    if not all_sizes:
        raise ValueError(f"--sizes {','.join(map(str, sizes))}: no size between 1 and the {objective.n_components} "
                         "components")

    def done(name: str, start: float, before: float = 0.0) -> None:
        method_seconds[name] = time.perf_counter() - start + before
        if name in SEARCHES:
            seconds[name] = method_seconds[name]
        result["rows"] = [{"size": s, **{n: curves[n].get(s) for n in METHOD_NAMES}} for s in all_sizes]
        if report is not None:
            report(result)

    def top_circuits(name: str, scores: np.ndarray) -> None:
        masks = ranking_masks(scores, all_sizes)
        circuits[name] = dict(zip(all_sizes, masks > 0))
        curves[name] = dict(zip(all_sizes, map(float, objective.evaluate_masks(masks))))

    start = time.perf_counter()
    configs = [config.replace(lambda1=config.lambda1 * f, lambda2=config.lambda2 * f) for f in lambda_factors]
    with progress_bar(config.epochs * len(objective.batcher.in_order), "PGB-CT sweep", progress) as on_step:
        runs = run_searches(objective, configs, on_step=on_step)
    masks = np.stack([r.mask for r in runs]).astype(np.float32)
    for run, effect in zip(runs, objective.evaluate_masks(masks)):
        size = int(run.mask.sum())
        result["pgbct_runs"].append({"lambda1": run.config.lambda1, "lambda2": run.config.lambda2,
                                     "size": size, "effect": float(effect)})
        if size and float(effect) > curves["pgbct"].get(size, -np.inf):
            curves["pgbct"][size], circuits["pgbct"][size] = float(effect), run.mask
    rankings["pgbct"] = np.mean([r.z for r in runs], axis=0)
    all_sizes = sorted(set(all_sizes) | set(curves["pgbct"]))
    done("pgbct", start)

    start = time.perf_counter()
    single = rankings["single"] = baselines.single_effects(objective)
    done("single", start)
    start = time.perf_counter()
    top_circuits("topk", single)
    done("topk", start, method_seconds["single"])

    start = time.perf_counter()
    limit = min(greedy_max or max(all_sizes), max(all_sizes), greedy_candidates or objective.n_components)
    result["greedy_max"] = limit
    pool = None if greedy_candidates is None else np.argsort(-single, axis=None)[:greedy_candidates]
    order, previous = [], np.zeros(objective.shape, bool)
    for size, (mask, effect) in enumerate(baselines.greedy_path(objective, limit, pool), 1):
        order.append(int(np.flatnonzero(mask & ~previous)[0]))
        previous = mask
        if size in all_sizes:
            curves["greedy"][size], circuits["greedy"][size] = effect, mask
    rankings["greedy"] = greedy_ranking(order, single)
    done("greedy", start)

    start = time.perf_counter()
    for s in all_sizes:
        circuits["random"][s], curves["random"][s] = baselines.random_best(objective, s, n_random, seed,
                                                                          with_effect=True)
    done("random", start)

    for name in ("atp", "ig"):
        start = time.perf_counter()
        rankings[name] = attribution_scores(objective, name, ig_steps)
        top_circuits(name, rankings[name])
        done(name, start)

    start = time.perf_counter()  # the rankings' curves and every circuit in one evaluation
    curve_sizes = fraction_sizes(objective.n_components, MIB_FRACTIONS)
    ranked_masks = curve_masks(rankings, curve_sizes)
    listed = [(name, size, mask) for name in METHOD_NAMES for size, mask in circuits[name].items()]
    scored = circuit_faithfulness(objective, np.concatenate([ranked_masks, [mask for _, _, mask in listed]]))
    ranked = ranking_curves(list(rankings), MIB_FRACTIONS, curve_sizes, scored)
    by_circuit = {(name, size): float(f)
                  for (name, size, _), f in zip(listed, scored["faithfulness"][len(ranked_masks):])}
    result["faithfulness_rows"] = [{"size": s, **{n: by_circuit.get((n, s)) for n in METHOD_NAMES}}
                                   for s in all_sizes]
    result["faithfulness"] = {"fractions": list(MIB_FRACTIONS), "sizes": curve_sizes,
                              "seconds": time.perf_counter() - start,
                              "curves": {name: dataclasses.asdict(ranked[RANKING_OF[name]]) for name in RANKING_OF}}
    result["rankings"] = {name: np.asarray(scores, np.float32).tolist() for name, scores in rankings.items()}
    if report is not None:
        report(result)
    return result


def _cells(values, digits: int = 4) -> str:
    return " | ".join("–" if v is None else f"{v:+.{digits}f}" for v in values)


def table_markdown(result: dict) -> str:
    """The curve as a Markdown table (effects to 4 decimals, '–' where a method has no circuit of that size)."""
    lines = ["| size | " + " | ".join(METHOD_NAMES) + " |", "|---:|" + "---:|" * len(METHOD_NAMES)]
    for row in result["rows"]:
        lines.append(f"| {row['size']} | " + _cells(row[n] for n in METHOD_NAMES) + " |")
    lines.append("")
    lines.append(f"all {result['n_components']} components: {result['effect_all']:+.4f}")
    lines.append("wall time: " + ", ".join(f"{n} {s:.1f} s" for n, s in result["method_seconds"].items()))
    return "\n".join(lines)


def methods_markdown(result: dict) -> str:
    """Every method's wall time, ranking and faithfulness areas, as a Markdown table."""
    curves = (result["faithfulness"] or {}).get("curves", {})
    lines = ["| method | wall time (s) | ranking | CPR ↑ | CMD ↓ |", "|---|---:|---|---:|---:|"]
    for name in REPORT_METHODS:
        curve = curves.get(name)
        took = result["method_seconds"].get(name)
        lines.append(f"| {name} | {'–' if took is None else f'{took:.1f}'} | {RANKING_NOTES[name]} | "
                     + ("– | –" if curve is None else f"{curve['cpr']:.4f} | {curve['cmd']:.4f}") + " |")
    return "\n".join(lines)


def curves_markdown(result: dict, field: str) -> str:
    """The rankings' `field` ("faithfulness" or "share") at MIB's fractions, as a Markdown table."""
    faith = result["faithfulness"]
    names = list(RANKINGS)
    lines = ["| fraction | size | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for i, (p, size) in enumerate(zip(faith["fractions"], faith["sizes"])):
        lines.append(f"| {p:g} | {size} | " + _cells(faith["curves"][n][field][i] for n in names) + " |")
    return "\n".join(lines)


def report_markdown(result: dict, provenance: Provenance, mib: tuple[str, ...] = ()) -> str:
    """report.md: the methods, effect against size, the rankings' curves and the circuits' faithfulness."""
    described = provenance.describe()
    faith = result["faithfulness"]
    circuit_rows = ["| size | " + " | ".join(METHOD_NAMES) + " |", "|---:|" + "---:|" * len(METHOD_NAMES)]
    circuit_rows += [f"| {row['size']} | " + _cells(row[n] for n in METHOD_NAMES) + " |"
                     for row in result["faithfulness_rows"]]
    lines = [f"# jaxtrace evaluation: {described['model'] or 'model'} on {described['task'] or 'task'}", "",
             f"{result['n_pairs']} pairs, {result['n_components']} {result['site']} components, metric "
             f"{result['metric']}; IE(all) = {result['effect_all']:+.4f} (the mean effect of patching every "
             "component from the counterfactual).", "",
             "## Methods", "", methods_markdown(result), "",
             "CPR and CMD are MIB's areas under f and under |1 − f| over the fractions 0.001 … 1 of the components "
             "(trapezoids on the linear fraction axis; see `jaxtrace.engine.faithfulness`).", "",
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
             f"Curves and circuits scored in {faith['seconds']:.1f} s."]
    if mib:
        lines += ["", "## MIB submission layout", "",
                  "EAP-IG graph JSON, node level, counterfactual patching: "
                  + ", ".join(f"`mib/{name}_patching_node/`" for name in mib)
                  + " (importances.json: the ranking; circuit_<p>.json: its top max(1, int(p·n)) components)."]
    return "\n".join(lines) + "\n"


def write_mib(path: Path, objective: Objective, result: dict, methods: tuple[str, ...],
              provenance: Provenance) -> None:
    """The rankings of `methods` and their thresholded circuits in MIB's layout under `path` (module docstring)."""
    described = provenance.describe()
    model = model_slugs([provenance.model])[provenance.model] if provenance.model else "model"
    task = (described["task"] or "task").replace("_", "-")
    config = dataclasses.asdict(objective.spec.config)
    every = [[layer, index] for layer in range(objective.shape[0]) for index in range(objective.shape[1])]
    fractions, sizes = result["faithfulness"]["fractions"], result["faithfulness"]["sizes"]
    for method in methods:
        scores = np.asarray(result["rankings"][RANKING_OF[method]], np.float32)
        folder = path / f"{method}_patching_node" / f"{task}_{model}"
        folder.mkdir(parents=True)
        graph = lambda selected: eap_graph(config, objective.site, selected, scores, provenance.model,  # noqa: E731
                                           described["task"])
        write_graph(graph(every), folder / "importances.json")
        for p, mask in zip(fractions, ranking_masks(scores, sizes)):
            write_graph(graph(np.argwhere(mask > 0).tolist()), folder / f"circuit_{p:g}.json")


def write_curve_plot(result: dict, path) -> None:
    plots.plot_effect_curve(result["rows"], METHOD_NAMES, result["effect_all"], path,
                            f"{result['site']}: effect against circuit size")


def compare_run(objective: Objective, search: SearchConfig, config: CurveConfig, *,
                out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                provenance: Provenance = Provenance()) -> dict:
    """The evaluation of every method on `objective`; with `out`, curve.json and curve.png are rewritten after every
    method (a killed comparison keeps what it measured), then curve.md, faithfulness.png, mib/ and report.md (last)
    are published."""
    settings = {"search": {k: v for k, v in dataclasses.asdict(resolve(objective, [search])[0]).items()},
                "curve": dataclasses.asdict(config)}
    with result_folder(out, "compare", objective, provenance, settings, overwrite=overwrite,
                       finished="report.md") as folder:
        def report(result: dict) -> None:
            if folder is None or not is_writer():
                return
            write_json(folder.path / "curve.json", {**provenance.describe(), **result})
            write_curve_plot(result, folder.path / "curve.png")

        factors = np.geomspace(*config.lambda_range, config.n_lambdas)
        result = compare(objective, search, list(config.sizes), factors, greedy_max=config.greedy_max,
                         greedy_candidates=config.greedy_candidates, n_random=config.samples, seed=config.random_seed, progress=progress, ig_steps=config.ig_steps, report=report)
        if folder is not None:
            writers = {
                "curve.md": lambda path: write_text(path, table_markdown(result) + "\n"),
                "faithfulness.png": lambda path: plots.plot_faithfulness_curves(
                    {name: result["faithfulness"]["curves"][name] for name in RANKINGS}, path,
                    f"{result['site']}: effect share and faithfulness of each ranking"),
                "report.md": lambda path: write_text(path, report_markdown(result, provenance, config.mib)),
            }
            if config.mib:
                writers["mib"] = lambda path: write_mib(path, objective, result, config.mib, provenance)
            folder.publish(writers)
    return result
