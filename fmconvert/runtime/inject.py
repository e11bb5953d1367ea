"""Swap a live transformers model's transformer stack for the fused one built from a converted checkpoint.

The HF model keeps its class, config, lm_head and generation machinery; only the body (`model.<base_model_prefix>`:
embeddings, every block, final norm) becomes a FusedBody. `model(input_ids).logits` and `model.generate()` keep
working. The fused body keeps its own KV cache and recognises continuation calls, so it works whether transformers
hands it the whole sequence each step or only the new tokens, across transformers versions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FmError
from ..policy import policy_for, saved_as_owner, wrappers
from .load import load


class FusedBody(nn.Module):
    def __init__(self, fused, original: nn.Module):
        super().__init__()
        self.fused = fused
        self.config = getattr(original, "config", None)
        self._orig_embed = original.get_input_embeddings() if hasattr(original, "get_input_embeddings") else None
        self._ids: torch.Tensor | None = None      # tokens already in the cache
        self._hidden: torch.Tensor | None = None   # their final hidden states
        self._cache = None
        self._hf_cache = None
        self._token = None          # the cache token handed to transformers when it keeps none (see forward)
        for k, v in vars(original).items():   # numbers the head reads off the body (Falcon-H1's lm_head_multiplier)
            if not k.startswith("_") and k != "training" and type(v) in (int, float):
                setattr(self, k, v)

    def get_input_embeddings(self):
        return self._orig_embed

    def _run(self, ids: torch.Tensor, continuation: bool) -> torch.Tensor:
        B, T = ids.shape
        if not continuation:
            self._cache = self.fused.new_cache(B, max(256, 2 * T))
            self._ids, self._hidden = ids[:, :0], None
        elif self._cache.length + T > self._cache.max_len:  # grow: re-prefill into a larger cache
            full = torch.cat([self._ids, ids], dim=1)
            return self._run(full, False)[:, -T:]
        h = self.fused.project_out(self.fused.hidden(ids, self._cache))
        self._ids = torch.cat([self._ids, ids], dim=1)
        self._hidden = h if self._hidden is None else torch.cat([self._hidden, h], dim=1)
        return h

    @torch.inference_mode()
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise FmError("the fused body needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise FmError("the fused body does not support padded batches; pass unpadded input_ids")
        if kwargs.get("token_type_ids") is not None and self.fused.spec.get("loop"):
            raise FmError("the fused body does not run HRM-Text's prefix-LM block (token_type_ids); pass input_ids "
                          "alone")
        hf_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        given = hf_cache is not None and hf_cache is not self._token
        ids = input_ids.to(self.fused.device)
        B, T = ids.shape
        n = 0 if self._ids is None else self._ids.shape[1]
        same_batch = self._ids is not None and self._ids.shape[0] == B
        if same_batch and hf_cache is not None and hf_cache is self._hf_cache and T <= 2:
            h = self._run(ids, True)                                       # transformers sent only new tokens
        elif same_batch and T > n and n > 0 and torch.equal(ids[:, :n], self._ids):
            self._run(ids[:, n:], True)                                    # whole sequence again: run the suffix
            h = self._hidden
        else:
            h = self._run(ids, False)
            if not given:
                # a model whose generate leaves the cache to the model (MiniMax's own cache class): hand back a
                # token for transformers to pass in with the next step, so that step is known as a continuation
                from transformers import DynamicCache
                hf_cache = self._token = DynamicCache()
        self._hf_cache = hf_cache
        return _base_output(h, bool(self.fused.spec["num_experts"]), hf_cache if hf_cache is self._token else None)


def _base_output(h, moe: bool = False, cache=None):
    # The widest base output class, so every causal-LM head finds the fields it reads (GPT-2 reads cross_attentions,
    # a mixture-of-experts head reads router_logits).
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, MoeModelOutputWithPast
    out = (MoeModelOutputWithPast if moe else BaseModelOutputWithPastAndCrossAttentions)(last_hidden_state=h)
    if cache is not None:     # the field is `cache` in transformers 5.2x, `past_key_values` before
        setattr(out, "cache" if hasattr(out, "cache") else "past_key_values", cache)
    for name in ("shared_kv_states", "router_logits"):   # Gemma 4's head reads both (the fused body keeps its own
        if not hasattr(out, name):                        # caches, and routes inside)
            setattr(out, name, None)
    return out


def inject(hf_model: nn.Module, out_dir, device=None, backend: str = "auto", check_hashes: bool = True):
    """Replace hf_model's transformer stack with the fused layers of OUT_DIR (tp=1). Returns hf_model."""
    fused = load(out_dir, device=device, backend=backend, check_hashes=check_hashes)
    spec = fused.spec
    archs = list(getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])
    if spec.get("architecture") in wrappers() or any(a in wrappers() for a in archs):
        raise FmError("inject replaces a text model's layers; a vision-language model's converted language model "
                      "runs with fmconvert.load (or `fmconvert generate`)")
    # a model transformers runs under a generic class (EXAONE 3.x as a LlamaForCausalLM) is its model_type's family
    archs = [saved_as_owner(a, getattr(hf_model.config, "model_type", None)) or a for a in archs]
    policy, _ = policy_for(archs + [type(hf_model).__name__])
    if policy.family != spec["family"]:
        raise FmError(f"{out_dir} holds a {spec['family']} model, but the live model is {policy.family}")
    for key, attr in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                      ("vocab_size", "vocab_size")):
        live = getattr(hf_model.config, attr, None)
        if live is not None and live != spec[key]:
            raise FmError(f"{out_dir} has {key}={spec[key]} but the live model has {live}")
    if spec["kind"] != "decoder":
        raise FmError("inject supports decoder models (use fmconvert.load for encoders)")
    prefix = hf_model.base_model_prefix
    body = getattr(hf_model, prefix, None)
    if body is None or body is hf_model:
        raise FmError(f"{type(hf_model).__name__} has no separate base model to replace; pass the *ForCausalLM model")
    parent, name = hf_model, prefix
    if isinstance(getattr(body, "decoder", None), nn.Module):  # OPT nests the stack one level deeper
        parent, name, body = body, "decoder", body.decoder
    setattr(parent, name, FusedBody(fused, body))
    if hasattr(hf_model, "generation_config") and hf_model.generation_config is not None:
        hf_model.generation_config.use_cache = True
    return hf_model
