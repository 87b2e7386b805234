"""Batched mask evaluation, the baselines against plain-Python re-implementations, and vmapped λ sweeps."""

import dataclasses
import itertools
import json

import numpy as np
import pytest

from jaxtrace.runs import baselines
from jaxtrace.runs.model_sweep import model_slugs
from jaxtrace.cli import main
from jaxtrace.engine.objective import build_objective, masks_per_chunk
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import find_target_size, run_search, run_searches
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

DATA = SHARED / "data"


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny GPT-2 on 40 WinoBias pairs (signs flipped so that patching helps: see test_pgbct)."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:40], tokenizer)
    return build_objective(model, task.replace_arrays(sign=-task.arrays.sign), "attn_pattern", batch_size=16)


def _mean_effect(objective, flat_indices):
    mask = np.zeros(objective.n_components, np.float32)
    mask[list(flat_indices)] = 1.0
    return float(objective.effects(mask.reshape(objective.shape)).mean())


def test_vmapped_evaluation_equals_loop_and_chunks_agree(objective):
    rng = np.random.RandomState(0)
    masks = np.concatenate([(rng.uniform(size=(5, 2, 4)) > 0.5), rng.uniform(size=(4, 2, 4))]).astype(np.float32)
    np.testing.assert_allclose(objective.evaluate_masks(masks),
                               [objective.effects(mask).mean() for mask in masks], atol=1e-6)
    # Per pair, batched and single matmuls sum in different orders: float32 round-off of log-probs near -10.
    batched = objective.mask_effects(masks)
    looped = np.stack([objective.effects(mask) for mask in masks])
    np.testing.assert_allclose(batched, looped, atol=1e-5)
    assert masks_per_chunk(objective, 9) == 9
    tiny_budget = objective.replace(memory_budget=1)  # forces one mask per chunk
    assert masks_per_chunk(tiny_budget, 9) == 1
    np.testing.assert_allclose(tiny_budget.evaluate_masks(masks), objective.evaluate_masks(masks), atol=1e-6)
    np.testing.assert_allclose(tiny_budget.mask_effects(masks), batched, atol=1e-5)
    assert masks_per_chunk(objective.replace(memory_budget=3 * (2 << 20)), 9) < 9  # chunk sizes follow the budget


def test_single_and_topk_match_plain_python(objective):
    single = baselines.single_effects(objective)
    plain = np.array([_mean_effect(objective, [i]) for i in range(8)]).reshape(2, 4)
    np.testing.assert_allclose(single, plain, atol=1e-6)
    for k in (1, 3, 5):
        expected = sorted(range(8), key=lambda i: -plain.ravel()[i])[:k]
        assert sorted(np.flatnonzero(baselines.topk(objective, k, single))) == sorted(expected)


def test_greedy_matches_plain_python(objective):
    path = baselines.greedy(objective, 4)
    chosen = []
    for size in range(1, 5):
        remaining = [i for i in range(8) if i not in chosen]
        chosen.append(max(remaining, key=lambda i: _mean_effect(objective, chosen + [i])))
        assert sorted(np.flatnonzero(path[size - 1])) == sorted(chosen)


def test_exhaustive_matches_itertools_and_refuses_large(objective):
    best = baselines.exhaustive(objective, 3)
    for size, mask in enumerate(best, start=1):
        effects = {c: _mean_effect(objective, c) for c in itertools.combinations(range(8), size)}
        assert _mean_effect(objective, np.flatnonzero(mask)) == pytest.approx(max(effects.values()), abs=1e-7)
    assert baselines.count_subsets(8, 3) == 8 + 28 + 56
    with pytest.raises(ValueError, match="92 masks, over the limit of 50"):
        baselines.exhaustive(objective, 3, max_masks=50)


def test_random_best_is_seeded_and_best_of_its_draws(objective):
    first = baselines.random_best(objective, 3, n_samples=10, seed=5)
    assert np.array_equal(first, baselines.random_best(objective, 3, n_samples=10, seed=5))
    rng = np.random.default_rng(5)
    draws = [rng.choice(8, size=3, replace=False) for _ in range(10)]
    best = max(_mean_effect(objective, d) for d in draws)
    assert first.sum() == 3 and _mean_effect(objective, np.flatnonzero(first)) == pytest.approx(best, abs=1e-7)


def test_pgbct_near_exhaustive_optimum(objective):
    """With metric -IE PGB-CT optimises the mean effect itself; accepted gap: >= 90% of the best at its size."""
    config = SearchConfig(epochs=10, lambda1=0.01, lambda2=0.01, transform="neg")
    result = run_search(objective, config)
    size = int(result.mask.sum())
    assert 0 < size < 8
    best = max(_mean_effect(objective, c) for c in itertools.combinations(range(8), size))
    found = _mean_effect(objective, np.flatnonzero(result.mask))
    print(f"PGB-CT size {size}: mean effect {found:.4f}, exhaustive best {best:.4f}")
    assert found >= 0.9 * best


def test_sweep_equals_separate_runs(objective):
    base = SearchConfig(epochs=3, lambda1=0.01, lambda2=0.01)
    configs = [base.replace(lambda1=l1, seed=seed) for l1, seed in ((0.0, 42), (0.05, 42), (0.5, 7))]
    swept = run_searches(objective, configs)
    for config, result in zip(configs, swept):
        alone = run_search(objective, config)
        np.testing.assert_allclose(result.z, alone.z, atol=1e-5)
        assert np.array_equal(result.mask, alone.mask)
        assert [h.effect for h in result.history] == pytest.approx([h.effect for h in alone.history], abs=1e-6)
    with pytest.raises(ValueError, match="differ only in"):
        run_searches(objective, [base, base.replace(lr=0.3)])


def test_target_size(objective):
    best, runs = find_target_size(objective, SearchConfig(epochs=3, lambda1=0.01, lambda2=0.01), 3,
                                  n_lambdas=4)
    sizes = [int(r.mask.sum()) for r in runs]
    assert int(best.mask.sum()) == min(sizes, key=lambda s: abs(s - 3))
    assert len(runs) in (4, 8)


@pytest.mark.slow  # the CLI end to end, about a minute
def test_baseline_and_compare_cli(tiny_gpt2, tmp_path, capsys):
    folder, _, _ = tiny_gpt2
    common = ["--model", str(folder), "--task", "winogender", "--data", str(DATA), "--site", "head_out"]
    assert main(["baseline", *common, "--method", "single", "--k", "2", "--out", str(tmp_path / "single")]) == 0
    circuit = json.loads((tmp_path / "single" / "circuit.json").read_text())
    assert circuit["method"] == "single" and circuit["n_selected"] == 2 and len(circuit["single_effects"]) == 2
    assert (tmp_path / "single" / "single_effects.png").stat().st_size > 0
    assert main(["baseline", *common, "--method", "greedy", "--k", "2", "--out", str(tmp_path / "greedy")]) == 0
    greedy = json.loads((tmp_path / "greedy" / "circuit.json").read_text())
    assert greedy["method"] == "greedy" and greedy["n_selected"] == 2 and greedy["status"] == "ok"
    assert main(["compare", *common, "--sizes", "1,2,4", "--n-lambdas", "2", "--epochs", "2", "--samples", "5",
                 "--ig-steps", "2", "--mib", "pgbct,greedy", "--direction", "patch", "--no-progress",
                 "--out", str(tmp_path / "cmp")]) == 0
    curve = json.loads((tmp_path / "cmp" / "curve.json").read_text())
    assert curve["direction"] == "patch"  # as the baselines above
    assert {1, 2, 4} <= {row["size"] for row in curve["rows"]} and set(curve["seconds"]) == {
        "pgbct", "pgbct_budgets", "greedy", "topk", "random"}
    assert (tmp_path / "cmp" / "curve.png").stat().st_size > 0
    assert "| size | pgbct | pgbct_budgets | greedy | topk | random |" in (tmp_path / "cmp" / "curve.md").read_text()
    # the evaluation report: every method timed, every ranking's curves, every circuit's faithfulness
    assert set(curve["method_seconds"]) == {"pgbct", "pgbct_budgets", "greedy", "topk", "random", "single", "atp",
                                            "ig"}
    faith = curve["faithfulness"]
    assert faith["sizes"] == [max(1, int(p * 8)) for p in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)]
    assert set(faith["curves"]) == {"pgbct", "pgbct_budgets", "greedy", "topk", "single", "atp", "ig"}
    assert curve["pgbct_budgets"] == [1, 4]  # MIB's sizes of the 8 heads below 100 %, one circuit each
    assert faith["curves"]["topk"] == faith["curves"]["single"]
    for name, c in faith["curves"].items():
        assert c["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4) and c["share"][-1] == pytest.approx(1.0, abs=1e-5)
        assert c["cpr"] == pytest.approx(sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(
            c["fractions"], c["fractions"][1:], c["faithfulness"], c["faithfulness"][1:])))
    row = {r["size"]: r for r in curve["rows"]}[2]
    assert row["atp"] is not None and row["ig"] is not None
    f_row = {r["size"]: r for r in curve["faithfulness_rows"]}[2]
    assert all(f_row[name] is not None for name in ("greedy", "topk", "random", "atp", "ig"))
    # greedy's ranking starts with its order of addition
    ranking = np.asarray(curve["rankings"]["greedy"])
    assert sorted(np.argsort(-ranking, axis=None)[:2]) == sorted(4 * layer + head for layer, head in greedy["selected"])
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "![effect against circuit size](curve.png)" in report and "(faithfulness.png)" in report
    assert (tmp_path / "cmp" / "faithfulness.png").stat().st_size > 0
    slug = model_slugs([str(folder)])[str(folder)]
    assert "task winogender has no MIB name" in report and f"model {slug} has no MIB name" in report
    for method in ("pgbct", "greedy"):  # importances alone; fixed circuits in their own folder (MIB's layout)
        scored = tmp_path / "cmp" / "mib" / f"{method}_patching_node" / f"winogender_{slug}"
        fixed = tmp_path / "cmp" / "mib" / f"{method}-circuits_patching_node" / f"winogender_{slug}"
        assert [p.name for p in scored.iterdir()] == ["importances.json"]
        assert sorted(p.name for p in fixed.iterdir()) == sorted(f"circuit_{p:g}.json" for p in faith["fractions"]
                                                                 if p <= 0.5)
        scores = np.asarray(curve["rankings"][method])
        graph = json.loads((scored / "importances.json").read_text())
        assert graph["jaxtrace"]["ranking"][1][2] == pytest.approx(scores[1, 2])
        node_scores = [node["score"] for name, node in graph["nodes"].items() if name != "logits"]
        assert len(node_scores) == len(set(node_scores)) == 11  # input, 8 heads, 2 MLP blocks: distinct scores
        half = json.loads((fixed / "circuit_0.5.json").read_text())
        in_graph = {name for name, node in half["nodes"].items() if node["in_graph"]}
        order = np.argsort(-scores, axis=None, kind="stable")  # the MLP blocks rank as zeros, before negatives
        names = [f"a{i // 4}.h{i % 4}" for i in order if scores.flat[i] >= 0] + ["m0", "m1"] + [
            f"a{i // 4}.h{i % 4}" for i in order if scores.flat[i] < 0]
        assert in_graph == {"input", "logits", *names[:4]}  # int(0.5 · 11) = 5 nodes, input first


def test_greedy_restricted_to_candidates(objective):
    pool = np.array([0, 5, 6])
    path = baselines.greedy(objective, 2, candidates=pool)
    assert set(np.flatnonzero(path[-1])) <= set(pool)
    best_first = max(pool, key=lambda i: _mean_effect(objective, [i]))
    assert np.flatnonzero(path[0]).tolist() == [best_first]
    with pytest.raises(ValueError, match="between 1 and 3"):
        baselines.greedy(objective, 4, candidates=pool)


def test_evaluation_starts_above_the_ungated_layers(tiny_gpt2, tmp_path, monkeypatch):
    """Masks sorted by their lowest layer that is not all 0 (or, a keep-direction circuit's complement, not all 1)
    run the layers below once per call, clean (patched), and give the effects of evaluating each mask from the
    embeddings (a 4-layer model: starts at layers 0-3); chunks mix start layers (a chunk of both runs starts at 0),
    so only the last chunk is padded. Masks near a circuit (`near`: a greedy round's) start where they differ from
    it, from its run."""
    import jaxtrace
    from conftest import build_hf_model
    from jaxtrace.engine import objective as engine
    from jaxtrace.engine.objective import mask_effects, start_layers

    _, _, tokenizer = tiny_gpt2
    build_hf_model("gpt2", n_layer=4, vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = jaxtrace.load_model(tmp_path)[0]
    task = encode_pairs(load_pairs("winobias", DATA, split="dev")[:24], tokenizer)
    objective = build_objective(model, task, "head_out", batch_size=16)
    rng = np.random.RandomState(0)
    clean = (rng.uniform(size=(12, 4, 4)) < 0.4).astype(np.float32)
    clean[:, :, 0], clean[:, :, 1] = 1.0, 0.0  # no layer all 0 or all 1 ...
    for i, mask in enumerate(clean):
        mask[: i % 4] = 0.0  # ... but those below i % 4
    masks = np.concatenate([clean, 1.0 - clean[:8]])  # 8 complements: every gate 1 below layer i % 4
    starts, patched = start_layers(objective, masks)
    assert starts.tolist() == [0, 1, 2, 3] * 5 and patched.tolist() == [False] * 12 + [False, True, True, True] * 2
    expected = [objective.effects(m) for m in masks]
    np.testing.assert_allclose(mask_effects(objective, masks), expected, atol=1e-5)
    np.testing.assert_allclose(mask_effects(objective.replace(memory_budget=1), masks), expected, atol=1e-5)  # 1 mask a call

    calls = []  # (start layer, the reference run's gates if from one, masks evaluated) of every call
    programs, program = objective.programs, objective.programs.mask_effects

    def counted(start=0):
        def call(params, chunk, batch, cache, *reference):
            calls.append((start, None if not reference or reference[0] is None else np.asarray(reference[0]),
                          len(chunk)))
            return program(start)(params, chunk, batch, cache, *reference)
        return call

    monkeypatch.setattr(programs, "mask_effects", counted)
    monkeypatch.setattr(engine, "masks_per_chunk", lambda objective, n: 5)
    np.testing.assert_allclose(mask_effects(objective, masks), expected, atol=1e-5)
    # patched-run starts 3, 3, 2, 2, 1 | 1 and clean-run 0, 0, 0, 0 | 0, 1, 1, 1, 2 | 2, 2, 3, 3, 3: 4 calls a batch
    assert [(start, None if run is None else run.min(), n) for start, run, n in calls] == \
        2 * [(1, 1.0, 5), (0, None, 5), (0, None, 5), (2, None, 5)]

    # Near a circuit (a greedy round, keep direction): each of its one-component extensions starts at that
    # component's layer from the circuit's run; IE(all) (every gate 1) differs from it at layer 0.
    circuit = np.zeros((4, 4), np.float32)
    circuit[[0, 2], [1, 3]] = 1.0
    extensions = np.repeat(circuit[None], 10, axis=0)
    flat = [i for i in range(16) if not circuit.ravel()[i]][:10]
    extensions.reshape(10, -1)[np.arange(10), flat] = 1.0
    from_embeddings = engine.circuit_effects(objective.replace(cache=None), extensions, "keep")
    calls.clear()
    near = engine.circuit_effects(objective, extensions, "keep", near=circuit)
    np.testing.assert_allclose(near, from_embeddings, atol=1e-5)
    starts, referenced = start_layers(objective, np.concatenate([1 - extensions, np.ones((1, 4, 4))]), 1 - circuit)
    assert starts.tolist() == [f // 4 for f in flat] + [0] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0]
    assert referenced.tolist() == (starts > 0).tolist()
    # the circuit's run from 2, 2, 2, 1, 1 | both runs 1, 1, 0, 0, 0 | the clean run 0: 3 calls a batch
    assert [(start, None if run is None else run.tolist(), n) for start, run, n in calls] == \
        2 * [(1, (1 - circuit).tolist(), 5), (0, None, 5), (0, None, 5)]
