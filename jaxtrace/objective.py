"""The PGB-CT objective: gated log-odds of a task's targets, with every z-independent term cached.

For pair i with targets (t0, t1), score(t) is the geometric-mean probability of t's tokens after the prompt and
odds = score(t1) / score(t0); with a single target t0, odds = 1 / score(t0). The log ratio
`log r_i = sign_i * (log odds_gated - log odds_base)` gives the indirect effect IE_i = r_i - 1 (reference §4-6; for
one target, IE = p_clean / p_gated - 1). Gates mix the counterfactual's activations into the base prompt at the
task's gate positions; target positions stay live. The counterfactual is another prompt, or (`corruption="noise"`)
the base prompt with seeded Gaussian noise on its input embeddings, fixed per pair.

Batches are packed (`jaxtrace.packing`): each gated prompt is computed once for all its targets, and pairs share
rows, so a step costs the batch's real tokens rather than batch x targets x the longest row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace import packing
from jaxtrace.metrics import PROBABILITY_RATIO, Metric, get_metric
from jaxtrace.models import GatedLM, functional, gate_shape
from jaxtrace.models.sites import check_site, expand_gates, model_sites
from jaxtrace.tasks import EncodedTask

# Per-pair task arrays a batch carries (the token rows themselves travel packed).
PAIR_ARRAYS = ("index", "cf_ids", "cf_mask", "noise_mask", "target_ids", "target_valid", "sign", "keep")


class MetricNaNError(FloatingPointError):
    """The metric is not finite for some examples."""


def _bytes_per_pair(model: GatedLM, site: str, length: int) -> int:
    """Float32 bytes of one pair's cached source activations (every model site a site or component set gates)."""
    c = model.config
    per_layer = {"attn_pattern": c.n_heads * length * length, "head_out": length * c.n_heads * c.head_dim,
                 "mlp_out": length * c.d_model, "mlp_hidden": length * c.d_ff}
    return 4 * c.n_layers * sum(per_layer[s] for s in model_sites(site))


class Objective:
    """A task's gated objective at one site, on packed batches of `batch_size` pairs.

    With `cache=True` the counterfactual activations and base log-odds are computed once per dataset and kept on
    the host; with `cache=False` every call recomputes them (the reference's way; used to check the cache).
    `cache=None` caches when the sources fit in `cache_limit_bytes`. `row_width` sets the packed row length
    (default: the longer of the longest pair and four average pairs).
    """

    def __init__(self, model: GatedLM, task: EncodedTask, site: str, batch_size: int = 32,
                 cache: bool | None = None, cache_limit_bytes: int = 4 << 30,
                 metric: str | Metric = PROBABILITY_RATIO, row_width: int | None = None):
        self.model, self.task, self.site = model, task, check_site(site)
        self.sites = model_sites(site)
        self.metric = get_metric(metric)
        if task.keep.any() and self.metric.trained.ratio:
            raise ValueError(f"the task has invariance pairs, which {self.metric.name} cannot score: use "
                             "logit_difference or accuracy")
        noise_std, noise_scale, noise_seed = task.noise
        self.noise_std = (noise_std if noise_std is not None else  # the embedding std is measured on the model
                          noise_scale * float(jnp.std(model.embed_tokens[...].astype(jnp.float32))))
        self.noise_key = jax.random.key(noise_seed)
        self.batch_size = batch_size
        self.packer = packing.Packer(task, batch_size, row_width)
        self.n_layers, self.n_per_layer = gate_shape(model.config, site)
        self.apply, self.params = functional(model)
        self.cache_bytes = _bytes_per_pair(model, site, task.cf_ids.shape[1]) * len(task)
        if cache is None:
            cache = self.cache_bytes <= cache_limit_bytes
        elif cache and self.cache_bytes > cache_limit_bytes:
            raise MemoryError(f"caching {site} sources needs {self.cache_bytes / 2**30:.1f} GiB, over the "
                              f"{cache_limit_bytes / 2**30:.1f} GiB limit; use cache=False")
        self.cache = cache
        arrays = task.arrays()
        self._arrays = {name: arrays[name] for name in PAIR_ARRAYS}
        self._chunks = self.batches(np.arange(len(task)))
        self._dataset_shape = tuple(int(n) for n in np.max([self.packer.sizes(idx) for idx in self._chunks], 0))
        self._mask_effects = jax.jit(jax.vmap(self.batch_effect, in_axes=(None, 0, None)))
        if cache:
            self._arrays.update(self._precompute())

    @property
    def n_components(self) -> int:
        return self.n_layers * self.n_per_layer

    # -- pure functions of (params, gates, batch) ----------------------------------------------------------------

    def noise(self, batch):
        """[B, P, D] the embedding noise of each pair's counterfactual (zero outside its noise positions)."""
        shape = (batch["cf_ids"].shape[1], self.model.config.d_model)
        draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(self.noise_key, i), shape))
        return self.noise_std * draw(batch["index"]) * batch["noise_mask"][..., None]

    def _source(self, params, batch):
        """Counterfactual activations {model site: [L, B, P, ...]} of a batch's prompts."""
        noise = self.noise(batch) if self.task.corruption == "noise" else None
        _, acts = self.apply(params, batch["cf_ids"], batch["cf_mask"], method="capture", sites=self.sites,
                             input_noise=noise)
        return acts

    def _outputs(self, params, batch, gates=None, source=None) -> dict[str, jax.Array]:
        """{"targets": [B, K] mean target-token log-probs, "last": [B, V] next-token log-probs at the last prompt
        position} of a packed batch, optionally gated at the task's gate positions with per-pair `source`."""
        packed_source = None
        if gates is not None:
            packed_source = {site: packing.pack_source(site, acts, batch) for site, acts in source.items()}
        hidden, _ = self.apply(params, batch["tokens"], packing.visibility(batch), gates=gates, source=packed_source,
                               gate_positions=batch["gate"] > 0, position_ids=batch["positions"],
                               method="hidden_states")
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch["logit_index"]]
        logits = self.apply(params, hidden, method="unembed")  # [Q, V]
        norm = jax.nn.logsumexp(logits, axis=-1)  # [Q]
        slot = batch["target_slot"]  # [B, K, M]
        token_logp = logits[slot, batch["target_ids"]] - norm[slot]
        valid = batch["target_valid"]
        last = batch["last_slot"]
        return {"targets": (token_logp * valid).sum(-1) / valid.sum(-1), "last": logits[last] - norm[last, None]}

    def _base(self, outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The ungated outputs the metric needs (the next-token distribution only when it uses it)."""
        keep = ("targets", "last") if self.metric.uses_last else ("targets",)
        return {key: outputs[key] for key in keep}

    def batch_effect(self, params, z, batch, metric: Metric | None = None):
        """[B] per-pair effect of gates z under `metric` (default: the objective's)."""
        metric = metric or self.metric
        if self.cache:
            source = {site: batch[f"source/{site}"] for site in self.sites}
            base = {key.removeprefix("base_"): value for key, value in batch.items() if key.startswith("base_")}
        else:
            source = jax.lax.stop_gradient(self._source(params, batch))
            base = jax.lax.stop_gradient(self._base(self._outputs(params, batch)))
        gated = self._outputs(params, batch, expand_gates(self.model.config, self.site, z), source)
        return metric.effect(gated, base, batch)

    # -- host side -----------------------------------------------------------------------------------------------

    def _precompute(self) -> dict[str, np.ndarray]:
        source_fn = jax.jit(self._source)
        base_fn = jax.jit(lambda params, batch: self._base(self._outputs(params, batch)))
        sources, bases = [], []
        for idx, batch in self._dataset_batches(with_cache=False):
            sources.append({s: np.asarray(a)[:, : len(idx)] for s, a in source_fn(self.params, batch).items()})
            bases.append({k: np.asarray(v)[: len(idx)] for k, v in base_fn(self.params, batch).items()})
        cached = {f"base_{key}": np.concatenate([b[key] for b in bases]) for key in bases[0]}
        return {f"source/{s}": np.concatenate([a[s] for a in sources], axis=1) for s in self.sites} | cached

    def batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive index chunks of at most `batch_size` pairs."""
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batch(self, idx: np.ndarray, with_cache: bool = True, rows: int | None = None,
              n_logits: int | None = None) -> dict[str, np.ndarray]:
        """Packed arrays of pairs `idx`; per-pair arrays padded to `batch_size` by repeating the first pair with
        weight 0. `rows`, `n_logits`: minimum packed sizes (to give batches that run together one shape)."""
        padded = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[0])])
        out = {}
        for name, array in self._arrays.items():
            if name.startswith("source/"):
                if with_cache:
                    out[name] = array[:, padded]
            elif not name.startswith("base_") or with_cache:
                out[name] = array[padded]
        out.update(self.packer.pack(idx, rows, n_logits))
        out["weight"] = (np.arange(self.batch_size) < len(idx)).astype(np.float32)
        return out

    def stacked_batch(self, orders: list[np.ndarray], rows: int | None = None,
                      n_logits: int | None = None) -> dict[str, np.ndarray]:
        """Batches of several runs (a vmapped sweep) packed to one shape (at least `rows`, `n_logits`) and stacked
        on a leading run axis."""
        sizes = np.array([self.packer.sizes(idx) for idx in orders] + [(rows or 0, n_logits or 0)]).max(0)
        batches = [self.batch(idx, rows=int(sizes[0]), n_logits=int(sizes[1])) for idx in orders]
        return jax.tree.map(lambda *xs: np.stack(xs), *batches)

    def _dataset_batches(self, with_cache: bool = True):
        """(idx, batch) over the task in order, all packed to one shape (one compilation)."""
        for idx in self._chunks:
            yield idx, self.batch(idx, with_cache, *self._dataset_shape)

    def masks_per_chunk(self, n_masks: int, memory_budget: int) -> int:
        """How many masks one vmapped call evaluates: the budget over one mask's activation bytes for a batch.

        Per mask, a packed batch keeps about 4 residual-width and 2 MLP-width vectors and one attention row per
        token and layer-step, plus the logits and log-softmax at its logit positions (float32).
        """
        c = self.model.config
        rows, n_logits = self._dataset_shape
        width = self.packer.width
        per_mask = 4 * (rows * width * (4 * c.d_model + 2 * c.d_ff + 2 * c.n_heads * width)
                        + 2 * n_logits * c.vocab_size)
        return int(max(1, min(n_masks, memory_budget // per_mask)))

    def mask_effects(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        """[K, N] effect on every pair of each of K masks [K, L, N_per_layer] (binary or soft), checked finite.

        Each data batch is sent once; the masks go through one jitted, vmapped program in chunks of
        `masks_per_chunk` (the last chunk padded, so every call has the same shape).
        """
        masks = jnp.asarray(masks, jnp.float32)
        n_masks = masks.shape[0]
        chunk = self.masks_per_chunk(n_masks, memory_budget)
        padded = jnp.concatenate([masks, jnp.repeat(masks[:1], -n_masks % chunk, axis=0)])
        out = np.empty((n_masks, len(self.task)), np.float32)
        for idx, batch in self._dataset_batches():
            batch = jax.device_put(batch)
            for start in range(0, n_masks, chunk):
                values = self._mask_effects(self.params, padded[start: start + chunk], batch)
                stop = min(start + chunk, n_masks)
                out[start:stop, idx] = np.asarray(values)[: stop - start, : len(idx)]
        for mask, row in zip(masks, out):
            self.check_finite(row, np.arange(len(self.task)), mask)
        return out

    def evaluate_masks(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        """[K] mean effect over the task of each of K masks [K, L, N_per_layer]."""
        return self.mask_effects(masks, memory_budget).mean(1)

    def effects(self, z) -> np.ndarray:
        """[N] per-pair effects of gates z [L, N_per_layer] (soft or binary), checked to be finite."""
        return self.mask_effects(jnp.asarray(z)[None])[0]

    def check_finite(self, values: np.ndarray, idx: np.ndarray, z) -> None:
        """Raise MetricNaNError naming the pairs whose effect under gates z is not finite.

        A non-finite activation spreads to the pairs packed in the same row (a zero attention weight times NaN is
        NaN), so flagged pairs are evaluated again each alone and those still non-finite are named.
        """
        flagged = [int(i) for i, v in zip(idx, values) if not math.isfinite(float(v))]
        if not flagged:
            return
        z = jnp.asarray(z, jnp.float32)[None]
        alone = [i for i in flagged
                 if not math.isfinite(float(self._mask_effects(self.params, z, self.batch(np.array([i])))[0, 0]))]
        bad = [self.task.pairs[i].label or str(i) for i in alone or flagged]
        raise MetricNaNError(f"the metric is not finite for {len(bad)} examples: {', '.join(bad[:10])}")
