"""The draft vocabulary: the tokens a cheap head is restricted to for drafting and early-exit screening, computed
from training data when a model is trained or exported and saved beside it (`draft_vocab.json`).

SmolLM2-135M's head is ~21% of its weights, so a full-vocabulary head makes every drafted token cost about a fifth
of a full forward on top of the draft's layers. Restricted to the N most frequent tokens it costs N / V of that.
Exactness is unaffected: drafts only propose, the full model's head verifies (greedy: a draft outside the subset
is simply never proposed; sampling: the draft distribution is zero outside the subset, which rejection sampling
handles exactly).

The file ranks token ids: the tokenizer's special tokens and the model's stop tokens first (always kept), then
every token of the training rows (chat template applied, as training sees them) by decreasing count, cut at the
requested size. `restricted_head(sm, k, n)` takes the first n. A model without the file (an untuned hub model) has
`sm.draft_vocab = None` and drafts with the full head; add one with `sortedllm export --model FOLDER --draft_vocab N
--draft_data DATA` or `add_draft_vocab`. Nothing is tokenised at inference time.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write_text, read_manifest, verify_manifest, write_manifest
from ..data import encode_example, load_examples
from ..errors import SortedError

VOCAB_FILE = "draft_vocab.json"
FORMAT = "sortedllm-draft-vocab"
DEFAULT_SIZE = 8192
_HEADS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    return ids


def rank_tokens(sequences, size: int, always=()) -> torch.Tensor:
    """`always` (sorted) then the other tokens of `sequences` by decreasing count (ties: lower id first), at most
    `size` in all."""
    counts = Counter(t for ids in sequences for t in ids)
    first = sorted(set(always))
    kept = set(first)
    rest = sorted((t for t in counts if t not in kept), key=lambda t: (-counts[t], t))
    return torch.tensor((first + rest)[:size], dtype=torch.long)


def count_vocab(tokenizer, model, sequences, size: int, data: str | None) -> tuple[torch.Tensor, dict]:
    """The draft vocabulary of token-id `sequences` (the training rows) and where it came from."""
    if size < 1:
        raise SortedError(f"draft vocabulary size must be >= 1, got {size}")
    sequences = list(sequences)
    always = set(getattr(tokenizer, "all_special_ids", None) or []) | stop_token_ids(tokenizer, model)
    ids = rank_tokens(sequences, size, always)
    info = {"data": data, "rows": len(sequences), "tokens": sum(len(s) for s in sequences), "size": len(ids)}
    return ids, info


def vocab_from_data(tokenizer, model, data: str, size: int = DEFAULT_SIZE, max_length: int | None = None):
    """`count_vocab` over the rows of a data spec (gsm8k, a JSONL file, hf:..., a+b), encoded as training does."""
    encoded = (encode_example(tokenizer, row, max_length) for row in load_examples(data))
    return count_vocab(tokenizer, model, [e["input_ids"] for e in encoded if e is not None], size, data)


def vocab_json(ids: torch.Tensor, info: dict) -> str:
    return json.dumps({"format": FORMAT, **info, "ids": [int(t) for t in ids]}) + "\n"


def load_draft_vocab(folder) -> tuple[torch.Tensor | None, dict]:
    """(ranked token ids, provenance) from a model folder, or (None, {}) when it has no draft vocabulary."""
    path = Path(folder) / VOCAB_FILE
    if not Path(folder).is_dir() or not path.is_file():
        return None, {}
    try:
        data = json.loads(path.read_text())
        ids = data["ids"]
        if data.get("format") != FORMAT or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError("not a list of token ids")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise SortedError(f"{path} is malformed ({e}); write it again with `sortedllm export --model {folder} "
                          f"--draft_vocab N`") from e
    return torch.tensor(ids, dtype=torch.long), {k: v for k, v in data.items() if k not in ("format", "ids")}


def add_draft_vocab(folder, ids: torch.Tensor, info: dict) -> Path:
    """Write (or replace) the draft vocabulary of an existing model folder in place; its manifest is checked
    first and re-written after, so the folder stays verifiable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SortedError(f"{folder} is not a local folder: a draft vocabulary is written into a model folder "
                          "(save or export the model to one first)")
    verify_manifest(folder, require=False, fix="re-save or re-copy it before adding a draft vocabulary")
    old = read_manifest(folder)
    atomic_write_text(folder / VOCAB_FILE, vocab_json(ids, info))
    if old is not None:
        write_manifest(folder, {k: v for k, v in old.items() if k not in ("format", "version", "files")})
    return folder / VOCAB_FILE


class RestrictedHead(nn.Module):
    """`head` on a subset of the vocabulary: logits [..., len(ids)]; `ids` maps a column back to a token id."""

    def __init__(self, head: nn.Linear, ids: torch.Tensor):
        super().__init__()
        self.ids = ids.to(head.weight.device)
        self.weight = nn.Parameter(head.weight.detach()[self.ids].clone(), requires_grad=False)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach()[self.ids].clone(),
                                                                requires_grad=False)
        self.vocab_size = head.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)

    def to_vocab(self, probs: torch.Tensor) -> torch.Tensor:
        """Scatter a distribution over the subset [..., n] into the full vocabulary [..., V]."""
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return out.index_copy_(-1, self.ids, probs)


def restricted_head(sm, k: int, size: int | None) -> RestrictedHead | None:
    """Exit k's head restricted to the first `size` tokens of `sm.draft_vocab`; None (use the full head) when the
    model has no draft vocabulary, `size` is None/0, or the subset would be the whole vocabulary. Built once per
    head weights, vocabulary and size."""
    if sm.draft_vocab is None or not size:
        return None
    if size < 1:
        raise SortedError(f"draft vocabulary size must be >= 1, got {size}")
    _, head = sm.exit_norm_head(k)
    vocab = head.weight.shape[0]
    ids = sm.draft_vocab[:size]
    ids = ids[ids < vocab].sort().values
    if len(ids) >= vocab:
        return None
    per_head = _HEADS.setdefault(head, {})
    version = (head.weight._version, head.weight.data_ptr())
    cached = per_head.get(size)
    if cached is None or cached[0] != version or cached[1] is not sm.draft_vocab:  # new weights or vocabulary
        cached = per_head[size] = (version, sm.draft_vocab, RestrictedHead(head, ids).eval())
    return cached[2]
