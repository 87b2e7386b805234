"""An independent PyTorch implementation of the edge-gated forward on Hugging Face GPT-2, Llama and Gemma 2 models.

Built from the HF model's own modules (embeddings, norms, MLPs, rotary embedding, output head) and its weights
sliced per head; only the attention core is written out, because each query head reads its own query, key and value
inputs. Writers are kept as a list of [B, T, D] outputs (the embeddings, then per layer each head's share of the
attention output and the MLP's output); a reader's input is their sum plus Σ_p z[p] (cf_p − live_p), the form
jaxtrace's `edges` docstring states. Every position is gated; no padding.
"""

from __future__ import annotations

import math

import torch


def edge_forward(model, ids: torch.Tensor, qkv=None, mlp=None, logits_z=None, cf=None):
    """(logits [B, T, V], writers [O, B, T, D]) of `model` on `ids` [B, T] with edge gates `qkv` [L, 3, H, O],
    `mlp` [L, O], `logits_z` [O] mixing in the counterfactual writers `cf` [O, B, T, D]; no gates: the plain
    forward (its writers are the counterfactual's source when `ids` are the counterfactual's)."""
    config = model.config
    family = config.model_type
    gpt2 = family == "gpt2"
    body = model.transformer if gpt2 else model.model
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", n_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    batch, length = ids.shape
    positions = torch.arange(length)[None].expand(batch, length)

    writers = [body.wte(ids) + body.wpe(positions) if gpt2 else body.embed_tokens(ids)]

    def read(z):
        live = torch.stack(writers)  # [n, B, T, D]
        x = live.sum(0)
        if z is None:
            return x
        n = len(writers)
        return x + torch.einsum("n,nbtd->btd", z[:n], cf[:n] - live)

    rotary = None if gpt2 else body.rotary_emb(writers[0], positions)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    blocks = body.h if gpt2 else body.layers
    for layer, block in enumerate(blocks):
        projected = []  # per port q, k, v: [B, H, T, head_dim]
        for port in range(3):
            heads = []
            for head in range(n_heads):
                x = read(None if qkv is None else qkv[layer, port, head])
                heads.append(_project(block, family, port, head, head // (n_heads // n_kv), head_dim, x))
            projected.append(torch.stack(heads, 1))
        q, k, v = projected
        if not gpt2:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, *rotary)
        attention = block.attn if gpt2 else block.self_attn
        scale = config.query_pre_attn_scalar ** -0.5 if family == "gemma2" else head_dim ** -0.5
        scores = q @ k.transpose(-1, -2) * scale
        visible = causal
        if family == "gemma2":
            if config.attn_logit_softcapping:
                scores = torch.tanh(scores / config.attn_logit_softcapping) * config.attn_logit_softcapping
            if config.layer_types[layer] == "sliding_attention":
                offsets = torch.arange(length)[:, None] - torch.arange(length)[None]
                visible = causal & (offsets < config.sliding_window)
        probabilities = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
        out = probabilities @ v  # [B, H, T, head_dim]
        o_weight = attention.c_proj.weight if gpt2 else attention.o_proj.weight.T  # [H·head_dim, D]
        shares = [out[:, h] @ o_weight[h * head_dim:(h + 1) * head_dim] for h in range(n_heads)]
        if gpt2:
            shares = [s + attention.c_proj.bias / n_heads for s in shares]
        if family == "gemma2":  # the post-attention norm's scale, from the summed heads of this forward
            norm = block.post_attention_layernorm
            summed = torch.stack(shares).sum(0)
            factor = torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)
            shares = [s * factor for s in shares]
        writers.extend(shares)
        x = read(None if mlp is None else mlp[layer])
        if gpt2:
            writers.append(block.mlp(block.ln_2(x)))
        elif family == "gemma2":
            writers.append(block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x))))
        else:
            writers.append(block.mlp(block.post_attention_layernorm(x)))
    final = body.ln_f if gpt2 else body.norm
    logits = model.lm_head(final(read(logits_z)))
    cap = getattr(config, "final_logit_softcapping", None)
    if family == "gemma2" and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, torch.stack(writers)


def _project(block, family, port, head, kv_head, head_dim, x):
    """[B, T, head_dim] query (port 0), key (1) or value (2) of query head `head` from its own input x."""
    if family == "gpt2":
        d = x.shape[-1]
        columns = slice(port * d + head * head_dim, port * d + (head + 1) * head_dim)
        return block.ln_1(x) @ block.attn.c_attn.weight[:, columns] + block.attn.c_attn.bias[columns]
    attention = block.self_attn
    linear = (attention.q_proj, attention.k_proj, attention.v_proj)[port]
    h = head if port == 0 else kv_head  # keys and values: the query head's KV head's weights
    rows = slice(h * head_dim, (h + 1) * head_dim)
    bias = None if linear.bias is None else linear.bias[rows]
    return torch.nn.functional.linear(block.input_layernorm(x), linear.weight[rows], bias)
