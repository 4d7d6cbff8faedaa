"""Answer extraction and normalisation (GSM8K, TriviaQA) and the PandaLM judge format, on hand-checked cases."""

import pytest

from sortedllm.evaluate import gsm8k, triviaqa
from sortedllm.evaluate.judges import Item, pandalm_prompt, parse_verdict


@pytest.mark.parametrize("reply, expected", [
    ("She sells 9 eggs.\n9 * 2 = 18\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("The answer is #### $1,234.50.", "1234.5"),
    ("#### -3", "-3"),
    ("First 4 then 6 #### 10\nThen I said 99", "10"),   # `####` wins over later numbers
    ("So 3 + 4 = 7. The answer is 7.", "7"),             # last-number fallback
    ("It costs $12.00 in total", "12"),
    ("There are 0.5 liters left", "0.5"),
    ("no number here", None),
    ("#### none\nbut 5 apples", "5"),                    # nothing after ####: fall back to the last number
    ("#### 100", "100"),
    ("#### 0.000", "0"),
    ("1" * 60 + ".50", "1" * 60 + ".5"),                 # a degenerate reply's huge number, kept exactly
])
def test_gsm8k_extraction(reply, expected):
    assert gsm8k.extract_answer(reply) == expected


def test_gsm8k_correct_compares_values():
    assert gsm8k.is_correct("1000", "1,000") and gsm8k.is_correct("18", "18.0")
    assert not gsm8k.is_correct("17", "18") and not gsm8k.is_correct(None, "18")


@pytest.mark.parametrize("text, expected", [
    ("The Beatles!", "beatles"), ("  An   Apple a day ", "apple day"), ("Rock 'n' Roll", "rock n roll"),
    ("U.S.A.", "u s"), ("Theatre", "theatre"),
])
def test_triviaqa_normalisation(text, expected):
    assert triviaqa.normalize(text) == expected


def test_triviaqa_match():
    answers = ["Onion", "Allium cepa", "Onions"]
    assert triviaqa.exact_match(triviaqa.prediction("Answer: the onion.\nMore text"), answers)
    assert not triviaqa.exact_match("It is an onion", answers)
    assert triviaqa.contains("It is an onion", answers) and not triviaqa.contains("onionskin", answers)
    assert not triviaqa.exact_match("", ["the"])  # an empty prediction never matches


def test_pandalm_prompt_is_pandalm_format():
    with_input = pandalm_prompt(Item("Fix the sentence.", "me go home", " I go home. </s>", "Me goes home."))
    assert with_input == (
        "Below are two responses for a given task. The task is defined by the Instruction with an Input that provides "
        "further context. Evaluate the responses and generate a reference answer for the task.\n\n### Instruction:\n"
        "Fix the sentence.\n\n### Input:\nme go home\n\n### Response 1:\nI go home.\n\n### Response 2:\nMe goes home."
        "\n\n### Evaluation:\n")
    without = pandalm_prompt(Item("Say hi.", "", "hi", "hello"))
    assert without.startswith("Below are two responses for a given task. The task is defined by the Instruction. "
                              "Evaluate") and "### Input" not in without


@pytest.mark.parametrize("text, verdict", [
    ("1\n\n### Reason: ...", 1), ("2", 2), ("Tie\n### Reason", 0), ("**2**", 2), ("Response 1 is better", 1),
    ("", 0), ("garbage", 0), ("  \n1.", 1),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict
