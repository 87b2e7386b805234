"""Typed records passed between the layers: frozen dataclasses registered as pytrees (every field a child), so they
go through `jax.jit`, `vmap` and `device_put` whole. The same records hold host (numpy) or device arrays; a batch
built for a mesh carries a leading group axis G on every leaf, a stacked batch of R runs a leading R before it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


def record(cls):
    """A frozen dataclass registered as a pytree whose children are all its fields."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@record
class TaskArrays:
    """N aligned pairs with Y targets each, right-padded with the task's pad id. Row (i, y) of `ids` is base prompt i
    followed by target y without its last token; the logits at `target_pos` predict `target_ids`."""

    index: np.ndarray         # [N] int32, the pair's position in the task (seeds its noise)
    cf_ids: np.ndarray        # [N, P] int32
    cf_mask: np.ndarray       # [N, P] int32
    ids: np.ndarray           # [N, Y, T] int32
    mask: np.ndarray          # [N, Y, T] int32
    target_ids: np.ndarray    # [N, Y, U] int32
    target_pos: np.ndarray    # [N, Y, U] int32
    target_valid: np.ndarray  # [N, Y, U] float32
    sign: np.ndarray          # [N] float32
    keep: np.ndarray          # [N] float32, 1 for invariance pairs (the intervention should keep targets[0])
    gate_mask: np.ndarray     # [N, T] float32, 1 where gates apply
    noise_mask: np.ndarray    # [N, P] float32, 1 where noise corrupts the counterfactual's embeddings


@record
class PairArrays:
    """The per-pair arrays of a batch of B pairs (padding slots repeat the first pair with weight 0)."""

    index: np.ndarray         # [B] int32, the pair's position in the task (seeds its noise)
    prompt_ids: np.ndarray    # [B, P] int32, base prompts
    cf_ids: np.ndarray        # [B, P] int32, counterfactual prompts
    cf_mask: np.ndarray       # [B, P] int32, 1 on real prompt tokens
    noise_mask: np.ndarray    # [B, P] float32, 1 where noise corrupts the counterfactual's embeddings
    target_ids: np.ndarray    # [B, Y, U] int32
    target_valid: np.ndarray  # [B, Y, U] float32, 1 on real target tokens
    sign: np.ndarray          # [B] float32, ±1
    keep: np.ndarray          # [B] float32, 1 for invariance pairs
    weight: np.ndarray        # [B] float32, 1 for real pairs, 0 for padding slots


@record
class PackedRows:
    """B pairs packed into W rows of S tokens and E prefix slots (see `jaxtrace.core.packing`)."""

    tokens: np.ndarray            # [W, S] int32
    positions: np.ndarray         # [W, S] int32, position ids
    pair: np.ndarray              # [W, S] int32, slot of the pair in the batch (-1: padding)
    branch: np.ndarray            # [W, S] int32, 0 prompt, y + 1 continuation of target y
    gate: np.ndarray              # [W, S] float32, 1 where gates apply
    memory_pair: np.ndarray       # [W, E] int32, pair slot of each prefix slot (-1: empty)
    memory_positions: np.ndarray  # [W, E] int32, position of the prefix token it holds
    logit_index: np.ndarray       # [Q] int32, flat indices into W * S where logits are needed
    target_slot: np.ndarray       # [B, Y, U] int32, the logit row predicting each target token
    last_slot: np.ndarray         # [B] int32, the logit row of each pair's last prompt token


@record
class Batch:
    """What one step or one evaluation call reads: the pairs' arrays and their packed rows."""

    pairs: PairArrays
    rows: PackedRows


@record
class KeysValues:
    """Attention keys and values (after RoPE) of tokens that no gate changes: [L, B, X, K, Dh] each in a forward,
    pair-major [B, L, X, K, Dh] inside a `Cache`."""

    keys: np.ndarray
    values: np.ndarray


@record
class Outputs:
    """What a metric reads of one forward of the base prompts."""

    targets: np.ndarray        # [B, Y] mean log-probability of each target's tokens after the prompt
    last: np.ndarray | None    # [B, V] next-token log-probabilities at the last prompt token (None if unused)


@record
class Cache:
    """The z-independent terms of a set of pairs, pair-major (leading B or N axis), computed once per task:
    counterfactual sources {model site: [B, L, ...]}, shared-prefix keys and values ([B, L, X, K, Dh], None when no
    pair shares a prefix) and the ungated outputs."""

    sources: dict
    prefix: KeysValues | None
    base: Outputs

    def take(self, index: np.ndarray) -> Cache:
        """The cache of the pairs at `index` (any shape, e.g. [G, B]), on the host."""
        return jax.tree.map(lambda a: np.asarray(a)[index], self)


@record
class Tokens:
    """What a forward reads: token ids [B, T]; `mask` [B, T] (1 = real token, causal attention) or [B, T, E + T]
    (which keys each query sees, for packed rows whose E memory slots come first; None: every token real);
    `positions` [B, T] position ids (None: 0..T-1); `noise` [B, T, D] added to the input embeddings (None: none)."""

    ids: np.ndarray
    mask: np.ndarray | None = None
    positions: np.ndarray | None = None
    noise: np.ndarray | None = None


@record
class Memory:
    """Cached tokens every query may attend to before its own row's keys (a packed row's shared prefixes): keys and
    values [L, B, E, K, Dh] after RoPE, and their positions [B, E]."""

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
