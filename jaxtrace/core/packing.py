"""Packed batches: each pair's base prompt once, followed by its targets' continuations, several pairs to a row.

Gates touch prompt tokens only, so the Y targets of a pair can share one gated prompt. Row (i, y) of
`TaskArrays.ids` is prompt_i + target_y[:-1]; a packed row holds prompt_i, then every continuation target_y[:-1],
each continuation seeing the prompt and itself, then the next pair. Pairs are placed first-fit-decreasing into rows
of a fixed width, so padding is paid per row instead of per pair and per target.

Shared prefixes: where the base and counterfactual prompts agree (same tokens, no noise) up to position d, every
activation at positions < d is the same in both runs, so mixing there changes nothing and those positions do not
depend on the gates. They are not recomputed: a row keeps only each pair's tokens from d on, and reads the prefix's
keys and values (cached from the ungated base prompt) from the row's prefix slots, [W, E] next to its [W, S]
tokens.
For WinoBias (prompts differ only in the final pronoun) this halves the tokens a step computes.

Token t sees token u iff both belong to the same pair, pos(u) <= pos(t), and u is a prompt token (in memory or in
the row) or in t's continuation. Logits are computed only where a target token is predicted: at the last prompt token
(every target's first token) and at every continuation token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.core.records import KeysValues, Memory, PackedRows, TaskArrays
from jaxtrace.core.sites import REGISTRY


def shared_prefix_lengths(task: TaskArrays) -> np.ndarray:
    """[N] the number of leading prompt tokens where base and counterfactual agree (same token, no noise), at most
    the prompt length - 1 (the last prompt token is always computed: the first target is predicted there)."""
    prompt_len = task.cf_mask.sum(1).astype(np.int64)
    base = task.ids[:, 0, : task.cf_ids.shape[1]]
    differs = ((base != task.cf_ids) | (task.noise_mask > 0)) & (task.cf_mask > 0)
    first = np.where(differs.any(1), differs.argmax(1), prompt_len)
    return np.minimum(first, prompt_len - 1)


ROW_CAP = 256  # tokens: a row holds several short pairs, but does not grow past this for them


def _row_width(longest: int, mean: float) -> int:
    """Room for the longest item or four average ones, but no more than `ROW_CAP` for the average ones (a row's
    attention costs its width squared, its pairs masked apart), a multiple of 8 (0 for no items)."""
    return 8 * math.ceil(max(longest, min(4 * mean, ROW_CAP)) / 8)


class Packer:
    """Packs batches of a task's pairs (`arrays`, padded with `pad_id`) into rows of `width` tokens and
    `memory_width` prefix slots; the row count is rounded up to a multiple of `row_multiple`. With
    `share_prefix=False` every prompt token is computed (no prefix slots)."""

    def __init__(self, task: TaskArrays, pad_id: int, batch_size: int, width: int | None = None,
                 row_multiple: int = 1, share_prefix: bool = True):
        self.task, self.pad_id, self.batch_size, self.row_multiple = task, pad_id, batch_size, row_multiple
        self.prompt_len = task.cf_mask.sum(1).astype(np.int64)                        # [N]
        self.cont_len = task.mask.sum(2).astype(np.int64) - self.prompt_len[:, None]  # [N, Y]
        self.prefix_len = shared_prefix_lengths(task) if share_prefix else np.zeros(len(task.index), np.int64)  # [N]
        self.pair_len = self.prompt_len - self.prefix_len + self.cont_len.sum(1)      # [N] tokens computed
        longest, mean = int(self.pair_len.max()), float(self.pair_len.mean())
        self.width = width or _row_width(longest, mean)
        if self.width < longest:
            raise ValueError(f"packed rows of {self.width} tokens cannot hold the longest pair ({longest} tokens)")
        self.memory_width = _row_width(int(self.prefix_len.max()), float(self.prefix_len.mean()))

    def _place(self, idx: np.ndarray) -> tuple[list[tuple[int, int, int]], int]:
        """First-fit decreasing: (row, token offset, memory offset) of each pair in `idx`, and the rows used."""
        free: list[list[int]] = []  # per row: [free tokens, free memory slots]
        placed = [(0, 0, 0)] * len(idx)
        for slot in sorted(range(len(idx)), key=lambda s: -self.pair_len[idx[s]]):
            length, prefix = self.pair_len[idx[slot]], self.prefix_len[idx[slot]]
            row = next((r for r, (room, memory) in enumerate(free) if room >= length and memory >= prefix),
                       len(free))
            if row == len(free):
                free.append([self.width, self.memory_width])
            placed[slot] = (row, self.width - free[row][0], self.memory_width - free[row][1])
            free[row][0] -= length
            free[row][1] -= prefix
        return placed, len(free)

    def sizes(self, idx: np.ndarray) -> tuple[int, int]:
        """(rows, logit positions) that `pack(idx)` needs: rows a multiple of `row_multiple`, logits of 8."""
        rows = self._place(idx)[1]
        logits = len(idx) + int(self.cont_len[idx].sum())
        return self.row_multiple * math.ceil(rows / self.row_multiple), 8 * math.ceil(logits / 8)

    def pack(self, idx: np.ndarray, rows: int | None = None, n_logits: int | None = None) -> PackedRows:
        """The packed rows of pairs `idx` (at most `batch_size`; slots past them repeat slot 0's targets), with at
        least `rows` rows and `n_logits` logit positions (see `PackedRows`)."""
        task, width = self.task, self.width
        placed, _ = self._place(idx)
        min_rows, min_logits = self.sizes(idx)
        rows, n_logits = max(rows or 0, min_rows), max(n_logits or 0, min_logits)
        _, n_targets, n_tokens = task.target_ids.shape
        out = {
            "tokens": np.full((rows, width), self.pad_id, np.int32),
            "positions": np.zeros((rows, width), np.int32),
            "pair": np.full((rows, width), -1, np.int32),
            "branch": np.zeros((rows, width), np.int32),
            "gate": np.zeros((rows, width), np.float32),
            "memory_pair": np.full((rows, self.memory_width), -1, np.int32),
            "memory_positions": np.zeros((rows, self.memory_width), np.int32),
            "logit_index": np.zeros(n_logits, np.int32),
            "target_slot": np.zeros((self.batch_size, n_targets, n_tokens), np.int32),
            "last_slot": np.zeros(self.batch_size, np.int32),
        }
        n_used = 0
        for slot, (i, (row, start, memory_start)) in enumerate(zip(idx, placed)):
            prompt, prefix = self.prompt_len[i], self.prefix_len[i]
            out["memory_pair"][row, memory_start:memory_start + prefix] = slot
            out["memory_positions"][row, memory_start:memory_start + prefix] = np.arange(prefix)
            stop = start + prompt - prefix
            out["tokens"][row, start:stop] = task.ids[i, 0, prefix:prompt]
            out["positions"][row, start:stop] = np.arange(prefix, prompt)
            out["pair"][row, start:stop] = slot
            out["gate"][row, start:stop] = task.gate_mask[i, prefix:prompt]
            last = n_used
            out["logit_index"][last] = row * width + stop - 1
            out["last_slot"][slot] = last
            out["target_slot"][slot, :, 0] = last
            n_used += 1
            for k, length in enumerate(self.cont_len[i]):
                start, stop = stop, stop + length
                out["tokens"][row, start:stop] = task.ids[i, k, prompt:prompt + length]
                out["positions"][row, start:stop] = prompt + np.arange(length)
                out["pair"][row, start:stop] = slot
                out["branch"][row, start:stop] = k + 1
                out["logit_index"][n_used:n_used + length] = row * width + np.arange(start, stop)
                out["target_slot"][slot, k, 1:length + 1] = n_used + np.arange(length)
                n_used += length
        out["target_slot"][len(idx):] = out["target_slot"][0]
        out["last_slot"][len(idx):] = out["last_slot"][0]
        return PackedRows(**out)


def _keys(rows: PackedRows) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pair, position, branch) [W, E + S] of every key a packed row's tokens attend over: prefix slots, then the
    row's tokens (prefix slots hold prompt tokens, branch 0)."""
    return (jnp.concatenate([rows.memory_pair, rows.pair], 1),
            jnp.concatenate([rows.memory_positions, rows.positions], 1),
            jnp.concatenate([jnp.zeros_like(rows.memory_pair), rows.branch], 1))


def visibility(rows: PackedRows) -> jax.Array:
    """[W, S, E + S] bool: which keys (prefix slots, then row tokens) each packed token attends to (same pair,
    causal, prompt or own continuation)."""
    key_pair, key_pos, key_branch = _keys(rows)
    same_pair = (rows.pair[:, :, None] == key_pair[:, None, :]) & (rows.pair[:, :, None] >= 0)
    causal = key_pos[:, None, :] <= rows.positions[:, :, None]
    shared = (key_branch[:, None, :] == 0) | (key_branch[:, None, :] == rows.branch[:, :, None])
    return same_pair & causal & shared


def pack_memory(prefix: KeysValues, rows: PackedRows) -> Memory:
    """Per-pair prefix keys and values ([L, B, X, K, Dh] each) -> the rows' attention memory: keys and values
    [L, W, E, K, Dh], positions [W, E] (empty slots hold pair 0's first token, unseen)."""
    pair = jnp.maximum(rows.memory_pair, 0)
    pos = jnp.minimum(rows.memory_positions, prefix.keys.shape[2] - 1)
    return Memory(prefix.keys[:, pair, pos], prefix.values[:, pair, pos], rows.memory_positions)


def pack_source(site: str, source: jax.Array, rows: PackedRows) -> jax.Array:
    """Per-pair prompt activations [L, B, P, ...] ([L, B, H, P, P] for attn_pattern) -> packed [L, W, S, ...]
    ([L, W, H, S, E + S]: keys are the prefix slots, then the row's tokens).

    Only prompt tokens are gated; elsewhere the packed source holds some pair's value, which a zero gate weight
    leaves unused. Attention patterns are placed block-diagonally (zero between different pairs' tokens).
    """
    # over (query, key) pairs of tokens; `edges_input` (the edges site's embeddings) has no registry entry
    patterns = site in REGISTRY and REGISTRY[site].key_axis is not None
    n_prompt = source.shape[-1] if patterns else source.shape[2]
    pair = jnp.maximum(rows.pair, 0)
    pos = jnp.minimum(rows.positions, n_prompt - 1)
    if not patterns:
        return source[:, pair, pos]
    key_pair, key_pos, key_branch = _keys(rows)
    prompt = (rows.branch == 0) & (rows.pair >= 0)
    key_prompt = (key_branch == 0) & (key_pair >= 0)
    block = prompt[:, :, None] & key_prompt[:, None, :] & (rows.pair[:, :, None] == key_pair[:, None, :])
    key_pos = jnp.minimum(key_pos, n_prompt - 1)
    gathered = source[:, pair[:, :, None], :, pos[:, :, None], key_pos[:, None, :]]  # [W, S, E + S, L, H]
    return jnp.where(block[..., None, None], gathered, 0.0).transpose(3, 0, 4, 1, 2)
