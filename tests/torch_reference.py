"""An independent PyTorch implementation of the four gate sites on Hugging Face models, through hooks.

Mixing is `(1 - z) * live + z * source` (the reference's form), at every position; used to check jaxtrace's
activations and gradients.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch


def _modules(model):
    """Per layer: (attention module, output projection, MLP block, MLP down projection)."""
    if model.config.model_type == "gpt2":
        return [(b.attn, b.attn.c_proj, b.mlp, b.mlp.c_proj) for b in model.transformer.h]
    return [(b.self_attn, b.self_attn.o_proj, b.mlp, b.mlp.down_proj) for b in model.model.layers]


@contextlib.contextmanager
def gated(model, gates=None, source=None, capture=()):
    """Run `model` with gates {site: [L, N] tensor} mixing in `source` {site: [L, B, ...]}; fill `captured`.

    Yields a dict site -> list of per-layer activations (stack them for [L, ...]).
    """
    gates, source = gates or {}, source or {}
    captured = {site: [] for site in capture}
    handles = []

    def mix(site, layer, live, weight_shape):
        if site in gates:
            z = gates[site][layer].reshape(weight_shape)
            live = (1 - z) * live + z * source[site][layer]
        if site in captured:
            captured[site].append(live)
        return live

    layers = _modules(model)
    n_heads = model.config.num_attention_heads
    for layer, (attn, out_proj, mlp, down) in enumerate(layers):
        def pre_out(module, args, layer=layer):
            (x,) = args
            heads = x.reshape(*x.shape[:-1], n_heads, -1)
            return (mix("head_out", layer, heads, (1, 1, -1, 1)).reshape(x.shape),)

        def post_mlp(module, args, output, layer=layer):
            return mix("mlp_out", layer, output, (1, 1, -1))

        def pre_down(module, args, layer=layer):
            return (mix("mlp_hidden", layer, args[0], (1, 1, -1)),)

        handles += [out_proj.register_forward_pre_hook(pre_out), mlp.register_forward_hook(post_mlp),
                    down.register_forward_pre_hook(pre_down)]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        probs = mix("attn_pattern", module.layer_idx, torch.softmax(scores, dim=-1), (1, -1, 1, 1))
        return (probs @ value).transpose(1, 2).contiguous(), probs

    modeling = sys.modules[type(model).__module__]
    try:
        with mock.patch.object(modeling, "eager_attention_forward", attention):
            yield captured
    finally:
        for handle in handles:
            handle.remove()
