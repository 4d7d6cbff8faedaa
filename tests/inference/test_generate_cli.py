"""`sortedllm generate`: text on stdout, tokens/s on stderr, --jsonl, --prompts_file, each strategy, and clean
one-line errors."""

import json

import pytest

from sortedllm.cli import main


def run(capsys, *args):
    code = main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_strategies_and_output_formats(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+3?\n\nName a color.\n")
    base = ["--model", tiny_checkpoint, "--prompts_file", prompts, "--max_new_tokens", 6, "--jsonl"]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    full = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in full] == ["What is 2+3?", "Name a color."] and all(r["new_tokens"] == 6 for r in full)
    assert all(r["finish_reason"] == "length" for r in full)  # lets a script keep only finished replies
    assert "tokens/s" in err and "tokens/s" not in out
    code, out, err = run(capsys, *base, "--speculative", 3, "--draft_vocab", 0)
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == [r["text"] for r in full]
    assert "draft acceptance" in err
    code, out, err = run(capsys, *base, "--early-exit", "--thresholds", "2:2,4:2", "--exits", "2,4")
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == [r["text"] for r in full]
    assert "mean exit layer 6.0 of 6" in err
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompt", "What is 2+3?", "--max_new_tokens", 6)
    assert code == 0 and out == full[0]["text"] + "\n"
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompt", "hi", "--prompt", "yo", "--exit", 2,
                         "--max_new_tokens", 4, "--jsonl")
    assert code == 0 and len(out.splitlines()) == 2


def test_calibrate_and_saved_thresholds(tiny_checkpoint, tmp_path, capsys):
    saved = tmp_path / "th.json"
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompt", "hi", "--early-exit", "--calibrate",
                         "gsm8k", "--calibrate_limit", 2, "--max_new_tokens", 4, "--save_thresholds", saved)
    assert code == 0, err
    assert "calibrated on 2 prompts" in err and json.loads(saved.read_text())["calibration"]["prompts"] == 2
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompt", "hi", "--early-exit", "--thresholds", saved,
                         "--max_new_tokens", 4)
    assert code == 0, err


def test_jsonl_prompts_file(tiny_checkpoint, tmp_path, capsys):
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"instruction": "Say yes."}) + "\n")
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompts_file", rows, "--max_new_tokens", 3, "--jsonl")
    assert code == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == ["hi", "Say yes."]


@pytest.mark.parametrize("args, message", [
    (["--exit", 9], "exit layer 9 is out of range"),
    (["--speculative", 6], "speculative draft exit 6 is out of range"),
    (["--exit", 2, "--speculative", 3], "not allowed with argument"),
    (["--calibrate", "gsm8k"], "--calibrate needs --early-exit"),
    (["--early-exit", "--thresholds", "9:0.5"], "not one of the early-exit candidates"),
    (["--early-exit", "--thresholds", "abc"], "--thresholds 'abc' not understood"),
    (["--early-exit", "--measure", "vibes"], "unknown confidence measure"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--prompts_file", "missing.txt"], "prompts file not found"),
])
def test_bad_input_is_one_line_exit_2(tiny_checkpoint, capsys, args, message):
    code, out, err = run(capsys, "--model", tiny_checkpoint, "--prompt", "hi", "--max_new_tokens", 2, *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_no_prompt(tiny_checkpoint, capsys):
    code, out, err = run(capsys, "--model", tiny_checkpoint)
    assert code == 2 and "no prompt given" in err
