"""Multi-process SoFT on this CPU machine (gloo): DDP through `accelerate launch` of the real CLI, and FSDP2
sharding around the shared norm + LM head, each against one process with the same global batch.

accelerate 1.15 turns FSDP on only for GPU-type backends (on CPU it silently stays DDP), so FSDP2 is exercised
with torch's own `fully_shard` here: the part SoFT adds, the shared norm and head applied to every exit's hidden
state outside the model's forward, is exactly what this checks.

Run as a script (`torchrun --nproc_per_node 2 tests/train/test_distributed.py`) it is the FSDP2 worker.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "configs" / "accelerate"
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **kw.pop("env", {})}, cwd=ROOT, **kw)


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def run_yaml(tmp_path, tiny_checkpoint):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""model: {tiny_checkpoint}
data: gsm8k
data_limit: 24
exits: [2, 4]
max_steps: {STEPS}
max_length: 128
learning_rate: 3.0e-3
logging_steps: 1
save_strategy: steps
save_steps: {STEPS}
eval_strategy: "no"
disable_tqdm: true
report_to: none
seed: 0
""")
    return cfg


def losses(folder: Path, key: str = "loss") -> list[float]:
    state = json.loads((folder / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h[key] for h in state["log_history"] if key in h]


@pytest.mark.slow  # three training processes (one alone, two under accelerate launch)
@pytest.mark.timeout(900)
def test_ddp_two_processes_match_one_process(run_yaml, tmp_path):
    """accelerate launch, 2 processes x 2 sequences vs 1 process x 4: the same loss curve and final weights."""
    from safetensors.torch import load_file

    one = run([sys.executable, "-m", "sortedllm.cli", "train", "--config", run_yaml,
               "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "one"])
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE / "ddp.yaml",
               "--num_processes", 2, "--mixed_precision", "no", "--main_process_port", 0,
               "-m", "sortedllm.cli", "train", "--config", run_yaml, "--per_device_train_batch_size", 2,
               "--output_dir", tmp_path / "two", "--use_cpu", "true"])
    for proc in (one, two):
        code, out, err = finish(proc)
        assert code == 0, err[-3000:]
    assert (tmp_path / "two" / f"checkpoint-{STEPS}" / "rng_state_1.pth").is_file()  # there were two ranks
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == STEPS and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-5)
    for k in (2, 6):  # each exit's logged per-token loss is the global batch's, not a mean of the ranks' means
        assert losses(tmp_path / "two", f"loss_exit_{k}") == pytest.approx(losses(tmp_path / "one", f"loss_exit_{k}"),
                                                                         rel=1e-5)
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        # Adam divides by sqrt(v): for near-zero gradients, summation-order noise moves a weight by a small
        # fraction of one step (lr 3e-3), so the tolerance is 1% of a step.
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=3e-5)
    cfg = json.loads((tmp_path / "two" / "final" / "sorted_config.json").read_text())
    assert cfg["exits"] == [2, 4, 6] and cfg["mode"] == "soft"


@pytest.mark.slow  # two CLI processes under accelerate launch
@pytest.mark.timeout(600)
def test_unjoined_processes_are_refused(run_yaml, tmp_path):
    """Processes launched with no GPU and no --use_cpu would each train alone on all the data: refused, one line."""
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE / "ddp.yaml",
                "--num_processes", 2, "--mixed_precision", "no", "--main_process_port", 0,
                "-m", "sortedllm.cli", "train", "--config", run_yaml, "--output_dir", tmp_path / "x"])
    code, out, err = finish(proc, timeout=300)
    # One line from each process (counted in the whole stream: two processes' lines may interleave).
    assert code != 0 and err.count("error: 2 processes were launched") == 2, err[-2000:]
    assert "--use_cpu true" in err
    assert not (tmp_path / "x" / "final").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_accelerate_configs_are_valid(name, monkeypatch):
    """Each shipped config parses as `accelerate launch` parses it, uses only known options, and builds the engine's
    plugin (DeepSpeed's config builds without deepspeed installed; batch and accumulation stay with the trainer)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    path = ACCELERATE / f"{name}.yaml"
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    options = set(defaults.fsdp_config) | set(defaults.deepspeed_config)
    assert options <= known, options - known  # a misspelt key would be ignored silently by accelerate
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    elif name == "fsdp":
        assert args.use_fsdp
        for key, value in prepare_multi_gpu_env(args).items():
            if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # final/ is an ordinary HF folder
    else:
        assert args.use_deepspeed
        plugin = DeepSpeedPlugin(zero_stage=args.zero_stage, offload_optimizer_device=args.offload_optimizer_device,
                                 offload_param_device=args.offload_param_device, zero3_init_flag=args.zero3_init_flag,
                                 zero3_save_16bit_model=args.zero3_save_16bit_model)
        ds = plugin.deepspeed_config
        assert ds["zero_optimization"]["stage"] == int(name[-1])
        assert ds["gradient_accumulation_steps"] == ds["train_micro_batch_size_per_gpu"] == "auto"
        if name.endswith("3"):
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# -- FSDP2 ---------------------------------------------------------------------------------------------------------


def fsdp_steps(world: int, rank: int) -> dict:
    """Three AdamW steps of SoFT on 8 sequences, split over `world` FSDP2 ranks (world 1: no FSDP at all)."""
    sys.path.insert(0, str(ROOT))  # as pytest runs from the repository root: `tests.conftest`
    from tests.conftest import make_tiny
    from transformers import AutoTokenizer

    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.models import Architecture, resolve_folder
    from sortedllm.train.loss import label_positions, multi_exit_loss

    tok = AutoTokenizer.from_pretrained(resolve_folder("smollm2-135m"))
    model = make_tiny("llama", tok).train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    arch = Architecture(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = encode_dataset(tok, load_examples("gsm8k", limit=12), 128)
    rows = [rows[i] for i in range(8)]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((8, width), tok.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        t, n = torch.tensor(r["input_ids"]), len(r["input_ids"])
        ids[i, :n], mask[i, :n] = t, 1
        labels[i, :n] = torch.where(torch.tensor(r["completion_mask"]) == 1, t, -100)
    total = int(label_positions(labels)[0].sum())  # label tokens of the global batch, as the trainer counts them
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    weights = {2: 1 / 3, 4: 1 / 3, 6: 1 / 3}
    curve = []
    for _ in range(STEPS):
        out = model(input_ids=ids[mine], attention_mask=mask[mine], output_hidden_states=True, logits_to_keep=1,
                    use_cache=False)
        result = multi_exit_loss(out.hidden_states, labels[mine], weights, arch, num_items_in_batch=total)
        (result.loss * world).backward()  # FSDP averages gradients over ranks; the loss is a sum over tokens
        opt.step()
        opt.zero_grad()
        loss = result.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
        curve.append(loss.item())
    full = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor shards -> the whole tensor
        full[name] = t.detach().double().norm().item()
    return {"losses": curve, "norms": full}


@pytest.mark.slow  # two torchrun worker processes
@pytest.mark.timeout(900)
def test_fsdp2_matches_one_process(tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
                Path(__file__)], env={"FSDP_RESULT": str(tmp_path / "fsdp.json")})
    ref = fsdp_steps(1, 0)  # while the two ranks run
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert ref["losses"][-1] < ref["losses"][0]
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["norms"].keys() == ref["norms"].keys()
    for name, value in ref["norms"].items():
        assert got["norms"][name] == pytest.approx(value, rel=1e-4), name


if __name__ == "__main__":  # FSDP2 worker under torchrun
    import torch.distributed as dist

    dist.init_process_group("gloo")
    result = fsdp_steps(dist.get_world_size(), dist.get_rank())
    if dist.get_rank() == 0:
        Path(os.environ["FSDP_RESULT"]).write_text(json.dumps(result))
    dist.destroy_process_group()
