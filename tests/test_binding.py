"""Variable binding: generated prompts, the combined head + MLP-block site, and accuracy against PyTorch hooks."""

import re
from collections import Counter

import numpy as np
import pytest

from jaxtrace.core.intervention import Intervention
from jaxtrace.core.sites import expand_gates, gate_shape
from jaxtrace.engine.objective import build_objective
from jaxtrace.core.search import SearchConfig
from jaxtrace.engine.loop import run_search
from jaxtrace.tasks import encode_pairs, load_binding
from jaxtrace.runs.common import Provenance, summarize

PROMPT = re.compile(r"x = (\d+)\ny = (\d+)\nx ([+-]) y = $")


def _parse(prompt: str) -> tuple[int, int, str]:
    x, y, op = PROMPT.fullmatch(prompt).groups()
    return int(x), int(y), op


def _answer(x: int, y: int, op: str) -> int:
    return x + y if op == "+" else x - y


def test_binding_prompts_are_balanced_and_answers_correct():
    pairs = load_binding(operands=(10, 99), per_digit=5)
    assert len(pairs) == 90
    counts = Counter((pair.keep, pair.targets[0][0]) for pair in pairs)
    assert counts == {(keep, digit): 5 for keep in (False, True) for digit in "123456789"}
    for pair in pairs:
        (x, y, op), (x_cf, y_cf, op_cf) = _parse(pair.base), _parse(pair.counterfactual)
        assert all(10 <= v <= 99 for v in (x, y, x_cf, y_cf))
        assert pair.targets == (str(_answer(x, y, op)), str(_answer(x_cf, y_cf, op_cf)))
        assert pair.targets[0][0] != pair.targets[1][0] and min(map(int, pair.targets)) >= 0
        if pair.keep:  # task switch: the operator flips, the operands stay
            assert (x_cf, y_cf, op_cf) == (x, y, "-" if op == "+" else "+")
        else:  # value switch: x changes (same digit count), the rest stays
            assert (y_cf, op_cf) == (y, op) and x_cf != x and len(str(x_cf)) == len(str(x))
    assert load_binding(per_digit=5) == pairs  # seeded
    assert load_binding(per_digit=5, seed=7) != pairs
    small = load_binding(operands=(1, 9), per_digit=2, desiderata=("value",))
    assert len(small) == 18 and not any(p.keep for p in small)
    with pytest.raises(ValueError, match="widen --operands"):
        load_binding(operands=(0, 0))


@pytest.fixture(scope="module")
def binding_task(tiny_gpt2):
    _, _, tokenizer = tiny_gpt2
    return encode_pairs(load_binding(per_digit=2), tokenizer, positions="last")


def test_heads_mlp_accuracy_and_logit_difference_match_torch_hooks(tiny_gpt2, binding_task):
    """Accuracy and logit difference of a random head + MLP-block mask at the last token, against a plain count
    over an independent PyTorch forward with hooks."""
    import torch
    from transformers import GPT2LMHeadModel

    from torch_reference import gated

    folder, model, tokenizer = tiny_gpt2
    task = binding_task
    assert len(task) == 36 and not task.skipped
    n_layers, width = gate_shape(model.config, "heads_mlp")
    z = (np.random.RandomState(1).uniform(size=(n_layers, width)) > 0.5).astype(np.float32)
    accuracy = build_objective(model, task, "heads_mlp", batch_size=16, metric="accuracy").effects(z)
    logit_difference = build_objective(model, task, "heads_mlp", batch_size=16, metric="logit_difference").effects(z)

    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    d_model = hf.config.n_embd
    gates = {"head_out": torch.tensor(z[:, :-1]), "mlp_out": torch.tensor(np.repeat(z[:, -1:], d_model, 1))}
    hits, changes = [], []
    with torch.no_grad():
        for i, pair in enumerate(task.pairs):
            base_ids = torch.tensor([tokenizer(pair.base)["input_ids"]])
            cf_ids = torch.tensor([tokenizer(pair.counterfactual)["input_ids"]])
            acts = {}
            for name, ids in (("base", base_ids), ("cf", cf_ids)):
                with gated(hf, capture=("head_out", "mlp_out")) as captured:
                    logits = hf(ids).logits[0, -1]
                acts[name] = {site: torch.stack(v) for site, v in captured.items()}
                if name == "base":
                    base_logp = torch.log_softmax(logits, -1)
            # The source is the base run with the counterfactual's last token: mixing everywhere then only
            # changes the last position (earlier positions never see it).
            source = {site: torch.cat([acts["base"][site][:, :, :-1], acts["cf"][site][:, :, -1:]], 2)
                      for site in gates}
            with gated(hf, gates, source):
                logp = torch.log_softmax(hf(base_ids).logits[0, -1], -1)
            t0, t1 = (task.arrays.target_ids[i, k, 0] for k in (0, 1))
            hits.append(float(int(logp.argmax()) == (t0 if pair.keep else t1)))
            change = float((logp[t1] - logp[t0]) - (base_logp[t1] - base_logp[t0]))
            changes.append(-change**2 if pair.keep else change)
    np.testing.assert_array_equal(accuracy, hits)
    single_token = task.arrays.target_valid[:, :, 1:].sum((1, 2)) == 0  # multi-token answers average their tokens
    assert single_token.sum() >= 30
    np.testing.assert_allclose(logit_difference[single_token], np.array(changes)[single_token], atol=1e-4)


def test_heads_mlp_search_cache_and_circuit_names(tiny_gpt2, binding_task):
    _, model, _ = tiny_gpt2
    cached = build_objective(model, binding_task, "heads_mlp", batch_size=16, metric="accuracy")
    uncached = build_objective(model, binding_task, "heads_mlp", batch_size=16, metric="accuracy", cache=False)
    z = np.random.RandomState(2).uniform(size=cached.shape).astype(np.float32)
    np.testing.assert_array_equal(cached.effects(z), uncached.effects(z))
    expanded = expand_gates(model.config, "heads_mlp", z)
    assert expanded["head_out"].shape == (2, 4) and expanded["mlp_out"].shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(expanded["mlp_out"])[:, 7], z[:, 4])

    result = run_search(cached, SearchConfig(epochs=1, transform="neg", lambda1=0.0, lambda2=0.0))
    assert result.z.shape == (2, 5)
    mask = np.zeros((2, 5), bool)
    mask[1, 4] = mask[0, 2] = True
    circuit = summarize(cached, mask, result.z, Provenance(), "pgbct", {}, [], 0.0, 0.1, 0.2)
    assert circuit.selected_names == ["L0.H2", "L1.MLP"]
    with pytest.raises(ValueError, match="invariance pairs"):
        build_objective(model, binding_task, "heads_mlp", metric="probability_ratio")
    with pytest.raises(ValueError, match="expand_gates"):
        model(binding_task.arrays.ids[:1, 0], Intervention({"heads_mlp": z}, {"heads_mlp": z}))
