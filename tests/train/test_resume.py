"""Kill and resume: a tiny `sortedllm train` run killed with SIGKILL at a random step, or crashed in the middle of
writing a checkpoint, then continued with `--resume`, ends with bit-identical weights and the same logged loss
curve as the same run left alone. The processes are real CLI subprocesses; the kill point is drawn from a seeded
random generator, so what the test checks is the same on every run. The model has attention dropout and the exit
schedule samples an exit per step, so the RNG state and the schedule must be restored too, not only the data order.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sortedllm.checkpoint import CRASH_ENV, stale_temp_folders, verify_manifest
from sortedllm.errors import SortedError

MAX_STEPS = 7  # 4 steps per epoch: the run crosses an epoch boundary, so the data order is reshuffled once
CONFIG = """model: {model}
data: gsm8k
data_limit: 8
exits: [2, 4]
exit_schedule: sample:1
max_steps: {steps}
per_device_train_batch_size: 2
max_length: 128
learning_rate: 3.0e-3
gradient_checkpointing: false
save_strategy: steps
save_steps: 1
save_total_limit: 2
logging_steps: 1
disable_tqdm: true
report_to: none
seed: 7
output_dir: {out}
"""


def start(config: Path, *extra, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sortedllm.cli", "train", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def write_config(tmp_path: Path, name: str, model) -> tuple[Path, Path]:
    out = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(CONFIG.format(model=model, out=out, steps=MAX_STEPS))
    return cfg, out


def curve(out: Path) -> list[dict]:
    """The logged per-step training metrics (loss, per-exit losses, grad norm, lr) of the whole run."""
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [{k: v for k, v in h.items() if k != "epoch"} for h in state["log_history"] if "loss" in h]


def assert_same_run(out: Path, reference: Path) -> None:
    a, b = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:3]}"
    assert curve(out) == curve(reference)
    assert [h["step"] for h in curve(out)] == list(range(1, MAX_STEPS + 1))


def aftermath(out: Path, result: tuple[int, str]) -> dict:
    """What a killed run left on disk, recorded before it is resumed."""
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    problems = {}
    for ckpt in checkpoints:
        try:
            verify_manifest(ckpt)
        except Exception as e:  # recorded, asserted in the test
            problems[ckpt.name] = str(e)
    return {"result": result, "checkpoints": [p.name for p in checkpoints], "problems": problems,
            "stale": [p.name for p in stale_temp_folders(out)], "final": (out / "final").exists()}


@pytest.fixture(scope="module")
def dropout_checkpoint(tmp_path_factory, tokenizer):
    """A tiny LLaMA folder whose attention dropout makes every step consume random numbers."""
    from tests.conftest import make_tiny

    path = tmp_path_factory.mktemp("tiny") / "llama-dropout"
    model = make_tiny("llama", tokenizer)
    model.config.attention_dropout = 0.1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dropout_checkpoint):
    """The uninterrupted reference run and two interrupted runs, then their resumes; independent runs go in
    parallel to keep the wall time down."""
    tmp = tmp_path_factory.mktemp("resume")
    kill_step = random.Random(8).randint(2, 4)  # seeded: the same kill point every time
    ref_cfg, ref_out = write_config(tmp, "reference", dropout_checkpoint)
    kill_cfg, kill_out = write_config(tmp, "killed", dropout_checkpoint)
    crash_cfg, crash_out = write_config(tmp, "crashed", dropout_checkpoint)
    procs = {"reference": start(ref_cfg), "killed": start(kill_cfg),
             # dies in the middle of writing checkpoint-3 (after 2 of its files, the 3rd left half-written)
             "crashed": start(crash_cfg, env={CRASH_ENV: "2@checkpoint-3"})}
    # SIGKILL as soon as checkpoint-<kill_step> exists: the run is then inside a later step or a later save.
    deadline = time.time() + 900
    while not (kill_out / f"checkpoint-{kill_step}").exists():
        assert procs["killed"].poll() is None, procs["killed"].communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    procs["killed"].send_signal(signal.SIGKILL)
    results = {name: finish(p) for name, p in procs.items()}
    code, err = results["reference"]
    assert code == 0, err[-3000:]
    runs = {"killed": aftermath(kill_out, results["killed"]), "crashed": aftermath(crash_out, results["crashed"])}
    runs["killed"]["kill_step"] = kill_step
    resumed = {"killed": start(kill_cfg, "--resume"), "crashed": start(crash_cfg, "--resume")}
    for name, proc in resumed.items():
        runs[name].update(out=tmp / name, resumed=finish(proc))
    runs["reference"] = ref_out
    return runs


@pytest.mark.slow  # five CLI training runs (three, then two resumes)
@pytest.mark.timeout(1200)  # the first of the two also runs the module's `runs` fixture
@pytest.mark.parametrize("how", ["killed", "crashed"])
def test_interrupted_run_resumes_to_the_same_weights_and_loss_curve(runs, how):
    run = runs[how]
    code, err = run["result"]
    assert code == -signal.SIGKILL, f"the run was not killed (exit {code}): {err[-2000:]}"
    # What the kill left: only whole checkpoints (their manifests verify), no final model, maybe a temp folder.
    assert not run["final"]
    assert run["checkpoints"], "no checkpoint survived the kill"
    assert not run["problems"], run["problems"]
    if how == "crashed":
        assert run["checkpoints"] == ["checkpoint-1", "checkpoint-2"]  # checkpoint-3 never appeared
        assert run["stale"], "the crash should have left its temp folder behind"
    else:
        assert int(run["checkpoints"][-1].split("-")[1]) >= run["kill_step"]

    code, err = run["resumed"]
    assert code == 0, err[-3000:]
    assert not stale_temp_folders(run["out"])
    assert_same_run(run["out"], runs["reference"])


# -- choosing the checkpoint (no training: checkpoint folders written by the same atomic save) -------------------


def fake_checkpoint(out: Path, step: int) -> Path:
    from sortedllm.checkpoint import atomic_dir

    with atomic_dir(out / f"checkpoint-{step}", meta={"global_step": step}) as tmp:
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
    return out / f"checkpoint-{step}"


def test_latest_whole_checkpoint_is_chosen_and_damaged_ones_skipped(tmp_path, caplog):
    from sortedllm.train.resume import find_checkpoint

    out = tmp_path / "run"
    fake_checkpoint(out, 1)
    fake_checkpoint(out, 2)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"w" * 10)  # damaged after the save
    (out / ".checkpoint-3.tmp-abc").mkdir()  # left by a save that was killed
    assert find_checkpoint(out, "latest") == out / "checkpoint-1"
    assert "skipping checkpoint-2: model.safetensors is truncated" in caplog.text
    assert not stale_temp_folders(out)
    assert find_checkpoint(out, True) == out / "checkpoint-1"
    with pytest.raises(SortedError, match="checkpoint-2: model.safetensors is truncated or altered"):
        find_checkpoint(out, str(out / "checkpoint-2"))  # named explicitly: refused, not skipped


def test_auto_resumes_when_possible_and_starts_fresh_otherwise(tmp_path):
    from sortedllm.train.resume import find_checkpoint, flag_value

    out = tmp_path / "run"
    assert find_checkpoint(out, "auto") is None and find_checkpoint(out, None) is None
    with pytest.raises(SortedError, match="no checkpoint-N folder"):
        find_checkpoint(out, "latest")
    fake_checkpoint(out, 5)
    assert find_checkpoint(out, "auto") == out / "checkpoint-5"
    with pytest.raises(SortedError, match="already holds checkpoint-5 from an earlier run: pass --resume"):
        find_checkpoint(out, None)
    assert flag_value(["--resume"]) == ["--resume", "latest"]
    assert flag_value(["--resume", "--seed", "1"]) == ["--resume", "latest", "--seed", "1"]
    assert flag_value(["--resume", "auto"]) == ["--resume", "auto"]
