"""Effect against circuit size for PGB-CT (through a λ sweep) and the baselines, as a table and a plot."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from jaxtrace import baselines
from jaxtrace.objective import Objective
from jaxtrace.plots import plot_effect_curve
from jaxtrace.search import SearchConfig, run_sweep

METHOD_NAMES = ("pgbct", "greedy", "topk", "random")


def compare(objective: Objective, config: SearchConfig, sizes: list[int], lambda_factors: np.ndarray,
            greedy_max: int | None = None, greedy_candidates: int | None = None, n_random: int = 100,
            seed: int = 0, memory_budget: int = 2 << 30, progress: bool = True,
            report: Callable[[dict], None] | None = None) -> dict:
    """Effects by size for every method, and each method's wall time.

    PGB-CT runs one vmapped sweep of (λ1, λ2) scaled by `lambda_factors`; its circuits land at their own sizes,
    which join `sizes` so the baselines are measured there too. Greedy runs up to `greedy_max` (default: the
    largest size), over the `greedy_candidates` best components by single effect (default: all).
    `report(result)` is called after every method with the result so far (methods not yet run are None), so a
    long comparison can be written as it goes.
    Returns {"rows": [{size, pgbct, greedy, topk, random}], "seconds": {...}, "effect_all": ...}.
    """
    seconds, curves = {}, {name: {} for name in METHOD_NAMES}
    ones = np.ones((1, objective.n_layers, objective.n_per_layer), np.float32)
    result = {"rows": [], "seconds": seconds, "greedy_max": None, "greedy_candidates": greedy_candidates,
              "n_random": n_random, "effect_all": float(objective.mask_effects(ones).mean()),
              "n_components": objective.n_components, "site": objective.site, "pgbct_runs": []}
    all_sizes = sorted({s for s in sizes if 1 <= s <= objective.n_components})

    def done(name: str, start: float) -> None:
        seconds[name] = time.perf_counter() - start
        result["rows"] = [{"size": s, **{n: curves[n].get(s) for n in METHOD_NAMES}} for s in all_sizes]
        if report is not None:
            report(result)

    start = time.perf_counter()
    configs = [config.replace(lambda1=config.lambda1 * f, lambda2=config.lambda2 * f) for f in lambda_factors]
    runs = run_sweep(objective, configs, progress=progress)
    masks = np.stack([r.mask for r in runs]).astype(np.float32)
    for run, effect in zip(runs, objective.mask_effects(masks, memory_budget).mean(1)):
        size = int(run.mask.sum())
        result["pgbct_runs"].append({"lambda1": run.config.lambda1, "lambda2": run.config.lambda2,
                                     "size": size, "effect": float(effect)})
        if size:
            curves["pgbct"][size] = max(curves["pgbct"].get(size, -np.inf), float(effect))
    all_sizes = sorted(set(all_sizes) | set(curves["pgbct"]))
    done("pgbct", start)

    start = time.perf_counter()
    single = baselines.single_effects(objective, memory_budget)
    topk_masks = np.stack([baselines.topk(objective, s, single) for s in all_sizes]).astype(np.float32)
    curves["topk"] = dict(zip(all_sizes, map(float, objective.mask_effects(topk_masks, memory_budget).mean(1))))
    done("topk", start)

    start = time.perf_counter()
    limit = result["greedy_max"] = min(greedy_max or max(all_sizes), max(all_sizes))
    pool = None if greedy_candidates is None else np.argsort(-single, axis=None)[:greedy_candidates]
    for size, (mask, effect) in enumerate(baselines.greedy_path(objective, limit, memory_budget, pool), 1):
        if size in all_sizes:
            curves["greedy"][size] = effect
    done("greedy", start)

    start = time.perf_counter()
    for s in all_sizes:
        _, curves["random"][s] = baselines.random_best(objective, s, n_random, seed, memory_budget, with_effect=True)
    done("random", start)
    return result


def table_markdown(result: dict) -> str:
    """The curve as a Markdown table (effects to 4 decimals, '–' where a method has no circuit of that size)."""
    lines = ["| size | " + " | ".join(METHOD_NAMES) + " |", "|---:|" + "---:|" * len(METHOD_NAMES)]
    for row in result["rows"]:
        cells = ["–" if row[n] is None else f"{row[n]:+.4f}" for n in METHOD_NAMES]
        lines.append(f"| {row['size']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"all {result['n_components']} components: {result['effect_all']:+.4f}")
    lines.append("wall time: " + ", ".join(f"{n} {s:.1f} s" for n, s in result["seconds"].items()))
    return "\n".join(lines)


def write_curve_plot(result: dict, path) -> None:
    plot_effect_curve(result["rows"], METHOD_NAMES, result["effect_all"], path,
                      f"{result['site']}: effect against circuit size")
