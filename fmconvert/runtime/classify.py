"""Sequence classification with a converted encoder: its task head, kept beside the shards as passthrough tensors
and described by the manifest's `classifier`, run on the encoder's last hidden states (rerankers and cross-encoders
such as bge-reranker or ms-marco-MiniLM are such heads, scoring a (query, passage) pair).

The head is small (a vector per text through one or two matrices), so it runs in plain torch on every rank, each
holding the whole head and the whole hidden state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FmError
from .ops import activate


def end_token(spec: dict) -> int:
    """The end token an encoder-decoder's classifier reads the decoder at (config.json's eos_token_id, the first of
    a list)."""
    eos = spec["eos_token_id"]
    return eos[0] if isinstance(eos, list) else eos


def head_logits(model, hidden: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor,
                ids: torch.Tensor | None = None, states: list | None = None) -> torch.Tensor:
    """The encoder's output (hidden [B, T, h], pooled) and the attention mask -> logits [B, labels] in fp32, as the
    manifest's classifier says. An encoder-decoder's (BART's, pool "eos"): hidden is its decoder's, read at each
    row's last eos token of ids (the source). A head with layer_sum (Wav2Vec2's use_weighted_layer_sum) reads the
    states of every layer (`hidden(..., output_hidden_states=True)`'s) weighted by softmax(layer_weights)."""
    head = model.spec["classifier"]
    if head is None:
        raise FmError(f"{model.spec['architecture']} has no sequence-classification head (convert a "
                      f"*ForSequenceClassification checkpoint)")
    if head.get("layer_sum"):
        if states is None:
            raise ValueError("this classifier sums every layer's states: pass states=")
        w = torch.softmax(model.g["extra.layer_weights"].float(), -1).to(hidden.dtype)
        hidden = (torch.stack(states, 1) * w.view(-1, 1, 1)).sum(1)
    if head["pool"] == "xvector":
        return xvector(model, hidden, mask)
    if head["pool"] in ("tokens", "spans", "late"):     # every token's state: [B, T, labels] (spans: start, end)
        x = hidden
    elif head["pool"] == "pooler":
        x = pooled
    elif head["pool"] == "eos":
        eos = end_token(model.spec)
        at = torch.where(ids == eos, torch.arange(ids.shape[1], device=ids.device), -1).max(1).values
        if bool((at < 0).any()):
            raise FmError(f"{model.spec['architecture']} classifies at each text's end token ({eos}), which a text "
                          f"here lacks: let the tokenizer add it")
        x = hidden[torch.arange(hidden.shape[0], device=hidden.device), at.to(hidden.device)]
    elif head["pool"] == "mean":
        m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        x = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    else:
        x = hidden[:, 0]
    x = run_steps(model, x, head["steps"])
    if head["pool"] == "late":      # EuroBERT: each token classified, the logits averaged over the real tokens
        m = mask.to(x.device, x.dtype).unsqueeze(-1)
        x = (x * m).sum(1) / m.sum(1).clamp(min=1)
    return x.float()


def run_steps(model, x: torch.Tensor, steps: list[dict]) -> torch.Tensor:
    """A head's steps over x: each a linear layer (or a LayerNorm at the model's eps) of its passthrough tensors,
    then its activation."""
    g = model.g
    for s in steps:
        w, b = g[f"extra.{s['name']}.weight"], g.get(f"extra.{s['name']}.bias")
        if s["op"] == "linear":
            x = F.linear(x, w, b)
        else:
            x = F.layer_norm(x, w.shape, w, b, model.eps)
        if s["act"] == "tanh":
            x = torch.tanh(x)
        elif s["act"] != "none":
            x = activate(x, s["act"])
    return x


def xvector(model, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An x-vector head (Wav2Vec2's *ForXVector: speaker verification) -> an embedding [B, dim] in fp32: each frame
    through the first step (the projector), the TDNN layers (a dilated conv over time each, from a Linear over kernel
    frames, then ReLU), each row's mean and standard deviation over its first n frames side by side, then the other
    steps. n is transformers' count: the real frames less each layer's kernel - 1 (dilation left out, as it leaves
    it out), at most the frames there are."""
    head, g = model.spec["classifier"], model.g
    x = run_steps(model, hidden, head["steps"][:1])
    for t in head["tdnn"]:
        w, k = g[f"extra.{t['name']}.weight"], t["kernel"]
        weight = w.view(w.shape[0], k, w.shape[1] // k).transpose(1, 2)
        x = F.relu(F.conv1d(x.transpose(1, 2), weight, g[f"extra.{t['name']}.bias"], dilation=t["dilation"])
                   .transpose(1, 2))
    n = (mask.long().sum(-1) - sum(t["kernel"] - 1 for t in head["tdnn"])).clamp(min=2, max=x.shape[1]).tolist()
    x = torch.stack([torch.cat([x[i, :m].mean(0), x[i, :m].std(0)]) for i, m in enumerate(n)])
    return run_steps(model, x, head["steps"][1:]).float()


def classify(model, tok, texts: list[str], pairs: list[str] | None = None, max_length: int | None = None):
    """Logits [len(texts), labels] for texts (each with its pair, a cross-encoder's second segment, if given); for a
    token classifier ([len(texts), T, labels], the tokens' character spans [len(texts), T, 2], 0-0 for specials and
    padding)."""
    tokens = model.spec["classifier"] is not None and model.spec["classifier"]["pool"] == "tokens"
    batch = tok(list(texts), list(pairs) if pairs is not None else None, padding=True,
                truncation="longest_first" if max_length else False, max_length=max_length, return_tensors="pt",
                **({"return_offsets_mapping": True} if tokens else {}))
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    if model.spec.get("encoder"):       # BART's: the decoder reads the source shifted behind its start token
        model.attach(model.source_encoder.hidden(ids, attention_mask=mask), mask)
        start = torch.full_like(ids[:, :1], model.spec["decoder_start_token_id"])
        return head_logits(model, model.hidden(torch.cat([start, ids[:, :-1]], 1)), None, mask, ids)
    types = batch.get("token_type_ids")
    hidden, pooled = model(ids, attention_mask=mask, token_type_ids=None if types is None else types.to(model.device))
    logits = head_logits(model, hidden, pooled, mask)
    return (logits, batch["offset_mapping"] * mask.cpu().unsqueeze(-1)) if tokens else logits


def answers(model, tok, questions: list[str], contexts: list[str], max_length: int | None = None,
            max_answer: int = 30, stride: int = 0) -> list[dict]:
    """Extractive QA: for each (question, context), the context span whose start and end logits sum highest (start
    at or before end, at most max_answer tokens), its characters and its probability (softmax of the starts times
    softmax of the ends, over the context's tokens of its window). A context past max_length tokens is cut into
    windows that overlap by `stride` tokens (0: only the first window is read), and the most probable span of any
    window wins, as transformers' question-answering pipeline does."""
    room = None
    if max_length:      # the tokenizer raises where only cutting the question would fit: say so first
        room = max_length - tok.num_special_tokens_to_add(pair=True)
        for n, q in enumerate(tok(list(questions), add_special_tokens=False)["input_ids"], 1):
            if len(q) >= room:
                raise FmError(f"question {n} is {len(q)} tokens: with the special tokens it leaves no room for its "
                              f"context within --max-length {max_length}")
            room = min(room, max_length - tok.num_special_tokens_to_add(pair=True) - len(q))
    windows = bool(max_length and stride)
    batch = tok(list(questions), list(contexts), padding=True, return_tensors="pt", return_offsets_mapping=True,
                truncation="only_second" if max_length else False, max_length=max_length,
                **({"stride": min(stride, room - 1), "return_overflowing_tokens": True} if windows else {}))
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    types = batch.get("token_type_ids")
    hidden, pooled = model(ids, attention_mask=mask, token_type_ids=None if types is None else types.to(model.device))
    logits = head_logits(model, hidden, pooled, mask).cpu()
    of = batch["overflow_to_sample_mapping"].tolist() if windows else list(range(len(contexts)))
    best: dict[int, dict] = {}
    for b, n in enumerate(of):          # window b of text n
        ctx = torch.tensor([s == 1 for s in batch.sequence_ids(b)])
        if not ctx.any():
            raise FmError("a context left no tokens after the question (raise --max-length)")
        start = logits[b, :, 0].masked_fill(~ctx, float("-inf"))
        end = logits[b, :, 1].masked_fill(~ctx, float("-inf"))
        T = start.shape[0]
        i, j = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
        pair = (start.view(T, 1) + end.view(1, T)).masked_fill((j < i) | (j >= i + max_answer), float("-inf"))
        s, e = divmod(int(pair.argmax()), T)
        p = float(start.softmax(0)[s] * end.softmax(0)[e])
        if n not in best or p > best[n]["score"]:
            a, z = int(batch["offset_mapping"][b, s, 0]), int(batch["offset_mapping"][b, e, 1])
            best[n] = {"answer": contexts[n][a:z], "start": a, "end": z, "score": p}
    return [best[n] for n in range(len(contexts))]


def labels(out_dir, n: int) -> list[str]:
    """The label names config.json gives (id2label), else LABEL_i."""
    try:
        cfg = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    names = cfg.get("id2label") if isinstance(cfg, dict) else None
    names = names if isinstance(names, dict) else {}
    return [str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(n)]


def scores(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probabilities: softmax over the labels, or a sigmoid per label for one label (a reranker's score) or a
    multi-label head, as transformers' text-classification pipeline does."""
    return torch.sigmoid(logits) if multi_label or logits.shape[-1] == 1 else logits.softmax(-1)
