"""Atomic checkpoints: a saved folder is whole (manifest + checksums, verified on load) or absent. A crash or a full
disk during a save leaves the previous version intact and loadable, with no half-written folder in its place."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sortedllm import SortedModel
from sortedllm.checkpoint import (CRASH_ENV, MANIFEST, atomic_dir, manifest_problem, stale_temp_folders,
                                  verify_manifest)
from sortedllm.errors import SortedError
from tests.conftest import make_tiny


def write(folder, files: dict) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_manifest_lists_every_file_and_verifies(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target, meta={"run": {"seed": 3}}) as tmp:
        write(tmp, {"a.bin": b"x" * 1000, "sub/b.json": b"{}"})
    manifest = json.loads((target / MANIFEST).read_text())
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"}
    assert manifest["files"]["a.bin"]["size"] == 1000 and manifest["run"] == {"seed": 3}
    assert verify_manifest(target)["run"] == {"seed": 3}
    assert not stale_temp_folders(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "a.bin").write_bytes(b"x" * 500), "a.bin is truncated or altered (500 bytes, 1000 expected)"),
    (lambda d: (d / "a.bin").write_bytes(b"y" * 1000), "a.bin does not match its checksum"),
    (lambda d: (d / "sub" / "b.json").unlink(), "sub/b.json is missing"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is malformed"),
    (lambda d: (d / MANIFEST).unlink(), "has no manifest.json"),
])
def test_damaged_folder_is_refused_with_one_line(tmp_path, damage, message):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        write(tmp, {"a.bin": b"x" * 1000, "sub/b.json": b"{}"})
    damage(target)
    with pytest.raises(SortedError, match="is incomplete or corrupted") as e:
        verify_manifest(target)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_exception_during_save_keeps_previous_version(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        write(tmp, {"a.bin": b"old"})
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            write(tmp, {"a.bin": b"new, half"})
            raise RuntimeError("boom")
    assert (target / "a.bin").read_bytes() == b"old" and manifest_problem(target) is None
    assert not stale_temp_folders(tmp_path)


def test_disk_full_while_saving_a_model_keeps_the_previous_one(tmp_path, tokenizer, monkeypatch):
    """A real write of the weights fails half-way with ENOSPC: one clear SortedError, old model intact."""
    import transformers.modeling_utils as mu

    target = tmp_path / "model"
    old = SortedModel(make_tiny("llama", tokenizer, layers=2, seed=0), tokenizer, exits=[1, 2])
    old.save_pretrained(target)
    real_save = mu.safe_save_file

    def disk_fills(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the disk filled part-way through the file
            f.truncate(os.path.getsize(filename) // 3)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mu, "safe_save_file", disk_fills)
    new = SortedModel(make_tiny("llama", tokenizer, layers=2, seed=1), tokenizer, exits=[1, 2])
    with pytest.raises(SortedError, match="No space left on device; nothing was written") as e:
        new.save_pretrained(target)
    assert str(target) in str(e.value)
    monkeypatch.undo()
    assert not stale_temp_folders(tmp_path)
    loaded = SortedModel.from_pretrained(str(target))  # verifies the manifest
    for name, p in old.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name


def test_truncated_model_folder_is_refused_on_load(tmp_path, tokenizer):
    target = tmp_path / "model"
    SortedModel(make_tiny("llama", tokenizer, layers=2), tokenizer, exits=[1, 2]).save_pretrained(target)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(SortedError, match="model.safetensors is truncated or altered"):
        SortedModel.from_pretrained(str(target))


CRASH_SCRIPT = textwrap.dedent("""
    import sys
    from sortedllm.checkpoint import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        for i in range(4):
            (tmp / f"part{i}.bin").write_bytes(sys.argv[2].encode() * 1000)
    print("saved")
""")


def test_process_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    """A real SIGKILL during a save (the test hook kills the process after 2 files, the 3rd half-written)."""
    target = tmp_path / "ckpt"

    def save(tag, env=None):
        return subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(target), tag], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=300)

    assert save("old").returncode == 0
    r = save("new", {CRASH_ENV: "2"})
    assert r.returncode == -9 and "saved" not in r.stdout
    assert (target / "part0.bin").read_bytes() == b"old" * 1000
    assert manifest_problem(target) is None
    stale = stale_temp_folders(tmp_path)
    assert len(stale) == 1  # the killed save's temp folder, holding the half-written file, never renamed
    assert (stale[0] / "part2.bin").stat().st_size == 1500 and not (stale[0] / MANIFEST).exists()


def test_disk_full_during_training_checkpoint(tmp_path, tokenizer, monkeypatch):
    """ENOSPC while the Trainer writes checkpoint-2: one clear error, checkpoint-1 whole and resumable."""
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train import resume
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    ds = encode_dataset(tokenizer, load_examples("gsm8k", limit=4), 128)
    args = SoFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, save_steps=1,
                      save_strategy="steps", max_length=128, gradient_checkpointing=False, disable_tqdm=True,
                      report_to="none", exits="1,2")
    trainer = SoFTTrainer(model=make_tiny("llama", tokenizer, layers=2), args=args, train_dataset=ds,
                          processing_class=tokenizer)
    monkeypatch.setenv(CRASH_ENV, "enospc:1@checkpoint-2")
    with pytest.raises(SortedError, match=r"could not write .*checkpoint-2: No space left on device"):
        trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not stale_temp_folders(run)
    assert resume.find_checkpoint(run, "latest") == run / "checkpoint-1"
    assert verify_manifest(run / "checkpoint-1")["global_step"] == 1
