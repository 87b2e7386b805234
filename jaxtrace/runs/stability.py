"""How stable PGB-CT's circuit is (`jaxtrace stability`): K seeds of the pairs' order × B bootstrap resamples of the
pairs, all R = K·B runs optimised together as one vmapped sweep (`run_searches(..., pairs=...)`: each run permutes
its own resample every epoch, one compiled step for all).

Run (k, b) has seed `seed + k` and trains on resample b: N pair indices drawn uniformly with replacement
(`bootstrap_resamples`); with B = 0 every run trains on all pairs once (seed stability only). Reported:
- each component's selection frequency over the R circuits ([L, C]);
- the mean pairwise Jaccard similarity |S_i ∩ S_j| / |S_i ∪ S_j| over the R(R−1)/2 pairs of circuits (two empty
  circuits count as identical, 1);
- the circuits' effects on the full task (every pair once), their mean and percentile interval (numpy's linear
  interpolation at (1 − confidence)/2 and (1 + confidence)/2), the bootstrap interval of the circuit's effect.

The result folder holds stability.json (written last) and selection_frequency.png (components selected in at least
half the runs marked), and the sweep's checkpoints, from which `--resume` continues a killed sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxtrace.core.options import option
from jaxtrace.core.search import SearchConfig
from jaxtrace.core.sites import component_labels
from jaxtrace.engine.loop import Runs, SearchResult, run_searches
from jaxtrace.engine.objective import Objective
from jaxtrace.io import plots
from jaxtrace.io.files import write_json
from jaxtrace.runs.common import Provenance, checkpointed_searches, field_defaults, progress_bar, result_folder


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """The seeds and resamples of a stability sweep."""

    seeds: int = option(3, "K seeds of the pairs' order: --seed, --seed + 1, ...")
    resamples: int = option(4, "B bootstrap resamples of the pairs, each run by every seed (0: all pairs)")
    bootstrap_seed: int = option(0, "seed of the resamples")
    confidence: float = option(0.95, "coverage of the effect's percentile interval")

    def __post_init__(self):
        if self.seeds < 1 or self.resamples < 0:
            raise ValueError(f"--seeds must be >= 1 and --resamples >= 0, got {self.seeds} and {self.resamples}")
        if self.seeds * max(self.resamples, 1) < 2:
            raise ValueError("a stability sweep needs at least 2 runs (--seeds x --resamples)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")


def bootstrap_resamples(n_pairs: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """[B, N] pair indices drawn uniformly with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n_pairs, size=(n_resamples, n_pairs))


def selection_frequency(masks) -> np.ndarray:
    """[L, C] the fraction of R circuits [R, L, C] that select each component."""
    return np.asarray(masks, bool).mean(0)


def mean_jaccard(masks) -> float:
    """The mean Jaccard similarity over every pair of R >= 2 circuits [R, L, C] (two empty ones: 1)."""
    flat = np.asarray(masks, bool).reshape(len(masks), -1)
    if len(flat) < 2:
        raise ValueError("the Jaccard similarity of circuits needs at least 2 circuits")
    inter = (flat[:, None] & flat[None]).sum(-1)
    union = (flat[:, None] | flat[None]).sum(-1)
    similarity = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    upper = np.triu_indices(len(flat), 1)
    return float(similarity[upper].mean())


def percentile_interval(values, confidence: float) -> tuple[float, float]:
    """The (1 − confidence)/2 and (1 + confidence)/2 percentiles of `values` (linear interpolation)."""
    low, high = np.percentile(np.asarray(values, np.float64), [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class StabilityRun:
    """One run (k, b) of a sweep: its seed and resample, its circuit and that circuit's effect on the full task."""

    seed: int
    resample: int | None          # index of its bootstrap resample (None: every pair once)
    size: int                     # components selected
    effect: float                 # the circuit's mean effect on every pair of the task
    selected: list[list[int]]     # [[layer, index], ...]
    selected_names: list[str]
    z: np.ndarray                 # [L, C] float32 final gates

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "resample": self.resample, "size": self.size, "effect": self.effect,
                "selected": self.selected, "selected_names": self.selected_names, "z": self.z.tolist()}

    @classmethod
    def from_dict(cls, run: dict) -> StabilityRun:
        return cls(**{**run, "z": np.asarray(run["z"], np.float32)})


@dataclasses.dataclass(frozen=True)
class StabilityResult:
    """What a stability sweep found (stability.json without its provenance: `to_dict`)."""

    site: str
    metric: str
    n_pairs: int
    n_components: int
    seeds: int
    resamples: int
    confidence: float
    seconds: float                         # wall time of the sweep's search
    runs: tuple[StabilityRun, ...]         # R = K·B, seed-major
    selection_frequency: np.ndarray        # [L, C] fraction of the runs selecting each component
    mean_jaccard: float
    effect_mean: float                     # over the runs' circuits
    effect_interval: tuple[float, float]   # percentile interval of the runs' effects at `confidence`
    size_mean: float
    resample_indices: np.ndarray           # [B, N] pair indices of each resample

    def to_dict(self) -> dict[str, Any]:
        """The stability.json record (less the provenance fields)."""
        return {"site": self.site, "metric": self.metric, "n_pairs": self.n_pairs, "n_components": self.n_components,
                "seeds": self.seeds, "resamples": self.resamples, "confidence": self.confidence,
                "seconds": self.seconds, "runs": [run.to_dict() for run in self.runs],
                "selection_frequency": self.selection_frequency.tolist(), "mean_jaccard": self.mean_jaccard,
                "effect_mean": self.effect_mean, "effect_interval": list(self.effect_interval),
                "size_mean": self.size_mean, "resample_indices": self.resample_indices.tolist()}

    @classmethod
    def from_dict(cls, record: dict) -> StabilityResult:
        """The result of a stability.json record (its provenance fields ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        return cls(**{**values, "runs": tuple(StabilityRun.from_dict(run) for run in record["runs"]),
                      "selection_frequency": np.asarray(record["selection_frequency"], np.float64),
                      "effect_interval": tuple(record["effect_interval"]),
                      "resample_indices": np.asarray(record["resample_indices"], np.int64).reshape(
                          -1, record["n_pairs"])})


def stability(objective: Objective, search: SearchConfig | Runs, config: StabilityConfig, progress: bool = True,
              searches: Callable[..., list[SearchResult]] = run_searches) -> StabilityResult:
    """The sweep's runs, selection frequency [L, C], mean Jaccard similarity, and the circuits' effects on the full
    task with their percentile interval. `search` is the runs' base config (or its resolved `Runs`), resolved
    once; `searches` runs the sweep (`run_searches`, or a checkpointed one)."""
    base = Runs.of(objective, search)
    n_pairs = len(objective.task)
    resamples = bootstrap_resamples(n_pairs, config.resamples, config.bootstrap_seed)
    grid = list(itertools.product(range(config.seeds), range(config.resamples) if config.resamples else [None]))
    runs = base.sweep([{"seed": base.config.seed + k} for k, _ in grid])
    pairs = None if not config.resamples else [resamples[b] for _, b in grid]
    with progress_bar(base.config.epochs * len(objective.batcher.in_order), "stability sweep", progress) as on_step:
        results = searches(objective, runs, on_step=on_step, pairs=pairs)
    masks = np.stack([r.mask for r in results])
    effects = objective.evaluate_masks(masks.astype(np.float32))
    labels = component_labels(objective.spec.config, objective.site)
    width = objective.shape[1]
    return StabilityResult(
        site=objective.site, metric=objective.metric.name, n_pairs=n_pairs, n_components=objective.n_components,
        seeds=config.seeds, resamples=config.resamples, confidence=config.confidence, seconds=results[0].seconds,
        runs=tuple(StabilityRun(
            seed=c.seed, resample=b, size=int(r.mask.sum()), effect=float(e),
            selected=[[int(layer), int(i)] for layer, i in zip(*np.nonzero(r.mask))],
            selected_names=[labels[int(layer) * width + int(i)] for layer, i in zip(*np.nonzero(r.mask))],
            z=np.asarray(r.z, np.float32))
            for c, (_, b), r, e in zip(runs.configs, grid, results, effects)),
        selection_frequency=selection_frequency(masks), mean_jaccard=mean_jaccard(masks),
        effect_mean=float(np.mean(effects)), effect_interval=percentile_interval(effects, config.confidence),
        size_mean=float(masks.reshape(len(masks), -1).sum(1).mean()), resample_indices=resamples)


def summary(result: StabilityResult) -> str:
    """A few lines: runs, Jaccard, effect interval, the most frequent components."""
    frequency = np.asarray(result.selection_frequency)
    order = np.argsort(-frequency, axis=None, kind="stable")[:10]
    width = frequency.shape[1]
    low, high = result.effect_interval
    return "\n".join([
        f"runs       {len(result.runs)} ({result.seeds} seeds x {result.resamples or 'no'} resamples), "
        f"mean size {result.size_mean:.1f} of {result.n_components}",
        f"jaccard    {result.mean_jaccard:.3f} (mean over pairs of circuits)",
        f"effect     {result.effect_mean:+.4f}, {100 * result.confidence:g}% interval [{low:+.4f}, {high:+.4f}]",
        "frequent   " + ", ".join(f"{i // width}.{i % width} ({frequency.flat[i]:.2f})" for i in order
                                  if frequency.flat[i] > 0),
    ])


def stability_run(objective: Objective, search: SearchConfig, config: StabilityConfig, *,
                  out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, provenance: Provenance = Provenance()) -> StabilityResult:
    """The stability sweep on `objective`; with `out`, stability.json (last) and selection_frequency.png, and a
    checkpoint of the sweep after every epoch (`checkpoints/search-<digest>/`). `resume` continues the sweep the
    folder holds (a killed one from its last epoch, or a finished one re-reported; the same run only), with the
    results of an uninterrupted sweep (wall time aside); `overwrite` replaces it."""
    base = Runs.of(objective, search)  # resolved once, for the run's identity and the sweep
    settings = {"search": dataclasses.asdict(base.config), "stability": dataclasses.asdict(config)}
    defaults = {"search": field_defaults(SearchConfig), "stability": field_defaults(StabilityConfig)}
    with result_folder(out, "stability", objective, provenance, settings, resume, overwrite,
                       finished="stability.json", defaults=defaults) as folder:
        searches = run_searches if folder is None else checkpointed_searches(folder.checkpoints)
        result = stability(objective, base, config, progress, searches)
        if folder is not None:
            frequency = result.selection_frequency
            folder.publish({
                "selection_frequency.png": lambda path: plots.plot_gate_map(
                    frequency, frequency >= 0.5, objective.site, path,
                    f"selection frequency over {len(result.runs)} runs (marked: at least half)",
                    "selection frequency"),
                "stability.json": lambda path: write_json(path, {**provenance.describe(), **result.to_dict()}),
            })
    return result
