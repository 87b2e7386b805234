"""`trace`: a model, a task and a site in; a circuit with its effect, plots and checkpoints out."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from jax.sharding import Mesh

from jaxtrace.core.metrics import Metric
from jaxtrace.core.models import GatedLM
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import Runs, SearchResult, find_target_size, initial_state, run_searches
from jaxtrace.engine.objective import Objective, ObjectiveConfig, build_objective
from jaxtrace.io.checkpoints import EpochCheckpoints
from jaxtrace.io.circuit import Circuit
from jaxtrace.runs.common import Provenance, progress_bar, publish_circuit, result_folder, summarize
from jaxtrace.tasks import EncodedTask


def trace(model: GatedLM, task: EncodedTask, objective: ObjectiveConfig | str = "attn_pattern",
          config: SearchConfig = SearchConfig(), *, batch_size: int | None = None, metric: str | Metric | None = None,
          mesh: Mesh | None = None, attention: str | None = None, out: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, target_size: int | None = None, progress: bool = True,
          provenance: Provenance = Provenance()) -> Circuit:
    """Run PGB-CT on `task` under `objective` (an `ObjectiveConfig` or a site; `batch_size`, `metric` and
    `attention` override it, see `build_objective`) and return the circuit; with `out`, checkpoint every epoch and
    write the result folder there (see `trace_objective`). The metric defaults to the task's
    (`EncodedTask.default_metric`)."""
    objective = build_objective(model, task, objective, batch_size, metric=metric, attention=attention, mesh=mesh)
    return trace_objective(objective, config, out=out, resume=resume, overwrite=overwrite, target_size=target_size,
                           progress=progress, provenance=provenance)


def trace_objective(objective: Objective, config: SearchConfig = SearchConfig(), *, out: str | Path | None = None,
                    resume: bool = False, overwrite: bool = False, target_size: int | None = None,
                    progress: bool = True, provenance: Provenance = Provenance()) -> Circuit:
    """PGB-CT on a built objective.

    With `out`, the run holds that folder (`jaxtrace.io.results`), saves a checkpoint after every epoch and, at the
    end, writes circuit.json (last), examples.csv, log.csv, z/, z_map.png and effect_per_epoch.png. `resume`
    continues the run the folder holds (a killed run, or a finished one to more epochs; the same run only);
    `overwrite` replaces it. With `target_size`, λ is searched by vmapped sweeps (`find_target_size`; not
    checkpointed) and the run whose circuit size is closest is kept. On a mesh every process runs this call;
    checkpoints are written collectively and the other files by process 0. The config is resolved once, here
    (`Runs.of`), and passed down resolved.
    """
    runs = Runs.of(objective, config)
    settings = {k: v for k, v in dataclasses.asdict(runs.config).items() if k != "epochs"}
    if target_size is not None:
        settings["target_size"] = target_size
    with result_folder(out, "trace", objective, provenance, settings, resume, overwrite) as folder:
        began = time.perf_counter()
        if target_size is None:
            # A folder holding only the run's identity (it ended before its first checkpoint) starts afresh.
            resume = resume and folder is not None and folder.has_checkpoints()
            result = checkpointed_search(objective, runs, folder, resume, progress)
            record, seconds = dataclasses.asdict(result.config), result.seconds
        else:
            with progress_bar(None, "PGB-CT λ search", progress) as on_step:
                result, swept = find_target_size(objective, runs, target_size, on_step=on_step)
            record = {**dataclasses.asdict(result.config), "target_size": target_size,
                      "sweep": [{"lambda1": r.config.lambda1, "lambda2": r.config.lambda2, "size": int(r.mask.sum())}
                                for r in swept]}
            seconds = time.perf_counter() - began
        circuit, effects = summarize(objective, result.mask, result.z, provenance, "pgbct", record, result.history,
                                     seconds)
        if folder is not None:
            publish_circuit(folder, circuit, effects, objective, result.steps)
    return circuit


def checkpointed_search(objective: Objective, config: SearchConfig | Runs, folder, resume: bool,
                        progress: bool) -> SearchResult:
    """One checkpointed run of `config` (or its resolved `Runs`), resumed from the folder's latest checkpoint if
    asked."""
    runs = Runs.of(objective, config)
    checkpoints = None if folder is None else EpochCheckpoints(folder.checkpoints)
    try:
        start = checkpoints.restore(initial_state(objective, runs)) if resume and checkpoints else None
        done = 0 if start is None else start[1].epochs_done
        total = max(runs.config.epochs - done, 0) * len(objective.batcher.in_order)
        on_epoch = None if checkpoints is None else checkpoints.save
        with progress_bar(total, "PGB-CT", progress) as on_step:
            result = run_searches(objective, runs, start=start, on_step=on_step, on_epoch=on_epoch)[0]
    except BaseException:
        if checkpoints is not None:
            checkpoints.close(quiet=True)  # the error on its way says what went wrong
        raise
    if checkpoints is not None:
        checkpoints.close()
    return result
