"""The command line on a tiny GPT-2 folder: trace, evaluate, export, info, and errors as messages."""

import json

import pytest

from jaxtrace.cli import main
from conftest import SHARED

DATA = str(SHARED / "data")


@pytest.fixture(scope="module")
def traced(tiny_gpt2, tmp_path_factory):
    folder, _, _ = tiny_gpt2
    out = tmp_path_factory.mktemp("trace")
    code = main(["trace", "--model", str(folder), "--task", "winogender", "--data", DATA, "--site", "head_out",
                 "--epochs", "2", "--lambda1", "0.01", "--lambda2", "0.01", "--out", str(out), "--no-progress"])
    assert code == 0
    return folder, out


def test_trace_writes_results_and_summary(traced, capsys):
    _, out = traced
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["task"] == "winogender" and circuit["n_pairs"] == 44 and circuit["n_components"] == 8
    assert circuit["search"]["lr"] == 0.1 and circuit["search"]["penalty"] == "mean"
    assert {"z_map.png", "effect_per_epoch.png", "examples.csv", "log.csv", "z", "checkpoints"} <= {
        p.name for p in out.iterdir()}


def test_evaluate_reproduces_the_circuit_effect(traced, capsys):
    folder, out = traced
    circuit = json.loads((out / "circuit.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--model", str(folder), "--task", "winogender", "--data", DATA,
                 "--circuit", str(out / "circuit.json"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["effect"] == pytest.approx(circuit["effect"], abs=1e-6)
    assert result["effect_all"] == pytest.approx(circuit["effect_all"], abs=1e-6)
    select = ",".join(f"{layer}.{index}" for layer, index in circuit["selected"]) or "0.0"
    assert main(["evaluate", "--model", str(folder), "--task", "winogender", "--data", DATA, "--site", "head_out",
                 "--select", select, "--json"]) == 0
    by_select = json.loads(capsys.readouterr().out.splitlines()[-1])
    if circuit["selected"]:
        assert by_select["effect"] == pytest.approx(circuit["effect"], abs=1e-6)


def test_export_eap(traced, capsys):
    _, out = traced
    assert main(["export", "--circuit", str(out / "circuit.json"), "--format", "eap",
                 "--out", str(out / "graph.json")]) == 0
    graph = json.loads((out / "graph.json").read_text())
    assert graph["cfg"]["n_layers"] == 2 and graph["nodes"]["input"]["in_graph"]


def test_errors_are_messages_not_tracebacks(tiny_gpt2, tmp_path, capsys):
    folder, _, _ = tiny_gpt2
    assert main(["trace", "--model", str(tmp_path / "missing"), "--task", "winobias", "--data", DATA,
                 "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["trace", "--model", str(folder), "--task", "winobias", "--data", DATA, "--lambda1", "-1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "lambda1 must be >= 0" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(folder), "--task", "winobias", "--data", DATA,
                 "--select", "9.9", "--site", "head_out"]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["trace", "--model", str(folder), "--task", "winobias", "--data", DATA, "--site", "residual",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("jaxtrace: error: argument --site: invalid choice")


def test_info_prints_summary_and_forward(tiny_gpt2, capsys):
    folder, _, _ = tiny_gpt2
    assert main(["info", "--model", str(folder), "--time", "--batch", "2", "--length", "8"]) == 0
    out = capsys.readouterr().out
    assert "gpt2 (gpt2 family)" in out and "logit(' he') - logit(' she')" in out and "compile" in out
