"""Shared fixtures: tiny random-weight models of each supported architecture (with the default model's real
tokenizer) for unit tests, and the default SmolLM2 model for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: tiny models gain nothing from a second one, and on a shared 2-core machine two threads per
# process make the suite about three times slower (oversubscription). Set before torch is imported, so it reaches
# torch here and every CLI subprocess; an OMP_NUM_THREADS of your own is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests use local models only (CI has no network): offline, a hub id that is not cached fails at once instead of
# after the hub client's connection retries (about 20 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 (after OMP_NUM_THREADS)

# The machine's full data sets: ../shared/data beside the checkout, or SORTEDLLM_SHARED_DATA; tests that need them
# skip where the folder is missing.
SHARED_DATA = Path(os.environ.get("SORTEDLLM_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")
ARCHS = ("llama", "qwen2", "gemma3_text")
THREADS = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else torch.get_num_threads()


def run_slow() -> bool:
    """RUN_SLOW=1 (or yes/true/on) runs the tests marked `slow`, as in transformers; scripts/test.sh sets it."""
    return os.environ.get("RUN_SLOW", "").strip().lower() in ("1", "yes", "true", "on", "y")


def pytest_collection_modifyitems(config, items):
    """Skip the `slow` tests unless RUN_SLOW is set (`RUN_SLOW=1 pytest -m slow` runs them alone)."""
    if run_slow():
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run it (bash scripts/test.sh does)")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


def load_experiment(name: str):
    """A script under experiments/ imported as a module (experiments/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(arch: str, vocab_size: int, layers: int = 6):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2,
                  eos_token_id=2, bos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    raise ValueError(arch)


def make_tiny(arch: str, tokenizer, layers: int = 6, seed: int = 0, dtype=torch.float32):
    """A random-weight model of the real architecture; weights perturbed so every layer matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), layers), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts with the thread count chosen above, even if an earlier one (a CLI run with --threads)
    changed it."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from sortedllm.models import resolve_folder

    tok = AutoTokenizer.from_pretrained(resolve_folder("smollm2-135m"))
    return tok


@pytest.fixture(params=ARCHS)
def arch_name(request):
    return request.param


@pytest.fixture
def tiny(arch_name, tokenizer):
    """(model, tokenizer) for each architecture in turn."""
    return make_tiny(arch_name, tokenizer), tokenizer


@pytest.fixture
def tiny_sorted(tiny):
    from sortedllm import SortedModel

    model, tok = tiny
    return SortedModel(model, tok, exits=[2, 4, 6])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny LLaMA folder (plain HF model + tokenizer), for CLI tests."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model = make_tiny("llama", tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_model():
    """The default SmolLM2-135M model (30 layers), loaded once per session."""
    from sortedllm import SortedModel

    return SortedModel.from_pretrained("smollm2-135m")
