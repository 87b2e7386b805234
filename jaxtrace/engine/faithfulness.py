"""Faithfulness of circuits and rankings, in both directions, on PGB-CT's objective; as the MIB circuit-localization
track (Mueller et al. 2025, `MIB_circuit_track/evaluation.py`) scores them.

With IE(S) the objective's mean effect of patching the components S from the counterfactual (`evaluate_masks`) and
A every component:

- effect share  share(S) = IE(S) / IE(A): how much of the whole effect patching S alone produces (sufficiency);
- faithfulness  f(S) = 1 − IE(A \\ S) / IE(A): how much of the model's clean behaviour S keeps when everything else
  is patched (MIB's faithfulness).

Mapping to MIB. MIB keeps a circuit C clean and patches every other node from the counterfactual, m(·) being the
task metric (logit difference) averaged over examples: f(C) = (m(C) − m(∅)) / (m(N) − m(∅)), with N the whole model
(nothing patched) and ∅ the empty circuit (everything patched). jaxtrace's effect of patching T is the change of the
metric from the clean run, IE(T) = sign·(m(nothing patched) − m(T patched)) averaged over pairs for
`logit_difference` (exactly MIB's metric), so m(C) − m(∅) = IE(A) − IE(A \\ C), m(N) − m(∅) = IE(A) − IE(∅) with
IE(∅) = 0, and f(C) = 1 − IE(A \\ C) / IE(A). For other metrics f is the same formula on that metric's effect scale
(a ratio of mean effects, as MIB takes the ratio of mean metrics).

Curves of a ranking (scores [L, C], larger first; ties broken by the flat component index, `ranking_masks`): at
MIB's fractions p of the n components (`MIB_FRACTIONS`: 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 %) the circuit is
the top k(p) = max(1, int(p·n)) components: MIB's `int(pct * n_scored_items)` (floor of the float64 product), but at
least one component (MIB scores an empty circuit, f = 0: its k = 0 node circuit keeps `input`; `mib_score`
below is MIB's exact variant). Small models repeat sizes (8 components: k = 1 up to 20 %). MIB's default ranking is
signed (largest score first: CPR); the leaderboard's CMD run ranks by |score| (pass `np.abs(scores)` for that).
The areas are MIB's trapezoids over consecutive fractions on the linear fraction axis (its default, log_scale=False),
from the first fraction to the last — no point at 0 is added, so the area spans [0.001, 1]:

    CPR = Σ_i (p_{i+1} − p_i) (f_i + f_{i+1}) / 2            (area under f: larger is better)
    CMD = Σ_i (p_{i+1} − p_i) (|1 − f_i| + |1 − f_{i+1}|) / 2 (area between f and 1: smaller is better)

Every distinct mask of every curve (top-k circuits, their complements and all components) is scored in one
vmapped evaluation (`mask_effects`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxtrace.engine.objective import Objective

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def fraction_sizes(n_components: int, fractions=MIB_FRACTIONS) -> list[int]:
    """[F] circuit sizes max(1, int(p * n)) at increasing fractions p in (0, 1] of n components."""
    fractions = [float(p) for p in fractions]
    if not fractions or any(not 0 < p <= 1 for p in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions must be increasing numbers in (0, 1], got {fractions}")
    return [max(1, int(p * n_components)) for p in fractions]


def ranking_masks(scores, sizes) -> np.ndarray:
    """[F, L, C] the top-k masks of a ranking (scores [L, C], larger first, ties by flat index) at each size k."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=None, kind="stable")
    masks = np.zeros((len(sizes), scores.size), np.float32)
    for mask, k in zip(masks, sizes):
        mask[order[:k]] = 1.0
    return masks.reshape(len(sizes), *scores.shape)


def effect_share(effects, effect_all: float) -> np.ndarray:
    """IE(S) / IE(A) of circuits' effects IE(S)."""
    return np.asarray(effects, np.float64) / _nonzero(effect_all)


def faithfulness(complement_effects, effect_all: float) -> np.ndarray:
    """MIB faithfulness 1 − IE(A \\ S) / IE(A) from the effects of the circuits' complements IE(A \\ S)."""
    return 1.0 - np.asarray(complement_effects, np.float64) / _nonzero(effect_all)


def _nonzero(effect_all: float) -> float:
    if effect_all == 0 or not np.isfinite(effect_all):
        raise ValueError(f"the effect of all components is {effect_all}: effect shares and faithfulness are "
                         "undefined")
    return float(effect_all)


def trapezoid_area(fractions, values) -> float:
    """Σ (p_{i+1} − p_i)(v_i + v_{i+1}) / 2 over consecutive points (MIB's area; see the module docstring)."""
    x, y = np.asarray(fractions, np.float64), np.asarray(values, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"an area needs one value per fraction, got {x.shape} and {y.shape}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def cpr(fractions, faithfulnesses) -> float:
    """MIB's CPR: the area under the faithfulness curve."""
    return trapezoid_area(fractions, faithfulnesses)


def cmd(fractions, faithfulnesses) -> float:
    """MIB's CMD: the area between the faithfulness curve and 1."""
    return trapezoid_area(fractions, np.abs(1.0 - np.asarray(faithfulnesses, np.float64)))


def roc_auc(scores, truth) -> float:
    """ROC-AUC of scores (any shape) against a boolean ground truth of the same shape: the probability that a true
    component outscores a false one, ties counting one half (the Mann–Whitney statistic)."""
    scores, truth = np.asarray(scores, np.float64).ravel(), np.asarray(truth).ravel()
    if scores.shape != truth.shape or truth.dtype != bool:
        raise ValueError(f"roc_auc needs scores and a boolean truth of one shape, got {scores.shape} and "
                         f"{truth.shape} {truth.dtype}")
    positive, negative = scores[truth], scores[~truth]
    if not len(positive) or not len(negative):
        raise ValueError("roc_auc needs at least one true and one false component")
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(above / (len(positive) * len(negative)))


@dataclasses.dataclass(frozen=True, eq=False)
class CircuitFaithfulness:
    """Both directions for M circuits: IE(S) ("effect", [M]), IE(A \\ S) ("complement", [M]), IE(A), the effect
    shares IE(S) / IE(A) and the faithfulness 1 − IE(A \\ S) / IE(A) ([M] each)."""

    effect: np.ndarray
    complement: np.ndarray
    effect_all: float
    share: np.ndarray
    faithfulness: np.ndarray


def circuit_faithfulness(objective: Objective, masks) -> CircuitFaithfulness:
    """Both directions for circuits [M, L, C] (binary); the distinct masks among the circuits, their complements and
    all components in one `mask_effects` call."""
    masks = np.asarray(masks, np.float32)
    ones = np.ones((1, *objective.shape), np.float32)
    every = np.concatenate([masks, 1.0 - masks, ones]).reshape(2 * len(masks) + 1, -1)
    distinct, index = np.unique(every, axis=0, return_inverse=True)
    effects = objective.evaluate_masks(distinct.reshape(-1, *objective.shape))
    effects = effects.astype(np.float64)[index.reshape(-1)]
    n = len(masks)
    effect_all = float(effects[-1])
    return CircuitFaithfulness(effects[:n], effects[n: 2 * n], effect_all, effect_share(effects[:n], effect_all),
                               faithfulness(effects[n: 2 * n], effect_all))


@dataclasses.dataclass(frozen=True)
class FaithfulnessCurve:
    """Both curves of one ranking at `fractions` ([F] each) and MIB's areas of the faithfulness curve."""

    fractions: list[float]
    sizes: list[int]
    effect: list[float]        # IE(S_k) of the top-k circuits
    share: list[float]         # IE(S_k) / IE(A)
    faithfulness: list[float]  # 1 − IE(A \ S_k) / IE(A)
    cpr: float
    cmd: float


def curve_masks(rankings: dict[str, np.ndarray], sizes) -> np.ndarray:
    """[K * F, L, C] every ranking's top-k masks at the F sizes, ranking by ranking."""
    return np.concatenate([ranking_masks(scores, sizes) for scores in rankings.values()])


def ranking_curves(names, fractions, sizes, scored: CircuitFaithfulness) -> dict[str, FaithfulnessCurve]:
    """{name: curve} from a `circuit_faithfulness` result whose first K * F circuits are `curve_masks`."""
    curves = {}
    for i, name in enumerate(names):
        part = slice(i * len(sizes), (i + 1) * len(sizes))
        f = scored.faithfulness[part]
        curves[name] = FaithfulnessCurve([float(p) for p in fractions], list(sizes), scored.effect[part].tolist(),
                                         scored.share[part].tolist(), f.tolist(), cpr(fractions, f),
                                         cmd(fractions, f))
    return curves


def faithfulness_curves(objective: Objective, rankings: dict[str, np.ndarray],
                        fractions=MIB_FRACTIONS) -> tuple[dict[str, FaithfulnessCurve], float]:
    """({name: curve} of each ranking (scores [L, C]), IE(A)): every ranking's top-k circuits at the fractions'
    sizes, their complements and all components scored in one `mask_effects` call."""
    if not rankings:
        raise ValueError("faithfulness curves need at least one ranking")
    sizes = fraction_sizes(objective.n_components, fractions)
    scored = circuit_faithfulness(objective, curve_masks(rankings, sizes))
    return ranking_curves(list(rankings), fractions, sizes, scored), scored.effect_all


# MIB's scorecard exactly (`MIB_circuit_track/evaluation.py`'s `evaluate_area_under_curve`, as the leaderboard runs
# it), beside jaxtrace's own variant above ("at least one component per size"): sizes int(p·n) with 0 allowed (the
# empty circuit scores f = 0), CPR from the signed ranking (largest score first) and CMD from the absolute ranking
# (largest |score| first), trapezoids on the linear fraction axis; and MIB's multiple-circuits mode.


def mib_sizes(n_components: int, fractions=MIB_FRACTIONS) -> list[int]:
    """[F] MIB's circuit sizes int(p · n) (truncated; 0 is an empty circuit)."""
    fraction_sizes(n_components, fractions)  # checks the fractions
    return [int(float(p) * n_components) for p in fractions]


@dataclasses.dataclass(frozen=True)
class MibScore:
    """MIB's areas of one ranking: CPR over the signed ranking's curve, CMD over the absolute ranking's, and both
    curves ([F] faithfulness at MIB's sizes `sizes`)."""

    fractions: list[float]
    sizes: list[int]
    signed: list[float]
    absolute: list[float]
    cpr: float
    cmd: float


def mib_masks(scores, sizes) -> np.ndarray:
    """[2F, L, C] the circuits MIB scores a ranking (scores [L, C]) by: its top k by score, then by |score|, at each
    of MIB's sizes k (`mib_sizes`; an empty mask where k = 0)."""
    scores = np.asarray(scores, np.float64)
    return np.concatenate([ranking_masks(scores, sizes), ranking_masks(np.abs(scores), sizes)])


def mib_score_of(fractions, sizes, faithfulnesses) -> MibScore:
    """MIB's areas from the faithfulness [2F] of `mib_masks` (an empty circuit scores 0 whatever was measured)."""
    f = np.where(np.tile(np.asarray(sizes) > 0, 2), np.asarray(faithfulnesses, np.float64), 0.0)
    signed, absolute = f[: len(sizes)], f[len(sizes):]
    return MibScore([float(p) for p in fractions], list(sizes), signed.tolist(), absolute.tolist(),
                    cpr(fractions, signed), cmd(fractions, absolute))


def mib_score(objective: Objective, scores, fractions=MIB_FRACTIONS) -> MibScore:
    """MIB's CPR and CMD of a ranking (scores [L, C]) on the objective: the top int(p·n) components by score (CPR)
    and by |score| (CMD), each circuit kept clean with the rest patched, f = 0 for an empty circuit; every circuit
    in one evaluation (`circuit_faithfulness`)."""
    sizes = mib_sizes(objective.n_components, fractions)
    scored = circuit_faithfulness(objective, mib_masks(scores, sizes))
    return mib_score_of(fractions, sizes, scored.faithfulness)


def budget_faithfulness(circuit_faithfulness_by_size: Mapping[int, float], n_components: int,
                        fractions=MIB_FRACTIONS) -> list[float]:
    """The faithfulness of the fixed circuits a budgeted method submits in MIB's multiple-circuits mode: at each of
    MIB's sizes k = int(p·n) up to p = 0.5, its most faithful circuit of at most k components (any of them fits
    that budget: a larger budget's run that lands below a smaller one's circuit does not count against it), f = 0
    where k = 0 or it has none."""
    sizes = [k for p, k in zip(fractions, mib_sizes(n_components, fractions)) if p <= 0.5]
    return [max((float(f) for size, f in circuit_faithfulness_by_size.items() if 1 <= size <= k), default=0.0)
            for k in sizes]


def mib_multiple_circuits(faithfulnesses, fractions=MIB_FRACTIONS) -> tuple[float, float]:
    """(CPR, CMD) of a submission of fixed circuits (MIB's multiple-circuits mode): at most 9 circuits, ordered by
    size, whose faithfulness `faithfulnesses` lands on the fractions 0.001 ... 0.5 by rank, and the full model
    appended at 1.0 with f = 1."""
    f = [float(v) for v in faithfulnesses]
    if not 1 <= len(f) <= len(fractions) - 1:
        raise ValueError(f"MIB scores 1 to {len(fractions) - 1} fixed circuits, got {len(f)}")
    x, y = [*fractions[: len(f)], 1.0], [*f, 1.0]
    return cpr(x, y), cmd(x, y)
