"""Factual recall: the CounterFact loader, subject positions, seeded embedding noise, and the one-target effect."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace.core import objective as core
from jaxtrace.core.intervention import Intervention
from jaxtrace.core.records import Tokens
from jaxtrace.engine.objective import build_objective
from jaxtrace.core.search import SearchConfig
from jaxtrace.tasks import load_counterfact
from jaxtrace.tasks.encode import subject_span
from jaxtrace.runs.trace import trace
from jaxtrace.tasks import build_task

RECORDS = [
    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                         "target_true": {"str": "French"}, "target_new": {"str": "English"}}},
    {"case_id": 1, "requested_rewrite": {"prompt": "{}, that was created by", "subject": "Toko Yasuda",
                                         "target_true": {"str": "Sony"}, "target_new": {"str": "Nokia"}}},
    {"case_id": 2, "requested_rewrite": {"prompt": "{} is a citizen of", "subject": "Autonomous University of Madrid",
                                         "target_true": {"str": "Spain"}, "target_new": {"str": "Sweden"}}},
    {"case_id": 3, "requested_rewrite": {"prompt": "The headquarter of {} is located in", "subject": "Monell",
                                         "target_true": {"str": "Philadelphia"}, "target_new": {"str": "Rome"}}},
]


@pytest.fixture(scope="module")
def counterfact_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cf") / "counterfact.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_loader_reads_the_public_schema(counterfact_file, tmp_path):
    pairs = load_counterfact(counterfact_file)
    assert [p.base for p in pairs][:2] == ["The mother tongue of Danielle Darrieux is",
                                          "Toko Yasuda, that was created by"]
    assert pairs[0].targets == (" French",) and pairs[0].subject == "Danielle Darrieux" and pairs[0].label == "0"
    assert all(p.counterfactual == p.base for p in pairs)
    assert len(load_counterfact(counterfact_file.parent, limit=2)) == 2
    assert load_counterfact(counterfact_file, leading_space=False)[0].targets == ("French",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"requested_rewrite": {"prompt": "{} is"}}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        load_counterfact(bad)
    with pytest.raises(FileNotFoundError, match="counterfact.json"):
        load_counterfact(tmp_path)


def test_subject_positions_cover_multi_token_subjects(tiny_gpt2, counterfact_file):
    _, _, tokenizer = tiny_gpt2
    for pair in load_counterfact(counterfact_file):
        ids = tokenizer(pair.base)["input_ids"]
        start, stop = subject_span(tokenizer, ids, pair.base, pair.subject)
        assert tokenizer.decode(ids[start:stop]).strip() == pair.subject
    task = build_task("counterfact", counterfact_file, tokenizer, positions="subject", noise_on="subject")
    ids = tokenizer("The mother tongue of Danielle Darrieux is")["input_ids"]
    gated = np.flatnonzero(task.arrays.gate_mask[0])
    assert tokenizer.decode([ids[i] for i in gated]).strip() == "Danielle Darrieux" and len(gated) >= 3
    np.testing.assert_array_equal(task.arrays.noise_mask[0, : len(ids)], task.arrays.gate_mask[0, : len(ids)])
    last = build_task("counterfact", counterfact_file, tokenizer, positions="last")
    assert np.flatnonzero(last.arrays.gate_mask[0]).tolist() == [len(ids) - 1]


def test_pairs_without_subject_are_skipped(tiny_gpt2):
    from conftest import SHARED
    _, _, tokenizer = tiny_gpt2
    with pytest.raises(ValueError, match="no pair survives.*names no subject"):
        build_task("winogender", SHARED / "data", tokenizer, positions="subject")


def test_noise_is_seeded_fixed_and_placed(tiny_gpt2, counterfact_file):
    _, model, tokenizer = tiny_gpt2
    task = build_task("counterfact", counterfact_file, tokenizer, noise_on="subject", noise_scale=3.0)
    first = build_objective(model, task, "mlp_out", batch_size=4)
    again = build_objective(model, task, "mlp_out", batch_size=4)
    pairs = first.batcher.batch(np.arange(4)).pairs
    group = lambda pairs: jax.tree.map(lambda a: a[0], pairs)  # noqa: E731  group 0: the whole batch on one device
    noise = np.asarray(core.noise(first.spec, group(pairs)))
    np.testing.assert_array_equal(noise, np.asarray(core.noise(again.spec, group(pairs))))
    reordered = first.batcher.batch(np.array([2, 0, 3, 1])).pairs
    np.testing.assert_array_equal(np.asarray(core.noise(first.spec, group(reordered)))[1], noise[0])  # per pair
    assert np.all((noise != 0).any(-1) == (task.arrays.noise_mask > 0))
    embed_std = float(jnp.std(model.embed_tokens[...]))
    assert first.spec.noise_std == pytest.approx(3.0 * embed_std)
    assert np.std(noise[task.arrays.noise_mask > 0]) == pytest.approx(first.spec.noise_std, rel=0.1)
    other = build_task("counterfact", counterfact_file, tokenizer, noise_std=0.5, noise_seed=1)
    assert build_objective(model, other, "mlp_out").spec.noise_std == 0.5


def test_one_target_effect_is_clean_over_gated_probability(tiny_gpt2, counterfact_file):
    _, model, tokenizer = tiny_gpt2
    task = build_task("counterfact", counterfact_file, tokenizer)
    objective = build_objective(model, task, "mlp_out", batch_size=4)
    ones = np.ones((2, 32), np.float32)
    effects = objective.effects(ones)
    assert np.all(objective.effects(0 * ones) == 0)
    pairs = jax.tree.map(lambda a: a[0], objective.batcher.batch(np.arange(4)).pairs)
    _, source = model.capture(Tokens(pairs.cf_ids, pairs.cf_mask, noise=core.noise(objective.spec, pairs)),
                              ("mlp_out",))
    for i in range(4):
        ids, valid = task.arrays.ids[i, 0], task.arrays.target_valid[i, 0] > 0
        pos, tok = task.arrays.target_pos[i, 0][valid], task.arrays.target_ids[i, 0][valid]
        clean = jax.nn.log_softmax(model(ids[None]), -1)[0, pos, tok].mean()
        row_source = {"mlp_out": source["mlp_out"][:, i: i + 1]}
        intervention = Intervention({"mlp_out": ones}, row_source, task.arrays.gate_mask[i][None] > 0)
        gated = jax.nn.log_softmax(model(ids[None], intervention), -1)[0, pos, tok].mean()
        assert effects[i] == pytest.approx(float(jnp.exp(clean - gated)) - 1, rel=1e-4, abs=1e-6)


def test_counterfact_trace_resumes_with_identical_noise(tiny_gpt2, counterfact_file, tmp_path):
    _, model, tokenizer = tiny_gpt2
    task = build_task("counterfact", counterfact_file, tokenizer)
    config = SearchConfig(epochs=3, lambda1=0.01, lambda2=0.01)
    run = functools.partial(trace, model, task, "mlp_out", batch_size=2, progress=False)
    full = run(config, out=tmp_path / "full")
    run(config.replace(epochs=1), out=tmp_path / "part")
    resumed = run(config, out=tmp_path / "part", resume=True)
    np.testing.assert_array_equal(np.asarray(resumed.z), np.asarray(full.z))
