"""End to end: a model, a task and a site in; a circuit with its effect, plots and checkpoints out."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

import jaxtrace
from jaxtrace.checkpoint import EpochCheckpoints, save_tree
from jaxtrace.metrics import Metric
from jaxtrace.models import GatedLM
from jaxtrace.models.sites import component_names
from jaxtrace.objective import Objective
from jaxtrace.parallel import is_writer
from jaxtrace.baselines import run_baseline
from jaxtrace.plots import plot_effect_history, plot_gate_map, plot_single_effects
from jaxtrace.search import SearchConfig, find_target_size, run_search
from jaxtrace.tasks import EncodedTask, encode_pairs, load_pairs


TASK_CORRUPTION = {"counterfact": "noise"}  # every other task has a counterfactual prompt


def build_task(task: str, data: str | Path, tokenizer, positions: str = "prompt", noise_positions: str = "prompt",
               noise_std: float | None = None, noise_scale: float = 3.0, noise_seed: int = 0,
               **options) -> EncodedTask:
    """Load a task's prompt pairs from `data` (loader `options`, e.g. split="test") and tokenise them."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass one (CLI: --tokenizer FOLDER)")
    return encode_pairs(load_pairs(task, data, **options), tokenizer, positions,
                        TASK_CORRUPTION.get(task, "prompt"), noise_positions, noise_std, noise_scale, noise_seed)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename); only process 0 writes."""
    if not is_writer():
        return
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def circuit_status(n_selected: int, n_components: int, method: str = "pgbct") -> str:
    advice = method == "pgbct"
    if n_selected == 0:
        return "empty: no component was selected" + ("; lower --lambda1/--lambda2 (or use --penalty mean)" * advice)
    if n_selected == n_components:
        return "full: every component was selected" + ("; raise --lambda1" * advice)
    return "ok"


def components(mask: np.ndarray) -> list[list[int]]:
    """[[layer, index], ...] of a binary mask [L, N]."""
    return [[int(layer), int(index)] for layer, index in zip(*np.nonzero(mask))]


def trace(model: GatedLM, task: EncodedTask, site: str, config: SearchConfig = SearchConfig(),
          out: str | Path | None = None, resume: bool = False, progress: bool = True,
          metadata: dict | None = None, target_size: int | None = None,
          metric: str | Metric = "probability_ratio", mesh: Mesh | None = None) -> dict:
    """Run PGB-CT and return the circuit dict; with `out`, checkpoint every epoch and write the results there.

    With `target_size`, λ is searched by vmapped sweeps (`find_target_size`; not checkpointed) and the run whose
    circuit size is closest is kept. `metadata` (model name, task options, ...) is stored in `circuit.json`.
    On a `mesh` (`jaxtrace.parallel`) every process runs this call; checkpoints are written collectively and the
    result files by process 0.
    """
    objective = Objective(model, task, site, config.batch_size, metric=metric, mesh=mesh)
    if target_size is not None:
        return _trace_target_size(objective, config, target_size, out, progress, metadata or {})
    checkpoints = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints = EpochCheckpoints(out / "checkpoints")
        if checkpoints.steps() and not resume:
            raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, "
                                  "or choose another --out")
    try:
        result = run_search(objective, config, checkpoints, resume=resume, progress=progress)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    settings = {**dataclasses.asdict(config), "lr": config.learning_rate(objective.site)}
    circuit, effects = summarize(objective, result.mask, result.z, metadata or {}, "pgbct", settings,
                                 result.history, result.seconds)
    if out is not None:
        write_results(out, circuit, effects, objective, result.steps)
    return circuit


def summarize(objective: Objective, mask: np.ndarray, z: np.ndarray, metadata: dict, method: str,
              settings: dict, history: list[dict], seconds: float) -> tuple[dict, np.ndarray]:
    """(circuit dict, per-pair effects [N] of the selected mask)."""
    # One mask at a time: the program the per-epoch evaluation already compiled, and no gates give exactly 0.
    effects = [objective.effects(m.astype(np.float32)) for m in (mask, np.ones_like(mask), np.zeros_like(mask))]
    names = component_names(objective.model.config, objective.site)
    circuit = {
        "jaxtrace_version": jaxtrace.__version__,
        **metadata,
        "model_config": dataclasses.asdict(objective.model.config),
        "site": objective.site,
        "method": method,
        "metric": objective.metric.name,
        "search": settings,
        "n_pairs": len(objective.task),
        "skipped": [list(s) for s in objective.task.skipped],
        "selected": components(mask),
        "selected_names": [names[layer * mask.shape[1] + index] for layer, index in components(mask)],
        "n_selected": int(mask.sum()),
        "n_components": objective.n_components,
        "effect": float(effects[0].mean()),
        "effect_all": float(effects[1].mean()),
        "effect_none": float(effects[2].mean()),
        "status": circuit_status(int(mask.sum()), objective.n_components, method),
        "seconds": seconds,
        "history": history,
        "z": np.asarray(z).tolist(),
    }
    return circuit, effects[0]


def write_results(out: Path, circuit: dict, effects: np.ndarray, objective: Objective, steps: list[dict]) -> None:
    """circuit.json, examples.csv, log.csv (searches), the final z (Orbax) and the plots (files: process 0 only)."""
    out.mkdir(parents=True, exist_ok=True)
    z = np.asarray(circuit["z"], np.float32)
    save_tree(out / "z", {"z": z})  # collective
    if not is_writer():
        return
    write_json(out / "circuit.json", circuit)
    _write_csv(out / "examples.csv", [
        {"label": p.label, "base": p.base, "counterfactual": p.counterfactual, "effect": float(e)}
        for p, e in zip(objective.task.pairs, effects)])
    mask = np.zeros(z.shape, bool)
    for layer, index in circuit["selected"]:
        mask[layer, index] = True
    title = (f"{circuit.get('model', '')} {circuit.get('task', '')}: "
             f"{circuit['n_selected']} of {circuit['n_components']}")
    plot_gate_map(z, mask, objective.site, out / "z_map.png", title)
    if steps:
        _write_csv(out / "log.csv", steps)
        plot_effect_history(circuit["history"], circuit["effect_all"], out / "effect_per_epoch.png")


def _trace_target_size(objective: Objective, config: SearchConfig, target: int, out, progress: bool,
                       metadata: dict) -> dict:
    start = time.perf_counter()
    best, runs = find_target_size(objective, config, target, progress=progress)
    settings = {**dataclasses.asdict(best.config), "lr": best.config.learning_rate(objective.site),
                "target_size": target,
                "sweep": [{"lambda1": r.config.lambda1, "lambda2": r.config.lambda2, "size": int(r.mask.sum())}
                          for r in runs]}
    circuit, effects = summarize(objective, best.mask, best.z, metadata, "pgbct", settings, best.history,
                                 time.perf_counter() - start)
    if out is not None:
        write_results(Path(out), circuit, effects, objective, best.steps)
    return circuit


def baseline(model: GatedLM, task: EncodedTask, site: str, method: str, k: int, n_samples: int = 100,
             seed: int = 0, batch_size: int = 32, memory_budget: int = 2 << 30, out: str | Path | None = None,
             metadata: dict | None = None, metric: str | Metric = "probability_ratio",
             mesh: Mesh | None = None) -> dict:
    """A baseline circuit of size k (see `jaxtrace.baselines`), scored and written like a PGB-CT circuit."""
    objective = Objective(model, task, site, batch_size, metric=metric, mesh=mesh)
    mask, extras = run_baseline(objective, method, k, n_samples, seed, memory_budget)
    settings = {"k": k, "n_samples": n_samples, "seed": seed, "batch_size": batch_size}
    circuit, effects = summarize(objective, mask, mask.astype(np.float32), metadata or {}, method, settings, [],
                                 extras["seconds"])
    if "single_effects" in extras:
        circuit["single_effects"] = extras["single_effects"].tolist()
    if out is not None:
        out = Path(out)
        write_results(out, circuit, effects, objective, [])
        if "single_effects" in extras and is_writer():
            plot_single_effects(extras["single_effects"], site, out / "single_effects.png")
    return circuit


def evaluate_selection(model: GatedLM, task: EncodedTask, site: str, selected: list[list[int]],
                       batch_size: int = 32, metric: str | Metric = "probability_ratio",
                       mesh: Mesh | None = None) -> dict:
    """Mean effect of a subset of components (and of all and of none) on the task's objective."""
    objective = Objective(model, task, site, batch_size, metric=metric, mesh=mesh)
    mask = np.zeros((objective.n_layers, objective.n_per_layer), np.float32)
    for layer, index in selected:
        if not (0 <= layer < objective.n_layers and 0 <= index < objective.n_per_layer):
            raise ValueError(f"component {layer}.{index} is outside the {objective.n_layers} x "
                             f"{objective.n_per_layer} {site} grid")
        mask[layer, index] = 1.0
    return {"site": site, "metric": objective.metric.name, "n_selected": int(mask.sum()),
            "n_components": objective.n_components,
            "n_pairs": len(task), "effect": float(objective.effects(mask).mean()),
            "effect_all": float(objective.effects(np.ones_like(mask)).mean()),
            "effect_none": float(objective.effects(np.zeros_like(mask)).mean())}
