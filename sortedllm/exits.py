"""Exits (which first-k-layer sub-models exist) and `SortedModel`, the object every verb works on.

Exit k is the sub-model made of the first k decoder layers followed by the model's own final norm and LM head.
Layers are counted from 1, so exit L (the number of layers) is the full model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, DraftLayer, ICTHeads, LoraAdapter, adapter_kind, load_adapter
from .adapters.lora import is_adapter
from .adapters.vocab import VOCAB_FILE, load_draft_vocab, vocab_json
from .checkpoint import atomic_dir, atomic_write_text, verify_manifest
from .errors import SortedError
from .models import Architecture, load_model

CONFIG_NAME = "sorted_config.json"
VERSION = "0.1.0"
MAX_CHAIN = 8  # adapters stacked on adapters (ICT heads on a LoRA folder, ...) before a loop is assumed


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
    """A causal LM plus its exits: read any exit's hidden state and logits, attach adapters, save/load.

    The wrapped `model` stays a plain HF model (Trainer, peft, accelerate and `generate` see it unchanged); with a
    LoRA adapter it is the peft model. `adapters` maps an adapter type to the attached adapter (adapters/):
    `exit_heads` reads the ICT heads, `draft_layer` the trained draft layer. `draft_vocab` is the draft vocabulary
    (ranked token ids, adapters/vocab.py) or None, `draft_vocab_info` where it came from.
    """

    def __init__(self, model, tokenizer=None, exits=None, config: SortedConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = Architecture(model)
        self.num_layers = self.arch.num_layers
        self.use_config(config, exits)
        self.adapters: dict[str, Adapter] = {}
        if is_adapter(model):  # trained with --lora: the model is the peft wrapper
            self.adapters[LoraAdapter.adapter_type] = LoraAdapter(model)
        self.draft_vocab: torch.Tensor | None = None
        self.draft_vocab_info: dict = {}
        self.source: str | None = None  # the spec it was loaded from

    def use_config(self, config: SortedConfig | None, exits=None) -> None:
        """Adopt a checkpoint's sorted_config.json (checked against the model); `exits` overrides its exits."""
        if config is not None and config.num_hidden_layers != self.num_layers:
            raise SortedError(f"sorted_config.json says {config.num_hidden_layers} layers but the model has "
                              f"{self.num_layers}: the checkpoint folder mixes two models")
        if config is None:
            config = SortedConfig(exits=resolve_exits(exits, self.num_layers), num_hidden_layers=self.num_layers,
                                  mode="untuned")
        elif exits is not None:
            config.exits = exits
        config.exits = resolve_exits(config.exits, self.num_layers)
        self.config = config

    @property
    def exits(self) -> list[int]:
        return self.config.exits

    @property
    def exit_heads(self) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]] | None:
        """Per-exit (norm, head) pairs when ICT heads are attached; None = every exit uses the shared ones."""
        heads = self.adapters.get(ICTHeads.adapter_type)
        return heads.pairs(self.arch) if heads is not None else None

    @exit_heads.setter
    def exit_heads(self, pairs: dict | None) -> None:
        """Attach {exit: (norm, head)} modules as ICT heads on this model (None or {} detaches them); their base is
        the config's `base_model`, else where the model was loaded from."""
        self.adapters.pop(ICTHeads.adapter_type, None)
        if pairs:
            heads = ICTHeads.from_pairs(pairs, self.arch)
            heads.set_base(self.model, self.config.base_model or self.source)
            self.attach(heads)

    @property
    def draft_layer(self) -> DraftLayer | None:
        """The attached trained draft layer, if any."""
        return self.adapters.get(DraftLayer.adapter_type)

    @classmethod
    def from_pretrained(cls, spec: str, exits=None, **load_kwargs) -> "SortedModel":
        """Load a checkpoint (reads its `sorted_config.json` and `draft_vocab.json`), any plain model (exits default
        to count:8) or an adapter folder: its base (loaded the same way, so adapters chain) with it attached."""
        return cls._load(str(spec), exits, load_kwargs, depth=0)

    @classmethod
    def _load(cls, spec: str, exits, load_kwargs: dict, depth: int) -> "SortedModel":
        kind = adapter_kind(spec) if Path(spec).is_dir() else None
        if kind is None:
            model, tokenizer = load_model(spec, **load_kwargs)
            sm = cls(model, tokenizer, exits=exits, config=SortedConfig.load(spec) if Path(spec).is_dir() else None)
        else:
            if depth >= MAX_CHAIN:
                raise SortedError(f"{spec}: more than {MAX_CHAIN} adapters on top of each other (a folder that names "
                                  "itself as its base?)")
            verify_manifest(spec, require=False, fix="re-save or re-copy it")  # (load_model checks the base's)
            sm = cls._load(kind.base_spec(Path(spec)), None, load_kwargs, depth + 1)
            sm.load_adapter(spec)
            sm.use_config(SortedConfig.load(spec) or sm.config, exits)
        sm.source = spec
        vocab, info = load_draft_vocab(spec)
        if vocab is not None:
            sm.draft_vocab, sm.draft_vocab_info = vocab, info
        return sm

    def load_adapter(self, path) -> Adapter:
        """Attach the adapter saved at `path` (a folder, or a lone draft-layer file); its base must be this model."""
        return self.attach(load_adapter(path, self))

    def attach(self, adapter: Adapter) -> Adapter:
        """Attach an adapter built for this model (a draft layer replaces the one attached; a second ICT or LoRA
        adapter is refused: stack them by saving one and training the next on that folder)."""
        kind = adapter.adapter_type
        if kind in self.adapters and not adapter.replaceable:
            raise SortedError(f"{self.source or 'this model'} already has a {kind} adapter attached; {kind} adapters "
                              "go on a model without one")
        adapter.check_base(self, f"this {kind} adapter")
        adapter.attach(self)
        self.adapters[kind] = adapter
        return adapter

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
        """The model as a folder, written atomically: with ICT heads their adapter folder (heads + base reference),
        with LoRA peft's adapter folder, else a plain HF folder (safetensors + tokenizer); always its
        `sorted_config.json` and, when it has one, `draft_vocab.json`. A draft layer is saved on its own
        (`sm.draft_layer.save_pretrained(folder)`)."""
        for k, v in config_updates.items():
            setattr(self.config, k, v)
        folder = Path(folder)
        top = self.adapters.get(ICTHeads.adapter_type) or self.adapters.get(LoraAdapter.adapter_type)
        config = copy.deepcopy(self.config)
        with atomic_dir(folder) as tmp:
            if top is None:
                self.model.save_pretrained(tmp, safe_serialization=True)
            else:
                top.write(tmp, folder)
            if isinstance(top, ICTHeads):
                config.mode = "ict"  # the folder holds heads only; the tokenizer comes with the base
            elif self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            config.save(tmp)
            if self.draft_vocab is not None:
                (tmp / VOCAB_FILE).write_text(vocab_json(self.draft_vocab, self.draft_vocab_info))
        return folder

    # -- running layers and reading exits ------------------------------------------------------------------

    def forward_early(self, x: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
        """The hidden state after layer k (LayerSkip's early forward): `x` is token ids [B, T] (embedded first) or
        the embeddings [B, T, H]; kwargs as `Architecture.run_layers` (attention_mask, position_ids, cache)."""
        if not 0 <= k <= self.num_layers:
            raise SortedError(f"layer {k} is out of range: this model has layers 1..{self.num_layers}")
        h = x if torch.is_floating_point(x) else self.arch.embed(x)
        return self.arch.run_layers(h, 0, k, **kwargs)

    def forward_remainder(self, hidden: torch.Tensor, start: int, end: int | None = None, **kwargs) -> torch.Tensor:
        """Layers start+1..end (default: to the last) on the hidden state after layer `start`, so
        `forward_remainder(forward_early(ids, k), k)` is the full model's last hidden state (before the norm)."""
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise SortedError(f"layers {start + 1}..{end} are out of range for a model with {self.num_layers} layers")
        return self.arch.run_layers(hidden, start, end, **kwargs)

    def exit_norm_head(self, k: int):
        heads = self.exit_heads
        if heads is not None and k in heads:
            return heads[k]
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
            h = self.forward_remainder(h, done, k, attention_mask=attention_mask)
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
