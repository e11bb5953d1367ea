"""Sentence embeddings from a converted encoder, or a decoder built for them (Qwen3-Embedding, e5-mistral,
gte-Qwen2): the last hidden states pooled into one vector per text.

A sentence-transformers checkpoint says how in files beside the weights, which conversion copies: modules.json
lists the pipeline (Transformer, then Pooling, maybe Dense projections, maybe Normalize), the Pooling module's
config.json names its modes, a Dense module's its widths and activation (its weights in its own model.safetensors),
sentence_bert_config.json the length it truncates to. They are read as JSON and safetensors; none of their code runs
and nothing is unpickled. A module fmconvert does not run is refused, not skipped, since the vectors would silently
differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FmError
from ..read import sentence_modules

# In the order sentence-transformers concatenates them when a Pooling module sets several.
MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
         "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
         "pooling_mode_lasttoken": "lasttoken"}
_RUN = ("Transformer", "Pooling", "Dense", "Normalize")
# A Dense module's activation, as sentence-transformers names the torch class
_DENSE_ACTS = {"torch.nn.modules.linear.Identity": "none", "torch.nn.modules.activation.Tanh": "tanh",
               "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.GELU": "gelu",
               "torch.nn.modules.activation.Sigmoid": "sigmoid"}


@dataclass
class SentenceConfig:
    modes: tuple[str, ...]       # pooled vectors, concatenated in this order
    normalize: bool              # each vector scaled to unit L2 norm
    max_length: int | None       # tokens kept per text (sentence_bert_config's max_seq_length)
    prompts: dict                # name -> text put before each text (config_sentence_transformers.json)
    default_prompt: str | None   # the prompt used when none is named
    dense: tuple = ()            # Dense modules after the pooling: (weight [out, in], bias or None, activation)
    lower: bool = False          # texts lowercased before tokenizing (sentence_bert_config's do_lower_case)


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FmError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise FmError(f"{path}: expected a JSON object")
    return d


def sentence_config(out_dir) -> SentenceConfig | None:
    """What the sentence-transformers files beside a converted model ask for; None when there are none."""
    out_dir = Path(out_dir)
    mods = sentence_modules(out_dir)
    if not mods:
        return None
    other = [t for t, _ in mods if t not in _RUN]
    if other:
        raise FmError(f"{out_dir}: its sentence-transformers pipeline has a {other[0]} module, which fmconvert does "
                      f"not run; pass --pooling to pool the encoder's states without it")
    pooling = [p for t, p in mods if t == "Pooling"]
    if len(pooling) != 1 or not (out_dir / pooling[0] / "config.json").is_file():
        raise FmError(f"{out_dir}: modules.json needs one Pooling module with its config.json")
    cfg = _json(out_dir / pooling[0] / "config.json")
    modes = {m for k, m in _KEYS.items() if cfg.get(k) is True}
    if not modes or not modes <= set(MODES):
        raise FmError(f"{out_dir / pooling[0] / 'config.json'}: no pooling mode fmconvert knows "
                      f"({', '.join(MODES)})")
    if cfg.get("include_prompt", True) is not True:
        raise FmError(f"{out_dir / pooling[0] / 'config.json'}: include_prompt false (pooling that leaves out an "
                      f"instruction prefix) is not supported")
    length, lower = None, False
    if (out_dir / "sentence_bert_config.json").is_file():
        bert = _json(out_dir / "sentence_bert_config.json")
        length, lower = bert.get("max_seq_length"), bert.get("do_lower_case", False)
        if length is not None and (type(length) is not int or length < 1) or type(lower) is not bool:
            raise FmError(f"{out_dir / 'sentence_bert_config.json'}: max_seq_length must be a positive integer and "
                          f"do_lower_case true or false")
    prompts, default = {}, None
    if (out_dir / "config_sentence_transformers.json").is_file():
        st = _json(out_dir / "config_sentence_transformers.json")
        prompts, default = st.get("prompts") or {}, st.get("default_prompt_name")
        if not (isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in prompts.items())) or \
                (default is not None and default not in prompts):
            raise FmError(f"{out_dir / 'config_sentence_transformers.json'}: prompts must map names to texts, and "
                          f"default_prompt_name name one of them")
    dense = tuple(_dense(out_dir / p) for t, p in mods if t == "Dense")
    kinds = ", ".join(t for t, _ in mods)        # sentence_vectors runs them in this order, whatever the file says
    if not re.fullmatch(r"(Transformer, )?Pooling(, Dense)*(, Normalize)?", kinds):
        raise FmError(f"{out_dir}: modules.json runs {kinds}; fmconvert runs Transformer, Pooling, Dense..., "
                      f"Normalize, in that order")
    return SentenceConfig(tuple(m for m in MODES if m in modes), any(t == "Normalize" for t, _ in mods), length,
                          prompts, default, dense, lower)


def _dense(d: Path) -> tuple:
    """A Dense module: its config's activation and its safetensors weights (LaBSE's tanh projection, say)."""
    cfg = _json(d / "config.json")
    act = _DENSE_ACTS.get(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if act is None:
        raise FmError(f"{d / 'config.json'}: activation {str(cfg.get('activation_function'))[:80]!r} is not one "
                      f"fmconvert runs ({', '.join(a.rsplit('.', 1)[-1] for a in _DENSE_ACTS)})")
    if not (d / "model.safetensors").is_file():
        raise FmError(f"{d}: its Dense weights are not in model.safetensors (fmconvert never unpickles "
                      f"pytorch_model.bin)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        t = load_file(d / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise FmError(f"{d / 'model.safetensors'}: not readable ({e})") from None
    w, b = t.get("linear.weight"), t.get("linear.bias")
    shape = (cfg.get("out_features"), cfg.get("in_features"))
    if w is None or tuple(w.shape) != shape or (b is not None and tuple(b.shape) != shape[:1]) or \
            (b is None) == cfg.get("bias", True):
        raise FmError(f"{d}: linear.weight (and linear.bias) must match its config's {shape[1]} -> {shape[0]}")
    return w.float(), None if b is None else b.float(), act


def by_length(tok, texts: list[str], batch_size: int, pairs: list[str] | None = None) -> list[list[int]]:
    """Batches of text indices, longest texts first, so each batch pads its texts to nearly their own length (what
    sentence-transformers does): on mixed lengths most of a padded batch's tokens would otherwise be padding. The
    caller puts the results back in the texts' order."""
    lengths = [len(ids) for ids in tok(list(texts), list(pairs) if pairs else None)["input_ids"]]
    if 0 in lengths:        # a decoder's tokenizer may add nothing to an empty text: no state to pool or classify
        raise FmError(f"text {lengths.index(0) + 1} has no tokens (an empty text, and a tokenizer that adds none)")
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, h], mask [B, T] (1: a token, 0: padding on either side) -> [B, h], in fp32."""
    h, m = hidden.float(), mask.to(hidden.device).float().unsqueeze(-1)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":                       # padding never wins
        return h.masked_fill(m == 0, -1e9).max(1).values
    if mode == "lasttoken":                 # each row's last real token, wherever its padding lies
        T = mask.shape[1]
        last = T - 1 - mask.to(hidden.device).flip(1).float().argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if mode == "weightedmean":              # token i weighted by i + 1
        m = m * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
    total, count = (h * m).sum(1), m.sum(1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return total / count.sqrt()
    if mode in ("mean", "weightedmean"):
        return total / count
    raise FmError(f"unknown pooling mode {mode!r} (known: pooler, {', '.join(MODES)})")


def sentence_vectors(model, tok, texts: list[str], modes, normalize: bool, max_length: int | None,
                     dense: tuple = ()) -> torch.Tensor:
    """[len(texts), dim] fp32: texts tokenized (padded, truncated to max_length), encoded, pooled in each mode and
    concatenated, through the Dense modules (weight, bias, activation) in order, then normalised if asked. Mode
    "pooler" is BERT's tanh pooler output."""
    batch = tok(list(texts), padding=True, truncation=max_length is not None, max_length=max_length,
                return_tensors="pt")
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    types = batch.get("token_type_ids")
    if model.spec["kind"] == "decoder":     # an embedding model built on a decoder (Qwen3-Embedding, e5-mistral)
        hidden, pooled = model.hidden(ids, attention_mask=mask), None
    else:
        hidden, pooled = model(ids, attention_mask=mask,
                               token_type_ids=None if types is None else types.to(model.device))
    parts = []
    for mode in modes:
        if mode == "pooler":
            if pooled is None:
                raise FmError("this checkpoint has no pooler; use --pooling mean or cls")
            parts.append(pooled.float())
        else:
            parts.append(pool(hidden, mask, mode))
    vec = torch.cat(parts, -1)
    for w, b, act in dense:
        if w.shape[1] != vec.shape[-1]:
            raise FmError(f"a Dense module of the sentence-transformers pipeline reads {w.shape[1]} values, but the "
                          f"pooled vector has {vec.shape[-1]}")
        vec = F.linear(vec, w.to(vec.device), None if b is None else b.to(vec.device))
        vec = {"none": vec, "tanh": torch.tanh(vec), "relu": F.relu(vec), "gelu": F.gelu(vec),
               "sigmoid": torch.sigmoid(vec)}[act]
    return F.normalize(vec, dim=-1) if normalize else vec
