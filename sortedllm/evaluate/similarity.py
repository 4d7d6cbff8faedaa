"""Similarity of every exit to the last layer, as the paper's analysis: over PandaLM's prompts, the full model
generates 20 tokens greedily; at each generated position 0..19 (the same prefix for every exit) we compare exit k
with the last layer L:

- `kl`: KL(p_L || p_k) of the next-token distributions (nats),
- `cosine`: cosine similarity of what the heads read, norm_k(h_k) vs norm_L(h_L) (the exit's own norm, so ICT heads
  count); `cosine_raw` compares the residual streams h_k and h_L before any norm,
- `top1_agreement`: how often exit k's most likely token is the last layer's.

Each is reported overall (mean over every position of every prompt) and per position (`*_by_position`, 20 values,
`count_by_position` prompts still generating at that position).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import SortedError
from ..inference.batch import encode_prompts
from .tournament import load_prompts

HEADLINE = ("kl", False)
POSITIONS = 20


def prepare(ctx, name: str) -> list[dict]:
    if int(ctx.options.get("positions", POSITIONS)) < 1:
        raise SortedError(f"--positions must be at least 1 (got {ctx.options['positions']})")
    return load_prompts(ctx.data.get(name), ctx.limit)


def right_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def compare_exits(sm, prompt_ids: list[list[int]], continuations: list[list[int]], exits: list[int],
                  positions: int = POSITIONS, batch_size: int = 16, progress: bool = False) -> dict:
    """Teacher-force prompt + continuation once (right padding: positions need no shift) and compare every exit
    with the last layer at the positions that predicted continuation tokens 0..positions-1."""
    L = sm.num_layers
    exits = sorted(set(exits) | {L})
    device = next(sm.model.parameters()).device
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else 0
    sums = {k: {m: torch.zeros(positions, dtype=torch.float64) for m in ("kl", "cosine", "cosine_raw", "top1")}
            for k in exits}
    count = torch.zeros(positions, dtype=torch.float64)
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="similarity", disable=not progress):
        rows, b_idx, t_idx, j_idx = [], [], [], []
        for b, i in enumerate(range(start, min(start + batch_size, len(prompt_ids)))):
            cont = continuations[i][:positions]
            rows.append(prompt_ids[i] + cont)
            for j in range(len(cont)):
                b_idx.append(b)
                t_idx.append(len(prompt_ids[i]) - 1 + j)
                j_idx.append(j)
        if not j_idx:
            continue
        ids, mask = right_pad(rows, pad, device)
        hidden = sm.hidden_at_exits(ids, mask, exits)
        b_t, t_t, j_t = (torch.tensor(x, device=device) for x in (b_idx, t_idx, j_idx))
        h_last = hidden[L][b_t, t_t]
        norm_last, _ = sm.exit_norm_head(L)
        n_last = norm_last(h_last).float()
        logp_last = torch.log_softmax(sm.exit_logits(h_last, L).float(), -1)
        top_last = logp_last.argmax(-1)
        count += torch.bincount(j_t.cpu(), minlength=positions).double()
        for k in exits:
            h = hidden[k][b_t, t_t]
            norm_k, _ = sm.exit_norm_head(k)
            logp = torch.log_softmax(sm.exit_logits(h, k).float(), -1)
            values = {"kl": (logp_last.exp() * (logp_last - logp)).sum(-1).clamp(min=0),
                      "cosine": torch.cosine_similarity(norm_k(h).float(), n_last, dim=-1),
                      "cosine_raw": torch.cosine_similarity(h.float(), h_last.float(), dim=-1),
                      "top1": (logp.argmax(-1) == top_last).double()}
            for m, v in values.items():
                sums[k][m].index_add_(0, j_t.cpu(), v.double().cpu())
    total = count.sum().item()
    out = {}
    for k in exits:
        per = {m: [(s[j] / count[j]).item() if count[j] else None for j in range(positions)]
               for m, s in sums[k].items()}
        out[k] = {"kl": sums[k]["kl"].sum().item() / max(total, 1),
                  "cosine": sums[k]["cosine"].sum().item() / max(total, 1),
                  "cosine_raw": sums[k]["cosine_raw"].sum().item() / max(total, 1),
                  "top1_agreement": sums[k]["top1"].sum().item() / max(total, 1),
                  "positions": int(total),
                  "kl_by_position": per["kl"], "cosine_by_position": per["cosine"],
                  "cosine_raw_by_position": per["cosine_raw"], "top1_by_position": per["top1"],
                  "count_by_position": [int(c) for c in count.tolist()]}
    return out


def run(ctx, name: str, rows: list[dict]) -> dict:
    n_pos = int(ctx.options.get("positions", POSITIONS))
    prompts = [r["prompt"] for r in rows]
    out = {}
    for model, exits in ctx.exits.items():
        sm = ctx.models[model]
        gens = ctx.generate(model, sm.num_layers, prompts, n_pos, name)
        ctx.record(name, model, sm.num_layers, rows, gens)
        per_exit = compare_exits(sm, encode_prompts(sm, prompts), [g.token_ids for g in gens], exits,
                                 positions=n_pos, batch_size=ctx.batch_size, progress=ctx.progress)
        out[model] = {k: v for k, v in per_exit.items() if k in exits}
    ctx.details[name] = {"positions": n_pos, "n_prompts": len(rows), "reference": "last layer of the same model"}
    return out
