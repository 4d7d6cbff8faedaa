"""What every adapter shares: small weights added to a base model, stored as one folder that names its base.

An adapter folder holds `sorted_adapter.json` (`type`, the `base_model` it was trained on, a fingerprint of that
base, and the type's own fields) and one safetensors file of the adapter's weights. Loading resolves the base,
checks the fingerprint and attaches the weights, so the wrong base is refused with one line instead of producing
silently wrong logits.

The fingerprint is a sha256 over the base's structure (model type, sizes, every parameter's name and shape) plus a
probe: two values sampled from every parameter tensor, compared with a 1% relative tolerance. An exact hash of the
weights would refuse the right base loaded in another dtype (bf16 rounds each weight by up to 0.4%); fine-tuning
moves most weights by more than 1%, so the probe still tells a fine-tuned model from the one it started from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_dir
from ..errors import SortedError
from ..models import unwrap

ADAPTER_CONFIG = "sorted_adapter.json"
FORMAT = "sortedllm-adapter"
TOLERANCE = 1e-2  # relative difference of a probed weight that still counts as the same base
ABSOLUTE = 1e-6  # below this, values count as equal (float16 storage flushes tiny weights)


# -- base fingerprint --------------------------------------------------------------------------------------------


def _parameters(model, skip_lora: bool) -> list[tuple[str, torch.Tensor]]:
    """The base's parameters by name; `skip_lora` views a peft-wrapped model as the plain model it wraps."""
    out = []
    for name, p in unwrap(model).named_parameters():  # tied weights are listed once
        if skip_lora:
            if "lora_" in name:
                continue
            name = name.replace(".base_layer", "")
        out.append((name, p))
    return sorted(out, key=lambda item: item[0])


def fingerprint(model, skip_lora: bool = False) -> dict:
    """{"sha256": structure hash, "probe": sampled weights} of a model (see the module doc)."""
    params = _parameters(model, skip_lora)
    config = unwrap(model).config
    structure = {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
                 "hidden_size": config.hidden_size, "vocab_size": getattr(config, "vocab_size", None),
                 "parameters": [[name, list(p.shape)] for name, p in params]}
    probe = []
    for _, p in params:
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        n = flat.numel()
        probe += [float(f"{float(flat[i]):.6g}") for i in (n // 3, 2 * n // 3)]
    digest = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "probe": probe}


def fingerprint_problem(expected: dict, model, skip_lora: bool = False) -> str | None:
    """Why `model` is not the base `expected` was taken from, or None when it is."""
    got = fingerprint(model, skip_lora)
    if got["sha256"] != expected.get("sha256"):
        return "its structure differs (parameter names or shapes)"
    want = expected.get("probe") or []
    if len(want) != len(got["probe"]):
        return "its weights were not all available to compare"
    differ = sum(abs(a - b) > TOLERANCE * max(abs(a), abs(b)) + ABSOLUTE for a, b in zip(got["probe"], want))
    if differ:
        return f"{differ} of {len(want)} sampled weights differ"
    return None


def check_fingerprint(config: dict, sm, where, skip_lora: bool = False) -> None:
    """One clear line when `sm` is not the base recorded in an adapter's `config` (nothing to check for adapters
    saved before fingerprints: only the shape checks of loading apply to them)."""
    expected = config.get("base_fingerprint")
    if not expected:
        return
    problem = fingerprint_problem(expected, sm.model, skip_lora)
    if problem:
        raise SortedError(f"{where} was trained on another base model than {sm.source or 'this one'} ({problem}); "
                          f"load it on its own base ({config.get('base_model') or 'named in ' + ADAPTER_CONFIG})")


# -- base reference ----------------------------------------------------------------------------------------------


def base_reference(spec: str) -> str:
    """What `base_model` records: an absolute path for a local folder, the spec itself for a hub id or alias."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def locate_base(folder: Path, base: str | None, relative: str | None, fix: str) -> str:
    """The base of an adapter folder: `base`, else the same relative path from the folder (a moved tree)."""
    if not base:
        raise SortedError(f"{folder} does not record its base model (it was trained on a model built in memory): load "
                          f"that model and attach the adapter with load_adapter, or {fix}")
    candidates = [base] + ([str(folder / relative)] if relative else [])
    for c in candidates:
        if c and Path(c).expanduser().exists():
            return c
    if base and not base.startswith(("/", ".", "~")) and base.count("/") <= 1:
        return base  # a hub id or a built-in alias
    raise SortedError(f"{folder} needs its base model '{base}', which is not found; restore it or {fix}")


def read_adapter_config(folder: Path) -> dict | None:
    """The folder's sorted_adapter.json, or None when it has none."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SortedError(f"{path} is not valid JSON ({e}); re-save the adapter") from e
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise SortedError(f"{path} has no adapter type; re-save the adapter")
    return config


def read_safetensors(path: Path, what: str, fix: str) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter's weights file, with one clear line for a missing or damaged file."""
    if not path.is_file():
        raise SortedError(f"{what} file not found: {path}; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SortedError(f"{path} is not a readable {what} file ({e}); {fix}") from e


class Adapter:
    """Small weights trained on top of a base model. Subclasses set `adapter_type` (the registry key), `weights_file`,
    `replaceable` (whether attaching a second one replaces the first) and implement `tensors`, `fields`, `load`
    and, when attaching changes the model, `attach`."""

    adapter_type = ""
    weights_file = ""
    replaceable = False
    skip_lora = False  # fingerprint the base as the plain model under a peft wrapper (LoRA's own base)
    base_model: str | None = None
    base_fingerprint: dict | None = None

    def set_base(self, model, spec: str | None) -> None:
        """Record the base this adapter is trained on: its fingerprint and where it is (`spec`, else the folder the
        model was loaded from; None for a model built in memory, whose adapters attach with `load_adapter` only)."""
        spec = spec or getattr(unwrap(model).config, "_name_or_path", None)
        self.base_model = base_reference(spec) if spec else None
        self.base_fingerprint = fingerprint(model, self.skip_lora)

    def check_base(self, sm, where) -> None:
        """Refuse a base whose fingerprint differs from the one the adapter was trained on."""
        check_fingerprint({"base_fingerprint": self.base_fingerprint, "base_model": self.base_model}, sm, where,
                          self.skip_lora)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fields(self) -> dict:
        """The type's own entries of sorted_adapter.json."""
        return {}

    def metadata(self) -> dict[str, str]:
        """safetensors metadata of the weights file."""
        return {"format": "pt", "sortedllm": self.adapter_type}

    def attach(self, sm) -> None:
        """What attaching to `sm` changes besides `sm.adapters` (nothing, unless the adapter wraps the model)."""

    def config(self, target: Path) -> dict:
        config = {"format": FORMAT, "type": self.adapter_type, "base_model": self.base_model,
                  "base_fingerprint": self.base_fingerprint, "weights": self.weights_file, **self.fields()}
        base = Path(self.base_model).expanduser() if self.base_model else None
        if base is not None and base.exists():  # found again after the base and the adapter move together
            config["base_relative"] = os.path.relpath(base.resolve(), Path(target).resolve())
        return config

    def write(self, tmp: Path, target: Path) -> None:
        """The weights file and sorted_adapter.json into `tmp`, a folder that becomes `target`."""
        tensors = {k: t.detach().contiguous() for k, t in self.tensors().items()}
        save_file(tensors, str(Path(tmp) / self.weights_file), metadata=self.metadata())
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(self.config(target), indent=2) + "\n")

    def save_pretrained(self, folder: str | Path) -> Path:
        """The adapter alone as a folder (written atomically, with a manifest)."""
        with atomic_dir(folder) as tmp:
            self.write(tmp, Path(folder))
        return Path(folder)

    @classmethod
    def base_spec(cls, folder: Path) -> str:
        """Where the base of the adapter folder `folder` is."""
        config = read_adapter_config(folder) or {}
        return locate_base(Path(folder), config.get("base_model"), config.get("base_relative"),
                           f"set base_model in {Path(folder) / ADAPTER_CONFIG} to where it is now")

    @classmethod
    def is_legacy(cls, path: Path) -> bool:
        """Whether `path` holds this type in a format from before sorted_adapter.json."""
        return False

    @classmethod
    def load(cls, path: Path, sm) -> "Adapter":
        raise NotImplementedError
