"""Gate sites: the places where a gated forward mixes live and source activations.

At every site the forward computes `live + z * (source - live)` (= `(1 - z) * live + z * source`, written so that
z = 0, or a source equal to the live activation, gives the live value bit for bit). Gates carry a leading layer axis.

| site          | gate shape      | captured source shape   | what is mixed                                          |
|---------------|-----------------|-------------------------|--------------------------------------------------------|
| attn_pattern  | [L, H]          | [L, B, H, T, T]         | post-softmax attention probabilities of a query head  |
| head_out      | [L, H]          | [L, B, T, H, Dh]        | a head's output before the output projection          |
| mlp_out       | [L, D]          | [L, B, T, D]            | the MLP block's output, per residual dimension        |
| mlp_hidden    | [L, D_ff]       | [L, B, T, D_ff]         | the MLP's intermediate neurons (input of the down proj)|

H counts query heads (GQA models share values within a KV group). For `attn_pattern` the position restriction
applies to query rows.

A component set combines model sites under one gate array, for searches over mixed components:

| set        | gate shape  | expands to                                                                    |
|------------|-------------|-------------------------------------------------------------------------------|
| heads_mlp  | [L, H + 1]  | `head_out` gates z[:, :H] and `mlp_out` gates z[:, H] broadcast over D          |

The model's forward takes model-site gates only; `expand_gates` turns a component set's gates into them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxtrace.models.config import ModelConfig

Gates = Mapping[str, jax.Array]        # site -> [L, N]
Activations = Mapping[str, jax.Array]  # site -> [L, B, ...]

MODEL_SITES: dict[str, str] = {
    "attn_pattern": "post-softmax attention probabilities per query head",
    "head_out": "per-head attention output before the output projection",
    "mlp_out": "MLP block output, one gate per residual dimension",
    "mlp_hidden": "MLP intermediate neurons",
}
# Sites that can be captured but not gated: each layer's attention keys and values [B, T, KV, Dh] after RoPE.
CAPTURE_ONLY_SITES: dict[str, str] = {"attn_keys": "attention keys after RoPE", "attn_values": "attention values"}
COMPONENT_SETS: dict[str, tuple[str, ...]] = {"heads_mlp": ("head_out", "mlp_out")}
SITES: dict[str, str] = {
    **MODEL_SITES,
    "heads_mlp": "one gate per attention head (head_out) and one per whole MLP block (mlp_out), per layer",
}
HEAD_SITES = ("attn_pattern", "head_out")


def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; known sites: {', '.join(SITES)}")
    return site


def model_sites(site: str) -> tuple[str, ...]:
    """The model sites a site or component set gates."""
    return COMPONENT_SETS.get(check_site(site), (site,))


def gate_shape(config: ModelConfig, site: str) -> tuple[int, int]:
    """[L, N]: layers by components per layer."""
    width = {
        "attn_pattern": config.n_heads,
        "head_out": config.n_heads,
        "mlp_out": config.d_model,
        "mlp_hidden": config.d_ff,
        "heads_mlp": config.n_heads + 1,
    }[check_site(site)]
    return config.n_layers, width


def expand_gates(config: ModelConfig, site: str, z: jax.Array) -> dict[str, jax.Array]:
    """Model-site gates {site: [L, N_site]} of gates z [L, N] at a site or component set."""
    if site == "heads_mlp":
        heads = config.n_heads
        return {"head_out": z[:, :heads], "mlp_out": jnp.broadcast_to(z[:, heads:], (config.n_layers, config.d_model))}
    return {site: z}


def component_names(config: ModelConfig, site: str) -> list[str]:
    """[L * N] readable component names in flat order, e.g. "L3.H7", "L3.MLP", "L3.N120"."""
    n_layers, width = gate_shape(config, site)
    def name(layer: int, index: int) -> str:
        if site in HEAD_SITES or (site == "heads_mlp" and index < config.n_heads):
            return f"L{layer}.H{index}"
        return f"L{layer}.MLP" if site == "heads_mlp" else f"L{layer}.N{index}"
    return [name(layer, index) for layer in range(n_layers) for index in range(width)]


def full_gates(config: ModelConfig, sites, value: float = 0.0, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Gates of constant `value` for each site."""
    return {site: jnp.full(gate_shape(config, site), value, dtype) for site in sites}


def check_gates(config: ModelConfig, gates: Gates | None, source: Activations | None) -> None:
    """Raise a clear error when gates and source do not match the model or each other."""
    if not gates:
        return
    for site, gate in gates.items():
        if site not in MODEL_SITES:
            raise ValueError(f"the forward takes gates at model sites ({', '.join(MODEL_SITES)}), got {site!r}; "
                             "expand a component set's gates with expand_gates")
        expected = gate_shape(config, site)
        if tuple(gate.shape) != expected:
            raise ValueError(f"gate for {site!r} has shape {tuple(gate.shape)}, "
                             f"expected {expected} [layers, components]")
        if source is None or site not in source:
            raise ValueError(f"gates at {site!r} need a source activation for that site (see Model.capture)")
        if source[site].shape[0] != config.n_layers:
            raise ValueError(f"source for {site!r} has {source[site].shape[0]} layers, the model {config.n_layers}")
