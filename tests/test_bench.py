"""`sortedllm bench train|decode|batch|kernels` end to end on a tiny random-weight model with minimal sizes, and
its bad input: one `error:` line, exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sortedllm.bench import batch, common, decode, kernels, train
from sortedllm.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = ("_ci95", "_n", "_verdict")


def has_interval(row: dict, prefix: str) -> bool:
    lo, hi = row[prefix + "_ci95"]
    return all(prefix + s in row for s in INTERVAL) and lo <= hi


def test_decode_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "decode.json"
    assert decode.main(["--model", str(tiny_checkpoint), "--prompts", "2", "--max_new_tokens", "4",
                        "--draft_exits", "2", "--hf_exits", "2", "--calibration_prompts", "2",
                        "--static_rounds", "1", "--batch_study", "2", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    # the keys experiments/make_results.py reads, plus the kernel table and the machine facts
    assert {"model", "model_note", "num_layers", "exits", "settings", "rows", "static_depth", "batch",
            "checks", "kernel_costs", "cpu_bf16", "torch"} <= set(d)
    assert d["settings"]["prompts_per_task"] == 2 and d["kernel_costs"]["relative"]["1"] == 1.0
    methods = {r["method"] for r in d["rows"]}
    assert {"greedy", "greedy (repeat)", "greedy (HF generate)", "greedy (HF generate, bfloat16)",
            "HF assistant_early_exit 2", "self-speculative 2", "early exit (paper)",
            "early exit (calibrated 95%)"} <= methods
    assert {r["task"] for r in d["rows"]} == {"pandalm", "triviaqa", "gsm8k"}
    for r in d["rows"]:
        assert has_interval(r, "speedup") and has_interval(r, "speedup_wall") and r["speedup_n"] == 2
        assert len(r["per_prompt"]["cpu_s"]) == 2
        if r["exact"]:  # speculation and the A/A repeat must reproduce plain greedy token for token
            assert r["identical_rate"] == 1.0, r["method"]
        assert (r["accuracy"] is None) == (r["task"] == "pandalm")
    greedy = next(r for r in d["rows"] if r["method"] == "greedy")
    assert greedy["speedup"] == 1.0 and greedy["speedup_ci95"] == [1.0, 1.0]
    assert any(r["method"] == "self-speculative 2" and "acceptance" in r for r in d["rows"])


def test_decode_leaves_out_what_it_is_told_and_judges_each_target(tiny_checkpoint, tmp_path):
    out = tmp_path / "decode.json"
    assert decode.main(["--model", str(tiny_checkpoint), "--prompts", "2", "--max_new_tokens", "4", "--tasks", "gsm8k",
                        "--draft_exits", "2", "--hf_exits", "2", "--skip_hf_assisted", "--skip_early_exit",
                        "--static_rounds", "0", "--batch_study", "0", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    methods = {r["method"] for r in d["rows"]}
    assert "HF assistant_early_exit 2" in methods and not any(m.startswith(("HF assisted", "early exit"))
                                                                for m in methods)
    (spec,) = [v for k, v in d["checks"].items() if k.startswith("self-speculative >= 1.6x")]
    assert spec["gsm8k"].endswith(("met", "missed", "undecided (the interval contains the target)"))


def test_kernels_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "kernels.json"
    assert kernels.main(["--model", str(tiny_checkpoint), "--reps", "1", "--context", "16", "--dtype", "float32",
                         "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["sizes"] == [1, 2, 3, 4, 6, 8] and d["dtype"] == "float32" and d["context"] == 16
    assert {"HF float32", "HF bfloat16", "ours float32", "LM head float32 (ours)", "LM head float32, unpadded oneDNN",
            "LM head float32 (HF)"} == \
        set(d["methods"])
    for m in d["methods"].values():
        assert set(m["relative"]) == set(m["relative_mean"]) == set(m["relative_ci95"]) == set(map(str, kernels.SIZES))
        assert all(v > 0 for v in m["ms"].values()) and m["relative_n"] == 1
    assert d["cost_table"]["relative"]["1"] == 1.0 and "cpu_bf16" in d["machine"]


def test_batch_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "batched_generation.json"
    assert batch.main(["--model", str(tiny_checkpoint), "--n", "3", "--batch-size", "3", "--max-new-tokens", "4",
                       "--rounds", "2", "--threads", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["rounds"]) == 2 and d["ratio_n"] == 2 and has_interval(d, "ratio")
    assert d["ratio_min"] <= d["ratio_median"] <= d["ratio_max"]
    assert all(r["same_tokens"] == 1.0 for r in d["rounds"])  # batching must not change greedy output


def test_train_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "train.json"
    assert train.main(["--model", str(tiny_checkpoint), "--steps", "2", "--warmup", "0", "--batch-size", "1",
                       "--exits", "2,4,6", "--methods", "hf_sft,sft,soft_uniform,naive_soft,split_uniform",
                       "--no-memory", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["hf_sft", "sft", "soft_uniform", "naive_soft", "split_uniform"]
    # what make_results reads, and the new interval over rounds
    for r in rows.values():
        assert {"time_ratio", "cpu_time_ratio", "peak_mem_ratio", "ideal_ratio", "ideal_ratio_llama2_13b", "exits",
                "cpu_s", "model", "batch_size", "mean_seq_len", "rounds"} <= set(r)
        assert has_interval(r, "cpu_time_sum_ratio") and r["cpu_time_sum_ratio_n"] == 2
    assert rows["hf_sft"]["time_ratio"] == 1.0 and rows["hf_sft"]["peak_mem_ratio"] is None
    # the same loss computed two ways (learning rate 0 keeps the weights put)
    assert rows["sft"]["loss"] == pytest.approx(rows["hf_sft"]["loss"], abs=1e-3)
    assert rows["soft_uniform"]["loss"] == pytest.approx(rows["naive_soft"]["loss"], abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["bench", "frobnicate"], "unknown benchmark 'frobnicate'"),
    (["bench", "decode", "--model", "/no/such/model", "--prompts", "1"], "not found"),
    (["bench", "kernels", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["bench", "decode", "--prompts", "0"], "--prompts must be at least 1"),
    (["bench", "decode", "--tasks", "mmlu"], "unknown task 'mmlu'"),
    (["bench", "train", "--methods", "hf_sft,bogus"], "unknown method bogus"),
    (["bench", "batch", "--nope"], "unrecognized arguments: --nope"),
])
def test_bad_input_is_one_error_line_exit_2(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_old_script_path_still_works_and_fails_cleanly():
    """benchmarks/bench_decode.py is a wrapper over `sortedllm bench decode`: same options, same one-line errors."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--prompts", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --prompts must be at least 1 (got 0)"]


def test_bench_help_lists_every_benchmark(capsys):
    assert cli(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sortedllm bench") and all(name in out for name in ("train", "decode", "batch",
                                                                                      "kernels"))
    with pytest.raises(SystemExit) as done:
        cli(["bench", "decode", "--help"])
    assert done.value.code == 0 and "--max_new_tokens" in capsys.readouterr().out


def test_results_name_repository_files_relatively():
    assert common.shown_path(ROOT / "runs" / "x" / "final") == "runs/x/final"
    assert common.shown_path("smollm2-135m") == "smollm2-135m"
    assert common.default_out("decode.json") == str(ROOT / "benchmarks" / "results" / "decode.json")
