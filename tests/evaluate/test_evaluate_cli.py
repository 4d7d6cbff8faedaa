"""`sortedllm evaluate` end to end on tiny checkpoints: every task for two models, the output folder (results.json,
generations.jsonl, PNG plots, report.md), and bad input as one line with nothing written."""

import json

import pytest
from evaluate_fixtures import constant_checkpoints  # noqa: F401 (fixture)

from sortedllm.cli import main
from sortedllm.evaluate import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_task_two_models(constant_checkpoints, tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(constant_checkpoints["sevens"]), "--compare",
                 str(constant_checkpoints["blank"]), "--names", "soft,sft", "--tasks",
                 "loss,gsm8k,triviaqa,tournament,similarity", "--limit", "2", "--max_new_tokens", "4",
                 "--positions", "3", "--output_dir", str(out), "--no_progress"])
    assert code == 0, capsys.readouterr().err
    assert "tournament (score)" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"sortedllm_version", "models", "settings", "tasks", "details"}
    assert res["models"]["soft"]["mode"] == "soft" and res["models"]["sft"]["exits"] == [2, 4]
    for task in ("loss", "gsm8k", "triviaqa", "tournament", "similarity"):
        assert set(res["tasks"][task]) == {"soft", "sft"} and set(res["tasks"][task]["soft"]) == {"2", "4"}
        assert res["details"][task]["headline"]["metric"]
    assert res["tasks"]["tournament"]["soft"]["4"]["score"] == 1.0
    assert res["tasks"]["similarity"]["sft"]["4"]["kl_by_position"] == [0.0, 0.0, 0.0]
    samples = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    # 2 prompts x 2 exits x 2 models for gsm8k, triviaqa and tournament, + 2 prompts x 2 models for similarity
    assert len(samples) == 3 * 8 + 4 and {s["task"] for s in samples} == {"gsm8k", "triviaqa", "tournament",
                                                                           "similarity"}
    md = (out / "report.md").read_text()
    images = [line[line.index("(") + 1:-1] for line in md.splitlines() if line.startswith("![")]
    assert {"loss.png", "gsm8k.png", "triviaqa.png", "tournament_matrix.png", "similarity_kl.png",
            "similarity_cosine.png"} <= set(images)
    for name in images:
        assert (out / name).read_bytes().startswith(PNG)
    assert "Judge validation on PandaLM's 999 human-labelled pairs" in md and "| soft exit 2 | sft exit 2 |" in md

    (out / "report.md").unlink()  # the report rebuilds from results.json alone
    assert report.main([str(out)]) == 0 and (out / "report.md").read_text() == md


@pytest.mark.parametrize("args, message", [
    (["--tasks", "loss,bleu"], "unknown task 'bleu'"),
    (["--exits", "3"], "exit 3 is not an exit of this checkpoint"),
    (["--tasks", "gsm8k", "--data_file", "missing.jsonl"], "data file not found: missing.jsonl"),
    (["--tasks", "tournament", "--judge", "gpt4"], "unknown judge 'gpt4'"),
    (["--compare", "{sevens}", "--names", "x"], "--names needs 2 distinct names"),
    (["--tasks", "similarity", "--positions", "0"], "--positions must be at least 1"),
    (["--tasks", "lm_eval:no_such_harness_task"], "unknown lm-eval task 'no_such_harness_task'"),
    (["--tasks", "tournament", "--compare", "{blank}", "--limit", "1", "--max_new_tokens", "2", "--judge", "openai:m",
      "--judge_url", "http://127.0.0.1:9/v1"], "judge endpoint http://127.0.0.1:9/v1 unreachable"),  # after generating
])
def test_bad_input_one_line_nothing_written(constant_checkpoints, tmp_path, capsys, args, message):
    out = tmp_path / "ev"
    args = [a.format(**constant_checkpoints) for a in args]
    code = main(["evaluate", "--model", str(constant_checkpoints["sevens"]), *args, "--output_dir", str(out),
                 "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_refuses_to_replace_a_foreign_folder(constant_checkpoints, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["evaluate", "--model", str(constant_checkpoints["sevens"]), "--output_dir", str(out)]) == 2
    assert "is not empty and holds no results.json" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
