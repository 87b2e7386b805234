"""Prompt pairs -> padded token arrays: the counterfactual prompts, and each base prompt followed by each target."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from jaxtrace.core.records import TaskArrays
from jaxtrace.tasks.pairs import PromptPair

if TYPE_CHECKING:
    from jaxtrace.tasks.spec import TaskSpec


@dataclasses.dataclass(frozen=True)
class Noise:
    """Seeded Gaussian noise on the counterfactual's input embeddings (the counterfactual is the base prompt): std
    `std`, else `scale` x the std of the model's token embeddings; on every prompt token or the subject's (`on`);
    drawn per pair from `seed` and the pair's index, the same in every epoch."""

    on: str = "prompt"
    std: float | None = None
    scale: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if self.on not in ("prompt", "subject"):
            raise ValueError(f"noise positions must be prompt or subject, got {self.on!r}")
        for name in ("std", "scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"noise {name} must be a finite number >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class EncodedTask:
    """A task's pairs as token arrays (`arrays`), with what is needed to read them.

    Base and counterfactual prompts have the same length (pairs whose lengths differ are in `skipped`, since every
    site mixes position by position); the data lines the loader dropped are in `dropped` (`pairs.Pairs`). Gates
    apply at `arrays.gate_mask` (prompt positions: all, the last, or the subject's). With `noise` the
    counterfactual is the base prompt with noisy input embeddings at `arrays.noise_mask`. `spec` is the `TaskSpec`
    that built it (None for pairs encoded directly with `encode_pairs`); it gives the task's `default_metric` and is
    no part of the task's digest or of a run's identity.
    """

    pairs: tuple[PromptPair, ...]
    skipped: tuple[tuple[str, str], ...]  # (label, reason): pairs that cannot be aligned
    noise: Noise | None                   # None: the counterfactual is another prompt
    pad_id: int                           # the tokenizer's pad id (else EOS) that pads every array of token ids
    arrays: TaskArrays
    dropped: tuple[tuple[str, str], ...] = ()  # ("file:lines", reason): data lines the loader left out
    spec: TaskSpec | None = dataclasses.field(default=None, compare=False, repr=False)  # what built it

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def corruption(self) -> str:
        """"prompt" (the counterfactual is another prompt) or "noise"."""
        return "prompt" if self.noise is None else "noise"

    @property
    def default_metric(self) -> str:
        """The metric the task is scored with unless told otherwise: its spec's ("probability_ratio" without one)."""
        return "probability_ratio" if self.spec is None else self.spec.default_metric

    @property
    def labels(self) -> list[str]:
        return [pair.label for pair in self.pairs]

    def replace_arrays(self, **changes) -> EncodedTask:
        """The task with some arrays replaced (e.g. `sign=-task.arrays.sign`)."""
        return dataclasses.replace(self, arrays=dataclasses.replace(self.arrays, **changes))


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


def encode_pairs(pairs: Sequence[PromptPair], tokenizer, positions: str = "prompt",
                 noise: Noise | None = None) -> EncodedTask:
    """Tokenise prompts (with the tokenizer's special tokens) and targets (without), skipping pairs that cannot be
    aligned: different base and counterfactual lengths, a target with no tokens, a subject not found. The lines the
    loader dropped (`pairs.dropped`, when `pairs` is a `pairs.Pairs`) are kept in the task's `dropped`.

    positions: where gates apply ("prompt": every prompt token; "last"; "subject"). noise: None (the counterfactual
    is the pair's counterfactual prompt) or the noise that corrupts the base prompt's embeddings instead.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if not pairs:
        raise ValueError("the task has no prompt pairs")
    n_targets = {len(pair.targets) for pair in pairs}
    if len(n_targets) != 1:
        raise ValueError(f"all pairs must have the same number of targets, found {sorted(n_targets)}")
    pad = pad_id_of(tokenizer)
    kept, skipped, bases, cfs, targets, gate_rows, noise_rows = [], [], [], [], [], [], []
    for number, pair in enumerate(pairs):
        label = pair.label or f"pair {number}"
        base = tokenizer(pair.base)["input_ids"]
        cf = base if noise is not None else tokenizer(pair.counterfactual)["input_ids"]
        toks = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in pair.targets]
        if not base:
            skipped.append((label, "the base prompt encodes to no tokens"))
            continue
        if len(base) != len(cf):
            skipped.append((label, f"base has {len(base)} tokens, counterfactual {len(cf)}"))
            continue
        if not all(toks):
            skipped.append((label, "a target encodes to no tokens"))
            continue
        try:
            gate_row = _positions(positions, tokenizer, pair, base)
            noise_row = (np.zeros(len(base), np.float32) if noise is None
                         else _positions(noise.on, tokenizer, pair, base))
        except ValueError as error:
            skipped.append((label, str(error)))
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
    n_targets = len(targets[0])
    length = max(map(len, rows))
    target_length = max(len(t) for toks in targets for t in toks)
    target_ids = np.full((len(kept), n_targets, target_length), pad, np.int32)
    target_pos = np.zeros((len(kept), n_targets, target_length), np.int32)
    target_valid = np.zeros((len(kept), n_targets, target_length), np.float32)
    for i, (base, toks) in enumerate(zip(bases, targets)):
        for j, t in enumerate(toks):
            target_ids[i, j, : len(t)] = t
            target_pos[i, j, : len(t)] = len(base) - 1 + np.arange(len(t))
            target_valid[i, j, : len(t)] = 1.0
    prompt_length = max(map(len, cfs))
    arrays = TaskArrays(
        index=np.arange(len(kept), dtype=np.int32),
        cf_ids=_pad(cfs, prompt_length, pad),
        cf_mask=_pad([[1] * len(c) for c in cfs], prompt_length, 0),
        ids=_pad(rows, length, pad).reshape(len(kept), n_targets, length),
        mask=_pad([[1] * len(r) for r in rows], length, 0).reshape(len(kept), n_targets, length),
        target_ids=target_ids,
        target_pos=target_pos,
        target_valid=target_valid,
        sign=np.array([pair.sign for pair in kept], np.float32),
        keep=np.array([pair.keep for pair in kept], np.float32),
        gate_mask=_pad(gate_rows, length, dtype=np.float32),
        noise_mask=_pad(noise_rows, prompt_length, dtype=np.float32),
    )
    return EncodedTask(pairs=tuple(kept), skipped=tuple(skipped), noise=noise, pad_id=pad, arrays=arrays,
                       dropped=tuple(getattr(pairs, "dropped", ())))
