"""PGB-CT in PyTorch on Hugging Face models, for benchmarking jaxtrace: the same objective in two forms.

Both forms reproduce jaxtrace's objective (`jaxtrace.core.objective`, `jaxtrace.core.search.pgbct`) at the
`attn_pattern` and `mlp_out` sites of GPT-2 and Llama-family models (float32, eager attention): for pair i with
targets t0, t1, score(t) = mean log p(token | prompt + previous target tokens), log_odds = score(t1) - score(t0)
(-score(t0) for one target), IE_i = exp(sign_i * (log_odds_gated - log_odds_base)) - 1; the loss of a batch is
mean_i transform(IE_i) + (λ1·Σ|z| + λ2·Σ z(1-z)) / n_components (penalty "mean"; "sum" drops the division), with
d|z|/dz = 0 at 0 (torch.abs), then Adam (torch defaults = optax.adam) and z clamped to [0, 1].

`ReferenceStyle` does what the paper's PyTorch code does, step by step: per batch it recomputes the
counterfactual activations (one padded forward over the interleaved base/counterfactual prompts, attention weights
from `output_attentions=True`, MLP outputs from forward hooks) and the base scores (Python floats); it then
replaces every attention module (or MLP) by a wrapper that calls the original, reads the live weights (and
recomputes the values V), and overwrites, example by example in a Python loop, the gated rows of each example's
prompt with `live + z * (source - live)`; candidates are scored one target at a time on right-padded batches
without an attention mask (causality alone protects the rows), one example at a time in a Python loop over full
logits; training runs under `torch.autograd.set_detect_anomaly(True)`, and `effects` (evaluation) repeats the
same per-batch procedure without gradients. (The reference's MLP scripts re-run every block by hand on the base
embeddings; wrapping each MLP gives the same forward.)

`Optimised` computes the z-independent terms once per dataset (counterfactual activations [L, N, ...] and base
log-odds [N]); a step is one batched gated forward and backward over the pairs' rows (one row per pair and target,
an explicit additive causal + padding mask), the gates applied by a registered attention function
(`AttentionInterface`, "pgbct_gated") or MLP forward hooks, vectorised over examples; scoring gathers the hidden
states at the target positions and applies the LM head there only. `compile=True` wraps the gated forward in
`torch.compile` (fixed shapes: every batch padded to `batch_size` pairs and the task's row length);
`compile="auto"` also times it against eager on the first batch and keeps the faster, with the reason in
`compile_status`.

On a model loaded in bfloat16 `Optimised` runs its forwards in bfloat16 (the cached sources too; the gates z,
Adam and the log-softmax of the target logits stay float32, the mixing weights cast to the activations' dtype):
the form `benchmarks/run.py` times against jaxtrace where torch's bfloat16 matmuls use oneDNN (AMX or
AVX512-BF16).

Where both forms deliberately follow jaxtrace rather than the reference (all of it comes from the shared
`EncodedTask`, built with `jaxtrace.build_task`, so token ids and skipped pairs are identical):
  - gates apply at the task's gate positions of the prompt only (`gate_mask`; the reference's MLP scripts mix at
    every position, padding included); target (continuation) tokens are never gated;
  - padding uses the tokenizer's pad id (else EOS), not a hard-coded 50256, and always on the right;
  - pronoun pairs are jaxtrace's (possessive examples fixed), pairs whose base and counterfactual lengths differ
    are skipped, and the effect is expm1 of the log ratio rather than (odds_int - odds_base) / odds_base;
  - the mixing is written `live + z * (source - live)` (jaxtrace's form of the reference's (1-z)·live + z·source);
  - the model's parameters are frozen (`requires_grad_(False)`): z is the only tensor with a gradient.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface

from jaxtrace.core.search import SCHEDULES
from jaxtrace.tasks import EncodedTask

SITES = ("attn_pattern", "mlp_out")
PENALTIES = ("mean", "sum")
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "inverse": lambda e: 1.0 / (1.0 + e),
    "neg": lambda e: -e,
    "neg_log": lambda e: -torch.log1p(e),
}
GATED_ATTENTION = "pgbct_gated"  # the name Optimised registers its attention function under


def _log_odds(scores: torch.Tensor) -> torch.Tensor:
    """[B] score(t1) - score(t0) for two targets, -score(t0) for one (scores [B, K])."""
    return -scores[:, 0] if scores.shape[1] == 1 else scores[:, 1] - scores[:, 0]


def _right_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]) of token rows right-padded to the longest, as a tokenizer pads."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


class _PGBCT:
    """What both forms share: the model's layout, the task as tensors, z, Adam, the loss and the epoch loop.

    model: a HF causal LM (GPT-2 or Llama family; switched to eager attention, eval mode, parameters frozen);
    task: a jaxtrace EncodedTask; site: "attn_pattern" or "mlp_out"; batch_size: pairs per step; lr (default 0.1
    for heads, 0.5 for MLP), lambda1, lambda2, schedule, penalty, transform, threshold, init: as jaxtrace's
    SearchConfig. z [L, H or D] starts at `init`.
    """

    def __init__(self, model: nn.Module, task: EncodedTask, site: str, batch_size: int = 32, lr: float | None = None,
                 lambda1: float = 0.05, lambda2: float = 0.05, schedule: str = "linear", penalty: str = "mean",
                 transform: str = "inverse", threshold: float = 0.5, init: float = 0.5):
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        if schedule not in SCHEDULES or penalty not in PENALTIES or transform not in TRANSFORMS:
            raise ValueError(f"unknown schedule {schedule!r}, penalty {penalty!r} or transform {transform!r}")
        self.model, self.task, self.site, self.batch_size = model, task, site, batch_size
        model.eval().requires_grad_(False)
        model.set_attn_implementation("eager")
        config = model.config
        self.family = "gpt2" if config.model_type == "gpt2" else "llama"
        self.blocks = list(model.transformer.h if self.family == "gpt2" else model.model.layers)
        self.attn_name = "attn" if self.family == "gpt2" else "self_attn"
        self.n_layers = len(self.blocks)
        self.n_per_layer = config.num_attention_heads if site == "attn_pattern" else config.hidden_size
        self.lr = lr if lr is not None else (0.1 if site == "attn_pattern" else 0.5)
        self.lambda1, self.lambda2, self.schedule = lambda1, lambda2, SCHEDULES[schedule]
        self.norm = float(self.n_components) if penalty == "mean" else 1.0
        self.transform, self.threshold = TRANSFORMS[transform], threshold
        self.z = torch.full((self.n_layers, self.n_per_layer), init, dtype=torch.float32, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=self.lr)
        # The task as tensors.
        self.pad_id = task.pad_id
        self.ids = torch.as_tensor(task.arrays.ids, dtype=torch.long)                   # [N, K, T]
        self.row_len = torch.as_tensor(task.arrays.mask.sum(2), dtype=torch.long)      # [N, K]
        self.prompt_len = torch.as_tensor(task.arrays.cf_mask.sum(1), dtype=torch.long)  # [N]
        self.cf_ids = torch.as_tensor(task.arrays.cf_ids, dtype=torch.long)             # [N, P]
        self.target_ids = torch.as_tensor(task.arrays.target_ids, dtype=torch.long)     # [N, K, M]
        self.target_pos = torch.as_tensor(task.arrays.target_pos, dtype=torch.long)     # [N, K, M]
        self.target_valid = torch.as_tensor(task.arrays.target_valid, dtype=torch.float32)
        self.n_target_tokens = self.target_valid.sum(2).long()                    # [N, K]
        self.sign = torch.as_tensor(task.arrays.sign, dtype=torch.float32)              # [N]
        self.gate_mask = torch.as_tensor(task.arrays.gate_mask, dtype=torch.float32)    # [N, T]

    @property
    def n_components(self) -> int:
        return self.n_layers * self.n_per_layer

    def _batch_effects(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx)] IE of pairs idx under gates z (differentiable in z)."""
        raise NotImplementedError

    def _train_context(self):
        return contextlib.nullcontext()

    def chunks(self, order) -> list[torch.Tensor]:
        order = torch.as_tensor(np.ascontiguousarray(order), dtype=torch.long)
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def effects(self, z) -> np.ndarray:
        """[N] per-pair IE of gates z [L, N_per_layer] (soft or binary), batches of `batch_size` in dataset order."""
        z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        out = [self._batch_effects(z, idx) for idx in self.chunks(torch.arange(len(self.task)))]
        return torch.cat(out).numpy()

    def evaluate(self, mask) -> float:
        """Mean IE of a (binary) mask over the whole task."""
        return float(self.effects(np.asarray(mask, np.float32)).mean())

    def loss(self, idx, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, effects [B]) of pairs idx at the current z, with the epoch's scheduled λ."""
        idx = torch.as_tensor(np.ascontiguousarray(idx), dtype=torch.long)
        z = self.z
        effects = self._batch_effects(z, idx)
        lambda1, lambda2 = self.schedule(self.lambda1, epoch), self.schedule(self.lambda2, epoch)
        penalty = lambda1 * z.abs().sum() + lambda2 * (z * (1.0 - z)).sum()
        return self.transform(effects).mean() + penalty / self.norm, effects

    def step(self, idx, epoch: int = 0) -> float:
        """One Adam step on pairs idx, then z clamped to [0, 1]; returns the loss before the step."""
        with self._train_context():
            self.optimizer.zero_grad(set_to_none=True)
            loss, _ = self.loss(idx, epoch)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            self.z.clamp_(0.0, 1.0)
        return float(loss.detach())

    def run(self, epochs: int, seed: int = 42, progress: Callable[[dict], None] | None = None) -> dict:
        """The full PGB-CT run: each epoch a seeded permutation of the pairs in batches of `batch_size`, one step
        per batch, then the binary mask z >= threshold evaluated on the whole task. Returns z, mask, history."""
        generator = torch.Generator().manual_seed(seed)
        history, start = [], time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(len(self.task), generator=generator)
            losses = [self.step(idx, epoch) for idx in self.chunks(order)]
            mask = (self.z.detach() >= self.threshold).float().numpy()
            row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "selected": int(mask.sum()),
                   "effect": self.evaluate(mask), "seconds": time.perf_counter() - start}
            history.append(row)
            if progress is not None:
                progress(row)
        z = self.z.detach().numpy().copy()
        return {"z": z, "mask": z >= self.threshold, "history": history, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# The reference's way


class _ReferenceAttention(nn.Module):
    """Stands in for one attention module: the original's live weights, with each example's gated prompt rows
    mixed towards its counterfactual weights in a Python loop; values stay live."""

    def __init__(self, inner: nn.Module, family: str, z: torch.Tensor, source: torch.Tensor, rows, prompt_len):
        super().__init__()
        self.inner, self.family, self.z, self.source = inner, family, z, source
        self.rows, self.prompt_len = rows, prompt_len

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H, T, Dh] live values, per query head."""
        inner, (batch, length, _) = self.inner, hidden.shape
        if self.family == "gpt2":
            value = inner.c_attn(hidden).split(inner.split_size, dim=2)[2]
            return value.view(batch, length, -1, inner.head_dim).transpose(1, 2)
        value = inner.v_proj(hidden).view(batch, length, -1, inner.head_dim).transpose(1, 2)
        return value.repeat_interleave(inner.num_key_value_groups, dim=1)

    def forward(self, hidden_states, *args, **kwargs):
        _, live = self.inner(hidden_states, *args, **kwargs)
        mixed = live.clone()
        z = self.z.view(-1, 1, 1)
        for b, (rows, n) in enumerate(zip(self.rows, self.prompt_len)):
            current = live[b, :, rows, :n]
            mixed[b, :, rows, :n] = current + z * (self.source[b, :, rows, :n] - current)
        out = (mixed @ self.values(hidden_states)).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        if self.family == "gpt2":
            return self.inner.resid_dropout(self.inner.c_proj(out)), mixed
        return self.inner.o_proj(out), mixed


class _ReferenceMLP(nn.Module):
    """Stands in for one MLP: its output at each example's gated prompt positions mixed towards the
    counterfactual's, in a Python loop."""

    def __init__(self, inner: nn.Module, z: torch.Tensor, source: torch.Tensor, rows):
        super().__init__()
        self.inner, self.z, self.source, self.rows = inner, z, source, rows

    def forward(self, hidden_states):
        live = self.inner(hidden_states)
        mixed = live.clone()
        for b, rows in enumerate(self.rows):
            current = live[b, rows]
            mixed[b, rows] = current + self.z * (self.source[b, rows] - current)
        return mixed


class ReferenceStyle(_PGBCT):
    """PGB-CT as the paper's code runs it: nothing cached, module wrappers, Python loops over examples, anomaly
    detection on while training. Arguments: see `_PGBCT`."""

    def _train_context(self):
        return torch.autograd.set_detect_anomaly(True)

    @contextlib.contextmanager
    def _replaced(self, make: Callable[[int, nn.Module], nn.Module]):
        """Every layer's attention module (attn_pattern) or MLP (mlp_out) replaced by make(layer, original)."""
        name = self.attn_name if self.site == "attn_pattern" else "mlp"
        originals = [getattr(block, name) for block in self.blocks]
        for layer, (block, original) in enumerate(zip(self.blocks, originals)):
            setattr(block, name, make(layer, original))
        try:
            yield
        finally:
            for block, original in zip(self.blocks, originals):
                setattr(block, name, original)

    def _counterfactual(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the counterfactual rows' attention weights [B, H, P, P] or MLP outputs [B, P, D], from one
        padded forward over the interleaved (base, counterfactual) prompts of the batch."""
        texts = []
        for i in idx.tolist():
            n = int(self.prompt_len[i])
            texts += [self.ids[i, 0, :n], self.cf_ids[i, :n]]
        ids, mask = _right_pad(texts, self.pad_id)
        if self.site == "attn_pattern":
            out = self.model(ids, attention_mask=mask, output_attentions=True, use_cache=False)
            return [weights[1::2] for weights in out.attentions]
        captured = []
        hooks = [block.mlp.register_forward_hook(lambda module, args, output: captured.append(output[1::2]))
                 for block in self.blocks]
        try:
            self.model(ids, attention_mask=mask, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def _scores(self, idx: torch.Tensor, as_float: bool) -> list[list]:
        """scores[b][k]: mean log-prob of target k's tokens after prompt b, one target at a time on right-padded
        rows (no attention mask), one example at a time; Python floats if `as_float`."""
        n_targets = self.ids.shape[1]
        scores = [[None] * n_targets for _ in idx]
        for k in range(n_targets):
            rows = [self.ids[i, k, : int(self.row_len[i, k])] for i in idx.tolist()]
            logits = self.model(_right_pad(rows, self.pad_id)[0], use_cache=False).logits
            for b, i in enumerate(idx.tolist()):
                n, start = int(self.n_target_tokens[i, k]), int(self.prompt_len[i]) - 1
                logp = torch.log_softmax(logits[b, start: start + n], dim=-1)
                score = logp[torch.arange(n), self.target_ids[i, k, :n]].mean()
                scores[b][k] = score.item() if as_float else score
        return scores

    def _batch_effects(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            source = self._counterfactual(idx)
            base = self._scores(idx, as_float=True)
        rows = [torch.nonzero(self.gate_mask[i, : int(self.prompt_len[i])])[:, 0] for i in idx.tolist()]
        lengths = [int(self.prompt_len[i]) for i in idx.tolist()]

        def make(layer: int, inner: nn.Module) -> nn.Module:
            if self.site == "attn_pattern":
                return _ReferenceAttention(inner, self.family, z[layer], source[layer], rows, lengths)
            return _ReferenceMLP(inner, z[layer], source[layer], rows)

        with self._replaced(make):
            gated = self._scores(idx, as_float=False)
        effects = []
        for b, i in enumerate(idx.tolist()):
            base_log_odds = _log_odds(torch.tensor([base[b]]))[0].item()
            gated_log_odds = _log_odds(torch.stack(gated[b])[None])[0]
            effects.append(torch.expm1(self.sign[i] * (gated_log_odds - base_log_odds)))
        return torch.stack(effects)


# ---------------------------------------------------------------------------------------------------------------
# The optimised way


class _GateState:
    """What the gated attention function and the MLP hooks of one model read during a forward: the gated site,
    gates z [L, N], position weights [R, T] and sources [L, R, ...] (mixing), or the site to capture into
    `captured` {layer: activation}. One per model, shared by every Optimised on it."""

    def __init__(self):
        self.site = self.z = self.weight = self.source = self.capture = None
        self.captured = {}


def _mlp_hook(state: _GateState, layer: int, module, args, output):
    """The mlp_out gate / capture, as a forward hook on each layer's MLP."""
    if state.capture == "mlp_out":
        state.captured[layer] = output
    if state.site == "mlp_out":  # the gates in the activations' dtype (bfloat16 models stay bfloat16)
        weight = (state.z[layer][None, None, :] * state.weight[:, :, None]).to(output.dtype)
        output = output + weight * (state.source[layer] - output)
    return output


def _gate_state(model: nn.Module, blocks, attn_name: str) -> _GateState:
    """The model's gate state; on first use, attached to every attention module and read by new MLP hooks."""
    state = getattr(model, "pgbct_state", None)
    if state is None:
        state = model.pgbct_state = _GateState()
        for layer, block in enumerate(blocks):
            getattr(block, attn_name).pgbct_state = state
            block.mlp.register_forward_hook(functools.partial(_mlp_hook, state, layer))
    return state


def _gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF eager attention (GQA by repeating K/V per query head) with the attn_pattern gate / capture."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    state, layer = module.pgbct_state, module.layer_idx
    if state.capture == "attn_pattern":
        state.captured[layer] = probs
    if state.site == "attn_pattern":
        weight = (state.z[layer][None, :, None, None] * state.weight[:, None, :, None]).to(probs.dtype)
        probs = probs + weight * (state.source[layer] - probs)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(GATED_ATTENTION, _gated_attention)


def _additive_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 1, T, T] float mask: 0 where a query may attend (causal, key inside the row), float32 min elsewhere."""
    pos = torch.arange(width)
    allowed = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] < lengths[:, None, None])
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


class Optimised(_PGBCT):
    """PGB-CT with the z-independent terms cached, vectorised scoring and one batched gated forward per step.

    Arguments: see `_PGBCT`, plus compile: False, True or "auto" (see the module docstring), with torch.compile's
    `compile_backend`; `compile_status` says what was used and why. The first Optimised on a model leaves a gate
    state on it (`model.pgbct_state`) and forward hooks on its MLPs, which do nothing unless a gated forward is
    running.
    """

    def __init__(self, model: nn.Module, task: EncodedTask, site: str, batch_size: int = 32,
                 compile: bool | str = False, compile_backend: str = "inductor", **options):
        super().__init__(model, task, site, batch_size, **options)
        self.state = _gate_state(model, self.blocks, self.attn_name)
        self.lm_head = model.get_output_embeddings()
        self.fixed_shapes = bool(compile)
        self.source, self.base_log_odds = self._precompute()
        self._forward = self._log_odds_rows
        self.compile_status = "off"
        if compile:
            self._compile(compile == "auto", compile_backend)

    @contextlib.contextmanager
    def _gated_implementation(self):
        """The model runs its attention through `_gated_attention` (only needed at the attention site)."""
        config = self.model.config
        if self.site != "attn_pattern":
            yield
            return
        config._attn_implementation = GATED_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = "eager"

    def _hidden(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = _additive_mask(lengths, ids.shape[1])
        return self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.no_grad()
    def _precompute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counterfactual activations [L, N, H, P, P] or [L, N, P, D], and base log-odds [N]."""
        sources, bases = [], []
        with self._gated_implementation():
            for idx in self.chunks(torch.arange(len(self.task))):
                self.state.capture, self.state.captured = self.site, {}
                try:
                    self._hidden(self.cf_ids[idx], self.prompt_len[idx])
                    sources.append(torch.stack([self.state.captured[layer] for layer in range(self.n_layers)]))
                finally:
                    self.state.capture, self.state.captured = None, {}
                bases.append(self._log_odds_rows(*self._batch(idx, with_source=False)[:5])[: len(idx)])
        return torch.cat(sources, dim=1), torch.cat(bases)

    def _batch(self, idx: torch.Tensor, with_source: bool = True):
        """Row tensors of pairs idx: ids [R, T], row lengths [R], gate weights [R, T], target positions and ids
        [R, M], validity [R, M], sources [L, R, ...] (R = pairs x targets; with fixed shapes, padded to
        `batch_size` pairs by repeating the first and to the task's row length)."""
        if self.fixed_shapes and len(idx) < self.batch_size:
            idx = torch.cat([idx, idx[:1].expand(self.batch_size - len(idx))])
        n_targets = self.ids.shape[1]
        width = self.ids.shape[2] if self.fixed_shapes else int(self.row_len[idx].max())
        ids = self.ids[idx, :, :width].flatten(0, 1)
        lengths = self.row_len[idx].flatten()
        weight = self.gate_mask[idx, :width].repeat_interleave(n_targets, dim=0)
        pos, tgt = self.target_pos[idx].flatten(0, 1), self.target_ids[idx].flatten(0, 1)
        valid = self.target_valid[idx].flatten(0, 1)
        source = None
        if with_source:
            source = self.source[:, idx].repeat_interleave(n_targets, dim=1)
            pad = width - source.shape[-1 if self.site == "attn_pattern" else 2]
            source = nn.functional.pad(source, (0, pad, 0, pad) if self.site == "attn_pattern" else (0, 0, 0, pad))
        return ids, lengths, pos, tgt, valid, weight, source, idx

    @contextlib.contextmanager
    def _gates(self, z, weight, source):
        """Gates z (None: none), position weights and sources for the forwards inside, through the gate state.

        The state is set outside the (compiled) forward: torch.compile then reads z and the sources as inputs."""
        state = self.state
        state.site = None if z is None else self.site
        state.z, state.weight, state.source = z, weight, source
        try:
            with self._gated_implementation():
                yield
        finally:
            state.site = state.z = state.weight = state.source = None

    def _log_odds_rows(self, ids, lengths, pos, tgt, valid) -> torch.Tensor:
        """[B] log-odds of a batch's rows (K rows a pair), under the gates that are set."""
        hidden = self._hidden(ids, lengths)
        gathered = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))   # [R, M, D]
        logp = torch.log_softmax(self.lm_head(gathered).float(), dim=-1)  # float32 (bfloat16 models too)
        token_logp = logp.gather(2, tgt[:, :, None])[..., 0]                                # [R, M]
        scores = (token_logp * valid).sum(-1) / valid.sum(-1)
        return _log_odds(scores.view(-1, self.ids.shape[1]))

    def _batch_effects(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ids, lengths, pos, tgt, valid, weight, source, padded = self._batch(idx)
        with self._gates(z, weight, source):
            log_odds = self._forward(ids, lengths, pos, tgt, valid)
        effects = torch.expm1(self.sign[padded] * (log_odds - self.base_log_odds[padded]))
        return effects[: len(idx)]

    def _compile(self, auto: bool, backend: str) -> None:
        """Compile the gated forward; with `auto`, keep it only if a forward+backward is faster than eager."""
        compiled = torch.compile(self._log_odds_rows, dynamic=False, backend=backend)
        idx = self.chunks(torch.arange(len(self.task)))[0]

        def forward_backward():
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(idx)[0].backward()
            self.optimizer.zero_grad(set_to_none=True)

        try:
            self._forward = compiled
            forward_backward()  # compiles
        except Exception as error:  # noqa: BLE001 - any failure means: run eagerly, and say why
            self._forward, self.fixed_shapes = self._log_odds_rows, False
            self.compile_status = f"eager: torch.compile failed ({type(error).__name__}: {error})".splitlines()[0]
            return
        self.compile_status = "compiled"
        if not auto:
            return
        seconds = {}
        for name, forward in (("compiled", compiled), ("eager", self._log_odds_rows)):
            self._forward, self.fixed_shapes = forward, name == "compiled"  # eager trims rows per batch
            forward_backward()
            start = time.perf_counter()
            for _ in range(3):
                forward_backward()
            seconds[name] = (time.perf_counter() - start) / 3
        faster = min(seconds, key=seconds.get)
        self.fixed_shapes = faster == "compiled"
        self._forward = compiled if self.fixed_shapes else self._log_odds_rows
        self.compile_status = (f"{faster}: forward+backward {seconds['compiled'] * 1e3:.1f} ms compiled, "
                               f"{seconds['eager'] * 1e3:.1f} ms eager")
