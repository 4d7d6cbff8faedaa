"""Teacher-forced held-out loss and perplexity per exit (the same loss the trainer optimises)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..data import encode_example, load_examples
from ..train.loss import IGNORE_INDEX, exit_cross_entropy, label_positions


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


def run(sm, exits, data: str, limit: int | None, max_length: int = 512, batch_size: int = 8) -> dict:
    rows = load_examples(data, limit=limit)
    return exit_losses(sm, rows, exits, max_length=max_length, batch_size=batch_size)
