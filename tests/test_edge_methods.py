"""The `edges` site searched like any other: EAP (attribution patching on the edge gates) against finite
differences, EAP-IG's completeness and a trace from the command line (MIB's edge-level files: test_mib_files.py)."""

import json

import numpy as np
import pytest

from jaxtrace.cli import main
from jaxtrace.core import edges
from jaxtrace.core.models import ModelConfig
from jaxtrace.engine.attribution import attribution_patching, integrated_gradients, mask_gradients
from jaxtrace.engine.objective import build_objective
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


def test_eap_keeps_the_clean_runs_gradient_in_the_keep_direction(objective):
    """With every edge patched each reader reads the counterfactual's writers at the gated positions, so keeping one
    edge clean reaches no later reader's input there: the gradient is 0 on every edge but the embeddings' (their
    deltas do not vanish; they reach the logits through the ungated target tokens), and the keep direction's EAP is
    MIB's, the gradient at the clean run."""
    at_patched = mask_gradients(objective, np.ones((1, *objective.shape), np.float32))[0][0, 0]
    eap = attribution_patching(objective)
    from_input = np.char.startswith(np.array(edges.edge_names(objective.spec.config)), "input->")
    assert np.abs(at_patched[~from_input]).max() < 1e-6 * np.abs(eap).max() < np.abs(at_patched[from_input]).max()
    np.testing.assert_array_equal(attribution_patching(objective, "keep"), eap)


def test_trace_and_evaluate_edges_from_the_command_line(tiny_gpt2, tmp_path, capsys):
    common = ["--model", str(tiny_gpt2[0]), "--task", "winobias", "--data", str(DATA), "--split", "dev",
              "--site", "edges", "--no-progress"]
    assert main(["trace", *common, "--epochs", "1", "--budget", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    circuit = json.loads((tmp_path / "circuit.json").read_text())
    names = edges.edge_names(ModelConfig.from_dict(circuit["model_config"]))
    assert np.shape(circuit["z"]) == (1, len(names)) and len(circuit["selected"]) == 3
    listed = next(line for line in printed.splitlines() if line.startswith("circuit"))
    assert listed.endswith(", ".join(names[index] for _, index in circuit["selected"]))  # edges by MIB's names
    assert main(["evaluate", "--circuit", str(tmp_path / "circuit.json"), "--data", str(DATA), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["effect"] == pytest.approx(circuit["effect"], abs=1e-5)


@pytest.mark.slow  # the CLI end to end, about a minute
def test_compare_runs_only_the_methods_asked_for(tiny_gpt2, tmp_path, capsys):
    """`compare --methods`: at scale the single effects cost one mask an edge, so a comparison on edges runs the
    methods asked for (and refuses a method whose ranking is another's that does not run)."""
    common = ["compare", "--model", str(tiny_gpt2[0]), "--task", "winobias", "--data", str(DATA), "--split", "dev",
              "--site", "edges", "--sizes", "1,2,5", "--no-progress"]
    out = tmp_path / "compare"
    assert main([*common, "--methods", "atp,ig,random", "--mib", "atp,ig", "--samples", "2", "--ig-steps", "2",
                 "--out", str(out)]) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert set(curve["method_seconds"]) == set(curve["rankings"]) | {"random"} == {"atp", "ig", "random"}
    assert set(curve["faithfulness"]["mib"]) == {"atp", "ig"}
    assert sorted(path.parent.parent.name for path in (out / "mib").glob("*/*/importances.json")) == [
        "atp_patching_edge", "ig_patching_edge"]
    for methods, message in (("topk", "topk is ranked by single's scores: add it"), ("nope", "no method nope")):
        assert main([*common, "--methods", methods, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
