"""Issue 23: defects of result folders, caches and checks, each run through the command line in-process like
test_malformed.py (exit status, the one line naming the file or option, no traceback, earlier results unchanged)."""

import json
import shutil
from pathlib import Path

import pytest

from jaxtrace.cli import main
from test_malformed import expect_error, gpt2_dir, pairs, run, snapshot, trace_args  # noqa: F401 (fixtures)


def sweep_args(model, pairs, out, epochs, *more):
    return ["sweep", "--models", model, "--tasks", "custom", "--data", pairs, "--site", "head_out", "--epochs",
            epochs, "--batch-size", "2", "--out", out, "--no-progress", *more]


# ---------------------------------------------------------------------------------------------------------------
# 1. A sweep rerun with other --epochs


def test_sweep_rerun_with_more_epochs_extends_its_pairs(gpt2_dir, pairs, tmp_path, capsys):
    out = tmp_path / "sweep"
    pair = out / gpt2_dir.name / "custom"
    code, _, err = run(capsys, *sweep_args(gpt2_dir, pairs, out, 1))
    assert code == 0, err
    assert len(json.loads((pair / "circuit.json").read_text())["history"]) == 1
    code, _, err = run(capsys, *sweep_args(gpt2_dir, pairs, out, 2))
    assert code == 0, err
    circuit = json.loads((pair / "circuit.json").read_text())
    manifest = json.loads((out / "sweep.json").read_text())
    assert [row["epoch"] for row in circuit["history"]] == [1, 2] and circuit["search"]["epochs"] == 2
    assert manifest["search"]["epochs"] == 2
    assert [(p["status"], p["epochs"]) for p in manifest["pairs"]] == [("done", 2)]
    # Fewer epochs than the pairs ran: refused, nothing changed.
    before = snapshot(out)
    expect_error(capsys, *sweep_args(gpt2_dir, pairs, out, 1),
                 names=["--epochs 1", "the 2 epochs", pair / "circuit.json"])
    assert snapshot(out) == before
