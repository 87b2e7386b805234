"""`info`: what a model is, what it predicts, and how fast its gated step runs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.core.intervention import Capture, Intervention
from jaxtrace.core.models import GatedLM, pure
from jaxtrace.core.records import Tokens
from jaxtrace.core.sites import SITES, full_gates, gate_shape


def model_summary(model: GatedLM, name: str) -> str:
    c = model.config
    return "\n".join([
        f"model      {name}: {c.model_type} ({c.family} family), {c.n_params / 1e6:.1f}M parameters, {c.dtype}",
        f"shape      {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} query / {c.n_kv_heads} KV heads of "
        f"{c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}",
        "gate sites " + ", ".join(f"{s} {list(gate_shape(c, s))}" for s in SITES),
    ])


def next_tokens(model: GatedLM, tokenizer, prompt: str, top: int = 5) -> str:
    """The prompt's most likely next tokens, and logit(' he') - logit(' she')."""
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    logits = np.asarray(model(ids))[0, -1]
    best = np.argsort(logits)[::-1][:top]
    he, she = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" he", " she"))
    return (f"prompt     {prompt!r} -> next tokens "
            + ", ".join(f"{tokenizer.decode([int(t)])!r} {logits[t]:.2f}" for t in best)
            + f"\n           logit(' he') - logit(' she') = {logits[he] - logits[she]:+.3f}")


def time_gated_step(model: GatedLM, site: str = "attn_pattern", batch: int = 32, length: int = 16,
                    steps: int = 3) -> tuple[float, float]:
    """(compile seconds, median step seconds) of a jitted gated forward+backward w.r.t. one site's gates."""
    lm, params = pure(model)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, length)))
    source_ids = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, length)))
    _, source = jax.jit(lambda p, x: lm.capture(p, Tokens(x), Capture((site,))))(params, source_ids)

    @jax.jit
    def step(gates, params, ids, source):
        def loss(gates):
            logits = lm.logits(params, Tokens(ids), Intervention(gates, source))
            return jax.nn.log_softmax(logits[:, -1]).mean()
        return jax.value_and_grad(loss)(gates)

    gates = full_gates(model.config, [site], 0.5)
    start = time.perf_counter()
    compiled = step.lower(gates, params, ids, source).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(gates, params, ids, source))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))
