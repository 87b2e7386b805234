"""Effect against circuit size for PGB-CT (through a λ sweep) and the baselines, as a table and a plot; the
`compare` run writes curve.json, curve.png (after every method) and curve.md (at the end) into its folder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxtrace.core.options import option
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import resolve, run_searches
from jaxtrace.engine.mesh import is_writer
from jaxtrace.engine.objective import Objective
from jaxtrace.io import plots
from jaxtrace.io.files import write_json, write_text
from jaxtrace.runs import baselines
from jaxtrace.runs.common import Provenance, progress_bar, result_folder


def size_list(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4)."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"--sizes takes comma-separated integers such as 1,2,4,8, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """Which sizes and how much of each method's search the curve runs."""

    sizes: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), "comma-separated circuit sizes for the baselines (PGB-CT's "
                                    "own sizes are added)", parse=size_list)
    n_lambdas: int = option(6, "PGB-CT runs in the vmapped λ sweep")
    lambda_range: tuple[float, float] = option((0.1, 10.0), "smallest and largest factor applied to --lambda1 and "
                                               "--lambda2, as LOW,HIGH", parse=lambda t: tuple(map(float, t.split(","))))
    greedy_max: int | None = option(None, "largest greedy size (default: the largest size)")
    greedy_candidates: int | None = option(None, "greedy only over this many best components by single effect "
                                           "(default: all)")
    samples: int = option(100, "random subsets drawn per size")
    random_seed: int = option(0, "random subsets' seed")

    def __post_init__(self):
        if len(self.lambda_range) != 2 or not 0 < self.lambda_range[0] <= self.lambda_range[1] < float("inf"):
            raise ValueError(f"--lambda-range takes LOW,HIGH with 0 < LOW <= HIGH, got {self.lambda_range}")
        if self.n_lambdas < 1 or self.samples < 1:
            raise ValueError("--n-lambdas and --samples must be >= 1")
        if not self.sizes:
            raise ValueError("--sizes needs at least one size")
        for name in ("greedy_max", "greedy_candidates"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if any(size < 1 for size in self.sizes):
            raise ValueError(f"--sizes takes circuit sizes >= 1, got {','.join(map(str, self.sizes))}")

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
    ones = np.ones((1, *objective.shape), np.float32)
    result = {"rows": [], "seconds": seconds, "greedy_max": None, "greedy_candidates": greedy_candidates,
              "n_random": n_random, "effect_all": float(objective.mask_effects(ones).mean()),
              "n_components": objective.n_components, "site": objective.site, "pgbct_runs": []}
    all_sizes = sorted({s for s in sizes if 1 <= s <= objective.n_components})
    if not all_sizes:
        raise ValueError(f"--sizes {','.join(map(str, sizes))}: no size between 1 and the {objective.n_components} "
                         "components")

    def done(name: str, start: float) -> None:
        seconds[name] = time.perf_counter() - start
        result["rows"] = [{"size": s, **{n: curves[n].get(s) for n in METHOD_NAMES}} for s in all_sizes]
        if report is not None:
            report(result)

    start = time.perf_counter()
    configs = [config.replace(lambda1=config.lambda1 * f, lambda2=config.lambda2 * f) for f in lambda_factors]
    with progress_bar(config.epochs * len(objective.batcher.in_order), "PGB-CT sweep", progress) as on_step:
        runs = run_searches(objective, configs, on_step=on_step)
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
    plots.plot_effect_curve(result["rows"], METHOD_NAMES, result["effect_all"], path,
                            f"{result['site']}: effect against circuit size")


def compare_run(objective: Objective, search: SearchConfig, config: CurveConfig, *, memory_budget: int = 2 << 30,
                out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                provenance: Provenance = Provenance()) -> dict:
    """The curve of every method on `objective`; with `out`, curve.json and curve.png are rewritten after every method
    (a killed comparison keeps what it measured) and curve.md, the finished table, written at the end."""
    settings = {"search": {k: v for k, v in dataclasses.asdict(resolve(objective, [search])[0]).items()},
                "curve": dataclasses.asdict(config)}
    with result_folder(out, "compare", objective, provenance, settings, overwrite=overwrite,
                       finished="curve.md") as folder:
        def report(result: dict) -> None:
            if folder is None or not is_writer():
                return
            write_json(folder.path / "curve.json", {**provenance.describe(), **result})
            write_curve_plot(result, folder.path / "curve.png")

        factors = np.geomspace(*config.lambda_range, config.n_lambdas)
        result = compare(objective, search, list(config.sizes), factors, greedy_max=config.greedy_max,
                         greedy_candidates=config.greedy_candidates, n_random=config.samples, seed=config.random_seed,
                         memory_budget=memory_budget, progress=progress, report=report)
        if folder is not None and is_writer():
            write_text(folder.path / "curve.md", table_markdown(result) + "\n")
    return result
