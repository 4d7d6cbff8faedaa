"""The tournament judges: the offline judge against PandaLM's human labels, the both-orders protocol, a local HF
judge (batched verdicts == one-at-a-time), and an OpenAI-compatible endpoint served by a local HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from sortedllm.errors import SortedError
from sortedllm.evaluate.judges import (HFJudge, Item, OfflineJudge, OpenAIJudge, combined_label, judge_both_orders,
                                       make_judge, pandalm_prompt, validate)



def test_offline_judge_agrees_with_humans():
    """Validated on all 999 human-labelled pairs: close to PandaLM-7B (0.668), well above trivial judges."""
    report = validate(OfflineJudge())  # the shipped copy of PandaLM's test_annotated.jsonl
    assert report["n"] == 999
    assert report["baselines"]["always_2"] == pytest.approx(472 / 999)
    assert report["accuracy"] > 0.64  # measured 0.662
    assert report["accuracy"] > report["baselines"]["longer_wins"] > report["baselines"]["always_2"]


def test_offline_judge_scores_new_content():
    j = OfflineJudge()
    prompt = ("List three fruits.", "")
    assert j([Item(*prompt, "Apples, pears and plums.", "")]) == [1]
    assert j([Item(*prompt, "and, and, and, and, and, and", "Apples, pears and plums.")]) == [2]
    assert j([Item(*prompt, "List three fruits.", "Bananas are yellow.")]) == [2]  # parroting the prompt adds nothing
    assert j([Item(*prompt, "x y", "y z")]) == [0]


class FirstIsBetter:
    """A judge with total position bias: always prefers whichever response it is shown first."""

    name, description = "first", "always 1"

    def __call__(self, items, progress=False):
        return [1] * len(items)


def test_both_orders_cancel_position_bias():
    items = [Item("q", "", "a b c", "d e f"), Item("q", "", "same", "same")]
    points = judge_both_orders(FirstIsBetter(), items)
    assert points[0] == (0.5, 0.5, 0.0)   # each order gives its half point to a different side
    assert points[1] == (0.0, 0.0, 1.0)   # identical answers tie without asking
    assert combined_label(points[0]) == 0
    consistent = judge_both_orders(OfflineJudge(), [Item("q", "", "", "some real answer")])
    assert consistent == [(0.0, 1.0, 0.0)] and combined_label(consistent[0]) == 2


def test_hf_judge_batched_equals_one_at_a_time(tiny_checkpoint):
    judge = HFJudge(str(tiny_checkpoint), batch_size=3)
    items = [Item("Say hi.", "", "hi", "hello there, how are you doing today?"),
             Item("Add the numbers.", "2 and 3", "5", "The sum of 2 and 3 is 5, which is the answer."),
             Item("Name a colour.", "", "Blue is a colour that many people like very much.", "red"),
             Item("Translate.", "bonjour", "hello", "good day")]
    batched = judge(items)
    model, tok = judge.model, judge.tokenizer
    labels = list(judge.label_tokens)
    for it, got in zip(items, batched):
        ids = torch.tensor([tok(pandalm_prompt(it))["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        want = labels[int(logits[[judge.label_tokens[c] for c in labels]].argmax())]
        assert got == want
    assert set(judge.label_tokens) == {0, 1, 2} and len(set(judge.label_tokens.values())) == 3


class Endpoint(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Endpoint.requests.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')
            return
        prompt = body["messages"][-1]["content"]
        verdict = "2" if "### Response 2:\nGOOD" in prompt else ("1" if "### Response 1:\nGOOD" in prompt else "Tie")
        reply = {"choices": [{"message": {"role": "assistant", "content": f"{verdict}\n\n### Reason: test"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Endpoint.requests.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_judge_against_local_server(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = make_judge("openai:judge-model", url=endpoint)
    items = [Item("Do it.", "", "GOOD", "bad"), Item("Do it.", "ctx", "bad", "GOOD"), Item("Do it.", "", "x", "y")]
    points = judge_both_orders(judge, items)
    assert [combined_label(p) for p in points] == [1, 2, 0]
    assert len(Endpoint.requests) == 6  # both orders of each pair
    path, auth, body = Endpoint.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"][-1]["content"].endswith("### Evaluation:\n")


def test_openai_judge_errors_are_one_line(endpoint):
    with pytest.raises(SortedError, match="answered HTTP 401") as e:
        OpenAIJudge("broken", base_url=endpoint)([Item("a", "", "b", "c")])
    assert "\n" not in str(e.value)
    with pytest.raises(SortedError, match="unreachable"):
        OpenAIJudge("m", base_url="http://127.0.0.1:9/v1", timeout=5)([Item("a", "", "b", "c")])
    with pytest.raises(SortedError, match="unknown judge 'pandalm'"):
        make_judge("pandalm")
