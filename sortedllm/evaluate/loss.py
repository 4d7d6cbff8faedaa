"""Teacher-forced held-out loss and perplexity per exit (the same loss the trainer optimises)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data import default_eval_data, encode_example, load_examples
from ..exit_loss import IGNORE_INDEX, exit_cross_entropy, label_positions


def batches(tokenizer, rows, max_length: int, batch_size: int):
    """Right-padded batches of (input_ids, attention_mask, labels), longest first to fail fast on memory."""
    encoded = [e for e in (encode_example(tokenizer, r, max_length) for r in rows) if e is not None]
    encoded.sort(key=lambda e: -len(e["input_ids"]))
    pad = tokenizer.pad_token_id
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.where(torch.tensor(e["completion_mask"]) == 1, ids[j, :n], IGNORE_INDEX)
        yield ids, mask, labels


@torch.no_grad()
def exit_losses(sm, rows, exits, max_length: int = 512, batch_size: int = 8, progress: bool = True) -> dict:
    """{exit: {"loss", "perplexity", "tokens"}} over the completion tokens of `rows`."""
    totals = {k: 0.0 for k in exits}
    count = 0
    device = next(sm.model.parameters()).device
    n_batches = math.ceil(len(rows) / batch_size)
    for ids, mask, labels in tqdm(batches(sm.tokenizer, rows, max_length, batch_size), total=n_batches,
                                  desc="held-out loss", disable=not progress):
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        sel, targets = label_positions(labels)
        for k, h in sm.hidden_at_exits(ids, mask, exits).items():
            norm, head = sm.exit_norm_head(k)
            totals[k] += exit_cross_entropy(h[:, :-1][sel], targets, norm, head, sm.arch.softcap).item()
        count += int(sel.sum())
    return {k: {"loss": totals[k] / max(count, 1), "perplexity": math.exp(min(totals[k] / max(count, 1), 50)),
                "tokens": count} for k in exits}


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
