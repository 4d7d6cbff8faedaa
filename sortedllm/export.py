"""Export sub-models: the first k layers + the shared norm and head as an ordinary HF model (`num_hidden_layers =
k`), loadable by `AutoModelForCausalLM`, vLLM or llama.cpp's converter with no sortedllm code; optionally GGUF. Each
folder also gets the model's draft vocabulary (`draft_vocab.json`, adapters/vocab.py), which other tools ignore.

    sortedllm export --model runs/soft/final --layers 12 --out exported/exit-12
    sortedllm export --model runs/soft/final --layers all --out exported          # exported/exit-<k> for every exit
    sortedllm export --model runs/soft/final --layers 12 --out exported/exit-12 --gguf f16
    sortedllm export --model runs/soft/final --draft_vocab 8192 [--draft_data gsm8k]   # add/replace it in place

The draft vocabulary written is the model's own (`sortedllm train` saves one with every model); `--draft_vocab N`
recomputes it: the N most frequent tokens of `--draft_data`, default the data the model was trained on (0 = none).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch

from .adapters import lora
from .adapters.vocab import DEFAULT_SIZE, VOCAB_FILE, add_draft_vocab, vocab_from_data, vocab_json
from .checkpoint import atomic_dir, writable_folder
from .config import ArgumentParser
from .errors import SortedError
from .exits import SortedModel
from .models import DTYPES

LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")
GGUF_TYPES = ("f32", "f16", "bf16")
GGUF_ARCHS = ("llama", "mistral")  # llama.cpp's LLAMA graph; other types: llama.cpp's convert_hf_to_gguf.py DIR


def submodel_config(config, k: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:k]
    return cfg


def submodel(sm, k: int):
    """A standalone k-layer HF model (weights copied) whose logits equal exit k of `sm`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not 1 <= k <= sm.num_layers:
        raise SortedError(f"exit layer {k} is out of range: this model has layers 1..{sm.num_layers}")
    source = sm.arch.model
    cfg = submodel_config(source.config, k)
    own = sm.exit_heads.get(k) if sm.exit_heads else None  # ICT: exit k's own norm (and head) replace the shared
    if own is not None and own[1] is not sm.arch.head:
        cfg.tie_word_embeddings = False  # the exit's head is no longer the input embedding
    small = AutoModelForCausalLM.from_config(cfg, dtype=next(source.parameters()).dtype)
    state = {name: t for name, t in source.state_dict().items()
             if not ((m := LAYER_KEY.search(name)) and int(m.group(2)) >= k)}
    if own is not None:
        names = {module: name for name, module in source.named_modules()}
        for shared, mine in zip((sm.arch.norm, sm.arch.head), own):
            state.update({f"{names[shared]}.{n}": t for n, t in mine.state_dict().items()})
    small.load_state_dict(state, strict=True)
    generation = getattr(source, "generation_config", None)
    small.generation_config = copy.deepcopy(generation) if generation is not None \
        else GenerationConfig.from_model_config(cfg)
    return small.eval()


def _write(sm, k: int, folder: Path, gguf: str | None) -> None:
    model = submodel(sm, k)
    model.save_pretrained(folder, safe_serialization=True)
    if sm.tokenizer is not None:
        sm.tokenizer.save_pretrained(folder)
    if sm.draft_vocab is not None:
        (folder / VOCAB_FILE).write_text(vocab_json(sm.draft_vocab, sm.draft_vocab_info))
    if gguf:
        write_gguf(model, folder, folder / f"model-{gguf}.gguf", gguf)


def export(sm, k: int, out_dir: str | Path, gguf: str | None = None) -> Path:
    """Write exit k as a standalone HF folder (safetensors + tokenizer + generation config), atomically."""
    check_gguf_export(sm, gguf)
    with atomic_dir(out_dir, flag="--out") as tmp:
        _write(sm, k, tmp, gguf)
    return Path(out_dir)


def export_many(sm, exits: list[int], out_dir: str | Path, gguf: str | None = None) -> list[Path]:
    """Every exit into `out_dir/exit-<k>`; the whole folder appears at once or not at all."""
    check_gguf_export(sm, gguf)
    with atomic_dir(out_dir, flag="--out") as tmp:
        for k in exits:
            _write(sm, k, tmp / f"exit-{k}", gguf)
    return [Path(out_dir) / f"exit-{k}" for k in exits]


# -- GGUF --------------------------------------------------------------------------------------------------------


def check_gguf_export(sm, gguf: str | None) -> None:
    """Refuse what the GGUF writer does not cover before anything is written."""
    if not gguf:
        return
    if gguf not in GGUF_TYPES:
        raise SortedError(f"unknown GGUF type '{gguf}': use one of {', '.join(GGUF_TYPES)} (quantize afterwards with "
                          f"llama.cpp's llama-quantize)")
    cfg = sm.arch.config
    problem = None
    if cfg.model_type not in GGUF_ARCHS:
        problem = f"model type '{cfg.model_type}' is not LLaMA-family"
    elif getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problem = "its linear layers have biases"
    elif (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default") != "default":
        problem = f"its rope scaling ({cfg.rope_scaling.get('rope_type')}) needs llama.cpp's own converter"
    if problem:
        raise SortedError(f"--gguf: {problem}; export the HF folder without --gguf and convert it with llama.cpp: "
                          f"python convert_hf_to_gguf.py <out> --outtype {gguf}")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (two halves per head) -> llama.cpp's (interleaved pairs) for q/k projection rows.

    Written here because the `gguf` package has the writer but not this layout change (it lives in llama.cpp's
    convert script); transformers' GGUF loader applies the inverse, which the round-trip test checks.
    """
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(folder: Path, vocab_size: int):
    """(tokenizer model name, tokens, scores, types) from the exported tokenizer files, padded to the model's vocab."""
    import gguf

    for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = kind(folder)
            break
        except (FileNotFoundError, ValueError, TypeError, KeyError, ImportError):
            continue
    else:
        raise SortedError(f"--gguf: the tokenizer in {folder} is neither a byte-level BPE nor a LLaMA (SentencePiece) "
                          f"tokenizer; convert the exported folder with llama.cpp's convert_hf_to_gguf.py")
    tokens, scores, types = [], [], []
    for text, score, kind_ in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8", errors="replace"))
        scores.append(score)
        types.append(kind_)
    if len(tokens) > vocab_size:
        raise SortedError(f"--gguf: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding), as llama.cpp does
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    # Added tokens are control (special) or user-defined even when they are also in the base vocabulary.
    tj = folder / "tokenizer.json"
    added = json.loads(tj.read_text(encoding="utf-8")).get("added_tokens") or [] if tj.is_file() else []
    for item in added:
        if 0 <= item["id"] < vocab_size:
            types[item["id"]] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    return vocab.tokenizer_model, tokens, scores, types


def _adds_bos(folder: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]


def write_gguf(model, tokenizer_dir: Path, path: Path, out_type: str = "f16") -> Path:
    """A llama.cpp GGUF of a LLaMA-family HF model: metadata, tokenizer and weights in f32/f16/bf16.

    Tensor names come from the `gguf` package's name map; norms stay f32 as llama.cpp's converter keeps them.
    """
    import gguf
    import numpy as np

    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs its plan with temporary file names
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    vocab_size = model.get_output_embeddings().weight.shape[0]
    tok_model, tokens, scores, types = _vocab(Path(tokenizer_dir), vocab_size)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "model")).name or "model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre("default")  # llama.cpp's converter names the pre-tokenizer by hashing; "default" is generic
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", _adds_bos(Path(tokenizer_dir)))  # what the HF tokenizer does
    special.add_to_gguf(w, quiet=True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads token_embd when output.weight is absent
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SortedError(f"--gguf: no GGUF name for tensor {name}; use llama.cpp's convert_hf_to_gguf.py")
        t = t.detach().float()
        if name.endswith("q_proj.weight"):
            t = _permute_qk(t, heads)
        elif name.endswith("k_proj.weight"):
            t = _permute_qk(t, kv_heads)
        data = t.numpy()
        if data.ndim == 1 or out_type == "f32":
            w.add_tensor(new, data.astype(np.float32))
        elif out_type == "f16":
            w.add_tensor(new, data.astype(np.float16))
        else:
            raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(new, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- CLI ---------------------------------------------------------------------------------------------------------


def _check_out(out: Path, model_spec: str, overwrite: bool) -> None:
    """Never replace a folder the user did not mean to (the source model above all); fail before loading it."""
    writable_folder(out, "--out")
    src = Path(model_spec).expanduser()
    if src.exists():
        a, b = out.resolve(), src.resolve()
        if a == b or a in b.parents:
            raise SortedError(f"--out {out} would replace the model being exported ({model_spec}); choose another --out")
    if out.exists():
        if not out.is_dir():
            raise SortedError(f"--out {out} is a file; choose a folder path")
        if any(out.iterdir()) and not overwrite:
            raise SortedError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")


def _layers(sm, spec: str) -> list[int]:
    if spec.strip() == "all":
        return list(sm.exits)
    return sm.check_exits(spec)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="sortedllm export", description="Write sub-models (first k layers + the shared norm and "
                       "LM head) as ordinary Hugging Face models, optionally with a GGUF file; or add a draft "
                       "vocabulary to a model folder.")
    p.add_argument("--model", required=True, help="sorted checkpoint (or any model): folder, hub id, .gguf, alias")
    p.add_argument("--layers", help="exit layer k, several (12,20), every:n, count:n, or 'all' (the checkpoint's "
                   "exits); more than one exit goes to <out>/exit-<k>. Without --layers, --draft_vocab N writes the "
                   "draft vocabulary into --model (a local folder) or, with --out, saves the whole model there")
    p.add_argument("--out", help="output folder (required with --layers)")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (as stored), float32, bfloat16, float16")
    p.add_argument("--gguf", nargs="?", const="f16", default=None, metavar="TYPE",
                   help=f"also write <folder>/model-TYPE.gguf for llama.cpp ({', '.join(GGUF_TYPES)}; default f16); "
                        f"LLaMA-family only")
    p.add_argument("--draft_vocab", type=int, metavar="N", help="recompute the draft vocabulary: the N most frequent "
                   f"tokens of --draft_data (e.g. {DEFAULT_SIZE}; 0 = write none; default: the model's own, if any)")
    p.add_argument("--draft_data", help="data the draft vocabulary is counted on (default: what the model was "
                   "trained on, from its sorted_config.json): gsm8k, alpaca, a JSONL file, hf:<dataset>, a+b")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def check_args(a) -> None:
    """Every option that can be checked without the model, before it is loaded."""
    if a.dtype != "auto" and a.dtype not in DTYPES:
        raise SortedError(f"unknown --dtype '{a.dtype}': use auto or one of {', '.join(DTYPES)}")
    if a.gguf is not None and a.gguf not in GGUF_TYPES:
        raise SortedError(f"unknown --gguf type '{a.gguf}': use one of {', '.join(GGUF_TYPES)}")
    if a.draft_vocab is not None and a.draft_vocab < 0:
        raise SortedError(f"--draft_vocab must be a number of tokens >= 0 (got {a.draft_vocab})")
    if a.layers is None:
        if not a.draft_vocab:
            raise SortedError("--layers is required (or --draft_vocab N without --layers to add a draft vocabulary "
                              "to --model)")
        if a.gguf:
            raise SortedError("--gguf needs --layers: it converts exported sub-models")
        if a.out is None and not Path(a.model).expanduser().is_dir():
            raise SortedError(f"--model {a.model} is not a local folder to write the draft vocabulary into; pass "
                              "--out to save the model with it")
    elif a.out is None:
        raise SortedError("--layers needs --out, the folder to export to")
    if a.out is not None:
        _check_out(Path(a.out).expanduser(), a.model, a.overwrite)


def set_draft_vocab(sm, size: int | None, data: str | None) -> None:
    """`sm.draft_vocab` as the export writes it: kept (`size` None), dropped (0) or recomputed as the `size` most
    frequent tokens of `data` (default: the data the model was trained on)."""
    if size is None:
        return
    if size == 0:
        sm.draft_vocab, sm.draft_vocab_info = None, {}
        return
    data = data or sm.config.data
    if data is None:
        raise SortedError(f"{sm.source} records no training data to count the draft vocabulary on: pass --draft_data "
                          "(e.g. gsm8k:train+alpaca:train+triviaqa:train)")
    sm.draft_vocab, sm.draft_vocab_info = vocab_from_data(sm.tokenizer, sm.model, data, size)


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    sm = SortedModel.from_pretrained(a.model, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    layers = _layers(sm, a.layers) if a.layers is not None else None
    if layers == []:
        raise SortedError(f"--layers {a.layers} selects no exit")
    set_draft_vocab(sm, a.draft_vocab, a.draft_data)
    if layers is None:  # the whole model: the draft vocabulary added in place, or a copy with it
        if a.out is None:
            path = add_draft_vocab(a.model, sm.draft_vocab, sm.draft_vocab_info)
        else:
            path = sm.save_pretrained(Path(a.out).expanduser()) / VOCAB_FILE
        print(f"draft vocabulary of {len(sm.draft_vocab)} tokens ({sm.draft_vocab_info.get('data')}) -> {path}")
        return 0
    if lora.is_adapter(sm.model):  # an adapter checkpoint leaves as a plain model: fold the adapter in first
        sm = lora.merge(sm)
    check_gguf_export(sm, a.gguf)
    out = Path(a.out).expanduser()
    if len(layers) == 1 and a.layers.strip() != "all":
        written = [export(sm, layers[0], out, a.gguf)]
    else:
        written = export_many(sm, layers, out, a.gguf)
    for k, folder in zip(layers, written):
        n = sum(t.numel() for t in {id(t): t for t in submodel_params(sm, k)}.values())
        print(f"exit {k}: {n / 1e6:,.1f} M parameters -> {folder}")
    return 0


def submodel_params(sm, k: int):
    """The parameters exit k's exported model holds (layers 1..k, embeddings, final norm, head)."""
    arch = sm.arch
    yield from arch.base.embed_tokens.parameters()
    for layer in arch.layers[:k]:
        yield from layer.parameters()
    norm, head = sm.exit_norm_head(k)
    yield from norm.parameters()
    yield from head.parameters()
