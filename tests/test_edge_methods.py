"""The `edges` site searched like any other: EAP (attribution patching on the edge gates) against finite
differences, EAP-IG's completeness, a trace from the command line, and MIB's edge-level files read back by a
plain-Python reader of MIB's rules."""

import json
import math

import numpy as np
import pytest

from jaxtrace.cli import main
from jaxtrace.core import edges
from jaxtrace.engine.attribution import attribution_patching, integrated_gradients
from jaxtrace.engine.objective import build_objective
from jaxtrace.io.export import _eap_edges, write_mib_submission
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

DATA = SHARED / "data"


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """The 110 edges of a tiny GPT-2 (2 layers, 4 heads) on 24 WinoBias pairs in batches of 16."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:24], tokenizer)
    return build_objective(model, task, "edges", batch_size=16)


def test_eap_is_the_gradient_and_eap_ig_is_complete(objective):
    assert objective.shape == (1, edges.n_edges(objective.spec.config)) == (1, 110)
    eap = attribution_patching(objective)
    eps, steps = 1e-2, np.eye(objective.n_components, dtype=np.float32).reshape(-1, *objective.shape)
    effects = objective.evaluate_masks(np.concatenate([eps * steps, -eps * steps]))
    central = ((effects[: len(steps)] - effects[len(steps):]) / (2 * eps)).reshape(objective.shape)
    assert np.abs(eap).max() > 1e-2
    np.testing.assert_allclose(eap, central, atol=2e-2 * np.abs(eap).max())  # central differences: O(eps²)
    full, none = objective.evaluate_masks(np.stack([np.ones(objective.shape), np.zeros(objective.shape)]))
    errors = [abs(float(integrated_gradients(objective, m).sum()) - (full - none)) for m in (2, 8)]
    print(f"EAP-IG completeness error for m = 2, 8: {errors} (effect of all edges {full:.4f})")
    assert errors[1] < errors[0] / 4 and errors[1] < 1e-2 * abs(full)  # the midpoint rule: O(1/m²)


def test_trace_and_evaluate_edges_from_the_command_line(tiny_gpt2, tmp_path, capsys):
    common = ["--model", str(tiny_gpt2[0]), "--task", "winobias", "--data", str(DATA), "--split", "dev",
              "--site", "edges", "--no-progress"]
    assert main(["trace", *common, "--epochs", "1", "--budget", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    circuit = json.loads((tmp_path / "circuit.json").read_text())
    names = edges.edge_names(edges_config(circuit))
    assert np.shape(circuit["z"]) == (1, len(names)) and len(circuit["selected"]) == 3
    listed = next(line for line in printed.splitlines() if line.startswith("circuit"))
    assert listed.endswith(", ".join(names[index] for _, index in circuit["selected"]))  # edges by MIB's names
    assert main(["evaluate", "--circuit", str(tmp_path / "circuit.json"), "--data", str(DATA), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["effect"] == pytest.approx(circuit["effect"], abs=1e-5)


def edges_config(circuit: dict):
    from jaxtrace.core.models import ModelConfig
    return ModelConfig.from_dict(circuit["model_config"])


# ---- MIB's edge-level files, by MIB's rules (../shared/reference/mib.md) ----

def strict_json(path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path} holds a bare {token}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def edge_top_n(graph: dict, n: int, absolute: bool = False) -> set[str]:
    """apply_topn(n, absolute, level="edge"): the n edges of largest (|)score(|) (asserted free of ties)."""
    scores = {name: edge["score"] for name, edge in graph["edges"].items()}
    assert all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores.values())
    key = {name: abs(s) if absolute else s for name, s in scores.items()}
    ranked = sorted(key, key=lambda name: -key[name])
    assert n == len(ranked) or key[ranked[n - 1]] != key[ranked[n]], "a tie at the cut"
    return set(ranked[:n])


def test_mib_edge_files_hold_the_rankings_circuits(tmp_path):
    cfg = {"n_layers": 3, "n_heads": 4, "d_model": 8}
    all_edges = _eap_edges(3, 4)
    n = len(all_edges)
    rng = np.random.default_rng(0)
    ranking = rng.normal(size=(1, n))
    ranking[0, :5] = 0.0  # ties at zero and a NaN: ranked last, still distinct in the file
    ranking[0, 7] = np.nan
    fractions = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
    write_mib_submission(tmp_path, "eap", "ioi_gpt2", cfg, "edges", ranking, fractions)
    importances = strict_json(tmp_path / "eap_patching_edge" / "ioi_gpt2" / "importances.json")
    assert set(importances) >= {"cfg", "nodes", "edges"} and len(importances["edges"]) == n
    assert all("score" not in node for node in importances["nodes"].values())  # edge level: no node scores
    names = [name for name, _, _ in all_edges]
    values = np.nan_to_num(ranking[0], nan=0.0)
    for k in (1, 10, 40, n // 2):
        expected = {names[i] for i in np.argsort(-values, kind="stable")[:k]}
        assert edge_top_n(importances, k) == expected
    by_magnitude = np.argsort(-np.abs(values), kind="stable")[:10]
    assert edge_top_n(importances, 10, absolute=True) == {names[i] for i in by_magnitude}
    folder = tmp_path / "eap-circuits_patching_edge" / "ioi_gpt2"
    files = sorted(folder.iterdir())
    assert len(files) == 6  # the fractions up to 0.5, no importances beside them
    for f in files:
        graph = strict_json(f)
        p = float(f.stem.removeprefix("circuit_"))
        kept = {name for name, edge in graph["edges"].items() if edge["in_graph"]}
        assert kept == edge_top_n(importances, int(p * n))
        touched = {"input", "logits"} | {end for name, parent, child in all_edges if name in kept
                                         for end in (parent, child)}
        assert {name for name, node in graph["nodes"].items() if node["in_graph"]} == touched
        assert all("score" not in node for node in graph["nodes"].values())
