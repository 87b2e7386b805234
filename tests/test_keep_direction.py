"""Every method in the keep direction (issue 21): a circuit C is kept clean and every other component patched, its
effect IE(all) − IE(all \\ C). Greedy, exhaustive search, single, random and AtP against brute force over every
subset of a tiny model's 8 heads; compare run and recorded in that direction; `trace --budgets` end to end, resumed,
and refused when resumed into another budget list or direction."""

import itertools
import json

import numpy as np
import pytest

from jaxtrace.cli import build_parser, main
from jaxtrace.core.search import SearchConfig, SearchState, warm_start_z
from jaxtrace.engine.attribution import attribution_patching, attribution_scores
from jaxtrace.engine.budgets import run_budgets, signed_ranking, swap_search
from jaxtrace.engine.faithfulness import MIB_FRACTIONS, mib_score
from jaxtrace.engine.loop import (Runs, data_scale, initial_state, run_inputs, stacked_inputs, starting_gates,
                                  training_step)
from jaxtrace.engine.methods.greedy import greedy_path
from jaxtrace.engine.objective import build_objective
from jaxtrace.runs import baselines
from jaxtrace.runs.curve import CurveConfig, compare_run
from jaxtrace.runs.trace import trace_budgets
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

DATA = SHARED / "data"


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny random GPT-2 on 24 WinoBias pairs (heads that interact: no planted structure)."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:24], tokenizer)
    return build_objective(model, task, "attn_pattern", batch_size=24, metric="logit_difference")


@pytest.fixture(scope="module")
def kept(objective):
    """{frozenset of flat indices: IE(all) − IE(all \\ C)} for every subset C, each complement patched as its own
    mask (not through `circuit_effects`)."""
    n = objective.n_components
    subsets = [frozenset(c) for size in range(n + 1) for c in itertools.combinations(range(n), size)]
    patches = np.ones((len(subsets), n), np.float32)
    for row, subset in zip(patches, subsets):
        row[list(subset)] = 0.0
    effects = objective.evaluate_masks(patches.reshape(-1, *objective.shape)).astype(np.float64)
    return {subset: effects[0] - effect for subset, effect in zip(subsets, effects)}  # effects[0]: IE(all)


def _set(mask) -> frozenset:
    return frozenset(np.flatnonzero(np.asarray(mask).ravel()).tolist())


def test_keep_direction_searches_match_brute_force(objective, kept):
    n, tol = objective.n_components, 1e-5
    assert kept[frozenset()] == 0 and kept[frozenset(range(n))] == pytest.approx(
        float(objective.evaluate_masks(np.ones((1, *objective.shape), np.float32))[0]), abs=tol)
    best = {size: max(v for s, v in kept.items() if len(s) == size) for size in range(1, n + 1)}
    # exhaustive: the best kept set of every size
    for size, mask in enumerate(baselines.exhaustive(objective, 4, direction="keep"), 1):
        assert mask.sum() == size and kept[_set(mask)] == pytest.approx(best[size], abs=tol)
    # greedy: every step adds the component whose keeping most restores the model
    current = frozenset()
    for size, (mask, effect) in enumerate(greedy_path(objective, n, direction="keep"), 1):
        step = max(kept[current | {c}] for c in set(range(n)) - current)
        assert _set(mask) > current and kept[_set(mask)] == pytest.approx(step, abs=tol)
        assert effect == pytest.approx(kept[_set(mask)], abs=tol)
        current = _set(mask)
    # single: each head kept alone; top-k selects by it
    single = baselines.single_effects(objective, "keep").ravel()
    np.testing.assert_allclose(single, [kept[frozenset({c})] for c in range(n)], atol=tol)
    assert _set(baselines.topk(objective, 3, direction="keep")) == frozenset(np.argsort(-single)[:3].tolist())
    # random: its effect is the kept effect of the subset it returns
    mask, effect = baselines.random_best(objective, 3, 20, seed=1, with_effect=True, direction="keep")
    assert effect == pytest.approx(kept[_set(mask)], abs=tol)
    # a real search in that direction: the patch direction's sets are worse kept at some size
    patch_best = baselines.exhaustive(objective, 4)
    assert any(kept[_set(m)] < best[size] - 1e-4 for size, m in enumerate(patch_best, 1))


def test_keep_direction_attributions(objective):
    """AtP keep: the gradient of IE(all) − IE(1 − z) at z = 0 (a finite difference at every head patched), not the
    patch direction's gradient at no head patched."""
    scores = attribution_patching(objective, "keep").ravel()
    ones = np.ones(objective.n_components, np.float32)
    eps = 1e-2
    steps = ones[None] - eps * np.eye(objective.n_components, dtype=np.float32)
    effects = objective.evaluate_masks(np.concatenate([ones[None], steps]).reshape(-1, *objective.shape))
    np.testing.assert_allclose(scores, (effects[0] - effects[1:]) / eps, atol=2e-2 * np.abs(scores).max())
    assert not np.allclose(scores, attribution_patching(objective).ravel())


def test_swap_search_ends_where_no_exchange_improves(objective, kept):
    """From the worst kept set of each size, swap search over every outsider ends on a set of at most its budget
    that no exchange of one member (nor, below the budget, addition of one component) improves, by brute force
    over every subset; at budget 1 the best single head. With 2 candidates a round tries only the ranking's 2 best
    outsiders."""
    n, tol = objective.n_components, 1e-5
    ranking = np.random.default_rng(0).permutation(n).reshape(objective.shape).astype(np.float32)
    for k in (1, 2, 3):
        worst = min((s for s in kept if len(s) == k), key=kept.get)
        start = np.isin(np.arange(n), list(worst)).reshape(objective.shape)
        mask, effect = swap_search(objective, start, ranking, k, "keep", candidates=n, rounds=100)
        found = _set(mask)
        assert len(found) <= k and effect == pytest.approx(kept[found], abs=tol) and effect > kept[worst]
        neighbours = [found - {i} | {j} for i in found for j in set(range(n)) - found]
        neighbours += [found | {j} for j in set(range(n)) - found] if len(found) < k else []
        assert max(kept[s] for s in neighbours) <= effect + tol, k
        if k == 1:
            assert effect == pytest.approx(max(v for s, v in kept.items() if len(s) == 1), abs=tol)
    start = np.isin(np.arange(n), list(worst)).reshape(objective.shape)  # size 3
    outsiders = [j for j in np.argsort(-ranking, axis=None) if j not in worst][:2]
    mask, effect = swap_search(objective, start, ranking, 3, "keep", candidates=2, rounds=1)
    tried = [worst - {i} | {j} for i in worst for j in outsiders]
    assert effect == pytest.approx(max(kept[worst], *(kept[s] for s in tried)), abs=tol)
    assert _set(mask) in [worst, *tried]


def test_signed_ranking_keeps_faithfulness_nearest_one(objective, kept):
    """At each size the block added since the last size splits between the two orders where f (brute force over
    every kept subset, each complement patched as its own mask) is nearest 1, ties to the fewest taken against;
    those score negative; by score the order is the ranking's without them."""
    n, rng = objective.n_components, np.random.default_rng(1)
    ranking, against = (rng.permutation(n).reshape(objective.shape).astype(np.float32) for _ in range(2))
    sizes = [1, 4, 6]
    scores = signed_ranking(objective, ranking, against, sizes, splits=n).ravel()
    f = {s: v / kept[frozenset(range(n))] for s, v in kept.items()}
    by_ranking, by_against = (list(np.argsort(-r, axis=None, kind="stable")) for r in (ranking, against))
    order, negative = [], set()
    for k in sizes:
        blocks = []
        for b in range(k - len(order) + 1):
            taken_against = [i for i in by_against if i not in order][:b]
            rest = [i for i in by_ranking if i not in order and i not in taken_against][: k - len(order) - b]
            blocks.append((rest, taken_against))
        distance = [abs(1 - f[frozenset(order + rest + taken)]) for rest, taken in blocks]
        rest, taken = blocks[distance.index(min(distance))]
        assert min(distance) <= distance[0] + 1e-9  # never further from 1 than the ranking alone
        order += rest + taken
        negative |= set(taken)
        assert set(np.argsort(-np.abs(scores), kind="stable")[:k]) == set(order), k
    assert set(np.flatnonzero(scores < 0)) == negative
    positive = [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0]
    assert positive == [i for i in by_ranking if i not in negative]
    assert sorted(np.abs(scores).tolist()) == list(range(1, n + 1))


def test_runs_against_the_behaviour_share_the_program_with_the_sign_flipped(objective):
    """A run against the behaviour is a sweepable field: one compiled step for both senses, whose data term is the
    other's negated at the same gates; budgeted runs against it come back as `BudgetedRuns.against`."""
    runs = Runs.of(objective, [SearchConfig(epochs=1, direction="keep", budget=2, sense=sense)
                               for sense in ("for", "against")])
    step, _ = training_step(objective, runs)
    state = initial_state(objective, runs)
    batch, cache = stacked_inputs(objective, [objective.batcher.in_order[0]] * 2)
    inputs = run_inputs(objective, runs.configs, 0, np.full(2, data_scale(objective, runs.config)[0], np.float32))
    _, stats = step(objective.batcher.replicate(SearchState(state.z, state.opt_state)), objective.params, batch,
                    cache, objective.batcher.replicate(inputs))
    assert float(stats.metric[1]) == pytest.approx(-float(stats.metric[0]), rel=1e-6) and float(stats.metric[0]) != 0
    objective = objective.fresh()  # its compilations counted from here
    result = run_budgets(objective, SearchConfig(epochs=2, direction="keep"), [1, 2], against=True)
    assert objective.programs.traces["training_step"] == 1  # four runs, both senses
    assert result.against is not None and result.against.budgets == [1, 2]
    assert all(r.config.sense == "against" for r in result.against.results)
    assert all(1 <= mask.sum() <= k for k, mask in result.against.circuits.items())
    warm = Runs.of(objective, [SearchConfig(direction="keep", warm_start="atp", sense=sense)
                               for sense in ("for", "against")])
    scores = attribution_scores(objective, "atp", direction="keep")
    np.testing.assert_array_equal(starting_gates(objective, warm), [warm_start_z(scores), warm_start_z(-scores)])
    with pytest.raises(ValueError, match="--sense"):
        SearchConfig(sense="sideways")
    with pytest.raises(ValueError, match="for the behaviour"):
        compare_run(objective, SearchConfig(sense="against"), CurveConfig(sizes=(1,), mib=()), progress=False)


def test_compare_runs_and_records_the_keep_direction(objective, kept, tmp_path):
    config = CurveConfig(sizes=(1, 2, 4), n_lambdas=1, samples=3, ig_steps=2, mib=())
    assert config.direction == "keep"
    result = compare_run(objective, SearchConfig(epochs=1), config, out=tmp_path / "cmp", progress=False)
    curve = json.loads((tmp_path / "cmp" / "curve.json").read_text())
    assert curve["direction"] == "keep" and result.direction == "keep"
    identity = json.loads((tmp_path / "cmp" / "run.json").read_text())["identity"]["settings"]
    assert identity["curve"]["direction"] == "keep" and identity["search"]["direction"] == "keep"
    assert "Direction: keep" in (tmp_path / "cmp" / "report.md").read_text()
    effect_all = result.effect_all
    for name in result.columns:  # every circuit's effect is its kept effect; its faithfulness that over IE(all)
        for size, (mask, effect) in result.results[name].circuits.items():
            assert effect == pytest.approx(kept[_set(mask)], abs=1e-5), (name, size)
            assert result.circuit_faithfulness[(name, size)] == pytest.approx(effect / effect_all, abs=1e-5)
    greedy = [_set(m) for m, _ in greedy_path(objective, 4, direction="keep")]
    assert [_set(result.results["greedy"].circuits[k][0]) for k in (1, 2, 4)] == [greedy[0], greedy[1], greedy[3]]
    assert {run["size"] for run in curve["pgbct_runs"]} and curve["pgbct_budgets"] == [1, 4]

    # MIB's exact scoring of every ranking beside jaxtrace's variant, and the budgeted circuits as MIB's
    # multiple-circuits submission: 8 components, so MIB's sizes int(p·8) are 0 up to 10 %, then 1 and 4
    exact = curve["faithfulness"]["mib"]
    for name, of in result.ranking_of.items():
        alone = mib_score(objective, result.rankings[of])
        assert exact[name]["sizes"] == [0] * 7 + [1, 4, 8] and exact[name]["signed"][:7] == [0.0] * 7
        assert exact[name]["cpr"] == pytest.approx(alone.cpr, abs=1e-5), name
        assert exact[name]["cmd"] == pytest.approx(alone.cmd, abs=1e-5), name
    budgets = result.results["pgbct_budgets"].circuits  # budget 1 swapped (--swap-max 8) to the best single head
    assert budgets[1][1] == pytest.approx(max(v for s, v in kept.items() if len(s) == 1), abs=1e-5)
    f = [0.0] * 7 + [max(result.circuit_faithfulness[("pgbct_budgets", size)] for size in budgets if size <= k)
                     for k in (1, 4)]
    x, y = MIB_FRACTIONS, [*f, 1.0]  # the full model appended at 1.0
    by_hand = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(9))
    assert curve["faithfulness"]["mib_circuits"]["pgbct_budgets"]["cpr"] == pytest.approx(by_hand)
    assert "multiple-circuits submission" in (tmp_path / "cmp" / "report.md").read_text()
    with pytest.raises(ValueError, match="--direction"):
        CurveConfig(direction="sideways")
    with pytest.raises(ValueError, match="--swap-max must be >= 0"):
        CurveConfig(swap_max=-1)
    parsed = build_parser().parse_args(["compare", "--task", "winobias", "--out", "x", "--direction", "patch"])
    assert getattr(parsed, "CurveConfig.direction") == "patch" and not hasattr(parsed, "SearchConfig.direction")
    assert getattr(parsed, "CurveConfig.signed") is True
    parsed = build_parser().parse_args(["compare", "--task", "winobias", "--out", "x", "--no-signed"])
    assert getattr(parsed, "CurveConfig.signed") is False


@pytest.mark.slow  # the CLI end to end, about a minute
def test_trace_budgets_end_to_end_resume_and_refusals(tiny_gpt2, objective, tmp_path, capsys):
    """One circuit per budget from one compiled program, each of at most its budget, and the merged ranking; the
    CLI run resumes to more epochs and refuses a resume into another budget list or direction, naming the field."""
    objective = objective.fresh()  # its compilations counted from here
    result = trace_budgets(objective, SearchConfig(epochs=2, lambda1=0.0, direction="keep"), "mib", progress=False)
    assert result.budgets == [1, 4, 8] and objective.programs.traces["training_step"] == 1
    for k, circuit in result.circuits.items():
        assert 1 <= circuit.n_selected <= k and circuit.search["budget"] == k
    assert sorted(result.ranking.ravel().tolist()) == list(range(1, 9))
    np.testing.assert_allclose(result.faithfulness, 1 - np.asarray(result.complement) / result.effect_all)

    folder, _, _ = tiny_gpt2
    out = tmp_path / "budgets"
    common = ["trace", "--model", str(folder), "--task", "winobias", "--data", str(DATA), "--site", "head_out",
              "--direction", "keep", "--no-progress", "--out", str(out)]
    assert main([*common, "--budgets", "1,2,5", "--epochs", "1"]) == 0
    saved = json.loads((out / "budgets.json").read_text())
    assert saved["budgets"] == [1, 2, 5] and saved["direction"] == "keep" and len(saved["ranking"]) == 2
    for entry in saved["circuits"]:
        circuit = json.loads((out / entry["file"]).read_text())
        assert circuit["n_selected"] == entry["n_selected"] <= entry["budget"] and len(circuit["history"]) == 1
        assert circuit["search"]["lambda1"] == 0.0  # no L1 penalty by default: the budget bounds the size
    assert (out / "log.csv").read_text().startswith("budget,run,") and (out / "ranking.png").stat().st_size > 0
    assert "budget 5:" in capsys.readouterr().out
    assert main([*common, "--budgets", "1,2,5", "--epochs", "2", "--resume"]) == 0  # one more epoch
    circuit = json.loads((out / "circuits" / "budget_5.json").read_text())
    assert [row["epoch"] for row in circuit["history"]] == [1, 2]
    for changed, field in ((["--budgets", "1,2"], "settings.budgets"),
                           (["--budgets", "1,2,5", "--direction", "patch"], "settings.direction")):
        assert main([*common, *changed, "--epochs", "2", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "cannot resume" in err and field in err, err
    assert main([*common, "--budgets", "1,9", "--epochs", "1", "--overwrite"]) == 2
    assert "--budgets: sizes between 1 and the 8 components" in capsys.readouterr().err
    assert main([*common, "--budgets", "1,2", "--target-size", "2"]) == 2
    assert "--budgets and --target-size" in capsys.readouterr().err
