"""The decode loops' attention, registered with transformers as "sortedllm": the same result for a token whether it
is computed alone or among several new tokens (a verify step, pending early-exit tokens).

That is what makes speculative greedy equal plain greedy token for token in every dtype: a verify step computes
the exact numbers the one-token steps would have. Batched attention kernels do not promise it: they tile the query
block and reduce over the keys in an order that depends on how many queries and keys there are (bfloat16 SDPA over
a 200-token cache differs for a query among 8 new ones). So each new query here attends with its own one-query
product over exactly its own keys (its causal prefix, within the sliding window), the shapes a one-token step uses.
The projections around it are row-independent already (checked by `sortedllm bench kernels`).

On a CPU the cache holds float32 keys and values (Runtime.new_cache) and these products run in float32 whatever
the weights' dtype: one query's products are a few thousand multiply-adds, where float32 matmul takes 14 + 12 us
against bfloat16's 39 + 26 us here (per layer, 200 cached tokens), and the scores keep float32 precision.

Prefill (`exact=False`) runs one causal SDPA call: every strategy prefills the same way, so it needs no such care.
Written by hand because transformers' attention functions are batched by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "sortedllm"


def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query [B, H, n, D] (the last n columns of key/value [B, Hkv, T, D]); `attention_mask` [B, T] bool (True =
    a real column) or None. From the layer's kwargs: `sliding_window`, `softcap`, and `exact` (False for prefill).
    Returns ([B, n, H, D], None) as transformers' attention functions do."""
    sliding_window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    exact = kwargs.get("exact", True)
    B, H, n, D = query.shape
    out_dtype = query.dtype
    query = query.to(key.dtype)
    if scaling is None:
        scaling = D ** -0.5
    if not exact and softcap is None:
        return _prefill(query, key, value, attention_mask, scaling, sliding_window).to(out_dtype), None
    Hkv, T = key.shape[1], key.shape[2]
    G = H // Hkv
    outs = []
    for i in range(n):
        end = T - n + i + 1  # this query's own column is end - 1
        start = max(0, end - sliding_window) if sliding_window else 0
        q = query[:, :, i].reshape(B, Hkv, G, D)
        s = torch.matmul(q, key[:, :, start:end].transpose(-1, -2)) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask[:, None, None, start:end], float("-inf"))
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(value.dtype)
        outs.append(torch.matmul(p, value[:, :, start:end]).reshape(B, H, D))
    return torch.stack(outs, 1).to(out_dtype), None


def _prefill(query, key, value, attention_mask, scaling, sliding_window):
    n, T = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None or sliding_window or T != n:
        q_col = torch.arange(T - n, T, device=query.device)[:, None]
        k_col = torch.arange(T, device=query.device)[None, :]
        mask = k_col <= q_col
        if sliding_window:
            mask = mask & (k_col > q_col - sliding_window)
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :T]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(NAME, attention)
