"""The PGB-CT objective: gated log-odds of a task's targets, with every z-independent term cached.

For pair i with targets (t0, t1), score(t) is the geometric-mean probability of t's tokens after the prompt and
odds = score(t1) / score(t0); with a single target t0, odds = 1 / score(t0). The log ratio
`log r_i = sign_i * (log odds_gated - log odds_base)` gives the indirect effect IE_i = r_i - 1 (reference §4-6; for
one target, IE = p_clean / p_gated - 1). Gates mix the counterfactual's activations into the base prompt at the
task's gate positions; target positions stay live. The counterfactual is another prompt, or (`corruption="noise"`)
the base prompt with seeded Gaussian noise on its input embeddings, fixed per pair.

Batches are packed (`jaxtrace.packing`): each gated prompt is computed once for all its targets, pairs share rows,
and the prefix a pair's base and counterfactual prompts share is read from cached keys and values instead of being
recomputed, so a step costs the batch's z-dependent tokens rather than batch x targets x the longest row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from jaxtrace import packing, parallel
from jaxtrace.metrics import PROBABILITY_RATIO, Metric, get_metric
from jaxtrace.models import GatedLM, functional, gate_shape
from jaxtrace.models.sites import check_site, expand_gates, model_sites
from jaxtrace.tasks import EncodedTask

# Per-pair task arrays a batch carries (the token rows themselves travel packed).
PAIR_ARRAYS = ("index", "cf_ids", "cf_mask", "noise_mask", "target_ids", "target_valid", "sign", "keep")
CACHED_PREFIXES = ("source/", "prefix/", "base_")  # the cached z-independent arrays a batch carries


class MetricNaNError(FloatingPointError):
    """The metric is not finite for some examples."""


def _bytes_per_pair(model: GatedLM, site: str, length: int, prefix: int = 0) -> int:
    """Float32 bytes of one pair's cached source activations (every model site a site or component set gates) and
    shared-prefix keys and values."""
    c = model.config
    per_layer = {"attn_pattern": c.n_heads * length * length, "head_out": length * c.n_heads * c.head_dim,
                 "mlp_out": length * c.d_model, "mlp_hidden": length * c.d_ff}
    keys_values = 2 * prefix * c.n_kv_heads * c.head_dim
    return 4 * c.n_layers * (sum(per_layer[s] for s in model_sites(site)) + keys_values)


class Objective:
    """A task's gated objective at one site, on packed batches of `batch_size` pairs.

    With `cache=True` the counterfactual activations and base log-odds are computed once per dataset and kept on
    the host; with `cache=False` every call recomputes them (the reference's way; used to check the cache).
    `cache=None` caches when the sources fit in `cache_limit_bytes`. `row_width` sets the packed row length
    (default: the longer of the longest pair and four average pairs). `share_prefix=False` recomputes the prompt
    tokens base and counterfactual share (the same effects, up to float rounding, at a higher cost; for checks).

    On a `mesh` (see `jaxtrace.parallel`) a batch is split into one group of pairs per `data` device, each packed on
    its own (batch arrays carry a leading group axis G), and the parameters are sharded over `model`.
    """

    def __init__(self, model: GatedLM, task: EncodedTask, site: str, batch_size: int = 32,
                 cache: bool | None = None, cache_limit_bytes: int = 4 << 30,
                 metric: str | Metric = PROBABILITY_RATIO, row_width: int | None = None, mesh: Mesh | None = None,
                 share_prefix: bool = True):
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
        self.batch_size, self.mesh = batch_size, mesh
        self.groups = mesh.shape["data"] if mesh is not None else 1
        self.slots = math.ceil(batch_size / self.groups)  # pair slots per group
        self.packer = packing.Packer(task, self.slots, row_width, share_prefix=share_prefix)
        self.prefix_length = int(self.packer.prefix_len.max())  # cached prefix tokens per pair (0: none)
        self.n_layers, self.n_per_layer = gate_shape(model.config, site)
        self.apply, self.params = functional(model)
        if mesh is not None:
            self.params = parallel.shard_params(self.params, mesh)
        self.cache_bytes = _bytes_per_pair(model, site, task.cf_ids.shape[1], self.prefix_length) * len(task)
        if cache is None:
            cache = self.cache_bytes <= cache_limit_bytes
        elif cache and self.cache_bytes > cache_limit_bytes:
            advice = "; head_out gates the same heads with memory linear in length" if site == "attn_pattern" else ""
            raise MemoryError(f"caching {site} sources needs {self.cache_bytes / 2**30:.1f} GiB, over the "
                              f"{cache_limit_bytes / 2**30:.1f} GiB limit; use cache=False{advice}")
        self.cache = cache
        arrays = task.arrays()
        self._arrays = {name: arrays[name] for name in PAIR_ARRAYS}
        self._arrays["prompt_ids"] = task.ids[:, 0, : task.cf_ids.shape[1]]  # [N, P] the base prompts
        self._chunks = self.batches(np.arange(len(task)))
        self._dataset_shape = self.packed_shape(self._chunks)
        self._mask_effects = self.jit(jax.vmap(self.batch_effect, in_axes=(None, 0, None)))
        if cache:
            self._arrays.update(self._precompute())

    @property
    def n_components(self) -> int:
        return self.n_layers * self.n_per_layer

    # -- pure functions of (params, gates, batch) ----------------------------------------------------------------

    def noise(self, batch):
        """[..., P, D] the embedding noise of each pair's counterfactual (zero outside its noise positions)."""
        shape = (batch["cf_ids"].shape[-1], self.model.config.d_model)
        draw = lambda i: jax.random.normal(jax.random.fold_in(self.noise_key, i), shape)  # noqa: E731
        index = batch["index"]
        noise = jax.vmap(draw)(index.reshape(-1)).reshape(*index.shape, *shape)
        return self.noise_std * noise * batch["noise_mask"][..., None]

    def _source(self, params, group):
        """Counterfactual activations {model site: [L, B, P, ...]} of one group's prompts."""
        noise = self.noise(group) if self.task.corruption == "noise" else None
        _, acts = self.apply(params, group["cf_ids"], group["cf_mask"], method="capture", sites=self.sites,
                             input_noise=noise)
        return acts

    def _prefix(self, params, group) -> dict[str, jax.Array] | None:
        """The base prompts' keys and values {"keys", "values": [L, B, D, KV, Dh]} at their first D =
        `prefix_length` positions, which no gate changes (None when no pair shares a prefix). Attention is causal,
        so a forward over those D tokens alone gives them."""
        if not self.prefix_length:
            return None
        prefix = slice(0, self.prefix_length)
        _, acts = self.apply(params, group["prompt_ids"][:, prefix], group["cf_mask"][:, prefix], method="capture",
                             sites=("attn_keys", "attn_values"))
        return {"keys": acts["attn_keys"], "values": acts["attn_values"]}

    def _outputs(self, params, group, prefix, gates=None, source=None) -> dict[str, jax.Array]:
        """{"targets": [B, K] mean target-token log-probs, "last": [B, V] next-token log-probs at the last prompt
        position} of one packed group whose shared prefixes have keys and values `prefix` (see `_prefix`),
        optionally gated at the task's gate positions with per-pair `source` {site: [L, B, P, ...]}."""
        packed_source = None
        if gates is not None:
            packed_source = {site: packing.pack_source(site, acts, group) for site, acts in source.items()}
        memory = None if prefix is None else packing.pack_memory(prefix, group)
        hidden, _ = self.apply(params, group["tokens"], packing.visibility(group), gates=gates, source=packed_source,
                               gate_positions=group["gate"] > 0, position_ids=group["positions"], memory=memory,
                               method="hidden_states")
        hidden = hidden.reshape(-1, hidden.shape[-1])[group["logit_index"]]
        logits = self.apply(params, hidden, method="unembed")  # [Q, V]
        norm = jax.nn.logsumexp(logits, axis=-1)  # [Q]
        slot = group["target_slot"]  # [B, K, M]
        token_logp = logits[slot, group["target_ids"]] - norm[slot]
        valid = group["target_valid"]
        last = group["last_slot"]
        return {"targets": (token_logp * valid).sum(-1) / valid.sum(-1), "last": logits[last] - norm[last, None]}

    def _base(self, outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The ungated outputs the metric needs (the next-token distribution only when it uses it)."""
        keep = ("targets", "last") if self.metric.uses_last else ("targets",)
        return {key: outputs[key] for key in keep}

    def _group_effect(self, params, z, group, metric: Metric):
        if self.cache:  # cached arrays are pair-major [B, L, ...]
            source = {site: jnp.moveaxis(group[f"source/{site}"], 0, 1) for site in self.sites}
            prefix = ({key: jnp.moveaxis(group[f"prefix/{key}"], 0, 1) for key in ("keys", "values")}
                      if self.prefix_length else None)
            base = {key.removeprefix("base_"): value for key, value in group.items() if key.startswith("base_")}
        else:
            source = jax.lax.stop_gradient(self._source(params, group))
            prefix = jax.lax.stop_gradient(self._prefix(params, group))
            base = jax.lax.stop_gradient(self._base(self._outputs(params, group, prefix)))
        gated = self._outputs(params, group, prefix, expand_gates(self.model.config, self.site, z), source)
        return metric.effect(gated, base, group)

    def batch_effect(self, params, z, batch, metric: Metric | None = None):
        """[G * B_group] per-pair effect of gates z [L, N] under `metric` (default: the objective's)."""
        effects = jax.vmap(lambda group: self._group_effect(params, z, group, metric or self.metric))(batch)
        return effects.reshape(-1)

    # -- host side -----------------------------------------------------------------------------------------------

    def _precompute(self) -> dict[str, np.ndarray]:
        """Pair-major counterfactual sources {f"source/{site}": [N, L, ...]}, shared-prefix keys and values
        {"prefix/keys", "prefix/values": [N, L, D, KV, Dh]} and base outputs {f"base_{key}": [N, ...]}."""
        def terms(params, group):
            prefix = self._prefix(params, group)
            layer_major = {f"source/{site}": acts for site, acts in self._source(params, group).items()}
            layer_major |= {f"prefix/{key}": value for key, value in (prefix or {}).items()}
            return layer_major, self._base(self._outputs(params, group, prefix))

        terms_fn = self.jit(jax.vmap(terms, in_axes=(None, 0)))
        # [G, L, B_group, ...] -> [G * B_group, L, ...]
        pair_major = lambda a: np.moveaxis(np.asarray(a), 1, 2).reshape(-1, a.shape[1], *a.shape[3:])  # noqa: E731
        chunks = []
        for idx, batch in self._dataset_batches(with_cache=False):
            layer_major, base = terms_fn(self.params, self.put(batch))
            chunks.append({name: pair_major(a)[: len(idx)] for name, a in layer_major.items()}
                          | {f"base_{key}": np.asarray(v).reshape(-1, *v.shape[2:])[: len(idx)]
                             for key, v in base.items()})
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}

    def batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive index chunks of at most `batch_size` pairs."""
        return [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _groups(self, idx: np.ndarray) -> list[np.ndarray]:
        return [idx[g * self.slots: (g + 1) * self.slots] for g in range(self.groups)]

    def batch_shape(self, idx: np.ndarray) -> tuple[int, int]:
        """(packed rows, logit positions) per group that a batch of pairs `idx` needs."""
        sizes = [self.packer.sizes(group) for group in self._groups(idx) if len(group)]
        return tuple(int(n) for n in np.max(sizes, 0))

    def packed_shape(self, batches: list[np.ndarray]) -> tuple[int, int]:
        """(rows, logit positions) per group that fit every batch of pairs in `batches`: packing them all to it gives
        one shape, hence one compilation."""
        return tuple(int(n) for n in np.max([self.batch_shape(idx) for idx in batches], 0))

    def batch(self, idx: np.ndarray, with_cache: bool = True, rows: int | None = None,
              n_logits: int | None = None) -> dict[str, np.ndarray]:
        """Host arrays of pairs `idx`, each with a leading group axis G: per-pair arrays [G, B_group, ...] (padded
        by repeating the first pair, with weight 0) and each group's packed arrays [G, R, S] etc. `rows`,
        `n_logits`: minimum packed sizes (to give batches that run together one shape)."""
        total = self.groups * self.slots
        padded = np.concatenate([idx, np.full(total - len(idx), idx[0])])
        grouped = lambda a: a.reshape(self.groups, self.slots, *a.shape[1:])  # noqa: E731
        out = {name: grouped(array[padded]) for name, array in self._arrays.items()
               if with_cache or not name.startswith(CACHED_PREFIXES)}
        rows_needed, logits_needed = self.batch_shape(idx)
        packed = [self.packer.pack(group, max(rows or 0, rows_needed), max(n_logits or 0, logits_needed))
                  for group in self._groups(idx)]
        out.update({name: np.stack([p[name] for p in packed]) for name in packing.PACKED_KEYS})
        out["weight"] = grouped((np.arange(total) < len(idx)).astype(np.float32))
        return out

    def stacked_batch(self, orders: list[np.ndarray], rows: int | None = None,
                      n_logits: int | None = None) -> dict[str, np.ndarray]:
        """Batches of several runs (a vmapped sweep) packed to one shape (at least `rows`, `n_logits`) and stacked
        on a leading run axis."""
        needed_rows, needed_logits = self.packed_shape(orders)
        rows, n_logits = max(rows or 0, needed_rows), max(n_logits or 0, needed_logits)
        batches = [self.batch(idx, rows=rows, n_logits=n_logits) for idx in orders]
        return jax.tree.map(lambda *xs: np.stack(xs), *batches)

    def put(self, batch: dict[str, np.ndarray], group_axis: int = 0) -> dict[str, jax.Array]:
        """Send a host batch to the devices: its group axis split over the mesh's `data` axis."""
        if self.mesh is None:
            return jax.device_put(batch)
        return parallel.put_batch(batch, self.mesh, group_axis)

    def replicate(self, tree):
        """A pytree (gates, optimiser state) on the devices, whole on every device of the mesh."""
        return jax.device_put(tree) if self.mesh is None else parallel.replicate(tree, self.mesh)

    def jit(self, fn):
        """`jax.jit`, with every output replicated on a mesh (so each process can read it)."""
        if self.mesh is None:
            return jax.jit(fn)
        return jax.jit(fn, out_shardings=parallel.replicated(self.mesh))

    def _dataset_batches(self, with_cache: bool = True):
        """(idx, host batch) over the task in order, all packed to one shape (one compilation)."""
        for idx in self._chunks:
            yield idx, self.batch(idx, with_cache, *self._dataset_shape)

    def masks_per_chunk(self, n_masks: int, memory_budget: int) -> int:
        """How many masks one vmapped call evaluates: the budget over one mask's activation bytes for a batch.

        Per mask, a packed batch keeps about 4 residual-width and 2 MLP-width vectors and one attention row (over
        memory and row keys) per token and layer-step, plus the logits and log-softmax at its logit positions
        (float32).
        """
        c = self.model.config
        rows, n_logits = (self.groups * n for n in self._dataset_shape)
        width, keys = self.packer.width, self.packer.width + self.packer.memory_width
        per_mask = 4 * (rows * width * (4 * c.d_model + 2 * c.d_ff + 2 * c.n_heads * keys)
                        + 2 * n_logits * c.vocab_size)
        return int(max(1, min(n_masks, memory_budget // per_mask)))

    def mask_effects(self, masks, memory_budget: int = 2 << 30) -> np.ndarray:
        """[K, N] effect on every pair of each of K masks [K, L, N_per_layer] (binary or soft), checked finite.

        Each data batch is sent once; the masks go through one jitted, vmapped program in chunks of
        `masks_per_chunk` (the last chunk padded, so every call has the same shape).
        """
        masks = np.asarray(masks, np.float32)
        n_masks = masks.shape[0]
        chunk = self.masks_per_chunk(n_masks, memory_budget)
        padded = self.replicate(np.concatenate([masks, np.repeat(masks[:1], -n_masks % chunk, axis=0)]))
        out = np.empty((n_masks, len(self.task)), np.float32)
        for idx, batch in self._dataset_batches():
            batch = self.put(batch)
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
        return self.mask_effects(np.asarray(z)[None])[0]

    def check_finite(self, values: np.ndarray, idx: np.ndarray, z) -> None:
        """Raise MetricNaNError naming the pairs whose effect under gates z is not finite.

        A non-finite activation spreads to the pairs packed in the same row (a zero attention weight times NaN is
        NaN), so flagged pairs are evaluated again each alone and those still non-finite are named.
        """
        flagged = [int(i) for i, v in zip(idx, values) if not math.isfinite(float(v))]
        if not flagged:
            return
        z = self.replicate(np.asarray(z, np.float32)[None])
        alone = [i for i in flagged if not math.isfinite(
            float(self._mask_effects(self.params, z, self.put(self.batch(np.array([i]))))[0, 0]))]
        bad = [self.task.pairs[i].label or str(i) for i in alone or flagged]
        raise MetricNaNError(f"the metric is not finite for {len(bad)} examples: {', '.join(bad[:10])}")
