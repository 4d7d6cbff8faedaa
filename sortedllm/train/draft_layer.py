"""Train a draft layer (inference/draft_layer.py) for a frozen sorted model: KL(last layer || draft) over the
draft vocabulary at the answer positions of prompt/completion rows.

    sortedllm train --mode draft --base runs/draft-quality/final --draft_shared 7 --draft_layers 2 --data gsm8k \
        --data_limit 3500 --max_steps 2500 --learning_rate 1e-3 --per_device_train_batch_size 8 \
        --output_dir runs/draft-layer

writes `<output_dir>/draft_layer.safetensors`; `sortedllm generate --speculative 9 --draft_layer <file>` drafts
with it. The model is frozen, so each row's layer-`shared` states and the last layer's logits over the draft
vocabulary are computed once and kept (bf16 / fp16) for every epoch: on a CPU that frozen forward is most of a
step's cost. They are held in memory: ~1.8 MB per GSM8K row on the default model (3,500 rows: ~6.5 GB). Written as a plain loop because no library trains a branch on cached features of a frozen model
(the Trainer would recompute the frozen forward every step); the file is written atomically at the end.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import encode_example, load_examples
from ..errors import SortedError
from ..inference.draft_layer import DRAFT_FILE, DraftLayer, check_shape

log = logging.getLogger("sortedllm")


@torch.no_grad()
def cache_features(sm, examples: list[dict], draft: DraftLayer, progress: bool = False) -> list[tuple]:
    """Per row: the state after layer `shared` [T, H] (bf16), the positions that predict answer tokens, and the
    last layer's logits there over the draft vocabulary (fp16)."""
    arch, s, L = sm.arch, draft.shared, sm.num_layers
    out = []
    for e in tqdm(examples, desc="cache frozen features", disable=not progress):
        ids = torch.tensor([e["input_ids"]], device=arch.head.weight.device)
        h = arch.run_layers(arch.embed(ids), 0, s)
        top = arch.run_layers(h, s, L)
        where = torch.tensor(e["completion_mask"][1:] + [0]).nonzero().squeeze(1)  # positions predicting answers
        if len(where):
            out.append((h[0].to(torch.bfloat16), where, arch.logits(top[0, where], head=draft.head).to(torch.float16)))
    return out


def draft_kl(sm, draft: DraftLayer, h: torch.Tensor, where: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || draft) over one sequence's answer positions (one unpadded sequence: no mask needed)."""
    d = draft.hidden(sm.arch, h.float().unsqueeze(0))[0, where]
    return F.kl_div(F.log_softmax(draft.logits(sm.arch, d), -1), F.log_softmax(teacher.float(), -1),
                    log_target=True, reduction="sum")


def train_draft(sm, examples: list[dict], *, shared: int, layers: int = 2, vocab: int | None = 8192,
                steps: int = 1000, batch: int = 8, lr: float = 1e-3, head_lr: float = 2e-4, seed: int = 0,
                progress: bool = False) -> tuple[DraftLayer, list[float]]:
    """A draft layer on `sm` (frozen), trained on `examples` (encoded rows); returns it and the loss per step.
    AdamW, 20 warm-up steps then linear decay; each step's gradient is the mean over its batch's answer tokens."""
    if not examples:
        raise SortedError("no training rows with an answer to train the draft layer on")
    sm.model.requires_grad_(False)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    draft = DraftLayer.from_model(sm, shared, layers, vocab).float().requires_grad_(True)
    data = cache_features(sm, examples, draft, progress)
    if not data:
        raise SortedError("no training row has an answer token within max_length")
    body = list(draft.layers.parameters()) + list(draft.norm.parameters())
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": [draft.head.weight], "lr": head_lr}],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1 - i / steps))
    losses = []
    bar = tqdm(range(steps), desc="train draft layer", disable=not progress)
    for _ in bar:
        opt.zero_grad()
        total, n = 0.0, 0
        for h, where, teacher in rng.sample(data, min(batch, len(data))):
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


def train(script, args) -> Path:
    """`sortedllm train --mode draft`: the frozen `--base` model, `--data`, `--max_steps`, `--learning_rate`,
    `--per_device_train_batch_size`, `--max_length`, `--seed`; writes `<output_dir>/draft_layer.safetensors`."""
    from ..checkpoint import writable_folder
    from ..exits import SortedModel

    if not script.base:
        raise SortedError("--mode draft needs --base <checkpoint>: the (frozen) model the draft layer drafts for")
    if script.lora or script.resume:
        raise SortedError("--mode draft trains a small draft layer in one short run: drop --lora and --resume")
    if args.max_steps is None or args.max_steps < 1:
        raise SortedError("--mode draft needs --max_steps N (N >= 1)")
    out = writable_folder(args.output_dir)
    sm = SortedModel.from_pretrained(script.base, dtype=script.dtype)
    shared = args.draft_shared if args.draft_shared is not None else sm.exits[0] - args.draft_layers
    check_shape(sm.arch, shared, args.draft_layers)
    if args.learning_rate < 1e-4:
        log.warning("--mode draft: learning_rate %g is far below the 1e-3 the default model's draft layer was trained "
                    "with (docs/draft-quality.md); pass --learning_rate", args.learning_rate)
    rows = load_examples(script.data, limit=script.data_limit)
    examples = [e for e in (encode_example(sm.tokenizer, r, args.max_length) for r in rows) if e is not None]
    log.info("draft layer: %d shared + %d own layer(s) (exit %d's cost), %d rows, %d steps", shared,
             args.draft_layers, shared + args.draft_layers, len(examples), args.max_steps)
    draft, losses = train_draft(sm, examples, shared=shared, layers=args.draft_layers, vocab=args.draft_vocab,
                                steps=args.max_steps, batch=args.per_device_train_batch_size,
                                lr=args.learning_rate, head_lr=args.draft_head_lr, seed=args.seed,
                                progress=not args.disable_tqdm)
    return draft.save(Path(out) / DRAFT_FILE, base=script.base, data=script.data, rows=len(examples),
                      steps=args.max_steps, final_kl=f"{sum(losses[-25:]) / len(losses[-25:]):.4f}")
