"""Metrics as a public interface: built-ins against plain computations, and a user metric against its built-in."""

import jax
import numpy as np
import pytest

from jaxtrace.core.metrics import ACCURACY, KL_DIVERGENCE, LOGIT_DIFFERENCE, METRICS, Metric, check_transform
from jaxtrace.core.intervention import Intervention
from jaxtrace.core.models import pure
from jaxtrace.core.records import Tokens
from jaxtrace.engine.objective import build_objective
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import run_search
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED


@pytest.fixture(scope="module")
def task(tiny_gpt2):
    _, _, tokenizer = tiny_gpt2
    return encode_pairs(load_pairs("professions", SHARED / "data")[:48], tokenizer)


def _gated_outputs(model, task, z):
    """Plain per-pair computation of the gated and ungated next-token log-probs [N, V] at each pair's first target
    position, via the public model API (one jitted forward per pair)."""
    lm, params = pure(model)

    @jax.jit
    def outputs(ids, mask, cf_ids, cf_mask, where):
        _, source = lm.capture(params, Tokens(cf_ids, cf_mask), ("mlp_out",))
        gated = lm.logits(params, Tokens(ids, mask), Intervention({"mlp_out": z}, source, where))
        return jax.nn.log_softmax(gated, -1)[0], jax.nn.log_softmax(lm.logits(params, Tokens(ids, mask)), -1)[0]

    gated, base = [], []
    for i in range(len(task)):
        arrays = task.arrays
        logp, clean = outputs(arrays.ids[i, :1], arrays.mask[i, :1], arrays.cf_ids[i: i + 1],
                              arrays.cf_mask[i: i + 1], arrays.gate_mask[i: i + 1] > 0)
        pos = arrays.target_pos[i, 0, 0]
        gated.append(np.asarray(logp[pos]))
        base.append(np.asarray(clean[pos]))
    return np.stack(gated), np.stack(base)


def test_accuracy_and_kl_match_plain_python(tiny_gpt2, task):
    _, model, _ = tiny_gpt2
    z = np.random.RandomState(0).uniform(size=(2, 32)).astype(np.float32)
    accuracy = build_objective(model, task, "mlp_out", batch_size=16, metric="accuracy").effects(z)
    kl = build_objective(model, task, "mlp_out", batch_size=16, metric="kl_divergence").effects(z)
    hits, kls = [], []
    for pair, ids, gated, base in zip(task.pairs, task.arrays.target_ids, *_gated_outputs(model, task, z)):
        wanted = ids[1 if pair.sign > 0 else 0, 0]
        hits.append(float(np.argmax(gated) == wanted))
        kls.append(float(np.sum(np.exp(base) * (base - gated))))
    np.testing.assert_array_equal(accuracy, hits)
    np.testing.assert_allclose(kl, kls, atol=1e-5)
    assert np.all(kl >= -1e-6)


def test_user_metric_gives_the_builtin_circuit(tiny_gpt2, task):
    _, model, _ = tiny_gpt2

    def logit_difference(gated, base, pairs):
        delta = lambda out: out.targets[:, 1] - out.targets[:, 0]  # noqa: E731
        return pairs.sign * (delta(gated) - delta(base))

    mine = Metric("mine", logit_difference)
    config = SearchConfig(epochs=2, lambda1=0.01, lambda2=0.01, transform="neg")
    builtin = run_search(build_objective(model, task, "mlp_out", batch_size=16, metric=LOGIT_DIFFERENCE), config)
    custom = run_search(build_objective(model, task, "mlp_out", batch_size=16, metric=mine), config)
    np.testing.assert_array_equal(custom.mask, builtin.mask)
    np.testing.assert_allclose(custom.z, builtin.z, atol=1e-6)


def test_accuracy_trains_on_its_surrogate_and_transforms_are_checked(tiny_gpt2, task):
    _, model, _ = tiny_gpt2
    assert ACCURACY.trained is LOGIT_DIFFERENCE and KL_DIVERGENCE.trained is KL_DIVERGENCE
    with pytest.raises(ValueError, match="needs a ratio metric"):
        check_transform("inverse", ACCURACY)
    assert check_transform("inverse", METRICS["probability_ratio"]) == "inverse"
    objective = build_objective(model, task, "mlp_out", batch_size=16, metric="accuracy")
    result = run_search(objective, SearchConfig(epochs=1, transform="neg"))
    assert set(np.unique(objective.effects(result.mask.astype(np.float32)))) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown metric"):
        build_objective(model, task, "mlp_out", metric="bleu")
