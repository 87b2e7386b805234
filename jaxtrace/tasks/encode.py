"""Prompt pairs -> padded token arrays: the counterfactual prompts, and each base prompt followed by each target."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxtrace.tasks.data import PromptPair


@dataclasses.dataclass(frozen=True)
class EncodedTask:
    """N aligned pairs with K targets each, right-padded with the tokenizer's pad id.

    Row (i, k) of `ids` is base prompt i followed by target k without its last token; the logits at `target_pos`
    predict `target_ids`. Base and counterfactual prompts have the same length (pairs whose lengths
    differ are in `skipped`, since every site mixes position by position). Gates apply at `gate_mask` (prompt
    positions: all, the last, or the subject's). With `corruption="noise"` the counterfactual is the base prompt with
    Gaussian noise on the input embeddings at `noise_mask` (all prompt tokens, or the subject's).
    """

    pairs: tuple[PromptPair, ...]
    skipped: tuple[tuple[str, str], ...]  # (label, reason)
    corruption: str           # "prompt" (the counterfactual prompt) or "noise"
    noise: tuple[float | None, float, int]  # (absolute std or None, std as a multiple of the embeddings', seed)
    pad_id: int               # the tokenizer's pad id (else EOS) that pads every array of token ids
    index: np.ndarray         # [N] int32, the pair's position in the task (seeds its noise)
    cf_ids: np.ndarray        # [N, P] int32
    cf_mask: np.ndarray       # [N, P] int32
    ids: np.ndarray           # [N, K, T] int32
    mask: np.ndarray          # [N, K, T] int32
    target_ids: np.ndarray    # [N, K, M] int32
    target_pos: np.ndarray    # [N, K, M] int32
    target_valid: np.ndarray  # [N, K, M] float32
    sign: np.ndarray          # [N] float32
    keep: np.ndarray          # [N] float32, 1 for invariance pairs (the intervention should keep targets[0])
    gate_mask: np.ndarray     # [N, T] float32, 1 where gates apply
    noise_mask: np.ndarray    # [N, P] float32, 1 where noise corrupts the counterfactual's embeddings

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def labels(self) -> list[str]:
        return [pair.label for pair in self.pairs]

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-pair arrays, each with a leading pair axis."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("pairs", "skipped", "corruption", "noise", "pad_id")}


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, but must be a real token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer defines neither a pad nor an EOS token; set tokenizer.pad_token")


def _pad(rows: Sequence[Sequence[float]], length: int, value: float = 0, dtype=np.int32) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


POSITIONS = ("prompt", "last", "subject")
CORRUPTIONS = ("prompt", "noise")


def subject_span(tokenizer, ids: Sequence[int], text: str, subject: str) -> tuple[int, int]:
    """[start, stop) of the tokens of `ids` (the encoding of `text`) that overlap the first `subject` in `text`."""
    start_char = text.index(subject)
    stop_char = start_char + len(subject)
    ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    tokens = [i for i, (a, b) in enumerate(zip(starts, ends)) if a < stop_char and b > start_char]
    if not tokens:
        raise ValueError(f"subject {subject!r} covers no token of {text!r}")
    return tokens[0], tokens[-1] + 1


def _positions(mode: str, tokenizer, pair: PromptPair, base: list[int]) -> np.ndarray:
    """[len(base)] 0/1 over the base prompt's tokens."""
    mask = np.zeros(len(base), np.float32)
    if mode == "prompt":
        mask[:] = 1.0
    elif mode == "last":
        mask[-1] = 1.0
    else:
        if not pair.subject:
            raise ValueError("this pair names no subject")
        start, stop = subject_span(tokenizer, base, pair.base, pair.subject)
        mask[start:stop] = 1.0
    return mask


def encode_pairs(pairs: Sequence[PromptPair], tokenizer, positions: str = "prompt", corruption: str = "prompt",
                 noise_positions: str = "prompt", noise_std: float | None = None, noise_scale: float = 3.0,
                 noise_seed: int = 0) -> EncodedTask:
    """Tokenise prompts (with the tokenizer's special tokens) and targets (without), skipping pairs that cannot be
    aligned: different base and counterfactual lengths, a target with no tokens, a subject not found.

    positions: where gates apply ("prompt": every prompt token; "last"; "subject"). corruption: "prompt" (the
    counterfactual prompt) or "noise" (the base prompt with noisy embeddings at `noise_positions`, of std
    `noise_std`, else `noise_scale` x the std of the model's token embeddings, seeded per pair by `noise_seed`).
    """
    if positions not in POSITIONS or noise_positions not in ("prompt", "subject"):
        raise ValueError(f"positions must be one of {POSITIONS} (noise positions: prompt or subject)")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if not pairs:
        raise ValueError("the task has no prompt pairs")
    n_targets = {len(pair.targets) for pair in pairs}
    if len(n_targets) != 1:
        raise ValueError(f"all pairs must have the same number of targets, found {sorted(n_targets)}")
    pad = pad_id_of(tokenizer)
    kept, skipped, bases, cfs, targets, gate_rows, noise_rows = [], [], [], [], [], [], []
    for pair in pairs:
        base = tokenizer(pair.base)["input_ids"]
        cf = base if corruption == "noise" else tokenizer(pair.counterfactual)["input_ids"]
        toks = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in pair.targets]
        if len(base) != len(cf):
            skipped.append((pair.label, f"base has {len(base)} tokens, counterfactual {len(cf)}"))
            continue
        if not all(toks):
            skipped.append((pair.label, "a target encodes to no tokens"))
            continue
        try:
            gate_row = _positions(positions, tokenizer, pair, base)
            noise_row = (_positions(noise_positions, tokenizer, pair, base) if corruption == "noise"
                         else np.zeros(len(base), np.float32))
        except ValueError as error:
            skipped.append((pair.label, str(error)))
            continue
        gate_rows.append(gate_row)
        noise_rows.append(noise_row)
        kept.append(pair)
        bases.append(base)
        cfs.append(cf)
        targets.append(toks)
    if not kept:
        raise ValueError(f"no pair survives alignment ({len(skipped)} skipped, e.g. {skipped[0]})")
    rows = [base + t[:-1] for base, toks in zip(bases, targets) for t in toks]
    k = len(targets[0])
    length = max(map(len, rows))
    m = max(len(t) for toks in targets for t in toks)
    target_ids = np.full((len(kept), k, m), pad, np.int32)
    target_pos = np.zeros((len(kept), k, m), np.int32)
    target_valid = np.zeros((len(kept), k, m), np.float32)
    for i, (base, toks) in enumerate(zip(bases, targets)):
        for j, t in enumerate(toks):
            target_ids[i, j, : len(t)] = t
            target_pos[i, j, : len(t)] = len(base) - 1 + np.arange(len(t))
            target_valid[i, j, : len(t)] = 1.0
    prompt_length = max(map(len, cfs))
    return EncodedTask(
        pairs=tuple(kept),
        skipped=tuple(skipped),
        corruption=corruption,
        noise=(noise_std, noise_scale, noise_seed),
        pad_id=pad,
        index=np.arange(len(kept), dtype=np.int32),
        cf_ids=_pad(cfs, prompt_length, pad),
        cf_mask=_pad([[1] * len(c) for c in cfs], prompt_length, 0),
        ids=_pad(rows, length, pad).reshape(len(kept), k, length),
        mask=_pad([[1] * len(r) for r in rows], length, 0).reshape(len(kept), k, length),
        target_ids=target_ids,
        target_pos=target_pos,
        target_valid=target_valid,
        sign=np.array([pair.sign for pair in kept], np.float32),
        keep=np.array([pair.keep for pair in kept], np.float32),
        gate_mask=_pad(gate_rows, length, dtype=np.float32),
        noise_mask=_pad(noise_rows, prompt_length, dtype=np.float32),
    )
