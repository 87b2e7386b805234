"""Result folders: a run knows what it is (resume refused for every identity field), one process at a time,
results published atomically, sweeps refuse other options; and how often the training step compiles."""

import dataclasses
import errno
import json
import socket
import subprocess
import sys

import numpy as np
import pytest

import jaxtrace
from jaxtrace.cli import main
from jaxtrace.engine import loop
from jaxtrace.engine.objective import ObjectiveConfig
from jaxtrace.io import plots
from jaxtrace.io.results import LOCK, FolderBusyError, ResultFolder
from jaxtrace.runs.common import Provenance
from jaxtrace.runs.model_sweep import sweep_models
from jaxtrace.tasks import TaskSpec
from conftest import SHARED, build_hf_model

DATA = str(SHARED / "data")
CONFIG = jaxtrace.SearchConfig(epochs=1, lambda1=0.01, lambda2=0.01)


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory):
    """A custom JSONL task of 6 pairs."""
    path = tmp_path_factory.mktemp("custom") / "pairs.jsonl"
    rows = [{"base": f"The {job} said that she", "counterfactual": f"The {job} said that he",
             "targets": [" was", " is"], "label": job}
            for job in ("nurse", "doctor", "baker", "pilot", "chef", "judge")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _trace(model, tokenizer, out, spec: TaskSpec, site="head_out", config=CONFIG, **kwargs):
    return jaxtrace.trace(model, spec.build(tokenizer), site, config, batch_size=kwargs.pop("batch_size", 4),
                          out=out, progress=False, provenance=Provenance(None, spec), **kwargs)


def test_resume_refuses_a_different_run_naming_the_field(tiny_gpt2, custom_data, tmp_path):
    _, model, tokenizer = tiny_gpt2
    spec = TaskSpec("custom", str(custom_data))
    out = tmp_path / "run"
    _trace(model, tokenizer, out, spec)
    changed_data = tmp_path / "changed.jsonl"
    changed_data.write_text(custom_data.read_text().replace("nurse", "clerk"))
    other_model = jaxtrace.load_model(tiny_gpt2[0], dtype="bfloat16")[0]
    cases = {
        "settings.lambda1": dict(config=CONFIG.replace(lambda1=0.5)),
        "settings.lr": dict(config=CONFIG.replace(lr=0.2)),
        "settings.schedule": dict(config=CONFIG.replace(schedule="exp")),
        "settings.penalty": dict(config=CONFIG.replace(penalty="sum")),
        "settings.transform": dict(config=CONFIG.replace(transform="neg_log")),
        "settings.threshold": dict(config=CONFIG.replace(threshold=0.6)),
        "settings.max_components": dict(config=CONFIG.replace(max_components=3)),
        "settings.seed": dict(config=CONFIG.replace(seed=1)),
        "settings.init": dict(config=CONFIG.replace(init=0.4)),
        "objective.site": dict(site="attn_pattern"),
        "objective.metric": dict(metric="logit_difference"),
        "objective.batch_size": dict(batch_size=3),
        "task.options.positions": dict(spec=dataclasses.replace(spec, positions="last")),
        "task.pairs": dict(spec=TaskSpec("custom", str(changed_data))),
        "model.config.dtype": dict(model=other_model),
    }
    for field, change in cases.items():
        arguments = {"model": model, "spec": spec, **change}
        with pytest.raises(ValueError, match=rf"cannot resume .*different run \(.*{field}"):
            _trace(arguments.pop("model"), tokenizer, out, arguments.pop("spec"), resume=True, **arguments)
    assert not (out / LOCK).exists()
    # A run saved before a setting existed resumes where the setting is at its default, and only there.
    saved = json.loads((out / "run.json").read_text())
    assert saved["identity"]["settings"].pop("threshold") == jaxtrace.SearchConfig().threshold
    (out / "run.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"different run \(settings\.threshold None -> 0\.6\)"):
        _trace(model, tokenizer, out, spec, resume=True, config=CONFIG.replace(threshold=0.6))
    # The same run resumes (here: re-reports), and a different one goes in with --overwrite.
    assert _trace(model, tokenizer, out, spec, resume=True).n_pairs == 6
    assert "threshold" in json.loads((out / "run.json").read_text())["identity"]["settings"]
    assert _trace(model, tokenizer, out, spec, site="attn_pattern", overwrite=True).site == "attn_pattern"
    assert json.loads((out / "run.json").read_text())["identity"]["objective"]["site"] == "attn_pattern"


def test_weights_are_part_of_the_identity(tiny_gpt2, custom_data, tmp_path):
    _, model, tokenizer = tiny_gpt2
    spec = TaskSpec("custom", str(custom_data))
    _trace(model, tokenizer, tmp_path, spec)
    other = jaxtrace.load_model(_save(build_hf_model("gpt2", seed=3, vocab_size=50257), tokenizer, tmp_path / "m"))[0]
    with pytest.raises(ValueError, match=r"model\.weights"):
        _trace(other, tokenizer, tmp_path, spec, resume=True)


def _save(hf_model, tokenizer, folder):
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_folder_in_use_is_refused_and_a_dead_holder_is_replaced(tiny_gpt2, custom_data, tmp_path):
    _, model, tokenizer = tiny_gpt2
    spec = TaskSpec("custom", str(custom_data))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(f"{socket.gethostname()} {holder.pid}")
        with pytest.raises(FolderBusyError, match=f"in use by process {holder.pid}"):
            _trace(model, tokenizer, tmp_path, spec)
        assert not (tmp_path / "circuit.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _trace(model, tokenizer, tmp_path, spec).n_pairs == 6  # the lock of a dead process is taken over
    assert not (tmp_path / LOCK).exists()
    with ResultFolder(tmp_path / "other", {"kind": "test"}):  # and within one process, a second holder waits
        with pytest.raises(FolderBusyError):
            ResultFolder(tmp_path / "other", {"kind": "test"}).__enter__()


def test_a_failed_result_write_leaves_the_earlier_result_whole(tiny_gpt2, custom_data, tmp_path, monkeypatch):
    _, model, tokenizer = tiny_gpt2
    spec = TaskSpec("custom", str(custom_data))
    _trace(model, tokenizer, tmp_path, spec)
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "circuit.json" in finished

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_effect_history", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _trace(model, tokenizer, tmp_path, spec, config=CONFIG.replace(epochs=2), resume=True)
    # Nothing of the failed publish is in place: the folder still holds the earlier finished result, whole.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "run.json"} == {
        name: data for name, data in finished.items() if name != "run.json"}
    assert not (tmp_path / LOCK).exists() and not (tmp_path / ".staging").exists()
    monkeypatch.undo()
    extended = _trace(model, tokenizer, tmp_path, spec, config=CONFIG.replace(epochs=2), resume=True)
    assert len(extended.history) == 2 and (tmp_path / "circuit.json").is_file()
    assert not (tmp_path / ".staging").exists()


def test_sweep_refuses_other_options_and_keeps_its_record(tiny_gpt2, custom_data, tmp_path, capsys):
    folder = str(tiny_gpt2[0])
    tasks = [TaskSpec("custom", str(custom_data))]
    sweep_models([folder], tasks, ObjectiveConfig("head_out", batch_size=4), tmp_path, CONFIG, progress=False)
    record = (tmp_path / "sweep.json").read_text()
    with pytest.raises(ValueError, match=r"different run \(.*search\.lambda1"):
        sweep_models([folder], tasks, ObjectiveConfig("head_out", batch_size=4), tmp_path, CONFIG.replace(lambda1=0.3),
                     progress=False)
    assert (tmp_path / "sweep.json").read_text() == record


def test_one_training_step_compilation_per_run_and_per_sweep(tiny_gpt2, custom_data):
    """A run compiles its step once (every batch packed to one shape); R runs optimised together compile one
    step; a target-size search compiles at most once per round (README)."""
    _, model, tokenizer = tiny_gpt2
    task = TaskSpec("custom", str(custom_data)).build(tokenizer)
    objective = jaxtrace.build_objective(model, task, "head_out", batch_size=4)
    config = CONFIG.replace(epochs=3)
    traces = objective.programs.traces
    jaxtrace.run_search(objective, config)
    assert traces["training_step"] == 1
    jaxtrace.run_searches(objective, [config.replace(lambda1=f) for f in (0.0, 0.1, 1.0)])
    assert traces["training_step"] == 2  # one more program: 3 runs instead of 1
    best, runs = loop.find_target_size(objective, config.replace(epochs=1), 2, n_lambdas=3, rounds=2)
    assert traces["training_step"] <= 2 + 2 and len(runs) in (3, 6)


def test_cli_overwrite_and_refusal(tiny_gpt2, custom_data, tmp_path, capsys):
    args = ["baseline", "--model", str(tiny_gpt2[0]), "--task", "custom", "--data", str(custom_data),
            "--site", "head_out", "--method", "topk", "--k", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "circuit.json").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err and "--resume" not in err
    assert (tmp_path / "circuit.json").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    assert np.isfinite(json.loads((tmp_path / "circuit.json").read_text())["effect"])


def test_search_config_resolves_once_per_run(tiny_gpt2, custom_data, tmp_path, monkeypatch):
    """A run resolves its config once (`Runs.of`) and passes the resolved configs down: one `SearchConfig.resolve`
    per trace (checkpointed, resumed or λ-searched) and per stability sweep; R per sweep of R configs."""
    from jaxtrace.runs.stability import StabilityConfig, stability_run
    from jaxtrace.runs.trace import trace_objective

    _, model, tokenizer = tiny_gpt2
    objective = jaxtrace.build_objective(model, TaskSpec("custom", str(custom_data)).build(tokenizer), "head_out",
                                         batch_size=4)
    calls = []
    resolve = jaxtrace.SearchConfig.resolve

    def counted(self, *args):
        calls.append(self)
        return resolve(self, *args)

    monkeypatch.setattr(jaxtrace.SearchConfig, "resolve", counted)

    def count(run) -> int:
        calls.clear()
        run()
        return len(calls)

    assert count(lambda: trace_objective(objective, CONFIG, progress=False)) == 1
    assert count(lambda: trace_objective(objective, CONFIG, out=tmp_path / "run", progress=False)) == 1
    assert count(lambda: trace_objective(objective, CONFIG.replace(epochs=2), out=tmp_path / "run", resume=True,
                                         progress=False)) == 1
    assert count(lambda: trace_objective(objective, CONFIG, target_size=2, progress=False)) == 1
    assert count(lambda: stability_run(objective, CONFIG, StabilityConfig(seeds=2, resamples=0),
                                       progress=False)) == 1
    assert count(lambda: jaxtrace.run_searches(objective, [CONFIG, CONFIG.replace(seed=1)])) == 2
    runs = loop.Runs.of(objective, CONFIG)
    assert count(lambda: (loop.run_search(objective, runs), loop.initial_state(objective, runs),
                          loop.training_step(objective, runs))) == 0
    with pytest.raises(ValueError, match="may differ only in"):
        runs.sweep([{"lr": 0.3}])


def test_typed_records_convert_at_the_file_boundary(tiny_gpt2, custom_data, tmp_path):
    """Checkpoints restore into `RunState` and `RunProgress` whose dicts are the JSON on disk; result rows are
    `EpochRow`s and `StepRow`s whose dicts are circuit.json's history and log.csv's rows; a damaged metadata file
    is a CheckpointError."""
    import csv

    from jaxtrace.io.checkpoints import CheckpointError, EpochCheckpoints

    _, model, tokenizer = tiny_gpt2
    objective = jaxtrace.build_objective(model, TaskSpec("custom", str(custom_data)).build(tokenizer), "head_out",
                                         batch_size=4)
    config = CONFIG.replace(epochs=2)
    out = tmp_path / "run"
    circuit = _trace(model, tokenizer, out, TaskSpec("custom", str(custom_data)), config=config)
    checkpoints = EpochCheckpoints(out / "checkpoints")
    try:
        state, progress = checkpoints.restore(loop.initial_state(objective, [config]))
    finally:
        checkpoints.close()
    assert isinstance(state, loop.RunState) and isinstance(progress, loop.RunProgress)
    assert state.z.shape == (1, *objective.shape) and state.keys.shape == (1, 2)
    meta = json.loads((out / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert list(meta) == ["configs", "epochs_done", "histories", "steps", "seconds", "unchanged", "settled"]
    assert progress.to_dict() == meta and loop.RunProgress.from_dict(meta) == progress
    assert progress.epochs_done == 2 and progress.configs[0] == loop.Runs.of(objective, config).config
    assert all(isinstance(row, loop.EpochRow) for row in progress.histories[0])
    assert [row.to_dict() for row in progress.histories[0]] == circuit.history
    with open(out / "log.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert [{k: str(v) for k, v in row.to_dict(run=False).items()} for row in progress.steps] == logged
    assert all(isinstance(row, loop.StepRow) and row.run == 0 for row in progress.steps)
    # Older checkpoints have no "unchanged" / "settled": no epoch unchanged, not stopped.
    older = loop.RunProgress.from_dict({k: v for k, v in meta.items() if k not in ("unchanged", "settled")})
    assert older.unchanged == (0,) and older.settled is False

    (out / "checkpoints" / "2" / "meta" / "metadata").write_text(json.dumps({**meta, "histories": None}))
    checkpoints = EpochCheckpoints(out / "checkpoints")
    try:
        with pytest.raises(CheckpointError, match=r"checkpoints/2 cannot be read .*metadata.*earlier checkpoints"):
            checkpoints.restore(loop.initial_state(objective, [config]))
    finally:
        checkpoints.close()
