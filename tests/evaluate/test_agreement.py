"""The agreement task (draft quality for self-speculation): accepted tokens from hand-built agreement runs, the
speedup formula, per-position agreement against Hugging Face's own forward pass, exact numbers on a model whose
exits all agree, and `sortedllm evaluate --tasks agreement` end to end."""

import json

import pytest
import torch
from evaluate_fixtures import constant_checkpoints, constant_model  # noqa: F401 (fixture)

from sortedllm import SortedModel
from sortedllm.cli import main
from sortedllm.evaluate import evaluate
from sortedllm.evaluate.agreement import MAX_DRAFT, accepted_tokens, agreement_runs, oracle_early_exit, speedups
from sortedllm.exits import hidden_from_outputs
from sortedllm.inference import generate
from sortedllm.inference.batch import encode_prompts

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on the shared 2-core machine two threads per process
    made this file several times slower (thread oversubscription); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_accepted_tokens_from_runs():
    T, F = True, False
    # runs from each start: 2, 1, 0, 1
    assert accepted_tokens([[T, T, F, T]], 4) == [0.75, 1.0, 1.0, 1.0]
    # two sequences, runs 3, 2, 1 and 0, 0 (5 starts)
    assert accepted_tokens([[T, T, T], [F, F]], 4) == [3 / 5, 5 / 5, 6 / 5, 6 / 5]
    # agreement 0.5 in one block: runs 3,2,1,0,0,0 -> g=2: (2+2+1)/6, not the independent a + a^2 = 0.75
    assert accepted_tokens([[T, T, T, F, F, F]], 3) == [3 / 6, 5 / 6, 6 / 6]
    # always agreeing: a cycle accepts all g drafts except where the answer ends first
    assert accepted_tokens([[T] * 8]) == [sum(min(g, s) for s in range(1, 9)) / 8 for g in range(1, MAX_DRAFT + 1)]
    assert accepted_tokens([[F] * 5]) == [0.0] * MAX_DRAFT
    assert accepted_tokens([[], []], 2) == [None, None]


def test_speedup_formula():
    sp = speedups([1.0, 1.5], t_full=1.0, t_draft=0.25, t_feed=0.2, t_verify=[0.8, 0.9])
    assert sp == pytest.approx([2 / 1.25, 2.5 / 1.6])


def test_oracle_early_exit_by_hand():
    """Each position stops at its shallowest right exit; at a lower agreement the wrong tokens go where they save
    the most (positions that only the last layer gets right), stopping at the cheapest exit."""
    T, F = True, False
    top1 = {2: [[T, F, F, F]], 4: [[T, T, F, F]], 6: [[T, T, T, T]]}
    cost = {2: 1.0, 4: 2.0, 6: 4.0}
    rows = oracle_early_exit(top1, cost, targets=(1.0, 0.75, 0.5))
    # right exits 2, 4, 6, 6: cost 11 vs 16 for the plain model
    assert rows[0] == {"agreement": 1.0, "mean_exit": 4.5, "speedup": pytest.approx(16 / 11)}
    # one wrong token: a position right only at 6 stops at 2 instead (exits 2, 4, 2, 6)
    assert rows[1] == {"agreement": 0.75, "mean_exit": 3.5, "speedup": pytest.approx(16 / 8)}
    assert rows[2] == {"agreement": 0.5, "mean_exit": 2.5, "speedup": pytest.approx(16 / 5)}
    assert oracle_early_exit({2: [[]], 6: [[]]}, {2: 1.0, 6: 2.0}) == []
    # a cheaper deeper exit (a measured cost can be noisy) is where the wrong tokens go
    rows = oracle_early_exit({2: [[F, F]], 4: [[F, F]], 6: [[T, T]]}, {2: 3.0, 4: 1.0, 6: 4.0}, targets=(0.5,))
    assert rows == [{"agreement": 0.5, "mean_exit": 5.0, "speedup": pytest.approx(8 / 5)}]


def test_agreement_runs_match_hf_forward(tiny_sorted):
    """Per-position top-1 agreement equals the same comparison computed from HF's forward (one sequence at a time,
    no padding, `output_hidden_states`), on LLaMA, Qwen2 and Gemma 3; the last exit agrees everywhere."""
    sm = tiny_sorted
    prompts = ["What is 2+3?", "Name a colour.", "Hi"]
    gens = generate(sm, prompts, max_new_tokens=7, dtype="float32")
    prompt_ids = encode_prompts(sm, prompts)
    conts = [g.token_ids for g in gens]
    runs = agreement_runs(sm, prompt_ids, conts, [2, 4], draft_vocab=None, batch_size=2)
    L = sm.num_layers
    assert runs["greedy"] == 1.0  # the teacher-forced last layer reproduces the greedy answer
    for i, (p, c) in enumerate(zip(prompt_ids, conts)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            out = sm.model(ids, output_hidden_states=True)
        at = slice(len(p) - 1, len(p) - 1 + len(c))
        ref = out.logits[0, at].argmax(-1)
        assert ref.tolist() == c
        for k in (2, 4):
            h, _ = hidden_from_outputs(out.hidden_states, k, L)
            expected = (sm.exit_logits(h[0, at], k).argmax(-1) == ref).tolist()
            assert runs["top1"][k][i] == expected
            assert runs["draft"][k][i] == expected  # draft_vocab=None: the draft head is the full head
        assert runs["top1"][L][i] == [True] * len(c)


@pytest.mark.parametrize("token, in_subset", [("7", True), ("xyz", False)])
def test_draft_head_agreement_uses_restricted_vocab(tokenizer, token, in_subset):
    """With a restricted draft head, a position agrees only if the subset's best token is the last layer's: a
    model that always says "xyz" (not among the 64 most frequent tokens) has full-head agreement 1 but can never
    draft it."""
    from sortedllm.adapters.vocab import restricted_head
    from tests.inference.conftest import builtin_vocab

    sm = SortedModel(constant_model(tokenizer, token), tokenizer, exits=[2, 4])
    sm.draft_vocab = builtin_vocab(tokenizer, sm.model)[0]
    [tid] = tokenizer(token, add_special_tokens=False)["input_ids"]
    assert (tid in restricted_head(sm, 2, 64).ids.tolist()) == in_subset
    runs = agreement_runs(sm, encode_prompts(sm, ["a?"]), [[tid] * 3], [2, 4], draft_vocab=64)
    assert runs["top1"][2] == runs["top1"][4] == [[True] * 3]
    assert runs["draft"][2] == [[in_subset] * 3]
    assert accepted_tokens(runs["draft"][2], 2) == ([1.0, 5 / 3] if in_subset else [0.0, 0.0])


def test_exact_numbers_on_agreeing_model(tokenizer):
    """A model that emits "7" at every exit: agreement 1 everywhere, accepted(g) known exactly, speedups equal the
    formula on the step costs it reports."""
    sm = SortedModel(constant_model(tokenizer, "7"), tokenizer, exits=[2, 4])
    res = evaluate({"A": sm}, ["agreement"], limit=2, max_new_tokens=8, progress=False)
    per_exit = res["tasks"]["agreement"]["A"]
    expected = [sum(min(g, s) for s in range(1, 9)) / 8 for g in range(1, MAX_DRAFT + 1)]
    t_full = res["details"]["agreement"]["timing"]["A"]["t_full_ms"]
    for k in ("2", "4"):
        m = per_exit[k]
        assert (m["top1_agreement"], m["draft_agreement"], m["positions"]) == (1.0, 1.0, 16)
        assert m["accepted_by_draft_length"] == pytest.approx(expected)
    m = per_exit["2"]
    assert m["speedup_by_draft_length"] == pytest.approx(
        speedups(m["accepted_by_draft_length"], t_full, m["t_draft_ms"], m["t_feed_ms"],
                 m["t_verify_ms_by_draft_length"]))
    assert m["best_speedup"] == max(m["speedup_by_draft_length"])
    assert m["speedup_by_draft_length"][m["best_draft_length"] - 1] == m["best_speedup"]
    assert per_exit["4"]["speedup_by_draft_length"] is None and per_exit["4"]["best_speedup"] is None
    assert all(t > 0 for t in [t_full, m["t_draft_ms"], m["t_feed_ms"], *m["t_verify_ms_by_draft_length"]])
    assert res["details"]["agreement"]["headline"] == {"metric": "top1_agreement", "higher_is_better": True}
    # every exit agrees: the oracle stops every token at exit 2, at exit 2's measured static step cost
    oracle = res["details"]["agreement"]["oracle_early_exit"]["A"]
    assert [r["agreement"] for r in oracle] == [1.0, 0.95, 0.9]
    for r in oracle:
        assert r["mean_exit"] == 2 and r["speedup"] == pytest.approx(t_full / m["t_exit_ms"])


def test_cli_agreement_compare(tiny_checkpoint, constant_checkpoints, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--compare", str(constant_checkpoints["sevens"]),
                 "--names", "tiny,sevens", "--tasks", "agreement", "--exits", "2", "--limit", "2",
                 "--max_new_tokens", "6", "--output_dir", str(out), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    assert "agreement (top1_agreement)" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]["agreement"]) == {"tiny", "sevens"}
    tiny = res["tasks"]["agreement"]["tiny"]
    assert set(tiny) == {"2"}  # the tiny model has 6 layers: exit 6 is the reference, not reported
    assert set(tiny["2"]) == {"top1_agreement", "draft_agreement", "positions", "accepted_by_draft_length",
                              "speedup_by_draft_length", "best_draft_length", "best_speedup", "t_draft_ms",
                              "t_feed_ms", "t_verify_ms_by_draft_length", "t_exit_ms"}
    assert len(tiny["2"]["accepted_by_draft_length"]) == len(tiny["2"]["speedup_by_draft_length"]) == MAX_DRAFT
    assert 0 <= tiny["2"]["top1_agreement"] <= 1
    assert res["tasks"]["agreement"]["sevens"]["2"]["top1_agreement"] == 1.0
    detail = res["details"]["agreement"]
    assert detail["data"] == "gsm8k:test" and detail["n_prompts"] == 2 and detail["draft_lengths"] == [*range(1, 9)]
    assert set(detail["timing"]["tiny"]) == {"t_full_ms", "context_tokens", "rounds",
                                             "teacher_forced_matches_generation"}
    oracle = detail["oracle_early_exit"]
    assert set(oracle) == {"tiny", "sevens"} and oracle["sevens"][0]["mean_exit"] == 2
    assert all(2 <= r["mean_exit"] <= 6 and r["speedup"] > 0 for r in oracle["tiny"])
    md = (out / "report.md").read_text()
    assert "## agreement" in md and "| exit | t_draft ms | g=1 |" in md
    assert "sevens, early-exit oracle" in md and "agreement 0.95: mean exit 2.0" in md
    for png in ("agreement.png", "agreement_speedup.png"):
        assert f"]({png})" in md and (out / png).read_bytes().startswith(PNG)
    samples = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(s["model"], s["exit"]) for s in samples] == [("tiny", 6)] * 2 + [("sevens", 4)] * 2


def test_cli_bad_data_one_line(tiny_checkpoint, tmp_path, capsys):
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--tasks", "agreement", "--data_file",
                 str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "missing.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ev").exists()


def test_draft_layer_measured_as_its_exit(tokenizer, tmp_path):
    """An untrained draft layer over the full vocabulary is exit 3 itself: the same per-position agreement and
    accepted drafts as exit 3's, its own step costs measured, and `evaluate(..., draft_layer=file)` reports it
    (results.json details and report.md)."""
    from sortedllm.evaluate.agreement import draft_layer_runs
    from sortedllm.evaluate.report import build
    from sortedllm.adapters.draft_layer import DraftLayer
    from tests.inference.conftest import PROMPTS, draftable

    sm = draftable("llama", tokenizer)
    draft = DraftLayer.from_model(sm, shared=2, layers=1, vocab=None)
    gens = generate(sm, PROMPTS[:4], max_new_tokens=12)
    prompt_ids, conts = encode_prompts(sm, PROMPTS[:4]), [g.token_ids for g in gens]
    runs = agreement_runs(sm, prompt_ids, conts, [3], draft_vocab=None)
    assert draft_layer_runs(sm, draft, prompt_ids, conts) == runs["top1"][3]
    assert 0 < sum(map(sum, runs["top1"][3])) < sum(map(len, runs["top1"][3]))  # neither all nor nothing

    path = draft.save_pretrained(tmp_path / "draft") / "draft_layer.safetensors"
    res = evaluate({"A": sm}, ["agreement"], exits=[3], limit=4, max_new_tokens=12, progress=False,
                   data_file=None, draft_layer=str(path))
    d = res["details"]["agreement"]["draft_layer"]["A"]
    exit3 = res["tasks"]["agreement"]["A"]["3"]
    assert (d["exit"], d["shared"], d["own_layers"]) == (3, 2, 1)
    assert d["top1_agreement"] == exit3["top1_agreement"] and d["positions"] == exit3["positions"]
    assert d["accepted_by_draft_length"] == exit3["accepted_by_draft_length"]
    assert d["speedup_by_draft_length"] == pytest.approx(
        speedups(d["accepted_by_draft_length"], d["t_full_ms"], d["t_draft_ms"], d["t_feed_ms"],
                 d["t_verify_ms_by_draft_length"]))
    assert all(t > 0 for t in [d["t_draft_ms"], d["t_feed_ms"], *d["t_verify_ms_by_draft_length"]])
    assert "| draft layer 3 (" in build(res, {})
