"""Exits (which first-k-layer sub-models exist) and `SortedModel`, the object every verb works on.

Exit k is the sub-model made of the first k decoder layers followed by the model's own final norm and LM head.
Layers are counted from 1, so exit L (the number of layers) is the full model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import SortedError
from .models import Architecture, load_model

CONFIG_NAME = "sorted_config.json"
VERSION = "0.1.0"


def default_start(num_layers: int) -> int:
    """First exit of `count: n` when no start is given: 30% depth, as the paper's 12 of 40 (9 of 30 here)."""
    return max(1, round(0.3 * num_layers))


def resolve_exits(spec, num_layers: int, add_last: bool = True) -> list[int]:
    """Exits from a list (`[9,12,30]` / "9,12,30"), `every: n`, `count: n` (evenly spaced, ending at the last
    layer, from `start`, default 30% depth) or "all". The last layer is added unless `add_last` is False
    (choosing a subset of a checkpoint's exits to evaluate)."""
    if spec is None or spec == "":
        spec = {"count": min(8, num_layers)}
    if isinstance(spec, str):
        text = spec.strip().strip("[]").replace(" ", "")
        if text == "all":
            spec = list(range(1, num_layers + 1))
        elif ":" in text or "=" in text:
            parts = dict(p.replace("=", ":").split(":", 1) for p in text.split(",") if p)
            spec = parts
        else:
            try:
                spec = [int(x) for x in text.split(",") if x]
            except ValueError:
                raise SortedError(f"exits '{spec}' not understood: give layers like 9,18,30, 'every:3' or 'count:8'")
    if isinstance(spec, dict):
        known = {"every", "count", "start"}
        if not spec.keys() <= known or not spec.keys() & {"every", "count"}:
            raise SortedError(f"exits {spec} not understood: use {{every: n}} or {{count: n, start: k}}")
        try:
            vals = {k: int(v) for k, v in spec.items()}
        except (TypeError, ValueError):
            raise SortedError(f"exits {spec}: values must be integers")
        if "every" in vals:
            n = vals["every"]
            if not 1 <= n <= num_layers:
                raise SortedError(f"exits every:{n} is out of range for a model with {num_layers} layers")
            spec = list(range(n, num_layers + 1, n))
        else:
            n = vals["count"]
            if not 1 <= n <= num_layers:
                raise SortedError(f"exits count:{n} is out of range: the model has {num_layers} layers")
            start = vals.get("start", default_start(num_layers))
            if not 1 <= start <= num_layers:
                raise SortedError(f"exits start:{start} is out of range 1..{num_layers}")
            start = min(start, num_layers - n + 1)
            spec = [num_layers] if n == 1 else [round(start + i * (num_layers - start) / (n - 1)) for i in range(n)]
    if not isinstance(spec, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in spec):
        raise SortedError(f"exits {spec!r} not understood: give a list of layer numbers, every:n or count:n")
    exits = list(spec)
    bad = [k for k in exits if not 1 <= k <= num_layers]
    if bad:
        raise SortedError(f"exit layer {bad[0]} is out of range: this model has layers 1..{num_layers}")
    if len(set(exits)) != len(exits):
        dup = next(k for k in exits if exits.count(k) > 1)
        raise SortedError(f"exit layer {dup} is listed twice in {exits}")
    if exits != sorted(exits):
        raise SortedError(f"exits {exits} must be in increasing order")
    if add_last and exits[-1] != num_layers:
        exits.append(num_layers)
    return exits


@dataclass
class SortedConfig:
    """What `sorted_config.json` holds beside a plain HF checkpoint: the exits and how they were trained."""

    exits: list[int]
    num_hidden_layers: int
    mode: str = "soft"
    base_model: str | None = None
    data: str | None = None
    exit_schedule: str = "uniform"
    extra: dict = field(default_factory=dict)
    sortedllm_version: str = VERSION

    def save(self, folder: str | Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "SortedConfig | None":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            known = {f for f in cls.__dataclass_fields__}
            extra = {k: v for k, v in data.items() if k not in known}
            cfg = cls(**{k: v for k, v in data.items() if k in known})
            cfg.extra.update(extra)
            return cfg
        except (json.JSONDecodeError, TypeError) as e:
            raise SortedError(f"{path} is malformed ({e}); re-save the checkpoint or delete the file")


class SortedModel:
    """A causal LM plus its exits: read any exit's hidden state and logits, save/load with the exit list.

    The wrapped `model` stays a plain HF model (Trainer, peft, accelerate and `generate` see it unchanged).
    """

    def __init__(self, model, tokenizer=None, exits=None, config: SortedConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = Architecture(model)
        self.num_layers = self.arch.num_layers
        if config is not None and config.num_hidden_layers != self.num_layers:
            raise SortedError(f"sorted_config.json says {config.num_hidden_layers} layers but the model has "
                              f"{self.num_layers}: the checkpoint folder mixes two models")
        self.config = config or SortedConfig(exits=resolve_exits(exits, self.num_layers),
                                             num_hidden_layers=self.num_layers, mode="untuned")
        if config is not None and exits is not None:
            self.config.exits = resolve_exits(exits, self.num_layers)
        self.config.exits = resolve_exits(self.config.exits, self.num_layers)
        # Per-exit (norm, head) pairs, when early-exit heads were trained (ICT); None = the shared norm + head.
        self.exit_heads: dict[int, tuple[torch.nn.Module, torch.nn.Module]] | None = None
        self.source: str | None = None  # the spec it was loaded from

    @property
    def exits(self) -> list[int]:
        return self.config.exits

    @classmethod
    def from_pretrained(cls, spec: str, exits=None, **load_kwargs) -> "SortedModel":
        """Load a checkpoint (reads its `sorted_config.json`) or any plain model (exits default to count:8)."""
        config = SortedConfig.load(spec) if Path(spec).is_dir() else None
        if config is not None and config.mode == "ict":  # per-exit heads beside a reference to their frozen base
            from .checkpoint import verify_manifest
            from .train.ict import load_ict

            verify_manifest(spec, require=False, fix="re-save or re-copy it")  # (load_model checks the base's)
            return load_ict(spec, config, exits=exits, **load_kwargs)
        model, tokenizer = load_model(spec, **load_kwargs)
        sm = cls(model, tokenizer, exits=exits, config=config)
        sm.source = spec
        return sm

    def check_exits(self, exits) -> list[int]:
        """Validate a user's choice of exits; on a trained checkpoint they must be among its exits."""
        if exits is None or exits == "":
            return list(self.exits)
        chosen = resolve_exits(exits, self.num_layers, add_last=False)
        if self.config.mode != "untuned":
            missing = [k for k in chosen if k not in self.exits]
            if missing:
                raise SortedError(f"exit {missing[0]} is not an exit of this checkpoint (its exits: "
                                  f"{','.join(map(str, self.exits))})")
        return chosen

    def save_pretrained(self, folder: str | Path, **config_updates) -> Path:
        """Plain HF folder (safetensors + tokenizer) plus `sorted_config.json`, written atomically."""
        from .checkpoint import atomic_dir

        for k, v in config_updates.items():
            setattr(self.config, k, v)
        if self.exit_heads:  # ICT: only the heads + the base reference (train/ict.py)
            from .train.ict import save_ict

            return save_ict(self, folder)
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self.config.save(tmp)
        return Path(folder)

    # -- reading exits -------------------------------------------------------------------------------------

    def exit_norm_head(self, k: int):
        if self.exit_heads is not None and k in self.exit_heads:
            return self.exit_heads[k]
        return self.arch.norm, self.arch.head

    def exit_logits(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        norm, head = self.exit_norm_head(k)
        return self.arch.logits(hidden, norm=norm, head=head)

    def hidden_at_exits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        exits=None) -> dict[int, torch.Tensor]:
        """Hidden state after each chosen exit layer (no cache); stops at the deepest exit asked for."""
        exits = sorted(exits or self.exits)
        h = self.arch.embed(input_ids)
        out, done = {}, 0
        for k in exits:
            h = self.arch.run_layers(h, done, k, attention_mask=attention_mask)
            out[k], done = h, k
        return out

    @torch.no_grad()
    def logits_at_exits(self, input_ids, attention_mask=None, exits=None) -> dict[int, torch.Tensor]:
        return {k: self.exit_logits(h, k) for k, h in self.hidden_at_exits(input_ids, attention_mask, exits).items()}


def hidden_from_outputs(hidden_states: tuple, k: int, num_layers: int) -> tuple[torch.Tensor, bool]:
    """Exit k's hidden state from a HF `output_hidden_states=True` forward, and whether it is already normed.

    transformers 5 returns the embeddings, each layer's output and, in the last slot, the *normed* final state;
    training goes through the model's own forward so DDP/FSDP/peft wrappers see it.
    """
    if len(hidden_states) != num_layers + 1:
        raise RuntimeError(f"expected {num_layers + 1} hidden states, got {len(hidden_states)}")
    return hidden_states[k], k == num_layers
