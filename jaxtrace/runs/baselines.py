"""Baseline searches on exactly PGB-CT's objective, each built on batched mask evaluation or on the objective's
gradient (`jaxtrace.engine.attribution`), and the `baseline` and `evaluate` runs.

All look for a binary mask of large mean indirect effect over the task's pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from jax.sharding import Mesh

from jaxtrace.core.metrics import Metric
from jaxtrace.core.models import GatedLM
from jaxtrace.core.options import option
from jaxtrace.engine.attribution import ATTRIBUTIONS, attribution_scores
from jaxtrace.engine.faithfulness import ranking_masks
from jaxtrace.engine.objective import Objective, ObjectiveConfig, build_objective
from jaxtrace.io.circuit import Circuit
from jaxtrace.runs.common import Provenance, publish_circuit, result_folder, summarize
from jaxtrace.tasks import EncodedTask

METHODS = ("single", "topk", "greedy", "random", "exhaustive", *ATTRIBUTIONS)


def _one_hot(shape: tuple[int, int], flat: np.ndarray) -> np.ndarray:
    masks = np.zeros((len(flat), shape[0] * shape[1]), np.float32)
    masks[np.arange(len(flat)), flat] = 1.0
    return masks.reshape(len(flat), *shape)


def single_effects(objective: Objective) -> np.ndarray:
    """[L, C] mean effect of each component alone (every one-hot mask, batched)."""
    shape = objective.shape
    masks = _one_hot(shape, np.arange(objective.n_components))
    return objective.mask_effects(masks).mean(1).reshape(shape)


def topk(objective: Objective, k: int, single: np.ndarray | None = None) -> np.ndarray:
    """Mask [L, C] of the k components with the largest single effects (or the given scores [L, C])."""
    single = single_effects(objective) if single is None else single
    return ranking_masks(single, [k])[0] > 0


def _ranks(values: np.ndarray) -> np.ndarray:
    """[n] 0-based ranks of `values`, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two equally sized arrays (flattened; ties take average ranks): the Pearson
    correlation of their ranks; NaN when either is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"rank correlation needs two arrays of one size >= 2, got {a.size} and {b.size} values")
    ra, rb = _ranks(a) - (a.size - 1) / 2, _ranks(b) - (b.size - 1) / 2
    norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else math.nan


def greedy_path(objective: Objective, k: int,
                candidates: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """Forward selection: yields (mask [L, C], mean effect) for sizes 1..k, each adding the candidate that
    maximises the mean effect.

    Every round evaluates all remaining candidates (default: every component; or the flat indices given, e.g. the
    best by single effect, to bound the cost) as one batch of masks.
    """
    shape = objective.shape
    pool = np.zeros(objective.n_components, bool)
    pool[np.arange(objective.n_components) if candidates is None else candidates] = True
    if not 1 <= k <= pool.sum():
        raise ValueError(f"greedy size {k} needs between 1 and {int(pool.sum())} candidates")
    current = np.zeros(objective.n_components, np.float32)
    for _ in range(k):
        remaining = np.flatnonzero(pool & (current == 0))
        masks = np.repeat(current[None], len(remaining), axis=0)
        masks[np.arange(len(remaining)), remaining] = 1.0
        effects = objective.mask_effects(masks.reshape(-1, *shape)).mean(1)
        best = int(np.argmax(effects))
        current = masks[best]
        yield current.reshape(shape) > 0, float(effects[best])


def greedy(objective: Objective, k: int,
           candidates: np.ndarray | None = None) -> list[np.ndarray]:
    """Greedy masks of sizes 1..k (see `greedy_path`)."""
    return [mask for mask, _ in greedy_path(objective, k, candidates)]


def random_best(objective: Objective, k: int, n_samples: int, seed: int = 0,
                with_effect: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """The best of `n_samples` uniformly random subsets of size k (seeded), with its mean effect if asked."""
    rng = np.random.default_rng(seed)
    shape = objective.shape
    masks = np.zeros((n_samples, objective.n_components), np.float32)
    for row in masks:
        row[rng.choice(objective.n_components, size=k, replace=False)] = 1.0
    effects = objective.mask_effects(masks.reshape(-1, *shape)).mean(1)
    best = int(np.argmax(effects))
    mask = masks[best].reshape(shape) > 0
    return (mask, float(effects[best])) if with_effect else mask


def count_subsets(n: int, k: int) -> int:
    """Number of non-empty subsets of size at most k."""
    return sum(math.comb(n, size) for size in range(1, k + 1))


def exhaustive(objective: Objective, k: int, max_masks: int = 100_000) -> list[np.ndarray]:
    """The best mask of each size 1..k over all subsets; refused when there are more than `max_masks`."""
    n = objective.n_components
    total = count_subsets(n, k)
    if total > max_masks:
        raise ValueError(f"exhaustive search up to size {k} over {n} components means {total:,} masks, over the "
                         f"limit of {max_masks:,}: lower --k or use greedy")
    shape = objective.shape
    best = []
    for size in range(1, k + 1):
        subsets = np.array(list(itertools.combinations(range(n), size)))
        masks = np.zeros((len(subsets), n), np.float32)
        np.put_along_axis(masks, subsets, 1.0, axis=1)
        effects = objective.mask_effects(masks.reshape(-1, *shape)).mean(1)
        best.append(masks[int(np.argmax(effects))].reshape(shape) > 0)
    return best


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """A baseline search for a circuit of size k."""

    method: str = option("topk", "the search (atp: attribution patching, the gradient at no patch; ig: integrated "
                         "gradients from no patch to all; both select their top k scores)", choices=METHODS)
    k: int = option(8, "circuit size (single: the heat map, the top k selected)")
    samples: int = option(100, "random: subsets drawn")
    random_seed: int = option(0, "random: the subsets' seed")
    ig_steps: int = option(32, "ig: integration steps (midpoint rule)")
    single_max: int = option(4096, "atp, ig: also measure every component alone, and the scores' rank correlation "
                             "with those effects, when there are at most this many components (0: never)")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline {self.method!r}; known: {', '.join(METHODS)}")
        if self.k < 1 or self.samples < 1 or self.ig_steps < 1:
            raise ValueError(f"--k, --samples and --ig-steps must be >= 1, got {self.k}, {self.samples} and "
                             f"{self.ig_steps}")
        if self.single_max < 0:
            raise ValueError(f"--single-max must be >= 0, got {self.single_max}")


def run_baseline(objective: Objective, method: str, k: int, n_samples: int = 100, seed: int = 0, ig_steps: int = 32,
                 single_max: int = 4096) -> tuple[np.ndarray, dict]:
    """(mask [L, C] of size k, extras) for one method. `single` and `topk` select the top k single effects and
    return them ("single_effects"); `atp` and `ig` select the top k scores and return them ("scores"), with, when
    there are at most `single_max` components, the single effects and the scores' Spearman rank correlation with
    them ("score_correlation"; None when undefined)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    if not 1 <= k <= objective.n_components:
        raise ValueError(f"--k must be between 1 and {objective.n_components}, got {k}")
    start = time.perf_counter()
    extras: dict = {}
    if method in ("single", "topk"):
        single = single_effects(objective)
        extras["single_effects"] = single
        mask = topk(objective, k, single)
    elif method == "greedy":
        mask = greedy(objective, k)[-1]
    elif method == "random":
        mask = random_best(objective, k, n_samples, seed)
    elif method in ATTRIBUTIONS:
        scores = extras["scores"] = attribution_scores(objective, method, ig_steps)
        mask = topk(objective, k, scores)
        if objective.n_components <= single_max:
            single = extras["single_effects"] = single_effects(objective)
            correlation = rank_correlation(scores, single)
            extras["score_correlation"] = correlation if math.isfinite(correlation) else None
    else:
        mask = exhaustive(objective, k)[-1]
    extras["seconds"] = time.perf_counter() - start
    return mask, extras


def baseline(model: GatedLM, task: EncodedTask, objective: ObjectiveConfig | str, config: BaselineConfig, *,
             batch_size: int | None = None, metric: str | Metric | None = None, mesh: Mesh | None = None,
             attention: str | None = None, out: str | Path | None = None, overwrite: bool = False,
             provenance: Provenance = Provenance()) -> Circuit:
    """A baseline circuit of size k, scored like a PGB-CT circuit; with `out`, written like one (no checkpoints).
    `objective`, `batch_size`, `metric`, `attention` as `build_objective` (the metric defaults to the task's)."""
    objective = build_objective(model, task, objective, batch_size, metric=metric, attention=attention, mesh=mesh)
    settings = dataclasses.asdict(config)
    with result_folder(out, "baseline", objective, provenance, settings, overwrite=overwrite) as folder:
        mask, extras = run_baseline(objective, config.method, config.k, config.samples, config.random_seed,
                                    config.ig_steps, config.single_max)
        circuit, effects = summarize(objective, mask, mask.astype(np.float32), provenance, config.method, settings,
                                     [], extras["seconds"])
        single, scores = extras.get("single_effects"), extras.get("scores")
        circuit = dataclasses.replace(circuit, single_effects=None if single is None else single.tolist(),
                                      scores=None if scores is None else scores.tolist(),
                                      score_correlation=extras.get("score_correlation"))
        if folder is not None:
            publish_circuit(folder, circuit, effects, objective, [], single, scores)
    return circuit


def evaluate_selection(objective: Objective, selected: list[list[int]]) -> dict:
    """Mean effect of a subset of components ([[layer, index], ...]), of all and of none, on the objective."""
    n_layers, width = objective.shape
    mask = np.zeros(objective.shape, np.float32)
    for layer, index in selected:
        if not (0 <= layer < n_layers and 0 <= index < width):
            raise ValueError(f"component {layer}.{index} is outside the {n_layers} x {width} {objective.site} grid")
        mask[layer, index] = 1.0
    # One mask at a time, as `summarize` scores a circuit: the same program, the same numbers.
    effects = [float(objective.effects(m).mean()) for m in (mask, np.ones_like(mask), np.zeros_like(mask))]
    return {"site": objective.site, "metric": objective.metric.name, "n_selected": int(mask.sum()),
            "n_components": objective.n_components, "n_pairs": len(objective.task), "effect": effects[0],
            "effect_all": effects[1], "effect_none": effects[2]}
