"""Model families in batch: every (model, task) pair traced into one folder, resumable, and a cross-model report.

Layout of a sweep folder: `<model slug>/<task>/` holds one `trace` result folder per pair (`circuit.json`,
`z_map.png`, checkpoints, ...); `sweep.json` the sweep's arguments and each pair's status; `report.md` the report,
with `effect_vs_size.png` and one `relative_depth_<task>.png` per task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from jax.sharding import Mesh

import jaxtrace
from jaxtrace import tracing
from jaxtrace.loading import MODEL_REGISTRY, resolve_model_path
from jaxtrace.parallel import is_writer
from jaxtrace.plots import plot_effect_vs_size, plot_relative_depth
from jaxtrace.search import SearchConfig
from jaxtrace.tasks import TASK_LOADERS


def model_slugs(models: list[str]) -> dict[str, str]:
    """A safe folder name per model spec: the registered name, or the folder/file name ([A-Za-z0-9._-] only); names
    that would collide get a hash of the spec appended."""
    def name(spec: str) -> str:
        base = spec if spec in MODEL_REGISTRY else Path(spec).expanduser().resolve().name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-") or "model"

    names = {spec: name(spec) for spec in models}
    counts = Counter(names.values())
    return {spec: n if counts[n] == 1 else f"{n}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
            for spec, n in names.items()}


def _has_checkpoints(folder: Path) -> bool:
    """Whether an interrupted trace left a finished epoch (Orbax step folders are named by the epoch count)."""
    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def run_family_sweep(models: list[str], tasks: list[str], site: str, out: str | Path, data: str | Path | None,
                     config: SearchConfig = SearchConfig(), task_options: dict[str, dict] | None = None,
                     metric: str = "probability_ratio", progress: bool = True,
                     load: Callable = jaxtrace.load_model, mesh: Mesh | None = None) -> dict:
    """Trace every (model, task) pair into `out/<model slug>/<task>/`, then write `out/report.md`.

    A pair with a `circuit.json` is finished and skipped; one with checkpoints but no circuit (a killed run) is
    resumed. Each model is loaded once (`load(spec) -> (model, tokenizer)`), and only if one of its pairs is
    unfinished. `task_options[task]` goes to `tracing.build_task` (loader options, `positions`, noise settings);
    `metric` names the effect (see `jaxtrace.metrics`); `mesh` spreads every trace over devices (`jaxtrace.parallel`).
    `sweep.json` (the arguments, each pair's status) is rewritten atomically as the sweep goes.
    Returns that manifest.
    """
    models, tasks, task_options = list(dict.fromkeys(models)), list(dict.fromkeys(tasks)), task_options or {}
    if not models or not tasks:
        raise ValueError("a sweep needs at least one model and one task")
    unknown = [t for t in tasks if t not in TASK_LOADERS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(TASK_LOADERS)}")
    for spec in models:  # a typo fails now, not after hours of tracing the models before it
        resolve_model_path(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slugs = model_slugs(models)
    pairs = [{"model": spec, "slug": slugs[spec], "task": task, "folder": f"{slugs[spec]}/{task}"}
             for spec in models for task in tasks]
    for pair in pairs:
        pair["status"] = "done" if (out / pair["folder"] / "circuit.json").is_file() else "pending"
    manifest = {"jaxtrace_version": jaxtrace.__version__, "models": models, "tasks": tasks, "site": site,
                "data": None if data is None else str(data), "search": dataclasses.asdict(config), "metric": metric,
                "task_options": task_options, "pairs": pairs}
    tracing.write_json(out / "sweep.json", manifest)
    for spec in models:
        todo = [p for p in pairs if p["model"] == spec and p["status"] != "done"]
        if not todo:
            continue
        model, tokenizer = load(spec)
        for pair in todo:
            folder = out / pair["folder"]
            resume = _has_checkpoints(folder)
            if progress:
                print(f"sweep      [{pairs.index(pair) + 1}/{len(pairs)}] {spec} {pair['task']}"
                      + (" (resuming)" if resume else ""), flush=True)
            options = task_options.get(pair["task"], {})
            pair["status"] = "running"
            tracing.write_json(out / "sweep.json", manifest)
            try:
                task = tracing.build_task(pair["task"], data, tokenizer, **options)
                tracing.trace(model, task, site, config, out=folder, resume=resume, progress=progress,
                              metadata={"model": spec, "task": pair["task"], "task_options": options,
                                        "data": manifest["data"]}, metric=metric, mesh=mesh)
                pair["status"] = "done"
            except BaseException as error:
                pair["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else f"failed: {error}"
                raise
            finally:
                tracing.write_json(out / "sweep.json", manifest)
    if is_writer():
        write_report(out)
    return manifest


def find_circuits(out: str | Path) -> list[tuple[str, dict]]:
    """(folder relative to `out`, circuit dict) of every `out/<model>/<task>/circuit.json`, sorted by folder."""
    out = Path(out)
    return [(path.parent.relative_to(out).as_posix(), json.loads(path.read_text()))
            for path in sorted(out.glob("*/*/circuit.json"))]


def _mask(circuit: dict) -> np.ndarray:
    mask = np.zeros(np.shape(circuit["z"]), bool)
    for layer, index in circuit["selected"]:
        mask[layer, index] = True
    return mask


def summary_table(circuits: list[tuple[str, dict]]) -> str:
    """The circuits as a Markdown table: model, task, site, layers, size, effects, seconds, status."""
    lines = ["| model | task | site | layers | selected | effect | effect all | effect none | seconds | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for _, c in circuits:
        model = str(c["model"]).replace("|", "\\|")
        lines.append(f"| {model} | {c['task']} | {c['site']} | {c['model_config']['n_layers']} | "
                     f"{c['n_selected']} / {c['n_components']} | {c['effect']:+.4f} | {c['effect_all']:+.4f} | "
                     f"{c['effect_none']:+.4f} | {c['seconds']:.0f} | {c['status']} |")
    return "\n".join(lines)


def write_report(out: str | Path) -> Path:
    """`out/report.md` from the circuits found under `out`: the table, effect against size across models, per task
    the circuits on relative depth, and per pair its selection and gate map. Returns the report's path."""
    out = Path(out)
    circuits = find_circuits(out)
    label = {folder: folder.split("/")[0] for folder, _ in circuits}  # the model slug: short, unique
    lines = ["# jaxtrace sweep", "",
             f"{len(circuits)} circuits ({len({c['model'] for _, c in circuits})} models, "
             f"{len({c['task'] for _, c in circuits})} tasks) found in this folder.", "",
             "## Effect and size", "", summary_table(circuits), ""]
    if circuits:
        plot_effect_vs_size([{"label": label[f], "task": c["task"], "size": c["n_selected"] /
                              c["n_components"], "effect": c["effect"], "effect_all": c["effect_all"]}
                             for f, c in circuits], out / "effect_vs_size.png")
        lines += ["![effect against circuit size](effect_vs_size.png)", ""]
    lines += ["## Circuits on relative depth", "",
              "Per model, the fraction of each layer's components in the circuit and the layer's mean gate z, at "
              "relative depth (layer + 0.5) / layers, so that models of different depth compare.", ""]
    for task in sorted({c["task"] for _, c in circuits}):
        profiles = {label[f]: (_mask(c).mean(1), np.asarray(c["z"]).mean(1))
                    for f, c in circuits if c["task"] == task}
        image = f"relative_depth_{task}.png"
        plot_relative_depth(profiles, out / image, f"{task}: circuits on relative depth")
        lines += [f"### {task}", "", f"![{task} on relative depth]({image})", ""]
    lines += ["## Circuits", ""]
    for folder, c in circuits:
        selected = ", ".join(f"{layer}.{index}" for layer, index in c["selected"][:40])
        lines += [f"### {c['model']}: {c['task']}", "",
                  f"`{folder}/`: {c['n_selected']} of {c['n_components']} {c['site']} components "
                  f"({c['model_config']['n_layers']} layers), effect {c['effect']:+.4f} "
                  f"(all {c['effect_all']:+.4f}); selected: {selected or 'none'}"
                  + (" ..." if c["n_selected"] > 40 else ""), ""]
        if (out / folder / "z_map.png").is_file():
            lines += [f"![{folder} gate map]({folder}/z_map.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
