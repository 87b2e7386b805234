"""The `baseline` and `evaluate` runs: a circuit of size k from one registered method
(`jaxtrace.engine.methods`) on exactly PGB-CT's objective, and the effect of a given selection.

The baseline searches themselves (single, topk, greedy, random, exhaustive, atp, ig) live in
`jaxtrace.engine.methods`, one module each; their algorithms are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxtrace.core.metrics import Metric
from jaxtrace.core.models import GatedLM
from jaxtrace.core.options import option
from jaxtrace.engine.faithfulness import ranking_masks
from jaxtrace.engine.methods import MethodContext, baseline_methods, method_of, run_method
from jaxtrace.engine.methods.exhaustive import count_subsets, exhaustive  # noqa: F401  (re-exported)
from jaxtrace.engine.methods.greedy import greedy, greedy_path  # noqa: F401
from jaxtrace.engine.methods.random import random_best  # noqa: F401
from jaxtrace.engine.methods.single import SINGLE_EFFECTS, single_effects, single_of  # noqa: F401
from jaxtrace.engine.methods.topk import topk  # noqa: F401
from jaxtrace.engine.objective import Objective, ObjectiveConfig, build_objective
from jaxtrace.io.circuit import Circuit
from jaxtrace.runs.common import Provenance, patch_effects, publish_circuit, result_folder, summarize
from jaxtrace.tasks import EncodedTask

METHODS = baseline_methods()  # the registered methods that give a circuit of size k (`--method`'s choices)


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
        if self.method not in baseline_methods():
            raise ValueError(f"unknown baseline {self.method!r}; known: {', '.join(baseline_methods())}")
        if self.k < 1 or self.samples < 1 or self.ig_steps < 1:
            raise ValueError(f"--k, --samples and --ig-steps must be >= 1, got {self.k}, {self.samples} and "
                             f"{self.ig_steps}")
        if self.single_max < 0:
            raise ValueError(f"--single-max must be >= 0, got {self.single_max}")


def run_baseline(objective: Objective, method: str, k: int, n_samples: int = 100, seed: int = 0, ig_steps: int = 32,
                 single_max: int = 4096) -> tuple[np.ndarray, dict]:
    """(mask [L, C] of size k, extras) for one registered method: the circuit of size k it gives, else the top k of
    its ranking. Extras: "single_effects" where the single effects were computed (`single`, `topk`); a method whose
    ranking is not the single effects (`atp`, `ig`) returns its scores ("scores") with, when there are at most
    `single_max` components, the single effects and the scores' Spearman rank correlation with them
    ("score_correlation"; None when undefined); "seconds", the wall time."""
    known = baseline_methods()
    if method not in known:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(known)}")
    if not 1 <= k <= objective.n_components:
        raise ValueError(f"--k must be between 1 and {objective.n_components}, got {k}")
    start = time.perf_counter()
    context = MethodContext(objective, (k,), n_random=n_samples, seed=seed, ig_steps=ig_steps, rankings=False,
                            measure=False)
    chosen = method_of(method)
    result = run_method(chosen, context)
    mask = result.circuits[k][0] if k in result.circuits else ranking_masks(result.scores, [k])[0] > 0
    extras: dict = {}
    if SINGLE_EFFECTS in context.memo:
        extras["single_effects"] = context.memo[SINGLE_EFFECTS]
    if result.scores is not None and chosen.ranking_of != "single":
        extras["scores"] = result.scores
        if objective.n_components <= single_max:
            single = extras["single_effects"] = single_of(context)
            correlation = rank_correlation(result.scores, single)
            extras["score_correlation"] = correlation if math.isfinite(correlation) else None
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
        effects, effect_all = patch_effects(objective, mask)
        circuit = summarize(objective, mask, mask.astype(np.float32), provenance, config.method, settings, [],
                            extras["seconds"], float(effects.mean()), effect_all)
        single, scores = extras.get("single_effects"), extras.get("scores")
        circuit = dataclasses.replace(circuit, single_effects=None if single is None else single.tolist(),
                                      scores=None if scores is None else scores.tolist(),
                                      score_correlation=extras.get("score_correlation"))
        if folder is not None:
            publish_circuit(folder, circuit, effects, objective, [], single, scores)
    return circuit


@dataclasses.dataclass(frozen=True)
class SelectionEffect:
    """The mean effect of a selection of components on an objective, with that of all and of none."""

    site: str
    metric: str
    n_selected: int
    n_components: int
    n_pairs: int
    effect: float
    effect_all: float
    effect_none: float

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (`evaluate --json`)."""
        return dataclasses.asdict(self)


def evaluate_selection(objective: Objective, selected: list[list[int]]) -> SelectionEffect:
    """Mean effect of a subset of components ([[layer, index], ...]), of all and of none, on the objective."""
    n_layers, width = objective.shape
    mask = np.zeros(objective.shape, np.float32)
    for layer, index in selected:
        if not (0 <= layer < n_layers and 0 <= index < width):
            raise ValueError(f"component {layer}.{index} is outside the {n_layers} x {width} {objective.site} grid")
        mask[layer, index] = 1.0
    effects, effect_all = patch_effects(objective, mask)  # as a circuit is scored: the same program, the same numbers
    return SelectionEffect(objective.site, objective.metric.name, int(mask.sum()), objective.n_components,
                           len(objective.task), float(effects.mean()), effect_all, 0.0)
