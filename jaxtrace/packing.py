"""Packed batches: each pair's base prompt once, followed by its targets' continuations, several pairs to a row.

Gates touch prompt tokens only, so the K targets of a pair can share one gated prompt. Row (i, k) of
`EncodedTask.ids` is prompt_i + target_k[:-1]; a packed row holds prompt_i, then every continuation target_k[:-1],
each continuation seeing the prompt and itself, then the next pair. Pairs are placed first-fit-decreasing into rows
of a fixed width, so padding is paid per row instead of per pair and per target.

Token t sees token u iff both belong to the same pair, pos(u) <= pos(t), and u is a prompt token or in t's
continuation. Logits are computed only where a target token is predicted: at the last prompt token (every target's
first token) and at every continuation token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.tasks import EncodedTask

PACKED_KEYS = ("tokens", "positions", "pair", "branch", "gate", "logit_index", "target_slot", "last_slot")


class Packer:
    """Packs batches of a task's pairs into rows of `width` tokens; the row count is rounded up to a multiple of
    `row_multiple` (e.g. the number of devices the rows are split over)."""

    def __init__(self, task: EncodedTask, batch_size: int, width: int | None = None, row_multiple: int = 1):
        self.task, self.batch_size, self.row_multiple = task, batch_size, row_multiple
        self.prompt_len = task.cf_mask.sum(1).astype(np.int64)                        # [N]
        self.cont_len = task.mask.sum(2).astype(np.int64) - self.prompt_len[:, None]  # [N, K]
        self.pair_len = self.prompt_len + self.cont_len.sum(1)                         # [N]
        longest, mean = int(self.pair_len.max()), float(self.pair_len.mean())
        self.width = width or 8 * math.ceil(max(longest, 4 * mean) / 8)
        if self.width < longest:
            raise ValueError(f"packed rows of {self.width} tokens cannot hold the longest pair ({longest} tokens)")

    def _place(self, idx: np.ndarray) -> tuple[list[tuple[int, int]], int]:
        """First-fit decreasing: (row, offset) of each pair in `idx`, and the number of rows used."""
        free: list[int] = []
        placed = [(0, 0)] * len(idx)
        for slot in sorted(range(len(idx)), key=lambda s: -self.pair_len[idx[s]]):
            length = self.pair_len[idx[slot]]
            row = next((r for r, room in enumerate(free) if room >= length), len(free))
            if row == len(free):
                free.append(self.width)
            placed[slot] = (row, self.width - free[row])
            free[row] -= length
        return placed, len(free)

    def sizes(self, idx: np.ndarray) -> tuple[int, int]:
        """(rows, logit positions) that `pack(idx)` needs: rows a multiple of `row_multiple`, logits of 8."""
        rows = self._place(idx)[1]
        logits = len(idx) + int(self.cont_len[idx].sum())
        return self.row_multiple * math.ceil(rows / self.row_multiple), 8 * math.ceil(logits / 8)

    def pack(self, idx: np.ndarray, rows: int | None = None, n_logits: int | None = None) -> dict[str, np.ndarray]:
        """Packed arrays of pairs `idx` (at most `batch_size`; slots past them repeat slot 0's targets).

        tokens, positions, pair (slot in the batch, -1 = padding), branch (0 = prompt, k + 1 = continuation of
        target k), gate (1 where gates apply): [R, S]; logit_index [Q]: flat indices into R * S of the positions
        whose logits are needed; target_slot [B, K, M]: the logit row predicting each target token; last_slot [B]:
        the logit row of each pair's last prompt token.
        """
        task, width = self.task, self.width
        placed, _ = self._place(idx)
        min_rows, min_logits = self.sizes(idx)
        rows, n_logits = max(rows or 0, min_rows), max(n_logits or 0, min_logits)
        _, n_targets, n_tokens = task.target_ids.shape
        out = {
            "tokens": np.full((rows, width), task.pad_id, np.int32),
            "positions": np.zeros((rows, width), np.int32),
            "pair": np.full((rows, width), -1, np.int32),
            "branch": np.zeros((rows, width), np.int32),
            "gate": np.zeros((rows, width), np.float32),
            "logit_index": np.zeros(n_logits, np.int32),
            "target_slot": np.zeros((self.batch_size, n_targets, n_tokens), np.int32),
            "last_slot": np.zeros(self.batch_size, np.int32),
        }
        n_used = 0
        for slot, (i, (row, start)) in enumerate(zip(idx, placed)):
            prompt = self.prompt_len[i]
            stop = start + prompt
            out["tokens"][row, start:stop] = task.ids[i, 0, :prompt]
            out["positions"][row, start:stop] = np.arange(prompt)
            out["pair"][row, start:stop] = slot
            out["gate"][row, start:stop] = task.gate_mask[i, :prompt]
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
        return out


def visibility(batch: dict[str, jax.Array]) -> jax.Array:
    """[R, S, S] bool: which keys each packed token attends to (same pair, causal, prompt or own continuation)."""
    pair, branch, pos = batch["pair"], batch["branch"], batch["positions"]
    same_pair = (pair[:, :, None] == pair[:, None, :]) & (pair[:, :, None] >= 0)
    causal = pos[:, None, :] <= pos[:, :, None]
    shared = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return same_pair & causal & shared


def pack_source(site: str, source: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-pair prompt activations [L, B, P, ...] ([L, B, H, P, P] for attn_pattern) -> packed [L, R, S, ...].

    Only prompt tokens are gated; elsewhere the packed source holds some pair's value, which a zero gate weight
    leaves unused. Attention patterns are placed block-diagonally (zero between different pairs' tokens).
    """
    n_prompt = source.shape[-1] if site == "attn_pattern" else source.shape[2]
    pair = jnp.maximum(batch["pair"], 0)
    pos = jnp.minimum(batch["positions"], n_prompt - 1)
    if site != "attn_pattern":
        return source[:, pair, pos]
    prompt = (batch["branch"] == 0) & (batch["pair"] >= 0)
    block = prompt[:, :, None] & prompt[:, None, :] & (batch["pair"][:, :, None] == batch["pair"][:, None, :])
    gathered = source[:, pair[:, :, None], :, pos[:, :, None], pos[:, None, :]]  # [R, S, S, L, H]
    return jnp.where(block[..., None, None], gathered, 0.0).transpose(3, 0, 4, 1, 2)
