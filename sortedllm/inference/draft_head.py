"""A cheaper head for drafting and confidence screening: the LM head restricted to the most frequent tokens.

SmolLM2-135M's head is ~21% of its weights, so a full-vocabulary head makes every drafted token cost about a fifth
of a full forward on top of the draft's layers. Restricted to the N most frequent tokens it costs N / V of that.
Exactness is unaffected: drafts only propose, the full model's head verifies (greedy: a draft outside the subset
is simply never proposed; sampling: the draft distribution is zero outside the subset, which rejection sampling
handles exactly).

Frequencies are token counts over the built-in *training* splits (GSM8K, Alpaca, TriviaQA prompts and answers),
tokenised with the model's own tokenizer, so no benchmark test answer is counted; the tokenizer's special tokens
and the stop tokens are always kept. The counts are cached per tokenizer under the sortedllm cache folder.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import Counter

import torch
from torch import nn

from ..errors import SortedError

CORPUS = ("gsm8k:train", "alpaca:train", "triviaqa:train")
_HEADS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _counts_key(tokenizer) -> str:
    from ..data import data_dir

    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    text = f"{type(tokenizer).__name__}:{vocab}:{','.join(CORPUS)}:{data_dir().resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def token_counts(tokenizer) -> dict[int, int]:
    """How often each token id occurs in the built-in training data (cached on disk per tokenizer)."""
    from ..checkpoint import atomic_write_text
    from ..data import load_examples
    from ..models import cache_dir

    path = cache_dir() / "token_counts" / f"{_counts_key(tokenizer)}.json"
    if path.is_file():
        try:
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        except (json.JSONDecodeError, ValueError):
            pass  # a damaged cache entry is recomputed
    texts = []
    for source in CORPUS:
        for row in load_examples(source):
            if isinstance(row["prompt"], str):
                texts.append(row["prompt"])
            texts.append(row["completion"])
    counts = Counter(t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids)
    try:
        atomic_write_text(path, json.dumps(dict(counts)))
    except OSError:
        pass  # a read-only cache only costs the recount next time
    return dict(counts)


def frequent_tokens(tokenizer, size: int, always=()) -> torch.Tensor:
    """The `size` most frequent token ids (plus `always` and the special tokens), sorted."""
    counts = token_counts(tokenizer)
    keep = set(always) | set(getattr(tokenizer, "all_special_ids", []) or [])
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    for t in ranked:
        if len(keep) >= size:
            break
        keep.add(t)
    if len(keep) < size:  # the corpus has fewer distinct tokens: fill with the lowest unused ids
        keep.update(t for t in range(len(tokenizer)) if t not in keep and len(keep) < size)
    return torch.tensor(sorted(keep), dtype=torch.long)


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


def restricted_head(sm, k: int, size: int) -> RestrictedHead:
    """Exit k's head restricted to the `size` most frequent tokens; built once per head weights and size."""
    from .batch import stop_ids

    _, head = sm.exit_norm_head(k)
    vocab = head.weight.shape[0]
    if not 1 <= size:
        raise SortedError(f"draft vocabulary size must be >= 1, got {size}")
    if sm.tokenizer is None:
        raise SortedError("a restricted draft head needs the model's tokenizer (token frequencies)")
    size = min(size, vocab)
    per_head = _HEADS.setdefault(head, {})
    version = (head.weight._version, head.weight.data_ptr())
    if size not in per_head or per_head[size][0] != version:  # new size, or the weights changed (training)
        ids = frequent_tokens(sm.tokenizer, size, always=stop_ids(sm.tokenizer, sm.model))
        ids = ids[ids < vocab]
        per_head[size] = (version, RestrictedHead(head, ids).eval())
    return per_head[size][1]
