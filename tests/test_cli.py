"""The CLI end to end on a tiny model: train (YAML + overrides), evaluate, and clean one-line errors."""

import json
import subprocess
import sys

import pytest

from sortedllm.cli import main


def run_cli(*args, cwd=None):
    """Run `sortedllm ...` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "sortedllm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture
def tiny_yaml(tmp_path, tiny_checkpoint):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""model: {tiny_checkpoint}
data: gsm8k
data_limit: 16
eval_limit: 8
exits: [2, 4]
max_steps: 2
per_device_train_batch_size: 4
max_length: 128
learning_rate: 1.0e-3
gradient_checkpointing: false
save_strategy: "no"
disable_tqdm: true
output_dir: {tmp_path / 'run'}
""")
    return cfg


@pytest.mark.slow  # two CLI subprocesses (train, then evaluate)
@pytest.mark.timeout(600)
def test_train_then_evaluate(tiny_yaml, tmp_path):
    r = run_cli("train", "--config", tiny_yaml, "--max_steps", "3", "--mode", "soft")
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "run" / "final"
    cfg = json.loads((final / "sorted_config.json").read_text())
    assert cfg["exits"] == [2, 4, 6] and cfg["mode"] == "soft" and cfg["data"] == "gsm8k"
    vocab = json.loads((final / "draft_vocab.json").read_text())  # counted on the training rows (2 of 16 too long)
    assert (vocab["data"], vocab["rows"]) == ("gsm8k", 14) and 100 < len(vocab["ids"]) <= 8192
    r = run_cli("evaluate", "--model", final, "--limit", "8", "--output_dir", tmp_path / "ev")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(res["tasks"]["loss"]["A"]) == {"2", "4", "6"}
    assert "loss" in r.stdout


@pytest.mark.parametrize("extra, message", [
    (["--exits", "2,99"], "exit layer 99 is out of range"),
    (["--no_such_field", "1"], "unknown option --no_such_field"),
    (["--model", "./missing-model"], "model path not found"),
    (["--mode", "banana"], "unknown mode 'banana'"),
    (["--data", "missing.jsonl"], "data file not found"),
])
def test_train_bad_input_is_one_line_exit_2(tiny_yaml, extra, message, capsys):
    code = main(["train", "--config", str(tiny_yaml), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unknown_yaml_field_and_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nlearnin_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown config field 'learnin_rate'" in capsys.readouterr().err
    bad.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_evaluate_bad_exit_and_task(tiny_checkpoint, capsys):
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--exits", "9"]) == 2
    assert "exit layer 9 is out of range" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "generate"])
def test_every_command_has_help(command, capsys):
    """Error messages send users to `sortedllm <command> --help`: it must print the options, not fail."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sortedllm") and "--model" in out
