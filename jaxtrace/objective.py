"""The PGB-CT objective: gated log-odds of a task's targets, with every z-independent term cached.

For pair i with targets (t0, t1), score(t) is the geometric-mean probability of t's tokens after the prompt and
odds = score(t1) / score(t0); with a single target t0, odds = 1 / score(t0). The log ratio
`log r_i = sign_i * (log odds_gated - log odds_base)` gives the indirect effect IE_i = r_i - 1 (reference §4-6; for
one target, IE = p_clean / p_gated - 1). Gates mix the counterfactual's activations into the base prompt at the
task's gate positions; target positions stay live. The counterfactual is another prompt, or (`corruption="noise"`)
the base prompt with seeded Gaussian noise on its input embeddings, fixed per pair.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.metrics import PROBABILITY_RATIO, Metric, get_metric
from jaxtrace.models import GatedLM, functional, gate_shape
from jaxtrace.models.sites import check_site, expand_gates, model_sites
from jaxtrace.tasks import EncodedTask

class MetricNaNError(FloatingPointError):
    """The metric is not finite for some examples."""


def _bytes_per_pair(model: GatedLM, site: str, length: int) -> int:
    """Float32 bytes of one pair's cached source activations (every model site a site or component set gates)."""
    c = model.config
    per_layer = {"attn_pattern": c.n_heads * length * length, "head_out": length * c.n_heads * c.head_dim,
                 "mlp_out": length * c.d_model, "mlp_hidden": length * c.d_ff}
    return 4 * c.n_layers * sum(per_layer[s] for s in model_sites(site))


class Objective:
    """A task's gated objective at one site, batched with fixed shapes (one compilation for every batch).

    With `cache=True` the counterfactual activations and base log-odds are computed once per dataset and kept on
    the host; with `cache=False` every call recomputes them (the reference's way; used to check the cache).
    `cache=None` caches when the sources fit in `cache_limit_bytes`.
    """

    def __init__(self, model: GatedLM, task: EncodedTask, site: str, batch_size: int = 32,
                 cache: bool | None = None, cache_limit_bytes: int = 4 << 30,
                 metric: str | Metric = PROBABILITY_RATIO):
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
        self.n_layers, self.n_per_layer = gate_shape(model.config, site)
        self.apply, self.params = functional(model)
        self.cache_bytes = _bytes_per_pair(model, site, task.cf_ids.shape[1]) * len(task)
        if cache is None:
            cache = self.cache_bytes <= cache_limit_bytes
        elif cache and self.cache_bytes > cache_limit_bytes:
            raise MemoryError(f"caching {site} sources needs {self.cache_bytes / 2**30:.1f} GiB, over the "
                              f"{cache_limit_bytes / 2**30:.1f} GiB limit; use cache=False")
        self.cache = cache
        self._arrays = task.arrays()
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
        """Counterfactual activations {model site: [L, B, ...]} of a batch."""
        noise = self.noise(batch) if self.task.corruption == "noise" else None
        _, acts = self.apply(params, batch["cf_ids"], batch["cf_mask"], method="capture", sites=self.sites,
                             logit_positions=jnp.zeros((batch["cf_ids"].shape[0], 1), jnp.int32), input_noise=noise)
        return acts

    def _outputs(self, params, batch, gates=None, source=None) -> dict[str, jax.Array]:
        """{"targets": [B, K] mean target-token log-probs, "last": [B, V] next-token log-probs at the last prompt
        position}, optionally gated at the task's gate positions."""
        b, k, t = batch["ids"].shape
        rows = lambda x: x.reshape(b * k, *x.shape[2:])  # noqa: E731
        if gates is not None:
            source = {s: jnp.repeat(a, k, axis=1) for s, a in source.items()}
            gate_positions = jnp.repeat(batch["gate_mask"] > 0, k, axis=0)
        else:
            gate_positions = None
        logits = self.apply(params, rows(batch["ids"]), rows(batch["mask"]), gates=gates, source=source,
                            gate_positions=gate_positions, logit_positions=rows(batch["target_pos"]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_logp = jnp.take_along_axis(logp, rows(batch["target_ids"])[..., None], axis=-1)[..., 0]
        valid = rows(batch["target_valid"])
        scores = ((token_logp * valid).sum(-1) / valid.sum(-1)).reshape(b, k)
        return {"targets": scores, "last": logp.reshape(b, k, *logp.shape[1:])[:, 0, 0]}

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
        for idx in self.batches(np.arange(len(self.task))):
            batch = self.batch(idx, with_cache=False)
            sources.append({s: np.asarray(a)[:, : len(idx)] for s, a in source_fn(self.params, batch).items()})
            bases.append({k: np.asarray(v)[: len(idx)] for k, v in base_fn(self.params, batch).items()})
        cached = {f"base_{key}": np.concatenate([b[key] for b in bases]) for key in bases[0]}
        return {f"source/{s}": np.concatenate([a[s] for a in sources], axis=1) for s in self.sites} | cached

    def batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive index chunks of at most `batch_size` pairs."""
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def batch(self, idx: np.ndarray, with_cache: bool = True) -> dict[str, np.ndarray]:
        """Arrays of pairs `idx`, padded to `batch_size` by repeating the first pair with weight 0."""
        padded = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[0])])
        out = {}
        for name, array in self._arrays.items():
            if name.startswith("source/"):
                if with_cache:
                    out[name] = array[:, padded]
            elif not name.startswith("base_") or with_cache:
                out[name] = array[padded]
        out["weight"] = (np.arange(self.batch_size) < len(idx)).astype(np.float32)
        return out

    def masks_per_chunk(self, n_masks: int, memory_budget: int) -> int:
        """How many masks one vmapped call evaluates: the budget over one mask's activation bytes for a batch.

        Per mask and batch row, a forward keeps about 4 residual-width and 2 MLP-width vectors and 2 attention maps
        per token, plus the target logits and their log-softmax (float32).
        """
        c = self.model.config
        _, k, length = self.task.ids.shape
        per_row = length * (4 * c.d_model + 2 * c.d_ff + 2 * c.n_heads * length)
        per_row += self.task.target_pos.shape[-1] * 2 * c.vocab_size
        per_mask = 4 * self.batch_size * k * per_row
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
        for idx in self.batches(np.arange(len(self.task))):
            batch = jax.device_put(self.batch(idx))
            for start in range(0, n_masks, chunk):
                values = self._mask_effects(self.params, padded[start: start + chunk], batch)
                stop = min(start + chunk, n_masks)
                out[start:stop, idx] = np.asarray(values)[: stop - start, : len(idx)]
        for row in out:
            self.check_finite(row, np.arange(len(self.task)))
        return out

    def evaluate_masks(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        """[K] mean effect over the task of each of K masks [K, L, N_per_layer]."""
        return self.mask_effects(masks, memory_budget).mean(1)

    def effects(self, z) -> np.ndarray:
        """[N] per-pair effects of gates z [L, N_per_layer] (soft or binary), checked to be finite."""
        return self.mask_effects(jnp.asarray(z)[None])[0]

    def check_finite(self, values: np.ndarray, idx: np.ndarray) -> None:
        bad = [self.task.pairs[i].label or str(i) for i, v in zip(idx, values) if not math.isfinite(float(v))]
        if bad:
            raise MetricNaNError(f"the metric is not finite for {len(bad)} examples: {', '.join(bad[:10])}")
