"""Teacher-forced held-out loss and perplexity per exit (the same loss the trainer optimises)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data import default_eval_data, encode_example, load_examples
from ..exit_loss import IGNORE_INDEX, label_positions, position_cross_entropy
from ..stats import ratio_interval


def batches(tokenizer, encoded: list[dict], batch_size: int):
    """(row indices, right-padded input_ids, attention_mask, labels) batches of encoded rows, longest first to fail
    fast on memory."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    pad = tokenizer.pad_token_id
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i:i + batch_size])
        chunk = [encoded[j] for j in idx.tolist()]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.where(torch.tensor(e["completion_mask"]) == 1, ids[j, :n], IGNORE_INDEX)
        yield idx, (ids, mask, labels)


@torch.no_grad()
def exit_losses(sm, rows, exits, max_length: int = 512, batch_size: int = 8, progress: bool = True) -> dict:
    """{exit: {"loss", "perplexity", "tokens", "ci95", "rows", "row_loss", "row_tokens"}} over the completion
    tokens of `rows`: the mean loss per token, its 95% bootstrap interval over the held-out rows, and each row's
    summed loss and token count (in the order of `rows`; rows whose prompt fills max_length are left out), which
    comparisons between models on the same rows resample jointly (sortedllm/stats.py)."""
    encoded = [e for e in (encode_example(sm.tokenizer, r, max_length) for r in rows) if e is not None]
    row_loss = {k: torch.zeros(len(encoded), dtype=torch.float64) for k in exits}
    row_tokens = torch.zeros(len(encoded), dtype=torch.long)
    device = next(sm.model.parameters()).device
    n_batches = math.ceil(len(encoded) / batch_size)
    for idx, (ids, mask, labels) in tqdm(batches(sm.tokenizer, encoded, batch_size), total=n_batches,
                                         desc="held-out loss", disable=not progress):
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        sel, targets = label_positions(labels)
        owner = idx[sel.nonzero()[:, 0].cpu()]  # the row each labelled position belongs to
        row_tokens.index_add_(0, owner, torch.ones_like(owner))
        for k, h in sm.hidden_at_exits(ids, mask, exits).items():
            norm, head = sm.exit_norm_head(k)
            ce = position_cross_entropy(h[:, :-1][sel], targets, norm, head, sm.arch.softcap)
            row_loss[k].index_add_(0, owner, ce.double().cpu())
    count = int(row_tokens.sum())
    out = {}
    for k in exits:
        mean = float(row_loss[k].sum()) / max(count, 1)
        out[k] = {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count, "rows": len(encoded),
                  "ci95": list(ratio_interval(row_loss[k].numpy(), row_tokens.numpy())),
                  "row_loss": [round(float(x), 4) for x in row_loss[k]], "row_tokens": row_tokens.tolist()}
    return out


HEADLINE = ("loss", False)


def default_data(sm) -> str:
    """The held-out split of what the checkpoint was trained on (GSM8K's test split for an untuned model)."""
    return default_eval_data(sm.config.data or "gsm8k") or "gsm8k:test"


def prepare(ctx, name: str) -> list[dict] | None:
    """Rows of the user's --data_file now (fail before loading models); None = each model's default split."""
    spec = ctx.data.get(name)
    return load_examples(spec, limit=ctx.limit) if spec else None


def run(ctx, name: str, rows: list[dict] | None) -> dict:
    if rows is None:  # one data set for every model compared: the first model's held-out split
        spec = default_data(next(iter(ctx.models.values())))
        rows = load_examples(spec, limit=ctx.limit)
        ctx.details[name] = {"data": spec}
    else:
        ctx.details[name] = {"data": ctx.data[name]}
    return {model: exit_losses(ctx.models[model], rows, exits, max_length=ctx.max_length,
                               batch_size=ctx.batch_size, progress=ctx.progress)
            for model, exits in ctx.exits.items()}
