"""compare and stability resume (issue 23): each is killed with SIGKILL at several points (a subprocess that kills
itself right after a given checkpoint is saved), rerun with --resume, and its results are an uninterrupted run's bit
for bit (wall times aside); a resume into another run is refused naming the field, and a plain rerun into a folder
holding a run is refused as trace's is."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrace.engine.methods import MethodResult
from jaxtrace.io.checkpoints import CheckpointError, FinishedMethods
from test_malformed import expect_error, gpt2_dir, pairs, run  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI on the arguments after the first two, killing itself with SIGKILL right after the count-th save of
# an epoch checkpoint ("epoch") or of a finished method ("method"); programs come from the tests' compilation cache.
KILLED = """
import os, signal, sys
import jax
from jaxtrace.io.cache import enable_compilation_cache
from jaxtrace.io.checkpoints import EpochCheckpoints, FinishedMethods
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
enable_compilation_cache(sys.argv[3], min_seconds=0.2)
store = {"epoch": EpochCheckpoints, "method": FinishedMethods}[sys.argv[1]]
save, saves = store.save, []
def save_then_die(self, *args):
    save(self, *args)
    saves.append(args)
    if len(saves) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
store.save = save_then_die
from jaxtrace.cli import main
sys.exit(main(sys.argv[4:] + ["--no-compile-cache"]))
"""


def killed(after: str, count: int, *argv) -> None:
    """Run the CLI in a subprocess killed right after the count-th `after` save ("epoch" or "method")."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED, after, str(count), jax.config.jax_compilation_cache_dir,
                           *map(str, argv)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def common(model, pairs, out, *more):
    return ["--model", model, "--task", "custom", "--data", pairs, "--site", "head_out", "--batch-size", "2",
            "--epochs", "2", "--no-progress", "--out", out, *more]


def compare_args(model, pairs, out, *more):
    return ["compare", *common(model, pairs, out, "--sizes", "1,2", "--n-lambdas", "2", "--samples", "3",
                               "--ig-steps", "1", "--mib", "", *more)]


def stability_args(model, pairs, out, *more):
    return ["stability", *common(model, pairs, out, "--seeds", "2", "--resamples", "1", *more)]


def without_seconds(record):
    """A result record less its wall times (every "seconds" and "method_seconds" field, at any depth)."""
    if isinstance(record, dict):
        return {k: without_seconds(v) for k, v in record.items() if k not in ("seconds", "method_seconds")}
    if isinstance(record, list):
        return [without_seconds(v) for v in record]
    return record


def result(path: Path):
    return without_seconds(json.loads(path.read_text()))


def test_finished_methods_are_read_back_exactly(tmp_path):
    store = FinishedMethods(tmp_path / "methods")
    assert store.load() == ({}, {})
    mask = np.array([[True, False], [False, True]])
    scores = np.array([[1.5, np.nan], [-0.0, 0.1 + 0.2]])
    extras = {"pgbct_runs": [{"lambda1": 0.1, "size": 2, "effect": 1 / 3}]}
    memo = {"single_effects": np.float32([[1, 2], [3, 4]]), "not_an_array": object()}  # the methods' shared memo
    store.save("pgbct", MethodResult({2: (mask, 0.1 + 0.2), 1: (~mask, None)}, scores, 1.25, extras), memo)
    store.save("random", MethodResult({1: (mask, -2.5)}), memo)
    results, memo = store.load()
    assert list(results) == ["pgbct", "random"] and list(memo) == ["single_effects"]
    pgbct = results["pgbct"]
    assert list(pgbct.circuits) == [2, 1] and [e for _, e in pgbct.circuits.values()] == [0.1 + 0.2, None]
    np.testing.assert_array_equal(pgbct.circuits[1][0], ~mask)
    assert pgbct.scores.dtype == np.float64 and np.array_equal(pgbct.scores, scores, equal_nan=True)
    assert (pgbct.seconds, pgbct.extras) == (1.25, extras) and results["random"].scores is None
    assert memo["single_effects"].dtype == np.float32
    (tmp_path / "methods" / "random.npz").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match=r"finished method .*random.npz cannot be read .*move it away"):
        store.load()


@pytest.mark.slow
def test_a_killed_compare_resumes_to_an_uninterrupted_runs_results(gpt2_dir, pairs, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run(capsys, *compare_args(gpt2_dir, pairs, reference))
    assert code == 0, err
    # Killed in PGB-CT's λ sweep, after its first epoch: no method finished.
    killed("epoch", 1, *compare_args(gpt2_dir, pairs, out))
    searches = list((out / "checkpoints").glob("search-*"))
    assert [sorted(p.name for p in s.iterdir() if p.name.isdigit()) for s in searches] == [["1"]]
    assert not (out / "checkpoints" / "methods").exists() and (out / ".jaxtrace.lock").exists()
    expect_error(capsys, *compare_args(gpt2_dir, pairs, out), names=[f"{out} already holds an unfinished run",
                                                                      "--resume"])
    # Resumed (the sweep from its epoch), then killed again once three methods are finished.
    killed("method", 3, *compare_args(gpt2_dir, pairs, out, "--resume"))
    finished = sorted(p.stem for p in (out / "checkpoints" / "methods").glob("*.npz") if "." not in p.stem)
    assert finished == ["pgbct", "pgbct_budgets", "single"] and not (out / "report.md").exists()
    # A resume into another comparison is refused, naming the field.
    expect_error(capsys, *compare_args(gpt2_dir, pairs, out, "--resume", "--samples", "4"),
                 names=[f"cannot resume {out}", "settings.curve.samples 3 -> 4"])
    # A comparison saved before --swap-max existed ran no swap search: resumed with the default (8) it is refused.
    saved = (out / "run.json").read_text()
    before = json.loads(saved)
    del before["identity"]["settings"]["curve"]["swap_max"]
    (out / "run.json").write_text(json.dumps(before))
    expect_error(capsys, *compare_args(gpt2_dir, pairs, out, "--resume"),
                 names=[f"cannot resume {out}", "settings.curve.swap_max None -> 8"])
    (out / "run.json").write_text(saved)
    code, _, err = run(capsys, *compare_args(gpt2_dir, pairs, out, "--resume"))
    assert code == 0, err
    assert result(out / "curve.json") == result(reference / "curve.json")
    # A finished comparison: a plain rerun is refused as trace's is.
    expect_error(capsys, *compare_args(gpt2_dir, pairs, out), names=[f"{out} already holds a finished run",
                                                                      "--resume", "--overwrite"])


@pytest.mark.slow
def test_a_killed_stability_sweep_resumes_to_an_uninterrupted_runs_results(gpt2_dir, pairs, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run(capsys, *stability_args(gpt2_dir, pairs, reference))
    assert code == 0, err
    killed("epoch", 1, *stability_args(gpt2_dir, pairs, out))
    assert not (out / "stability.json").exists()
    expect_error(capsys, *stability_args(gpt2_dir, pairs, out), names=["unfinished run", "--resume"])
    expect_error(capsys, *stability_args(gpt2_dir, pairs, out, "--resume", "--seeds", "3"),
                 names=[f"cannot resume {out}", "settings.stability.seeds 2 -> 3"])
    code, _, err = run(capsys, *stability_args(gpt2_dir, pairs, out, "--resume"))
    assert code == 0, err
    assert result(out / "stability.json") == result(reference / "stability.json")
    # A finished sweep: a plain rerun is refused as trace's is; --resume re-reports it.
    expect_error(capsys, *stability_args(gpt2_dir, pairs, out), names=["a finished run", "--resume"])
    code, _, err = run(capsys, *stability_args(gpt2_dir, pairs, out, "--resume"))
    assert code == 0, err
    assert result(out / "stability.json") == result(reference / "stability.json")


def budgets_args(model, pairs, out, *more):
    return ["trace", *common(model, pairs, out, "--budgets", "1,2,5", "--lambda1", "0", "--direction", "keep", *more)]


@pytest.mark.slow
def test_a_killed_budgeted_trace_resumes_bit_identical(gpt2_dir, pairs, tmp_path, capsys):
    """`trace --budgets` killed after its first epoch's checkpoint, then resumed: budgets.json and every budget's
    circuit are an uninterrupted run's (wall times aside); a resume into another budget list is refused."""
    reference, out = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run(capsys, *budgets_args(gpt2_dir, pairs, reference))
    assert code == 0, err
    killed("epoch", 1, *budgets_args(gpt2_dir, pairs, out))
    assert not (out / "budgets.json").exists()
    expect_error(capsys, *budgets_args(gpt2_dir, pairs, out, "--resume", "--budgets", "1,2"),
                 names=[f"cannot resume {out}", "settings.budgets"])
    code, _, err = run(capsys, *budgets_args(gpt2_dir, pairs, out, "--resume"))
    assert code == 0, err
    saved = result(out / "budgets.json")
    assert saved == result(reference / "budgets.json")
    for entry in saved["circuits"]:
        assert result(out / entry["file"]) == result(reference / entry["file"])
