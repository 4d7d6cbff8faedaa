"""`sortedllm train --dry-run`: the paper's 13B recipe planned on the meta device (no weights, no network)."""

from pathlib import Path

import pytest

from sortedllm.cli import main as cli
from sortedllm.config import ScriptArguments, parse_config
from sortedllm.errors import SortedError
from sortedllm.train.dry_run import GiB, plan
from sortedllm.train.trainer import SoFTConfig

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "llama2-13b-sorted.yaml"


def recipe_plan(*overrides):
    script, args = parse_config((ScriptArguments, SoFTConfig), ["--config", str(RECIPE), "--dry-run", *overrides])
    assert script.dry_run
    return plan(script, args)


def llama_params(h, i, layers, vocab, kv=None, tied=False):
    """LLaMA parameter count from its shapes alone (independent of transformers)."""
    kv = kv or h
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


def test_13b_recipe_dry_run_prints_the_plan(capsys):
    code = cli(["train", "--config", str(RECIPE), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "13,015,864,320" in out  # LLaMA-2 13B's published parameter count
    assert "12, 16, 20, 24, 28, 32, 36, 40" in out
    assert "* FSDP" in out  # the recipe's engine is marked
    for engine in ("DDP", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"):
        assert engine in out
    assert "SoFT/SFT = 1.0" in out


def test_13b_plan_numbers():
    p = recipe_plan()
    h, i, L, V = 5120, 13824, 40, 32000
    P = llama_params(h, i, L, V)
    assert p["parameters"]["total"] == P == 13_015_864_320
    assert p["exits"] == [12, 16, 20, 24, 28, 32, 36, 40] and p["exits_per_step"] == {"soft": 8, "sft": 1}
    assert p["batch"] == {"per_device": 4, "accumulation": 4, "global": 128, "max_length": 512,
                          "tokens_per_step": 128 * 512}
    assert p["gpus"] == 8 and p["engine"] == "fsdp"
    mem = p["memory_per_gpu"]
    # fp32 weights + bf16 autocast, AdamW: 4 + 4 + 8 bytes per parameter, sharded 8 ways under FSDP.
    assert mem["fsdp"]["weights"] == P * 4 / 8 and mem["fsdp"]["optimizer"] == P * 8 / 8
    assert mem["ddp"]["weights"] == P * 4 and mem["ddp"]["optimizer"] == P * 8
    # DeepSpeed mixed precision: 2-byte weights and grads, 12 bytes of fp32 master + Adam moments.
    assert mem["zero2"]["weights"] == P * 2 and mem["zero2"]["optimizer"] == P * 12 / 8
    assert mem["zero3"]["weights"] == P * 2 / 8
    assert mem["ddp"]["total"] > 150 * GiB > 80 * GiB > mem["fsdp"]["total"]  # 13B needs sharding on 80 GB GPUs
    # SoFT costs exactly 7 more LM-head passes (6 h V per labelled token) than SFT; the layers cost the same.
    soft, sft = p["flops_per_step"]["soft"], p["flops_per_step"]["sft"]
    assert soft["layers"] == sft["layers"]
    assert soft["total"] - sft["total"] == 7 * 128 * 512 * 6 * h * V
    assert 1.0 < p["soft_over_sft_flops"] < 1.1
    assert mem["fsdp"]["activations_soft"] > mem["fsdp"]["activations_sft"]


def test_dry_run_gpus_engine_and_checkpointing_change_the_plan(monkeypatch):
    base = recipe_plan()
    more = recipe_plan("--dry_run_gpus", "16")
    assert more["memory_per_gpu"]["fsdp"]["weights"] == base["memory_per_gpu"]["fsdp"]["weights"] / 2
    assert more["batch"]["global"] == 256
    plain = recipe_plan("--fsdp", "")  # no engine configured: a plain launch is DDP
    assert plain["engine"] == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    assert recipe_plan("--fsdp", "")["engine"] == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    no_ckpt = recipe_plan("--fsdp_config", '{"activation_checkpointing": false}')
    assert no_ckpt["memory_per_gpu"]["fsdp"]["activations"] > 3 * base["memory_per_gpu"]["fsdp"]["activations"] / 2
    assert no_ckpt["flops_per_step"]["sft"]["layers"] * 4 == base["flops_per_step"]["sft"]["layers"] * 3
    sft = recipe_plan("--mode", "sft")
    assert sft["memory_per_gpu"]["fsdp"]["activations"] == base["memory_per_gpu"]["fsdp"]["activations_sft"]


@pytest.mark.parametrize("exits, problem", [("12,44", "out of range"), ("16,12", "increasing order")])
def test_dry_run_checks_exits_against_the_config(exits, problem):
    with pytest.raises(SortedError, match=problem):
        recipe_plan("--exits", exits)


def test_dry_run_cli_error_is_one_line(capsys):
    assert cli(["train", "--config", str(RECIPE), "--dry-run", "--exits", "12,48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: exit layer 48 is out of range") and "1..40" in err[0]


def test_meta_count_matches_the_real_model(tiny_checkpoint):
    """On a real (tiny) folder the meta-device count is the loaded model's count, with tied embeddings once."""
    from transformers import AutoModelForCausalLM

    script, args = parse_config((ScriptArguments, SoFTConfig),
                                ["--model", str(tiny_checkpoint), "--exits", "2,4", "--dry-run", "--output_dir", "x"])
    p = plan(script, args)
    real = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert p["parameters"]["total"] == sum(t.numel() for t in real.parameters())
    assert p["parameters"]["tied"] and p["exits"] == [2, 4, 6]
    assert p["config_source"] == str(tiny_checkpoint)
    # A bare config.json file is enough.
    script.model = str(Path(tiny_checkpoint) / "config.json")
    assert plan(script, args)["parameters"]["total"] == p["parameters"]["total"]
