"""lm-evaluation-harness on any exit: the registered `sortedllm` model computes exit k's log-likelihoods, and a local
task (YAML + JSONL) runs through `sortedllm evaluate --tasks lm_eval:<task>` and
`python -m sortedllm.evaluate.lm_eval`."""

import json
import re
import subprocess
import sys

import pytest
import torch
from evaluate_fixtures import constant_checkpoints  # noqa: F401 (fixture)
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from sortedllm.cli import main
from sortedllm.evaluate.lm_eval import SortedLM

TASK = "sortedllm_tiny_choice"


@pytest.fixture
def local_task(tmp_path):
    """A multiple-choice task whose right answer is always "7" (what the `sevens` model says)."""
    data = tmp_path / "choices.jsonl"
    rows = [{"question": f"Question {i}: pick one.", "choices": ["cat", "7", "house"][i % 3:] + ["cat", "7", "house"]
             [:i % 3]} for i in range(4)]
    for r in rows:
        r["answer"] = r["choices"].index("7")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def test_registered_model_scores_exit_k(tiny_sorted):
    """loglikelihood(context, continuation) == sum of exit k's log-probabilities of the continuation tokens."""
    assert get_model("sortedllm") is SortedLM
    sm = tiny_sorted
    context, continuation = "The capital of France is", " Paris, of course"
    got = {}
    for k in (2, sm.num_layers):
        lm = SortedLM(sorted_model=sm, exit_layer=k, batch_size=2)
        req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
        [(logp, _)] = lm.loglikelihood([req], disable_tqdm=True)
        ctx_ids, cont_ids = lm._encode_pair(context, continuation)
        ids = torch.tensor([ctx_ids + cont_ids])
        logits = sm.logits_at_exits(ids, exits=[k])[k][0].float().log_softmax(-1)
        want = sum(logits[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))
        assert logp == pytest.approx(want, abs=1e-3)
        got[k] = logp
    assert got[2] != pytest.approx(got[sm.num_layers], abs=1e-3)


def test_evaluate_runs_a_harness_task_on_every_exit(constant_checkpoints, local_task, tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(constant_checkpoints["sevens"]), "--tasks", f"lm_eval:{TASK}",
                 "--lm_eval_include", str(local_task), "--output_dir", str(out), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    per_exit = res["tasks"][f"lm_eval:{TASK}"]["A"]
    assert set(per_exit) == {"2", "4"}
    assert all(v["acc"] == 1.0 for v in per_exit.values())  # the model always says 7
    assert res["details"][f"lm_eval:{TASK}"]["headline"] == {"metric": "acc", "higher_is_better": True}
    assert f"lm_eval_{TASK}.png" in (out / "report.md").read_text()


@pytest.mark.slow  # a CLI subprocess that imports lm-eval
@pytest.mark.timeout(600)
def test_python_m_entry_point(constant_checkpoints, local_task):
    r = subprocess.run([sys.executable, "-m", "sortedllm.evaluate.lm_eval", "--model", "sortedllm", "--model_args",
                        f"pretrained={constant_checkpoints['sevens']},exit_layer=2", "--tasks", TASK,
                        "--include_path", str(local_task), "--batch_size", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sortedllm ({'pretrained': " in r.stdout and "'exit_layer': 2" in r.stdout
    assert re.search(rf"\|{TASK}\|.*\|acc\s*\|.*\|\s*1\|", r.stdout), r.stdout  # acc 1: the model always says 7
