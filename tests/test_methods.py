"""The method registry: the built-in methods in compare's and the report's order, and a method added by one
registration (here "first_k", the first k components by flat index) run by `compare` and offered by `baseline`
without any other change."""

import json

import numpy as np
import pytest

from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.methods import (METHODS, Method, MethodContext, MethodResult, baseline_methods, compare_methods,
                                     register, registered, report_order, top_circuits, unregister)
from jaxtrace.engine.objective import build_objective
from jaxtrace.runs import baselines
from jaxtrace.runs.curve import CurveConfig, compare_run, ranking_of
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED


def first_k(objective, context: MethodContext) -> MethodResult:
    """The toy method: scores n - flat index, so its circuit of size k is the first k components."""
    scores = (objective.n_components - np.arange(objective.n_components, dtype=np.float32)).reshape(objective.shape)
    return MethodResult(top_circuits(context, scores), scores)


FIRST_K = Method("first_k", first_k, ranking="flat index, first first", scores=True)  # its one registration


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny GPT-2 on 24 WinoBias pairs (signs flipped so that patching helps: see test_pgbct)."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", SHARED / "data", split="dev")[:24], tokenizer)
    return build_objective(model, task.replace_arrays(sign=-task.arrays.sign), "attn_pattern", batch_size=24)


def test_builtin_methods_in_compare_and_report_order():
    """The orders the report's tables, curve.json and `baseline --method` had before the registry."""
    assert [m.name for m in compare_methods()] == ["pgbct", "pgbct_budgets", "single", "topk", "greedy", "random",
                                                  "atp", "ig"]
    reported = report_order(compare_methods())
    budgeted = ["pgbct", "pgbct_budgets"]
    assert [m.name for m in reported] == [*budgeted, "greedy", "topk", "random", "single", "atp", "ig"]
    assert [m.name for m in reported if m.circuits] == [*budgeted, "greedy", "topk", "random", "atp", "ig"]
    assert [m.name for m in reported if m.search] == [*budgeted, "greedy", "topk", "random"]
    assert [m.name for m in reported if m.scores] == [*budgeted, "greedy", "single", "atp", "ig"]
    assert ranking_of() == {"pgbct": "pgbct", "pgbct_budgets": "pgbct_budgets", "greedy": "greedy",
                            "single": "single", "atp": "atp", "ig": "ig", "topk": "single"}
    assert baseline_methods() == baselines.METHODS == ("single", "topk", "greedy", "random", "exhaustive", "atp",
                                                       "ig")
    assert {m.name: m.ranking for m in reported} == {
        "pgbct": "mean final z of the λ sweep",
        "pgbct_budgets": "budgeted circuits merged (MIB's sizes)", "greedy": "order of addition, then single effects",
        "topk": "single effects (= single)", "random": "none", "single": "effect alone",
        "atp": "AtP score (gradient at nothing patched; keep: at nothing kept; edges: EAP, at nothing patched)",
        "ig": "IG score"}


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("topk", first_k))
    with pytest.raises(ValueError, match="used by topk"):
        unregister("single")
    with pytest.raises(ValueError, match="not registered before it"):
        register(Method("late", first_k, ranked_as="nothing"))
    with pytest.raises(ValueError, match="cannot be a baseline"):
        Method("nothing", first_k, circuits=False)
    assert "late" not in METHODS


def test_a_registered_method_is_compared_and_offered(objective, tmp_path):
    with registered(FIRST_K):
        assert [m.name for m in compare_methods()][-1] == "first_k" and "first_k" in baseline_methods()
        assert CurveConfig(mib=("first_k",)).mib == ("first_k",)
        config = CurveConfig(sizes=(1, 2, 4), n_lambdas=1, samples=2, ig_steps=1, mib=("first_k",))
        result = compare_run(objective, SearchConfig(epochs=1), config, out=tmp_path / "cmp", progress=False)
        mask, extras = baselines.run_baseline(objective, "first_k", 3)
        assert baselines.BaselineConfig(method="first_k").method == "first_k"
    assert "first_k" not in METHODS and "first_k" not in baseline_methods()
    with pytest.raises(ValueError, match="first_k has no ranking"):
        CurveConfig(mib=("first_k",))

    # its circuits: the first k components, measured at every size in compare's default direction, keep
    curve = json.loads((tmp_path / "cmp" / "curve.json").read_text())
    assert curve == json.loads(json.dumps({**curve, **result.to_dict()})) and curve["direction"] == "keep"
    every = float(objective.evaluate_masks(np.ones((1, *objective.shape), np.float32))[0])
    for row in curve["rows"]:
        first = np.ones(objective.n_components, np.float32)  # the patch of the first k kept: the rest
        first[: row["size"]] = 0
        expected = every - float(objective.evaluate_masks(first.reshape(1, *objective.shape))[0])
        assert row["first_k"] == pytest.approx(expected, abs=1e-6)
    assert all(row["first_k"] is not None for row in curve["faithfulness_rows"])
    # its ranking: faithfulness curves, MIB export, wall time (not a search)
    assert "first_k" in curve["faithfulness"]["curves"] and "first_k" in curve["rankings"]
    assert "first_k" in curve["method_seconds"] and "first_k" not in curve["seconds"]
    assert (tmp_path / "cmp" / "mib" / "first_k_patching_node").is_dir()
    table = (tmp_path / "cmp" / "curve.md").read_text()
    assert "| size | pgbct | pgbct_budgets | greedy | topk | random | atp | ig | first_k |" in table
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| first_k |" in report and "flat index, first first" in report
    # and as a baseline: the circuit of size k it gives, its scores (correlated with the single effects)
    assert np.flatnonzero(mask).tolist() == [0, 1, 2]
    assert extras["scores"].shape == objective.shape and "score_correlation" in extras


def test_compare_result_matches_curve_json_keys(objective):
    """`CompareResult.to_dict()`: curve.json's keys, the methods' extras at their values before they ran."""
    from jaxtrace.runs.curve import compare

    seen = []
    context = MethodContext(objective, (1, 2), search=SearchConfig(epochs=1), n_random=2, ig_steps=1)
    result = compare(context, report=lambda r: seen.append(r.to_dict()))
    keys = {"direction", "rows", "seconds", "method_seconds", "greedy_max", "greedy_candidates", "n_random", "ig_steps",
            "effect_all", "n_components", "n_pairs", "site", "metric", "pgbct_runs", "pgbct_budgets", "faithfulness",
            "faithfulness_rows", "rankings"}
    assert all(set(d) == keys for d in seen) and len(seen) == len(compare_methods()) + 1
    assert seen[0]["greedy_max"] is None and seen[0]["faithfulness"] is None and seen[0]["rankings"] == {}
    assert len(seen[0]["pgbct_runs"]) == 1 and seen[-1]["greedy_max"] == max(result.sizes)
    assert list(seen[-1]["method_seconds"]) == ["pgbct", "pgbct_budgets", "single", "topk", "greedy", "random",
                                                "atp", "ig"]
    assert list(seen[-1]["seconds"]) == ["pgbct", "pgbct_budgets", "topk", "greedy", "random"]
    assert list(seen[-1]["rankings"]) == ["pgbct", "pgbct_budgets", "single", "greedy", "atp", "ig"]
    assert seen[-1]["method_seconds"]["topk"] >= seen[-1]["method_seconds"]["single"]  # topk includes single's
