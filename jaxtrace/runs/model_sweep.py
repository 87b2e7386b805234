"""Model families in batch (the `sweep` command): every (model, task) pair traced into one folder, resumable, and a
cross-model report.

Layout of a sweep folder: `<model slug>/<task>/` holds one `trace` result folder per pair (`circuit.json`,
`z_map.png`, checkpoints, ...); `run.json` the sweep's identity (a rerun with other options is refused; the number
of epochs is not part of it: a rerun with more `--epochs` extends every pair to that many, as `trace --resume
--epochs` does, and one with fewer than a pair ran is refused); `sweep.json` its arguments and each pair's status
and epochs; `report.md` the report, with `effect_vs_size.png` and one
`relative_depth_<task>.png` per task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.mesh import is_writer
from jaxtrace.engine.objective import ObjectiveConfig
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.files import read_json, write_json, write_text
from jaxtrace.io.loading import MODEL_REGISTRY, load_model, resolve_model_path
from jaxtrace.io.plots import plot_effect_vs_size, plot_relative_depth
from jaxtrace.io.results import ResultFolder
from jaxtrace.runs.common import Provenance
from jaxtrace.runs.trace import trace
from jaxtrace.tasks import TaskSpec
from jaxtrace.version import __version__


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


def _checkpoint_epochs(folder: Path) -> list[int]:
    """The epoch counts of a pair's checkpoints (Orbax step folders are named by the epoch count)."""
    checkpoints = folder / "checkpoints"
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def _has_checkpoints(folder: Path) -> bool:
    """Whether an interrupted trace left a finished epoch."""
    return bool(_checkpoint_epochs(folder))


def _circuit_epochs(path: Path) -> int | None:
    """The epochs a pair's circuit.json was traced for (None without one)."""
    if not path.is_file():
        return None
    record = read_json(path, "circuit")
    epochs = record.get("search", {}).get("epochs") if isinstance(record, dict) else None
    if not isinstance(epochs, int):
        raise ValueError(f"{path} records no number of epochs (search.epochs): not a circuit of a sweep's trace; "
                         "use --overwrite or another --out")
    return epochs


def _check_epochs(out: Path, pairs: list[dict], epochs: int) -> None:
    """Refuse `--epochs` fewer than a pair has run already (a trace can be extended, not shortened)."""
    for pair in pairs:
        folder = out / pair["folder"]
        ran = pair["epochs"]
        where = folder / "circuit.json"
        if ran is None and _checkpoint_epochs(folder):
            ran, where = _checkpoint_epochs(folder)[-1], folder / "checkpoints"
        if ran is not None and ran > epochs:
            raise ValueError(f"--epochs {epochs} is fewer than the {ran} epochs {where} ran: a sweep extends its "
                             f"pairs to more epochs but cannot shorten them; give --epochs {ran} or more, "
                             "--overwrite, or another --out")


def sweep_models(models: list[str], tasks: list[TaskSpec], objective: ObjectiveConfig | str, out: str | Path,
                 config: SearchConfig = SearchConfig(), *, progress: bool = True, load: Callable = load_model,
                 mesh: Mesh | None = None,
                 overwrite: bool = False) -> dict:
    """Trace every (model, task) pair into `out/<model slug>/<task>/`, then write `out/report.md`.

    A pair with a `circuit.json` of `config.epochs` epochs is finished and skipped; one of fewer epochs is resumed
    to `config.epochs` (as `trace --resume --epochs` extends a run), as is one with checkpoints but no circuit (a
    killed run); `config.epochs` fewer than a pair ran is refused. Each model is loaded once (`load(spec) -> (model, tokenizer)`), and only if one of its pairs is
    unfinished. `tasks` are the tasks' specs (data and options); `objective` the site, metric (default: each
    task's), batch size, memory budget and attention of every pair (an `ObjectiveConfig`, or a site).
    A rerun with other models, tasks or options than the folder's sweep is refused unless `overwrite`.
    `sweep.json` (the arguments, each pair's status) is rewritten atomically as the sweep goes. Returns it.
    """
    models = list(dict.fromkeys(models))
    names = [t.task for t in tasks]
    if not models or not tasks:
        raise ValueError("a sweep needs at least one model and one task")
    if len(set(names)) != len(names):
        raise ValueError(f"each task may appear once in a sweep, got {', '.join(names)}")
    for spec in models:  # a typo fails now, not after hours of tracing the models before it
        resolve_model_path(spec)
    slugs = model_slugs(models)
    objective = ObjectiveConfig(site=objective) if isinstance(objective, str) else objective
    identity = {"kind": "sweep", "models": models, "site": objective.site, "metric": objective.metric,
                "batch_size": objective.batch_size, "attention": objective.attention,
                "search": {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"},
                "tasks": [{"task": t.task, "data": t.data, "options": t.options()} for t in tasks]}
    folder = ResultFolder(out, identity, "report.md", overwrite=overwrite)
    folder.resume = folder.holds_run()  # the sweep the folder holds, if any, continues
    with folder:
        out = folder.path
        pairs = [{"model": spec, "slug": slugs[spec], "task": task.task, "folder": f"{slugs[spec]}/{task.task}"}
                 for spec in models for task in tasks]
        for pair in pairs:
            pair["epochs"] = _circuit_epochs(out / pair["folder"] / "circuit.json")
            pair["status"] = "done" if pair["epochs"] == config.epochs else "pending"
        _check_epochs(out, pairs, config.epochs)
        manifest = {"jaxtrace_version": __version__, **identity, "search": dataclasses.asdict(config),
                    "pairs": pairs}

        def save() -> None:
            if is_writer():
                write_json(out / "sweep.json", manifest)

        save()
        specs = {task.task: task for task in tasks}
        for spec in models:
            todo = [p for p in pairs if p["model"] == spec and p["status"] != "done"]
            if not todo:
                continue
            model, tokenizer = load(spec)
            for pair in todo:
                pair_folder = out / pair["folder"]
                extend = pair["epochs"] is not None
                resume = extend or _has_checkpoints(pair_folder)
                if progress and is_writer():
                    print(f"sweep      [{pairs.index(pair) + 1}/{len(pairs)}] {spec} {pair['task']}"
                          + (f" (extending {pair['epochs']} to {config.epochs} epochs)" if extend else
                             " (resuming)" if resume else ""), flush=True)
                pair["status"] = "running"
                save()
                try:
                    task_spec = specs[pair["task"]]
                    circuit = trace(model, task_spec.build(tokenizer), objective, config, mesh=mesh,
                                    out=pair_folder, resume=resume, progress=progress,
                                    provenance=Provenance(spec, task_spec))
                    pair["status"], pair["epochs"] = "done", circuit.search["epochs"]
                except BaseException as error:
                    pair["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else f"failed: {error}"
                    raise
                finally:
                    save()
        if is_writer():
            write_report(out)
    return manifest


def find_circuits(out: str | Path) -> list[tuple[str, Circuit]]:
    """(folder relative to `out`, circuit) of every `out/<model>/<task>/circuit.json`, sorted by folder."""
    out = Path(out)
    return [(path.parent.relative_to(out).as_posix(), Circuit.read(path)) for path in sorted(out.glob("*/*/circuit.json"))]


def summary_table(circuits: list[tuple[str, Circuit]]) -> str:
    """The circuits as a Markdown table: model, task, site, layers, size, effects, seconds, status."""
    lines = ["| model | task | site | layers | selected | effect | effect all | effect none | seconds | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for _, c in circuits:
        model = str(c.model).replace("|", "\\|")
        lines.append(f"| {model} | {c.task} | {c.site} | {c.model_config['n_layers']} | "
                     f"{c.n_selected} / {c.n_components} | {c.effect:+.4f} | {c.effect_all:+.4f} | "
                     f"{c.effect_none:+.4f} | {c.seconds:.0f} | {c.status} |")
    return "\n".join(lines)


def write_report(out: str | Path) -> Path:
    """`out/report.md` from the circuits found under `out`: the table, effect against size across models, per task
    the circuits on relative depth, and per pair its selection and gate map. Returns the report's path."""
    out = Path(out)
    circuits = find_circuits(out)
    label = {folder: folder.split("/")[0] for folder, _ in circuits}  # the model slug: short, unique
    lines = ["# jaxtrace sweep", "",
             f"{len(circuits)} circuits ({len({c.model for _, c in circuits})} models, "
             f"{len({c.task for _, c in circuits})} tasks) found in this folder.", "",
             "## Effect and size", "", summary_table(circuits), ""]
    if circuits:
        plot_effect_vs_size([{"label": label[f], "task": c.task, "size": c.n_selected /
                              c.n_components, "effect": c.effect, "effect_all": c.effect_all}
                             for f, c in circuits], out / "effect_vs_size.png")
        lines += ["![effect against circuit size](effect_vs_size.png)", ""]
    lines += ["## Circuits on relative depth", "",
              "Per model, the fraction of each layer's components in the circuit and the layer's mean gate z, at "
              "relative depth (layer + 0.5) / layers, so that models of different depth compare.", ""]
    for task in sorted({c.task for _, c in circuits}):
        profiles = {label[f]: (c.mask().mean(1), np.asarray(c.z).mean(1))
                    for f, c in circuits if c.task == task}
        image = f"relative_depth_{task}.png"
        plot_relative_depth(profiles, out / image, f"{task}: circuits on relative depth")
        lines += [f"### {task}", "", f"![{task} on relative depth]({image})", ""]
    lines += ["## Circuits", ""]
    for folder, c in circuits:
        selected = ", ".join(f"{layer}.{index}" for layer, index in c.selected[:40])
        lines += [f"### {c.model}: {c.task}", "",
                  f"`{folder}/`: {c.n_selected} of {c.n_components} {c.site} components "
                  f"({c.model_config['n_layers']} layers), effect {c.effect:+.4f} "
                  f"(all {c.effect_all:+.4f}); selected: {selected or 'none'}"
                  + (" ..." if c.n_selected > 40 else ""), ""]
        if (out / folder / "z_map.png").is_file():
            lines += [f"![{folder} gate map]({folder}/z_map.png)", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
