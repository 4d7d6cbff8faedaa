"""The bad-input table: every way a user can get a command wrong, run through the real CLI as a subprocess.

Each row must end with exit code 2 and one line on stderr, `error: <problem and fix>` (the last line; only rows
that fail after work has started may log progress before it), no traceback, and no half-written output: the
output folder is absent, or holds only what it held before plus whole checkpoints, never a temp folder, a `final`
model or results. `--debug` (or SORTEDLLM_DEBUG=1) shows the traceback first.

To extend it for another command, add rows to TABLE; paths in a row are `{name}` placeholders from `world`, and
`{out}` is a fresh output folder of that row.

Each row is its own process running the CLI entry point `sortedllm.cli.main(argv)`, with its own stderr and exit
code. To keep the table cheap, those processes are forked from one warm process that has already imported torch,
transformers and TRL (about 5 s of CPU per process otherwise); the --debug rows run `python -m sortedllm.cli`.

The default (fast) run checks one row per command (FAST); the other rows and the --debug rows are marked `slow` and
run with RUN_SLOW=1 (scripts/test.sh).
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.conftest import make_tiny

from sortedllm.checkpoint import CRASH_ENV, manifest_problem, stale_temp_folders


@dataclass
class Row:
    id: str
    cmd: str  # command line after `sortedllm`, with {placeholders}
    message: str  # must appear in the error line
    env: dict = field(default_factory=dict)
    quiet: bool = True  # nothing else on stderr (False: the command had started working and logged progress)

    def __repr__(self):
        return self.id


TRAIN = "train --config {yaml} --output_dir {out}"
EVALUATE = "evaluate --model {sorted} --limit 2"
GENERATE = "generate --model {sorted} --prompt hi --max_new_tokens 2"
EXPORT = "export --model {sorted} --out {out}"

TABLE = [
    # -- train ----------------------------------------------------------------------------------------------------
    Row("train-model-missing-path", TRAIN + " --model {tmp}/no-such-model", "model path not found: "),
    Row("train-model-unknown-id", TRAIN + " --model no-such-org/no-such-model",
        "unknown model 'no-such-org/no-such-model': not a local folder, .gguf file, built-in alias"),
    Row("train-model-unsupported-arch", TRAIN + " --model {gpt2}", "unsupported architecture 'gpt2'"),
    Row("train-model-bad-gguf", TRAIN + " --model {bad_gguf}", "is not a valid GGUF file (bad magic"),
    Row("train-model-pickle-only", TRAIN + " --model {pickled}", "has only pickle weights (pytorch_model.bin)"),
    Row("train-model-custom-code", TRAIN + " --model {custom}", "needs its own Python code (auto_map in config.json)"),
    Row("train-exit-out-of-range", TRAIN + " --exits 2,99", "exit layer 99 is out of range: this model has layers 1..6"),
    Row("train-exit-duplicated", TRAIN + " --exits 2,2,4", "exit layer 2 is listed twice"),
    Row("train-exit-not-understood", TRAIN + " --exits two", "exits 'two' not understood"),
    Row("train-yaml-malformed", "train --config {bad_yaml} --output_dir {out}", "malformed YAML in"),
    Row("train-yaml-unknown-field", "train --config {typo_yaml} --output_dir {out}",
        "unknown config field 'learnin_rate'"),
    Row("train-unknown-option", TRAIN + " --learnin_rate 1e-4", "unknown option --learnin_rate"),
    Row("train-bad-value", TRAIN + " --max_steps many", "invalid int value: 'many'"),
    Row("train-unknown-mode", TRAIN + " --mode banana", "unknown mode 'banana'"),
    Row("train-unknown-schedule", TRAIN + " --exit_schedule bogus", "unknown exit_schedule 'bogus'"),
    Row("train-data-missing-file", TRAIN + " --data {tmp}/nothing.jsonl", "data file not found"),
    Row("train-data-malformed-row", TRAIN + " --data {bad_jsonl}", "bad.jsonl:2: malformed JSON"),
    Row("train-data-missing-fields", TRAIN + " --data {nofields_jsonl}",
        "nofields.jsonl:1: row has no prompt/completion, messages, instruction/output or question/answer fields"),
    Row("train-data-empty", TRAIN + " --data {empty_jsonl}", "empty.jsonl' is empty"),
    Row("train-prompt-longer-than-context", TRAIN + " --max_length 8",
        "every prompt in 'gsm8k' is longer than max_length=8: raise --max_length"),
    Row("train-lora-bad-target", TRAIN + " --lora r=4,targets=no_such_proj",
        "--lora target 'no_such_proj' is not a linear layer of this model"),
    Row("train-output-unwritable", "train --config {yaml} --output_dir {a_file}/run",
        "is a file; choose another --output_dir"),
    Row("train-resume-missing", TRAIN + " --resume {tmp}/gone/checkpoint-3", "resume checkpoint not found"),
    Row("train-resume-nothing-to-resume", TRAIN + " --resume", "--resume: no checkpoint-N folder in"),
    Row("train-resume-truncated", TRAIN + " --resume {truncated_ckpt}",
        "model.safetensors is truncated or altered"),
    Row("train-resume-not-a-checkpoint", TRAIN + " --resume {sorted}", "it is not a training checkpoint"),
    Row("train-resume-foreign-run", TRAIN + " --resume {ckpt} --seed 8",
        "it was written by a run with seed=7, this run has seed=8", quiet=False),
    Row("train-resume-foreign-model", TRAIN + " --resume {ckpt} --model {tiny4}",
        "it is a checkpoint of a different model (num_hidden_layers 6 there, 4 here)", quiet=False),
    Row("train-earlier-run-in-output", "train --config {yaml} --output_dir {run}",
        "already holds checkpoint-1 from an earlier run: pass --resume"),
    Row("train-disk-full-during-save", TRAIN, "final: No space left on device; nothing was written",
        env={CRASH_ENV: "enospc:1@final"}, quiet=False),
    Row("train-draft-no-base", TRAIN + " --mode draft", "--mode draft needs --base <checkpoint>"),
    Row("train-draft-shared-out-of-range", TRAIN + " --mode draft --base {sorted} --draft_shared 6",
        "a draft of 6 shared + 2 own layer(s) must end before the last layer (this model has 6)"),
    # -- evaluate -------------------------------------------------------------------------------------------------
    Row("evaluate-model-missing-path", "evaluate --model {tmp}/no-such-model", "model path not found: "),
    Row("evaluate-model-unsupported-arch", "evaluate --model {gpt2}", "unsupported architecture 'gpt2'"),
    Row("evaluate-model-damaged", "evaluate --model {damaged_sorted}",
        "is incomplete or corrupted: model.safetensors is truncated or altered"),
    Row("evaluate-exit-out-of-range", EVALUATE + " --exits 9", "exit layer 9 is out of range"),
    Row("evaluate-exit-duplicated", EVALUATE + " --exits 2,2", "exit layer 2 is listed twice"),
    Row("evaluate-exit-not-in-checkpoint", EVALUATE + " --exits 3",
        "exit 3 is not an exit of this checkpoint (its exits: 2,4,6)"),
    Row("evaluate-unknown-task", EVALUATE + " --tasks nope", "unknown task 'nope'"),
    Row("evaluate-unknown-option", EVALUATE + " --bogus 1", "unrecognized arguments: --bogus"),
    Row("evaluate-data-malformed-row", EVALUATE + " --data_file {bad_jsonl}", "bad.jsonl:2: malformed JSON"),
    Row("evaluate-data-empty", EVALUATE + " --data_file {empty_jsonl}", "empty.jsonl' is empty"),
    Row("evaluate-output-unwritable", EVALUATE + " --output_dir {a_file}/eval", "is a file"),
    Row("evaluate-disk-full-during-save", EVALUATE + " --output_dir {out}",
        "No space left on device; nothing was written", env={CRASH_ENV: "enospc:0"}, quiet=False),
    Row("evaluate-judge-unknown", EVALUATE + " --tasks tournament --judge bogus",
        "unknown judge 'bogus': use offline, hf:<model folder or hub id> or openai:<model name>"),
    Row("evaluate-judge-missing-model", EVALUATE + " --tasks tournament --judge hf:{tmp}/no-judge",
        "no-judge: model path not found: "),
    Row("evaluate-data-file-task-not-chosen", EVALUATE + " --data_file gsm8k={bad_jsonl}",
        "--data_file names task 'gsm8k', which is not in --tasks (loss)"),
    Row("evaluate-data-file-which-task", EVALUATE + " --tasks gsm8k,triviaqa --data_file {bad_jsonl}",
        "say which task it is for, e.g. --data_file gsm8k="),
    Row("evaluate-data-file-task-malformed", EVALUATE + " --tasks gsm8k --data_file gsm8k={bad_jsonl}",
        "bad.jsonl:2: malformed JSON"),
    Row("evaluate-pairs-unknown", EVALUATE + " --tasks tournament --pairs bogus",
        "unknown --pairs 'bogus': choose from cross, diagonal, last"),
    Row("evaluate-positions-zero", EVALUATE + " --tasks similarity --positions 0", "--positions must be at least 1"),
    Row("evaluate-draft-layer-missing", EVALUATE + " --tasks agreement --draft_layer {tmp}/nothing.safetensors",
        "draft layer file not found"),
    # -- generate -------------------------------------------------------------------------------------------------
    Row("generate-model-missing-path", "generate --model {tmp}/no-such-model --prompt hi", "model path not found: "),
    Row("generate-model-unknown-id", "generate --model no-such-org/no-such-model --prompt hi",
        "unknown model 'no-such-org/no-such-model': not a local folder, .gguf file, built-in alias"),
    Row("generate-model-unsupported-arch", "generate --model {gpt2} --prompt hi", "unsupported architecture 'gpt2'"),
    Row("generate-model-damaged", "generate --model {damaged_sorted} --prompt hi",
        "is incomplete or corrupted: model.safetensors is truncated or altered"),
    Row("generate-exit-out-of-range", GENERATE + " --exit 9",
        "exit layer 9 is out of range: this model has layers 1..6"),
    Row("generate-exit-zero", GENERATE + " --exit 0", "exit layer 0 is out of range: this model has layers 1..6"),
    Row("generate-exit-not-in-checkpoint", GENERATE + " --exit 3",
        "exit 3 is not an exit of this checkpoint (its exits: 2,4,6)"),
    Row("generate-draft-exit-out-of-range", GENERATE + " --speculative 6",
        "speculative draft exit 6 is out of range: use a layer in 1..5 (the full model, layer 6, verifies)"),
    Row("generate-draft-exit-not-in-checkpoint", GENERATE + " --speculative 3",
        "exit 3 is not an exit of this checkpoint (its exits: 2,4,6)"),
    Row("generate-early-exits-duplicated", GENERATE + " --early-exit --exits 2,2", "exit layer 2 is listed twice"),
    Row("generate-early-exits-not-in-checkpoint", GENERATE + " --early-exit --exits 3",
        "exit 3 is not an exit of this checkpoint (its exits: 2,4,6)"),
    Row("generate-draft-layer-missing", GENERATE + " --speculative 3 --draft_layer {tmp}/nothing.safetensors",
        "draft layer file not found"),
    Row("generate-draft-layer-not-a-draft", GENERATE + " --speculative 3 --draft_layer {sorted}/model.safetensors",
        "is not a draft layer file"),
    Row("generate-draft-layer-without-speculative", GENERATE + " --draft_layer {tmp}/nothing.safetensors",
        "--draft_layer needs --speculative K"),
    Row("generate-two-strategies", GENERATE + " --exit 2 --speculative 4",
        "argument --speculative: not allowed with argument --exit"),
    Row("generate-no-prompt", "generate --model {sorted}",
        "no prompt given: pass --prompt TEXT or --prompts_file FILE"),
    Row("generate-prompts-file-missing", "generate --model {sorted} --prompts_file {tmp}/nothing.txt",
        "prompts file not found: "),
    Row("generate-prompts-file-malformed", "generate --model {sorted} --prompts_file {bad_jsonl}",
        "bad.jsonl:2: malformed JSON (Expecting ',' delimiter); fix or remove this line"),
    Row("generate-prompts-file-missing-fields", "generate --model {sorted} --prompts_file {nofields_jsonl}",
        "nofields.jsonl:1: row has no prompt/completion, messages, instruction/output or question/answer fields"),
    Row("generate-prompts-file-bad-prompt", "generate --model {sorted} --prompts_file {numeric_prompt_jsonl}",
        "numbers.jsonl:2: 'prompt' must be text or a non-empty list of {role, content} messages, got int"),
    Row("generate-prompts-file-empty", "generate --model {sorted} --prompts_file {empty_jsonl}",
        "empty.jsonl has no prompts"),
    Row("generate-prompts-file-not-utf8", "generate --model {sorted} --prompts_file {latin1_txt}",
        "latin1.txt is not UTF-8 text (invalid continuation byte at byte 8); save it as UTF-8"),
    Row("generate-prompt-longer-than-context", "generate --model {sorted} --prompts_file {long_txt}",
        "prompt 1 ('word word word word word word word word ...') has 1231 tokens, more than the model's context of "
        "512; shorten it"),
    Row("generate-max-new-tokens-negative", GENERATE + " --max_new_tokens -1",
        "--max_new_tokens must be at least 0 (got -1)"),
    Row("generate-thresholds-without-early-exit", GENERATE + " --thresholds 2:0.9",
        "--thresholds needs --early-exit"),
    Row("generate-thresholds-malformed", GENERATE + " --early-exit --thresholds 2=0.9",
        "--thresholds '2=0.9' not understood: give exit:threshold pairs like 9:0.95,15:0.9"),
    Row("generate-thresholds-file-missing", GENERATE + " --early-exit --thresholds {tmp}/none.json",
        "thresholds file not found: "),
    Row("generate-unknown-measure", GENERATE + " --early-exit --measure vibes",
        "unknown confidence measure 'vibes': choose from max_prob, margin, entropy, saturation"),
    Row("generate-save-thresholds-unwritable", GENERATE + " --early-exit --save_thresholds {a_file}/th.json",
        "a-file.txt is a file; choose another --save_thresholds"),
    Row("generate-unknown-option", GENERATE + " --bogus 1", "unrecognized arguments: --bogus 1"),
    # -- export ---------------------------------------------------------------------------------------------------
    Row("export-model-missing-path", "export --model {tmp}/no-such-model --layers 2 --out {out}",
        "model path not found: "),
    Row("export-model-unknown-id", "export --model no-such-org/no-such-model --layers 2 --out {out}",
        "unknown model 'no-such-org/no-such-model': not a local folder, .gguf file, built-in alias"),
    Row("export-model-unsupported-arch", "export --model {gpt2} --layers 1 --out {out}",
        "unsupported architecture 'gpt2'"),
    Row("export-model-damaged", "export --model {damaged_sorted} --layers 2 --out {out}",
        "is incomplete or corrupted: model.safetensors is truncated or altered"),
    Row("export-exit-out-of-range", EXPORT + " --layers 9",
        "exit layer 9 is out of range: this model has layers 1..6"),
    Row("export-exit-duplicated", EXPORT + " --layers 2,2", "exit layer 2 is listed twice"),
    Row("export-exit-not-in-checkpoint", EXPORT + " --layers 3",
        "exit 3 is not an exit of this checkpoint (its exits: 2,4,6)"),
    Row("export-exits-not-understood", EXPORT + " --layers two", "exits 'two' not understood"),
    Row("export-output-unwritable", "export --model {sorted} --layers 2 --out {a_file}/exported",
        "a-file.txt is a file; choose another --out"),
    Row("export-output-not-empty", "export --model {sorted} --layers 2 --out {nonempty}",
        "exists and is not empty; choose a new folder or pass --overwrite"),
    Row("export-output-is-the-model", "export --model {sorted} --layers 2 --out {sorted} --overwrite",
        "would replace the model being exported"),
    Row("export-unknown-gguf-type", EXPORT + " --layers 2 --gguf q4",
        "unknown --gguf type 'q4': use one of f32, f16, bf16"),
    Row("export-unknown-dtype", EXPORT + " --layers 2 --dtype float8", "unknown --dtype 'float8'"),
    Row("export-disk-full-during-save", EXPORT + " --layers 2",
        "No space left on device; nothing was written (free space or choose another --out)",
        env={CRASH_ENV: "enospc:1"}),
    Row("export-all-disk-full-during-save", EXPORT + " --layers all",
        "No space left on device; nothing was written (free space or choose another --out)",
        env={CRASH_ENV: "enospc:5"}),
]

DEBUG_ROWS = [
    Row("debug-flag", "--debug " + TRAIN + " --exits 2,99", "exit layer 99 is out of range"),
    Row("debug-env", TRAIN + " --exits 2,99", "exit layer 99 is out of range", env={"SORTEDLLM_DEBUG": "1"}),
    Row("debug-generate", "generate --debug --model {sorted} --prompt hi --exit 3", "exit 3 is not an exit"),
    Row("debug-export", "--debug " + EXPORT + " --layers 9", "exit layer 9 is out of range"),
]

# One representative row per command runs in the default fast run; the other rows are `slow`.
FAST = {"train-exit-out-of-range", "evaluate-exit-not-in-checkpoint", "generate-draft-exit-out-of-range",
        "export-disk-full-during-save"}
assert FAST <= {r.id for r in TABLE}, FAST - {r.id for r in TABLE}


# The first selected row runs the `world` and `outcomes` fixtures (a short training run, then every selected row's
# process): the timeout covers that setup, the rows themselves only read results.
pytestmark = pytest.mark.timeout(1200)


def params(rows: list[Row]) -> list:
    """The rows as pytest parameters: FAST rows as they are, every other row marked slow."""
    return [pytest.param(r, id=r.id, marks=() if r.id in FAST else pytest.mark.slow) for r in rows]


BASE_YAML = """model: {tiny}
data: gsm8k
data_limit: 4
exits: [2, 4]
max_steps: 1
per_device_train_batch_size: 2
max_length: 128
gradient_checkpointing: false
save_strategy: "no"
disable_tqdm: true
report_to: none
seed: 7
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint, tokenizer):
    """Every file and folder the table's rows point at, made once."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from sortedllm import SortedModel
    from sortedllm.train import recipe

    tmp = tmp_path_factory.mktemp("bad-input")
    w = {"tmp": tmp, "tiny": tiny_checkpoint}

    def folder(name, model):
        path = tmp / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    w["tiny4"] = folder("tiny4", make_tiny("llama", tokenizer, layers=4))
    sm = SortedModel(make_tiny("llama", tokenizer), tokenizer, exits=[2, 4, 6])
    sm.config.mode = "soft"
    w["sorted"] = sm.save_pretrained(tmp / "sorted")
    w["damaged_sorted"] = tmp / "damaged"
    shutil.copytree(w["sorted"], w["damaged_sorted"])
    with open(w["damaged_sorted"] / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    w["gpt2"] = folder("gpt2", AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                   eos_token_id=2)))
    w["bad_gguf"] = tmp / "broken.gguf"
    w["bad_gguf"].write_bytes(b"<html>404 not found</html>")
    w["pickled"] = folder("pickled", make_tiny("llama", tokenizer, layers=2))
    (w["pickled"] / "model.safetensors").unlink()
    with open(w["pickled"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({}, f)
    w["custom"] = folder("custom", make_tiny("llama", tokenizer, layers=2))
    config = json.loads((w["custom"] / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (w["custom"] / "config.json").write_text(json.dumps(config))

    w["yaml"] = tmp / "train.yaml"
    w["yaml"].write_text(BASE_YAML.format(tiny=tiny_checkpoint))
    w["bad_yaml"] = tmp / "bad.yaml"
    w["bad_yaml"].write_text(BASE_YAML.format(tiny=tiny_checkpoint) + "exits: [2, 4\n")
    w["typo_yaml"] = tmp / "typo.yaml"
    w["typo_yaml"].write_text(BASE_YAML.format(tiny=tiny_checkpoint) + "learnin_rate: 1.0e-4\n")
    w["bad_jsonl"] = tmp / "bad.jsonl"
    w["bad_jsonl"].write_text('{"prompt": "2+2?", "completion": "4"}\n{"prompt": "3+3?", "completion": 6\n')
    w["nofields_jsonl"] = tmp / "nofields.jsonl"
    w["nofields_jsonl"].write_text('{"text": "no prompt here"}\n')
    w["empty_jsonl"] = tmp / "empty.jsonl"
    w["empty_jsonl"].write_text("\n")
    w["a_file"] = tmp / "a-file.txt"
    w["a_file"].write_text("not a folder\n")
    w["numeric_prompt_jsonl"] = tmp / "numbers.jsonl"
    w["numeric_prompt_jsonl"].write_text('{"prompt": "2+2?"}\n{"prompt": 5}\n')
    w["latin1_txt"] = tmp / "latin1.txt"
    w["latin1_txt"].write_bytes("2+2?\ncaf\u00e9 au lait\n".encode("latin-1"))
    w["long_txt"] = tmp / "long.txt"
    w["long_txt"].write_text("What is 2+2?\n" + "word " * 1200 + "\n")
    w["nonempty"] = tmp / "nonempty"
    w["nonempty"].mkdir()
    (w["nonempty"] / "notes.txt").write_text("keep me\n")

    # A real training checkpoint (the run's seed 7), a truncated copy, and the run folder that holds it.
    w["run"] = tmp / "run"
    recipe.main(["--config", str(w["yaml"]), "--output_dir", str(w["run"]), "--save_strategy", "steps",
                 "--save_steps", "1"])
    w["ckpt"] = w["run"] / "checkpoint-1"
    w["truncated_ckpt"] = tmp / "truncated" / "checkpoint-1"
    shutil.copytree(w["ckpt"], w["truncated_ckpt"])
    with open(w["truncated_ckpt"] / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    return w


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# Imports the CLI's heavy dependencies once, then forks one child per row (four at a time). Nothing runs before
# the forks but imports, so no thread pool exists yet and each child starts as clean as a new interpreter.
FORK_SERVER = r"""
import json, os, sys, traceback
import datasets, peft, transformers, trl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import sortedllm.cli as cli, sortedllm.evaluate.cli, sortedllm.train.recipe

jobs, running, codes = json.load(sys.stdin), {}, {}

def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for job in jobs:
    while len(running) >= 4:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.environ.update(job["env"])
            code = cli.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    running[pid] = job["id"]
while running:
    reap()
print(json.dumps(codes))
"""


def prepare(row: Row, world: dict) -> dict:
    out = world["tmp"] / "out" / row.id
    paths = {**{k: str(v) for k, v in world.items()}, "out": str(out)}
    argv = shlex.split(row.cmd.format(**paths))
    watched = [Path(p) for p in argv if p.startswith(str(world["tmp"]))] + [out]
    return {"id": row.id, "argv": argv, "env": row.env, "stderr": str(world["tmp"] / f"{row.id}.stderr"),
            "out": out, "before": {p: listing(p) for p in watched if p.is_dir()}}


def run_forked(rows: list[Row], world: dict) -> dict:
    jobs = [prepare(row, world) for row in rows]
    request = json.dumps([{k: j[k] for k in ("id", "argv", "env", "stderr")} for j in jobs])
    r = subprocess.run([sys.executable, "-c", FORK_SERVER], input=request, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    return {j["id"]: {**j, "code": codes[j["id"]], "stderr": Path(j["stderr"]).read_text()} for j in jobs}


def run_cli(row: Row, world: dict) -> dict:
    job = prepare(row, world)
    r = subprocess.run([sys.executable, "-m", "sortedllm.cli", *job["argv"]], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **row.env}, timeout=900)
    return {**job, "code": r.returncode, "stderr": r.stderr}


@pytest.fixture(scope="module")
def outcomes(request, world):
    """Run the selected rows of this module that are not skipped (all of them with RUN_SLOW=1)."""
    rows = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        skipped = item.get_closest_marker("skip") is not None  # a slow row without RUN_SLOW
        if getattr(item, "module", None) is request.module and spec is not None and "row" in spec.params \
                and not skipped:
            rows.append(spec.params["row"])
    table = [r for r in rows if r not in DEBUG_ROWS]
    results = run_forked(table, world) if table else {}
    results.update({r.id: run_cli(r, world) for r in rows if r in DEBUG_ROWS})
    return results


def assert_nothing_half_written(result: dict) -> None:
    out = result["out"]
    for folder, before in result["before"].items():  # inputs and pre-existing folders are left as they were
        if folder != out:
            assert listing(folder) == before, f"{folder} changed"
    if out.exists():
        assert not stale_temp_folders(out), listing(out)
        assert not (out / "final").exists() and not (out / "results.json").exists(), listing(out)
        for ckpt in out.glob("checkpoint-*"):
            assert manifest_problem(ckpt) is None, ckpt


@pytest.mark.parametrize("row", params(TABLE))
def test_bad_input_is_one_clear_line_and_exit_2(row, outcomes):
    result = outcomes[row.id]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert lines and lines[-1].startswith("error: "), result["stderr"][-3000:]
    assert row.message in lines[-1], lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    if row.quiet:
        assert len(lines) == 1, result["stderr"]
    assert_nothing_half_written(result)


@pytest.mark.parametrize("row", params(DEBUG_ROWS))
def test_debug_shows_the_traceback(row, outcomes):
    result = outcomes[row.id]
    err = result["stderr"]
    assert result["code"] == 2
    assert "Traceback (most recent call last)" in err and "sortedllm.errors.SortedError" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and row.message in err.strip().splitlines()[-1]


def test_environment_os_errors_are_one_line_but_bugs_keep_their_traceback(monkeypatch, capsys):
    """An OSError from the environment anywhere in a command (here: disk full) is one line and exit 2."""
    import errno

    from sortedllm import cli
    from sortedllm.train import recipe

    def disk_full(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/README.md")

    monkeypatch.setattr(recipe, "main", disk_full)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "error: No space left on device: /data/run/README.md (free space or fix permissions, then retry)\n"

    def bug(argv):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(recipe, "main", bug)
    with pytest.raises(OSError):
        cli.main(["train"])
