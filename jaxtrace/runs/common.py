"""What every run shares: where its model and task came from, its identity, the circuit it reports and the files
it writes (through `jaxtrace.io.results.ResultFolder`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxtrace.core.search import StepStats
from jaxtrace.core.sites import component_labels
from jaxtrace.engine.loop import EpochRow, Runs, SearchResult, StepRow, initial_state, run_searches
from jaxtrace.engine.mesh import is_writer
from jaxtrace.engine.objective import Objective
from jaxtrace.io import plots
from jaxtrace.io.checkpoints import EpochCheckpoints, save_tree
from jaxtrace.io.circuit import Circuit
from jaxtrace.io.files import write_csv
from jaxtrace.io.loading import weights_digest
from jaxtrace.io.results import ResultFolder
from jaxtrace.tasks import TaskSpec, task_digest


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a run's model and task came from, as the user named them: the model (a name, folder or file) and the
    task's spec. Either may be None for objects built in Python; the weights are then identified by their values."""

    model: str | None = None
    task: TaskSpec | None = None

    def describe(self) -> dict:
        """The circuit.json fields "model", "task", "data", "task_options"."""
        task = self.task
        return {"model": self.model, "task": None if task is None else task.task,
                "data": None if task is None else task.data, "task_options": {} if task is None else task.options()}


def params_digest(params) -> str:
    """SHA-256 of a model's parameter values (for models that do not come from a file)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def identity(kind: str, objective: Objective, provenance: Provenance, settings: dict) -> dict:
    """What makes two runs the same run: the kind of run, the model's config and weights, the task's data (as
    tokenised) and options, the objective and the method's settings. Names and paths are not part of it (a moved
    file is the same data); the mesh is not (results do not depend on it)."""
    weights = (weights_digest(provenance.model) if provenance.model is not None
               else params_digest(objective.params))
    return {"kind": kind,
            "model": {"config": dataclasses.asdict(objective.spec.config), "weights": weights},
            "task": {"pairs": task_digest(objective.task),
                     "options": None if provenance.task is None else provenance.task.options()},
            "objective": {"site": objective.site, "metric": objective.metric.name,
                          "batch_size": objective.batcher.batch_size, "attention": objective.spec.attention},
            "settings": settings}


def circuit_status(n_selected: int, n_components: int, method: str = "pgbct") -> str:
    advice = method == "pgbct"
    if n_selected == 0:
        return "empty: no component was selected" + ("; lower --lambda1/--lambda2 (or use --penalty mean)" * advice)
    if n_selected == n_components:
        return "full: every component was selected" + ("; raise --lambda1" * advice)
    return "ok"


def summarize(objective: Objective, mask: np.ndarray, z: np.ndarray, provenance: Provenance, method: str,
              settings: dict, history: list[EpochRow], seconds: float, effect: float, effect_all: float) -> Circuit:
    """The circuit of a binary mask [L, C] found from soft gates z, with its measured effect IE(mask) and IE(all)
    (`patch_effects`); `history`: the search's epochs (circuit.json's "history" rows), none for a baseline. No gate
    open is the clean run: IE(∅) is 0 exactly (tests/test_pgbct.py), not measured."""
    config = objective.spec.config
    labels = component_labels(config, objective.site)
    selected = [[int(layer), int(index)] for layer, index in zip(*np.nonzero(mask))]
    circuit = Circuit(
        site=objective.site, method=method, metric=objective.metric.name, model_config=dataclasses.asdict(config),
        selected=selected, z=np.asarray(z, np.float32).tolist(), effect=float(effect),
        effect_all=float(effect_all), effect_none=0.0, n_pairs=len(objective.task),
        seconds=seconds, status=circuit_status(len(selected), objective.n_components, method),
        batch_size=objective.batcher.batch_size, search=settings, history=[row.to_dict() for row in history],
        skipped=[list(s) for s in objective.task.skipped], dropped=[list(d) for d in objective.task.dropped],
        selected_names=[labels[layer * mask.shape[1] + index] for layer, index in selected],
        **provenance.describe())
    return circuit


def patch_effects(objective: Objective, mask: np.ndarray, effects: np.ndarray | None = None,
                  effect_all: float | None = None) -> tuple[np.ndarray, float]:
    """([N] per-pair effects of patching a mask [L, C], IE(all)): `effects` and `effect_all` where a search measured
    them, the rest measured here, one mask at a time (the program a search's per-epoch evaluation compiled, so
    `evaluate` gives a circuit's numbers)."""
    if effects is None:
        effects = objective.effects(np.asarray(mask, np.float32))
    if effect_all is None:
        effect_all = float(objective.effects(np.ones(np.shape(mask), np.float32)).mean())
    return effects, effect_all


def publish_circuit(folder: ResultFolder, circuit: Circuit, effects: np.ndarray, objective: Objective,
                    steps: list[StepRow], single_effects: np.ndarray | None = None,
                    scores: np.ndarray | None = None) -> None:
    """circuit.json (last), examples.csv, log.csv (searches: one row per step of `steps`) the final z (Orbax,
    `z/`) and the plots (with the single effects and attribution scores [L, C] when given)."""
    z = np.asarray(circuit.z, np.float32)
    writers = {
        "examples.csv": lambda path: write_csv(path, [
            {"label": p.label, "base": p.base, "counterfactual": p.counterfactual, "effect": float(e)}
            for p, e in zip(objective.task.pairs, effects)]),
        "z_map.png": lambda path: plots.plot_gate_map(
            z, circuit.mask(), objective.site, path,
            f"{circuit.model or ''} {circuit.task or ''}: {circuit.n_selected} of {circuit.n_components}"),
        "circuit.json": circuit.write,
    }
    if steps:
        writers["log.csv"] = lambda path: write_csv(path, [row.to_dict(run=False) for row in steps])
        writers["effect_per_epoch.png"] = lambda path: plots.plot_effect_history(circuit.history, circuit.effect_all,
                                                                                 path)
    if single_effects is not None:
        writers["single_effects.png"] = lambda path: plots.plot_single_effects(single_effects, objective.site, path)
    if scores is not None:
        writers["scores.png"] = lambda path: plots.plot_single_effects(
            scores, objective.site, path, f"{circuit.method} attribution scores", "score (effect gradient)")
    folder.publish(writers, collective={"z": lambda path: save_tree(path, {"z": z})})


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator:
    """`on_step(epoch, stats)` for `jaxtrace.engine.loop`, moving a progress bar (process 0 only)."""
    bar = tqdm(total=total, disable=not (enabled and is_writer()), desc=desc, unit="step")

    def on_step(epoch: int, stats: StepStats) -> None:
        bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(stats.loss):.4f}", selected=int(np.mean(stats.selected)))

    try:
        yield on_step
    finally:
        bar.close()


SKIPPED = "skipped.csv"


def skipped_rows(task) -> list[dict]:
    """What a task left out, as `skipped.csv` rows (file, lines, reason): the data lines its loader dropped, then
    the pairs that cannot be aligned (no file or lines: the reason names the pair)."""
    rows = []
    for where, reason in task.dropped:
        file, _, lines = where.rpartition(":")
        rows.append({"file": file or where, "lines": lines if file else "", "reason": reason})
    rows += [{"file": "", "lines": "", "reason": f"pair {label}: {reason}"} for label, reason in task.skipped]
    return rows


RESUMABLE = ("trace", "compare", "stability")  # the kinds of run that --resume continues


def field_defaults(config_class) -> dict:
    """{field: default} of a config dataclass's fields that have one."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config_class)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def result_folder(out: str | Path | None, kind: str, objective: Objective, provenance: Provenance, settings: dict,
                  resume: bool = False, overwrite: bool = False, finished: str = "circuit.json",
                  defaults: dict | None = None):
    """The locked result folder of a run (a null context without `out`); the kinds of `RESUMABLE` resume, also a
    run saved before a setting existed where the setting is at its default (`defaults`, nested like `settings`, e.g.
    `field_defaults(SearchConfig)`). Its results include `skipped.csv`, the list of what the task left out, when it
    left out anything."""
    if out is None:
        return contextlib.nullcontext(None)
    folder = ResultFolder(out, identity(kind, objective, provenance, settings), finished, resume, overwrite,
                          resumable=kind in RESUMABLE, defaults={"settings": defaults or {}})
    rows = skipped_rows(objective.task)
    if rows:
        folder.with_results[SKIPPED] = lambda path: write_csv(path, rows)
    return folder


def search_digest(runs: Runs, z0: np.ndarray | None = None, pairs: list[np.ndarray] | None = None) -> str:
    """16 hex digits of SHA-256 over what a search runs: its resolved configs, its starting gates and its pairs."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(c) for c in runs.configs], sort_keys=True).encode())
    for name, array in (("z0", z0), *((f"pairs{i}", p) for i, p in enumerate(pairs or ()))):
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{name}{array.shape}{array.dtype}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def checkpointed_searches(directory: Path) -> Callable[..., list[SearchResult]]:
    """`run_searches` saving a checkpoint after every epoch in `directory/search-<search_digest>/` (named by what
    the search runs) and continuing from the latest one there: a killed search resumes where it stopped, a finished
    one gives its result again without a step, and either is bit-identical to an uninterrupted search."""
    def searches(objective: Objective, configs, *, z0: np.ndarray | None = None,
                 pairs: list[np.ndarray] | None = None, **kwargs) -> list[SearchResult]:
        runs = Runs.of(objective, configs)
        checkpoints = EpochCheckpoints(directory / f"search-{search_digest(runs, z0, pairs)}")
        try:
            start = checkpoints.restore(initial_state(objective, runs)) if checkpoints.steps() else None
            results = run_searches(objective, runs, start=start, on_epoch=checkpoints.save, z0=z0, pairs=pairs,
                                   **kwargs)
        except BaseException:
            checkpoints.close(quiet=True)  # the error on its way says what went wrong
            raise
        checkpoints.close()
        return results

    return searches
