import json

import pytest

from sortedllm import SortedError
from sortedllm.data import default_eval_data, encode_example, load_examples


@pytest.mark.parametrize("source, n", [("gsm8k", 1000), ("gsm8k:test", 250), ("alpaca", 1000), ("alpaca:test", 200),
                                       ("triviaqa", 500), ("triviaqa:test", 500), ("pandalm", 170)])
def test_builtin_tasks_in_paper_formats(source, n):
    rows = load_examples(source)
    assert len(rows) == n
    assert all(isinstance(r["prompt"], str) and r["prompt"] for r in rows)


def test_gsm8k_keeps_final_answer_and_drops_calculator_marks():
    row = load_examples("gsm8k", limit=1)[0]
    assert row["final_answer"] == "72" and "<<" not in row["completion"] and "#### 72" in row["completion"]


def test_triviaqa_keeps_aliases():
    row = load_examples("triviaqa:test", limit=1)[0]
    assert row["completion"] == "Onion" and "Allium cepa" in row["answers"]


def test_mixture_interleaves():
    rows = load_examples("gsm8k+alpaca", limit=4)
    assert ["final_answer" in r for r in rows] == [True, False, True, False]


def test_full_data_dir_env(monkeypatch):
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not present")
    monkeypatch.setenv("SORTEDLLM_DATA_DIR", str(SHARED_DATA))
    assert len(load_examples("gsm8k")) == 7473


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_user_jsonl_formats(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"instruction": "i", "input": "x", "output": "o"},
        {"question": "q", "answer": "work\n#### 5"},
    ])
    rows = load_examples(f)
    assert rows[0]["completion"] == "c"
    assert rows[1]["prompt"][-1] == {"role": "user", "content": "u"} and rows[1]["completion"] == "a"
    assert rows[2]["prompt"] == "i\n\nx" and rows[3]["final_answer"] == "5"


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], r"d.jsonl:2: malformed JSON"),
    (['{"text": "hello"}'], r"d.jsonl:1: row has no prompt/completion"),
    (['[1, 2]'], r"d.jsonl:1: each line must be a JSON object"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"d.jsonl:1: the last message must be the assistant"),
    ([], "is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    f = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(SortedError, match=message):
        load_examples(f)


def test_missing_file():
    with pytest.raises(SortedError, match="data file not found"):
        load_examples("nope.jsonl")


def test_completion_mask_covers_the_response_only(tokenizer):
    enc = encode_example(tokenizer, {"prompt": "What is 2+2?", "completion": "4"})
    response = [t for t, m in zip(enc["input_ids"], enc["completion_mask"]) if m]
    assert tokenizer.decode(response).startswith("4<|im_end|>")
    prompt = tokenizer.decode([t for t, m in zip(enc["input_ids"], enc["completion_mask"]) if not m])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+2?" in prompt


def test_prompt_longer_than_max_length_is_dropped(tokenizer):
    assert encode_example(tokenizer, {"prompt": "word " * 100, "completion": "x"}, max_length=20) is None


def test_default_eval_split():
    assert default_eval_data("gsm8k") == "gsm8k:test"
    assert default_eval_data("gsm8k+alpaca") == "gsm8k:test+alpaca:test"
    assert default_eval_data("my.jsonl") == ""
