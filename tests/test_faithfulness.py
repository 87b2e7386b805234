"""Faithfulness in both directions, MIB's fraction sizes, CPR and CMD, and ROC-AUC, against plain Python; the curves
of a ranking against one-mask-at-a-time evaluation on a tiny GPT-2."""

import numpy as np
import pytest

from jaxtrace.engine import faithfulness as F
from jaxtrace.engine import objective as engine_objective
from jaxtrace.engine.objective import build_objective
from jaxtrace.tasks import encode_pairs, load_pairs
from conftest import SHARED

MIB = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]


def mib_areas(percentages, faithfulnesses):
    """MIB's loop (`evaluate_area_under_curve`, log_scale=False), transcribed: (area_under, area_from_1)."""
    area_under, area_from_1 = 0.0, 0.0
    for i in range(len(faithfulnesses) - 1):
        x_1, x_2 = percentages[i], percentages[i + 1]
        area_from_1 += (x_2 - x_1) * ((abs(1.0 - faithfulnesses[i]) + abs(1.0 - faithfulnesses[i + 1])) / 2)
        area_under += (x_2 - x_1) * ((faithfulnesses[i] + faithfulnesses[i + 1]) / 2)
    return area_under, area_from_1


def plain_auc(scores, truth):
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_sizes_masks_areas_and_auc_match_plain_python():
    for n in (1, 8, 270, 1000, 1536, 32491):
        assert F.fraction_sizes(n) == [max(1, int(p * n)) for p in MIB]
    assert F.fraction_sizes(8) == [1] * 8 + [4, 8]
    assert F.fraction_sizes(1000)[:3] == [1, 2, 5]
    rng = np.random.RandomState(0)
    scores = rng.randint(0, 5, size=(3, 4)).astype(float)  # ties: broken by the flat index
    flat = scores.ravel().tolist()
    order = sorted(range(12), key=lambda i: (-flat[i], i))
    for k, mask in zip((1, 5, 12), F.ranking_masks(scores, [1, 5, 12])):
        assert sorted(np.flatnonzero(mask)) == sorted(order[:k])
    for _ in range(5):
        f = rng.normal(1, 2, size=10).tolist()
        under, from_1 = mib_areas(MIB, f)
        assert F.cpr(MIB, f) == pytest.approx(under, abs=1e-12)
        assert F.cmd(MIB, f) == pytest.approx(from_1, abs=1e-12)
    assert F.cpr(MIB, [1.0] * 10) == pytest.approx(0.999) and F.cmd(MIB, [1.0] * 10) == 0
    complement, effect, effect_all = np.array([0.3, -0.1, 0.0]), np.array([0.5, 1.2, 2.0]), 2.0
    assert F.faithfulness(complement, effect_all).tolist() == [1 - 0.3 / 2, 1 + 0.1 / 2, 1.0]
    assert F.effect_share(effect, effect_all).tolist() == [0.25, 0.6, 1.0]
    for _ in range(5):
        s = rng.randint(0, 4, size=9).astype(float)
        t = rng.uniform(size=9) > 0.5
        t[:2] = [True, False]
        assert F.roc_auc(s, t) == pytest.approx(plain_auc(s, t), abs=1e-12)
    assert F.roc_auc([3.0, 2.0, 0.0, 0.0], np.array([True, True, False, False])) == 1.0
    with pytest.raises(ValueError, match="at least one true and one false"):
        F.roc_auc([1.0, 2.0], np.array([True, True]))
    with pytest.raises(ValueError, match="boolean truth"):
        F.roc_auc([1.0, 2.0], np.array([1, 0]))
    with pytest.raises(ValueError, match="increasing numbers in"):
        F.fraction_sizes(8, [0.5, 0.2])
    with pytest.raises(ValueError, match="undefined"):
        F.faithfulness([0.1], 0.0)


@pytest.fixture(scope="module")
def objective(tiny_gpt2):
    """8 heads of a tiny GPT-2 on 16 WinoBias pairs, signs flipped so that patching helps."""
    _, model, tokenizer = tiny_gpt2
    task = encode_pairs(load_pairs("winobias", SHARED / "data", split="dev")[:16], tokenizer)
    return build_objective(model, task.replace_arrays(sign=-task.arrays.sign), "attn_pattern", batch_size=16)


def test_curves_match_one_mask_at_a_time(objective, monkeypatch):
    calls = []
    counted = engine_objective.mask_effects
    monkeypatch.setattr(engine_objective, "mask_effects", lambda *a, **k: calls.append(1) or counted(*a, **k))
    rankings = {"a": np.random.RandomState(1).normal(size=objective.shape), "b": np.arange(8.0).reshape(2, 4)}
    fractions = [0.125, 0.25, 0.5, 0.75, 1.0]
    curves, effect_all = F.faithfulness_curves(objective, rankings, fractions)
    assert len(calls) == 1  # every mask of both curves in one vmapped evaluation

    def mean_effect(components):
        mask = np.zeros(8, np.float32)
        mask[list(components)] = 1.0
        return float(objective.effects(mask.reshape(2, 4)).mean())

    every = mean_effect(range(8))
    assert effect_all == pytest.approx(every, abs=1e-6) and every > 0.05
    for name, scores in rankings.items():
        flat = scores.ravel().tolist()
        order = sorted(range(8), key=lambda i: (-flat[i], i))
        curve = curves[name]
        assert curve.sizes == [1, 2, 4, 6, 8]
        share = [mean_effect(order[:k]) / every for k in curve.sizes]
        f = [1 - mean_effect(order[k:]) / every for k in curve.sizes]
        np.testing.assert_allclose(curve.share, share, atol=1e-5)
        np.testing.assert_allclose(curve.faithfulness, f, atol=1e-5)
        under, from_1 = mib_areas(fractions, f)
        assert curve.cpr == pytest.approx(under, abs=1e-5) and curve.cmd == pytest.approx(from_1, abs=1e-5)
        print(f"ranking {name}: share {np.round(curve.share, 3)}, f {np.round(curve.faithfulness, 3)}, "
              f"CPR {curve.cpr:.4f}, CMD {curve.cmd:.4f}")
    circuit = np.zeros((1, 2, 4), np.float32)
    circuit[0, 0, :2] = 1
    scored = F.circuit_faithfulness(objective, circuit)
    assert scored.share[0] == pytest.approx(mean_effect([0, 1]) / every, abs=1e-5)
    assert scored.faithfulness[0] == pytest.approx(1 - mean_effect(range(2, 8)) / every, abs=1e-5)


def _mib_area_under_curve(xs, ys):
    """A plain-Python transcription of MIB's area (evaluation.py, log_scale=False): trapezoids between
    consecutive points, no point added at 0."""
    area = 0.0
    for i in range(len(xs) - 1):
        area += (xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2
    return area


def _mib_scorecard_by_hand(signed_f_by_size, absolute_f_by_size, n, fractions):
    """MIB's CPR and CMD from the faithfulness of every top-k circuit (dicts size -> f), as MIB computes them:
    size int(p * n), f = 0 for the empty circuit, CPR over the signed ranking, CMD over the absolute one."""
    sizes = [int(p * n) for p in fractions]
    signed = [0.0 if k == 0 else signed_f_by_size[k] for k in sizes]
    absolute = [0.0 if k == 0 else absolute_f_by_size[k] for k in sizes]
    return (_mib_area_under_curve(fractions, signed),
            _mib_area_under_curve(fractions, [abs(1 - f) for f in absolute]))


def test_mib_scorecard_matches_a_plain_transcription(objective):
    """Golden test: `mib_score` on a ranking with negative scores (signed and absolute rankings differ) against the
    plain-Python transcription of MIB's scoring, every circuit's faithfulness computed separately."""
    from jaxtrace.engine.faithfulness import MIB_FRACTIONS, mib_multiple_circuits, mib_score, mib_sizes

    n = objective.n_components
    scores = np.linspace(-1.0, 0.6, n).reshape(objective.shape)  # |score| ranks the negative end first
    assert mib_sizes(8, MIB_FRACTIONS) == [0, 0, 0, 0, 0, 0, 0, 1, 4, 8]
    result = mib_score(objective, scores)

    def f_of(mask):
        complement = objective.evaluate_masks((1.0 - mask)[None])[0]
        return 1.0 - complement / objective.evaluate_masks(np.ones((1, *objective.shape), np.float32))[0]

    by_hand = {}
    for name, ranking in (("signed", scores), ("absolute", np.abs(scores))):
        order = sorted(range(n), key=lambda i: (-ranking.ravel()[i], i))
        by_hand[name] = {}
        for k in range(1, n + 1):
            mask = np.zeros(n, np.float32)
            mask[order[:k]] = 1.0
            by_hand[name][k] = float(f_of(mask.reshape(objective.shape)))
    expected_cpr, expected_cmd = _mib_scorecard_by_hand(by_hand["signed"], by_hand["absolute"], n, MIB_FRACTIONS)
    assert result.cpr == pytest.approx(expected_cpr, abs=1e-5) and result.cmd == pytest.approx(expected_cmd, abs=1e-5)
    assert result.signed[0] == 0.0 and result.sizes == [int(p * n) for p in MIB_FRACTIONS]
    # multiple circuits: three circuits on 0.001, 0.002, 0.005 and the full model at 1
    f = [0.2, 0.5, 0.9]
    assert mib_multiple_circuits(f) == pytest.approx(
        (_mib_area_under_curve([0.001, 0.002, 0.005, 1.0], [*f, 1.0]),
         _mib_area_under_curve([0.001, 0.002, 0.005, 1.0], [abs(1 - v) for v in [*f, 1.0]])))
    with pytest.raises(ValueError, match="1 to 9 fixed circuits"):
        mib_multiple_circuits([0.5] * 10)
