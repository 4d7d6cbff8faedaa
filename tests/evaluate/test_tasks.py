"""Each task's numbers on models whose answers are known (constant-output tiny models), and the similarity
analysis against an independent computation from Hugging Face's own forward pass."""

import json

import pytest
import torch
from evaluate_fixtures import constant_model

from sortedllm import SortedModel
from sortedllm.errors import SortedError
from sortedllm.evaluate import evaluate, prepare
from sortedllm.evaluate.similarity import compare_exits
from sortedllm.evaluate.tournament import matches
from sortedllm.exits import hidden_from_outputs
from sortedllm.inference import Static, generate
from sortedllm.inference.batch import encode_prompts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sevens(tokenizer):
    return SortedModel(constant_model(tokenizer, "7"), tokenizer, exits=[2, 4])


@pytest.fixture(scope="module")
def blank(tokenizer):
    return SortedModel(constant_model(tokenizer, "\n", seed=1), tokenizer, exits=[2, 4])


def test_gsm8k_and_triviaqa_scores(sevens, tmp_path):
    """The model answers "77777777" (8 tokens) to everything: one row of each data set expects exactly that."""
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "q1?", "answer": "7 times ... #### 77,777,777"}, {"question": "q2?", "answer": "#### 5"}])
    tqa = write_jsonl(tmp_path / "tqa.jsonl", [
        {"question": "q1?", "answer": "x", "answers": ["nope", "The 77777777."]},
        {"question": "q2?", "answer": "Paris", "answers": ["Paris"]}])
    res = evaluate({"A": sevens}, ["gsm8k", "triviaqa"], data_file=f"gsm8k={gsm},triviaqa={tqa}", max_new_tokens=8,
                   progress=False)
    for k in ("2", "4"):
        assert res["tasks"]["gsm8k"]["A"][k] == {"accuracy": 0.5, "n": 2, "answered": 1.0, "mean_new_tokens": 8.0}
        assert res["tasks"]["triviaqa"]["A"][k]["exact_match"] == 0.5
    assert res["details"]["gsm8k"]["headline"] == {"metric": "accuracy", "higher_is_better": True}
    assert res["models"]["A"] == {"path": None, "mode": "untuned", "exits": [2, 4]}


def test_tournament_counts_and_matrix(sevens, blank):
    """Sevens (one word of content) beats blank (nothing) on every prompt in both orders: W = n, score +1."""
    res = evaluate({"sevens": sevens, "blank": blank}, ["tournament"], limit=3, max_new_tokens=4, progress=False)
    detail = res["details"]["tournament"]
    assert [(m["a"], m["b"]) for m in detail["matches"]] == [
        (["sevens", 2], ["blank", 2]), (["sevens", 2], ["blank", 4]), (["sevens", 4], ["blank", 2]),
        (["sevens", 4], ["blank", 4])]
    for m in detail["matches"]:
        assert (m["wins"], m["losses"], m["ties"], m["n"], m["score"]) == (3, 0, 0, 3, 1.0)
    assert res["tasks"]["tournament"]["sevens"]["2"]["score"] == 1.0
    assert res["tasks"]["tournament"]["blank"]["4"] == {"wins": 0, "losses": 6, "ties": 0, "n": 6, "matches": 2,
                                                        "score": -1.0}
    assert detail["judge"]["validation"]["accuracy"] > 0.6  # the offline judge is validated in every run
    single = evaluate({"sevens": sevens}, ["tournament"], limit=2, max_new_tokens=4, progress=False)
    assert [m["ties"] for m in single["details"]["tournament"]["matches"]] == [2]  # identical answers tie


def test_tournament_pairs():
    ex = {"A": [9, 18, 30], "B": [9, 18, 30]}
    assert len(matches(ex, "cross")) == 9
    assert matches(ex, "diagonal") == [(("A", 9), ("B", 9)), (("A", 18), ("B", 18)), (("A", 30), ("B", 30))]
    assert matches({"A": [9, 18, 30]}, "cross") == [(("A", 9), ("A", 18)), (("A", 9), ("A", 30)),
                                                    (("A", 18), ("A", 30))]
    assert matches({"A": [9, 18, 30]}, "last") == [(("A", 9), ("A", 30)), (("A", 18), ("A", 30))]
    with pytest.raises(SortedError, match="unknown --pairs 'all'"):
        prepare(["tournament"], pairs="all")


def test_similarity_matches_hf_forward(tiny_sorted):
    """KL / cosine / top-1 at generated positions equal the same quantities computed from HF's forward with
    output_hidden_states, prompt by prompt without padding (checks position alignment and padding)."""
    sm = tiny_sorted
    prompts = ["Hello there", "Write a long sentence about the sea and the sky, please."]
    gens = generate(sm, prompts, strategy=Static(sm.num_layers), max_new_tokens=5)
    prompt_ids = encode_prompts(sm, prompts)
    ours = compare_exits(sm, prompt_ids, [g.token_ids for g in gens], [2, 4], positions=5, batch_size=2)
    L = sm.num_layers
    kl = {2: [], 4: []}
    cos = {2: [], 4: []}
    for ids, g in zip(prompt_ids, gens):
        seq = torch.tensor([ids + g.token_ids[:5]])
        with torch.no_grad():
            out = sm.model(seq, output_hidden_states=True)
        span = slice(len(ids) - 1, len(ids) - 1 + len(g.token_ids[:5]))
        logp_last = torch.log_softmax(out.logits[0, span].float(), -1)
        for k in (2, 4):
            h, _ = hidden_from_outputs(out.hidden_states, k, L)
            logp = torch.log_softmax(sm.arch.logits(h[0, span]).float(), -1)
            kl[k] += (logp_last.exp() * (logp_last - logp)).sum(-1).tolist()
            cos[k] += torch.cosine_similarity(sm.arch.norm(h[0, span]), out.hidden_states[L][0, span], -1).tolist()
    for k in (2, 4):
        assert ours[k]["kl"] == pytest.approx(sum(kl[k]) / len(kl[k]), rel=1e-3, abs=1e-5)
        assert ours[k]["cosine"] == pytest.approx(sum(cos[k]) / len(cos[k]), rel=1e-4)
        assert ours[k]["positions"] == len(kl[k]) and sum(ours[k]["count_by_position"]) == len(kl[k])
    last = ours[L]
    assert last["kl"] == pytest.approx(0, abs=1e-6) and last["cosine"] == pytest.approx(1, abs=1e-5)
    assert last["top1_agreement"] == 1.0 and ours[2]["kl"] > 0


def test_loss_task_and_bad_data(tiny_sorted, tmp_path):
    res = evaluate({"A": tiny_sorted}, ["loss"], exits="2,6", limit=4)
    assert set(res["tasks"]["loss"]["A"]) == {"2", "6"} and res["details"]["loss"]["data"] == "gsm8k:test"
    with pytest.raises(SortedError, match="data file not found"):
        prepare(["gsm8k"], data_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(SortedError, match="needs a numeric final answer"):
        prepare(["gsm8k"], data_file=str(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "completion": "c"}])))
    with pytest.raises(SortedError, match="say which task"):
        prepare(["gsm8k", "triviaqa"], data_file="x.jsonl")
    with pytest.raises(SortedError, match="not in --tasks"):
        prepare(["loss"], data_file="gsm8k=x.jsonl")
    with pytest.raises(SortedError, match="unknown task 'mmlu'"):
        prepare(["loss", "mmlu"])
