"""Probe (issue 10): can one trained draft-only decoder layer on top of the first s shared layers (Kangaroo-style
adapter; the model itself stays frozen, so the last exit is untouched) agree with the last layer far more often
than the bare exit s+1 of the same cost?

    SORTEDLLM_DATA_DIR=../shared/data python experiments/draft_layer_probe.py --model runs/draft-quality/final \
        --shared 8 --rows 3500 --steps 2500 --lr 1e-3 --save runs/draft-layer/layer.safetensors

Stage 1 caches, for GSM8K train rows (teacher-forced on the references), the hidden state after layer s and the
last layer's logits over the draft vocabulary at answer positions. Stage 2 trains a copy of layer s+1 (+ a copy of
the final norm) by KL to those logits. Stage 3 teacher-forces the full model's own greedy answers to GSM8K test
prompts and reports top-1 agreement with the last layer for exits s, s+1, s+draft_layers, s+4 and the draft, then
prices self-speculation with each (accepted drafts per cycle and predicted speedup, as the `agreement` task does).
Written by hand: an experiment, not a library feature (no library trains such a draft layer on a frozen HF model).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sortedllm.data import encode_example, encode_prompt, load_examples
from sortedllm.evaluate.agreement import MAX_DRAFT, accepted_tokens, agreement_runs, speedups, step_costs
from sortedllm.exits import SortedModel
from sortedllm.inference.draft_head import restricted_head
from sortedllm.inference.static import generate


def draft_hidden(arch, layers, norm, h, pos):
    """The draft's normed state: one unpadded sequence, so no mask is needed (SDPA's causal path is exact)."""
    rope = arch._rope(h, pos)
    for layer in layers:
        h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
    return norm(h)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/draft-quality/final")
    p.add_argument("--shared", type=int, default=8)
    p.add_argument("--draft_layers", type=int, default=1)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--eval_prompts", type=int, default=30)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--out", default="experiments/results/draft-layer-probe/probe.json")
    p.add_argument("--train_head", action="store_true",
                   help="also train the draft's own copy of the head rows of its vocabulary (no extra inference cost)")
    p.add_argument("--head_lr", type=float, default=2e-4)
    p.add_argument("--save", default=None, help="also save the trained draft layer(s) + norm here (safetensors)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    sm = SortedModel.from_pretrained(a.model)
    sm.model.eval().requires_grad_(False)
    arch, L, s = sm.arch, sm.num_layers, a.shared
    tok = sm.tokenizer
    if not 1 <= s < s + a.draft_layers < L:
        p.error(f"--shared {s} with --draft_layers {a.draft_layers} must leave layers for the verifier (model: {L})")
    if any(t != "full_attention" for t in arch.layer_types[s:s + a.draft_layers]):
        p.error("the probe's draft layers run without a mask, so they must be full-attention layers")
    sub = restricted_head(sm, L, a.vocab)

    # Stage 1: cache layer-s states and teacher logits over the subset.
    rows = load_examples("gsm8k:train", limit=a.rows)
    data = []
    t0 = time.time()
    with torch.no_grad():
        for r in tqdm(rows, desc="cache"):
            e = encode_example(tok, r, max_length=384)
            ids = torch.tensor([e["input_ids"]])
            h = arch.run_layers(arch.embed(ids), 0, s)
            top = arch.run_layers(h, s, L)
            where = torch.tensor(e["completion_mask"][1:] + [0]).nonzero().squeeze(1)  # positions predicting answer
            z = sub(arch.norm(top[0, where]))
            data.append((h[0].to(torch.bfloat16), where, z.to(torch.float16)))
    cache_s = time.time() - t0

    layer = copy.deepcopy(arch.layers[s:s + a.draft_layers]).float().requires_grad_(True)
    norm = copy.deepcopy(arch.norm).float().requires_grad_(True)
    dhead = copy.deepcopy(sub).requires_grad_(a.train_head)  # the draft's head: the subset's rows, trainable or not
    params = list(layer.parameters()) + list(norm.parameters())
    groups = [{"params": params, "lr": a.lr}]
    if a.train_head:
        groups.append({"params": [dhead.weight], "lr": a.head_lr})
        params = params + [dhead.weight]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.0, 1 - i / max(1, a.steps)))
    t0 = time.time()
    losses = []
    for step in tqdm(range(a.steps), desc="train"):
        batch = random.sample(data, a.batch)
        loss_sum, n = 0.0, 0
        opt.zero_grad()
        for h, where, z in batch:  # one sequence at a time: no padding logic in a probe
            pos = torch.arange(h.shape[0]).unsqueeze(0)
            d = draft_hidden(arch, layer, norm, h.float().unsqueeze(0), pos)[0, where]
            logp = F.log_softmax(dhead(d), -1)
            q = F.log_softmax(z.float(), -1)
            loss = F.kl_div(logp, q, log_target=True, reduction="sum")
            loss.backward()
            loss_sum += loss.item()
            n += len(where)
        for prm in params:
            prm.grad /= n
        opt.step()
        sched.step()
        losses.append(loss_sum / n)
        if step % 25 == 0:
            tqdm.write(f"step {step} kl {sum(losses[-25:]) / len(losses[-25:]):.4f}")
    train_s = time.time() - t0
    if a.save:
        from safetensors.torch import save_file

        state = {f"layers.{n}": t for n, t in layer.state_dict().items()}
        state |= {f"norm.{n}": t for n, t in norm.state_dict().items()}
        if a.train_head:
            state |= {"head.weight": dhead.weight.detach(), "head.ids": dhead.ids}
        save_file(state, a.save)

    # Stage 3: agreement on the full model's own greedy GSM8K test answers.
    test = load_examples("gsm8k:test", limit=a.eval_prompts)
    prompts = [r["prompt"] for r in test]
    gens = generate(sm, prompts, max_new_tokens=a.max_new_tokens, batch_size=16, progress=True)
    p_ids = [encode_prompt(tok, q) for q in prompts]
    conts = [g.token_ids for g in gens]
    exits = sorted({s, s + 1, s + a.draft_layers, s + 4, L})
    runs = agreement_runs(sm, p_ids, conts, exits, draft_vocab=a.vocab)
    res = {f"exit_{k}": {"top1": sum(map(sum, runs["top1"][k])) / sum(map(len, runs["top1"][k])),
                         "draft": sum(map(sum, runs["draft"][k])) / sum(map(len, runs["draft"][k]))}
           for k in exits}
    agree = tot = agree_d = 0
    adapter_runs = []
    with torch.no_grad():
        for q, c in zip(p_ids, conts):
            if not c:
                continue
            ids = torch.tensor([q + c])
            h = arch.run_layers(arch.embed(ids), 0, s)
            ref = arch.logits(arch.run_layers(h, s, L))[0].argmax(-1)
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            d = draft_hidden(arch, layer, norm, h, pos)[0]
            at = torch.arange(len(q) - 1, len(q) - 1 + len(c))
            agree += int((arch.head(d[at]).argmax(-1) == ref[at]).sum())
            hits = dhead.ids[dhead(d[at]).argmax(-1)] == ref[at]
            adapter_runs.append(hits.tolist())
            agree_d += int(hits.sum())
            tot += len(c)
    res[f"adapter_{s}+{a.draft_layers}"] = {"top1": agree / tot, "draft": agree_d / tot}

    # Predicted self-speculation speedup, priced as the agreement task prices exits: a draft of s shared layers +
    # the trained layer(s) costs what exit k = s + draft_layers costs; its verifier runs layers s+1..L.
    k = s + a.draft_layers
    mid = sorted(range(len(p_ids)), key=lambda i: len(p_ids[i]) + len(conts[i]))[len(p_ids) // 2]
    cost = step_costs(sm, p_ids[mid] + conts[mid], [s, k], draft_vocab=a.vocab, rounds=3)
    for name, draft_runs, start in ((f"exit_{k}", runs["draft"][k], k), (f"adapter_{s}+{a.draft_layers}",
                                                                          adapter_runs, s)):
        acc = accepted_tokens(draft_runs)
        sp = speedups(acc, cost[("full",)], cost[("draft", k)], cost[("feed", k)],
                      [cost[("verify", start, g)] for g in range(1, MAX_DRAFT + 1)])
        best = max(range(MAX_DRAFT), key=lambda i: sp[i])
        res[name].update(accepted_by_draft_length=acc, speedup_by_draft_length=sp, best_draft_length=best + 1,
                         best_speedup=sp[best])
    out = {"model": a.model, "shared": s, "draft_layers": a.draft_layers, "rows": len(rows), "data": "gsm8k:train",
           "steps": a.steps, "batch": a.batch, "lr": a.lr,
           "train_head": a.train_head, "head_lr": a.head_lr if a.train_head else None,
           "vocab": a.vocab, "eval_prompts": a.eval_prompts, "positions": tot, "cache_seconds": cache_s,
           "train_seconds": train_s, "final_kl": sum(losses[-25:]) / max(1, len(losses[-25:])), "agreement": res}
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
