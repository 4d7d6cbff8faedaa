"""Train a draft layer (adapters/draft_layer.py) for a frozen sorted model, and its recipe: KL(last layer || draft)
over the draft vocabulary at the answer positions of prompt/completion rows.

    sortedllm train --config configs/draft.yaml --base runs/draft-quality/final [--draft_shared 7 --draft_layers 2]

writes the adapter folder `<output_dir>` (`draft_layer.safetensors` + `sorted_adapter.json`); `sortedllm generate
--speculative 9 --draft_layer <output_dir>` drafts with it (the file alone works too). The head's rows are the first
N tokens (`--draft_vocab`, 0 = all) of the model's draft vocabulary, the one its restricted exit heads use too; a model
saved without one gets one counted on the draft's training rows, saved in the folder (`draft_vocab.json`).

The model is frozen, so each row's layer-`shared` states and the last layer's logits over the draft vocabulary are
computed once and kept (bf16 / fp16) for every epoch: on a CPU that frozen forward is most of a step's cost. They are
held in memory: ~1.8 MB per GSM8K row on the default model (3,500 rows: ~6.5 GB). Written as a plain loop because no
library trains a branch on cached features of a frozen model (the Trainer would recompute the frozen forward every
step); the folder is written atomically at the end.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import adapter_kind
from ..adapters.draft_layer import DraftLayer, check_shape
from ..adapters.vocab import VOCAB_FILE, count_vocab, vocab_json
from ..checkpoint import atomic_dir, writable_folder
from ..data import encode_example, load_examples
from ..errors import SortedError
from ..exits import SortedModel

log = logging.getLogger("sortedllm")


@dataclass
class DraftOptions:
    """How to train a draft layer: `shared` model layers + `layers` own ones, a head over the first `vocab` tokens
    of the model's draft vocabulary, else the most frequent of the training rows (None = every token); AdamW at
    `lr` (head rows at `head_lr`) for `steps` of `batch` rows."""

    shared: int
    layers: int = 2
    vocab: int | None = 8192
    steps: int = 1000
    batch: int = 8
    lr: float = 1e-3
    head_lr: float = 2e-4
    seed: int = 0
    progress: bool = False


@torch.no_grad()
def cache_features(sm, examples: list[dict], draft: DraftLayer, progress: bool = False) -> list[tuple]:
    """Per row: the state after layer `shared` [T, H] (bf16), the positions that predict answer tokens, and the
    last layer's logits there over the draft vocabulary (fp16)."""
    arch, s = sm.arch, draft.shared
    out = []
    for e in tqdm(examples, desc="cache frozen features", disable=not progress):
        ids = torch.tensor([e["input_ids"]], device=arch.head.weight.device)
        h = sm.forward_early(ids, s)
        top = sm.forward_remainder(h, s)
        where = torch.tensor(e["completion_mask"][1:] + [0]).nonzero().squeeze(1)  # positions predicting answers
        if len(where):
            out.append((h[0].to(torch.bfloat16), where, arch.logits(top[0, where], head=draft.head).to(torch.float16)))
    return out


def draft_kl(sm, draft: DraftLayer, h: torch.Tensor, where: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || draft) over one sequence's answer positions (one unpadded sequence: no mask needed)."""
    d = draft.hidden(sm.arch, h.float().unsqueeze(0))[0, where]
    return F.kl_div(F.log_softmax(draft.logits(sm.arch, d), -1), F.log_softmax(teacher.float(), -1),
                    log_target=True, reduction="sum")


def train_draft(sm, examples: list[dict], options: DraftOptions) -> tuple[DraftLayer, list[float]]:
    """A draft layer on `sm` (frozen), trained on `examples` (encoded rows); returns it and the loss per step.
    AdamW, 20 warm-up steps then linear decay; each step's gradient is the mean over its batch's answer tokens."""
    o = options
    if not examples:
        raise SortedError("no training rows with an answer to train the draft layer on")
    sm.model.requires_grad_(False)
    torch.manual_seed(o.seed)
    rng = random.Random(o.seed)
    vocab = None
    if o.vocab:
        ranked = sm.draft_vocab if sm.draft_vocab is not None else \
            count_vocab(sm.tokenizer, sm.model, [e["input_ids"] for e in examples], o.vocab, None)[0]
        vocab = ranked[:o.vocab]
    draft = DraftLayer.from_model(sm, o.shared, o.layers, vocab).float().requires_grad_(True)
    data = cache_features(sm, examples, draft, o.progress)
    if not data:
        raise SortedError("no training row has an answer token within max_length")
    body = list(draft.layers.parameters()) + list(draft.norm.parameters())
    opt = torch.optim.AdamW([{"params": body, "lr": o.lr}, {"params": [draft.head.weight], "lr": o.head_lr}],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1 - i / o.steps))
    losses = []
    bar = tqdm(range(o.steps), desc="train draft layer", disable=not o.progress)
    for _ in bar:
        opt.zero_grad()
        total, n = 0.0, 0
        for h, where, teacher in rng.sample(data, min(o.batch, len(data))):
            loss = draft_kl(sm, draft, h, where, teacher)
            loss.backward()
            total += loss.item()
            n += len(where)
        for p in draft.parameters():
            if p.grad is not None:
                p.grad /= n
        opt.step()
        sched.step()
        losses.append(total / n)
        bar.set_postfix(kl=f"{sum(losses[-25:]) / len(losses[-25:]):.4f}")
    return draft.eval().requires_grad_(False), losses


def check_output(folder: str) -> Path:
    """The draft layer's folder replaces `--output_dir` as a whole: it must be new, empty or a draft layer's."""
    out = writable_folder(folder)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and adapter_kind(out) is not DraftLayer)):
        raise SortedError(f"--output_dir {folder} exists and is not an empty folder or a draft layer's; the draft "
                          "layer's folder replaces it as a whole: choose a new or empty folder")
    return out


def train(script, args) -> Path:
    """`sortedllm train --mode draft --base B`: a draft layer for the frozen B, written to `<output_dir>` (options:
    `--data`, `--max_steps`, `--learning_rate`, `--per_device_train_batch_size`, `--max_length`, `--seed`,
    `--draft_shared`, `--draft_layers`, `--draft_vocab`, `--draft_head_lr`)."""
    # 0. Fail fast, before any loading.
    if not script.base:
        raise SortedError("--mode draft needs --base <checkpoint>: the (frozen) model the draft layer drafts for")
    if script.lora or script.resume:
        raise SortedError("--mode draft trains a small draft layer in one short run: drop --lora and --resume")
    if args.max_steps is None or args.max_steps < 1:
        raise SortedError("--mode draft needs --max_steps N (N >= 1)")
    out = check_output(args.output_dir)

    # 1. The frozen base and the draft's shape: by default it costs what the base's first exit costs.
    sm = SortedModel.from_pretrained(script.base, dtype=script.dtype, trust_remote_code=args.trust_remote_code)
    shared = args.draft_shared if args.draft_shared is not None else sm.exits[0] - args.draft_layers
    check_shape(sm.arch, shared, args.draft_layers)
    if args.learning_rate < 1e-4:
        log.warning("--mode draft: learning_rate %g is far below the 1e-3 the default model's draft layer was trained "
                    "with (docs/draft-quality.md); pass --learning_rate", args.learning_rate)

    # 2. Data: encoded rows (their answer positions are where the draft learns the last layer's distribution).
    rows = load_examples(script.data, limit=script.data_limit)
    examples = [e for e in (encode_example(sm.tokenizer, r, args.max_length) for r in rows) if e is not None]
    log.info("draft layer: %d shared + %d own layer(s) (exit %d's cost), %d rows, %d steps", shared,
             args.draft_layers, shared + args.draft_layers, len(examples), args.max_steps)

    # 3. Train on cached features of the frozen model; a model saved without a draft vocabulary gets the data's.
    counted = sm.draft_vocab is None and bool(args.draft_vocab)
    if counted:
        sm.draft_vocab, sm.draft_vocab_info = count_vocab(sm.tokenizer, sm.model, [e["input_ids"] for e in examples],
                                                          args.draft_vocab, script.data)
    options = DraftOptions(shared=shared, layers=args.draft_layers, vocab=args.draft_vocab or None,
                           steps=args.max_steps, batch=args.per_device_train_batch_size, lr=args.learning_rate,
                           head_lr=args.draft_head_lr, seed=args.seed, progress=not args.disable_tqdm)
    draft, losses = train_draft(sm, examples, options)

    # 4. Save the adapter folder: the weights, the base it drafts for (and the draft vocabulary counted here).
    draft.info = {"data": script.data, "rows": len(examples), "steps": args.max_steps,
                  "final_kl": f"{sum(losses[-25:]) / len(losses[-25:]):.4f}"}
    with atomic_dir(out) as tmp:
        draft.write(tmp, out)
        if counted:
            (tmp / VOCAB_FILE).write_text(vocab_json(sm.draft_vocab, sm.draft_vocab_info))
    return out
