"""manifest.json: the contract between the converter and everything that reads its output.

Schema (format "fmconvert", FORMAT_VERSION below; documented in docs/manifest.md):
  format, format_version, tool_version
  source        architecture, family, prefix (of the HF tensor names), config_sha256, fingerprints {name: {size,
                head_sha256}}, files {name: sha256} (convert --source-sha256 only), sidecar_files, dropped
                {tensors, bytes, prefixes} (a vision-language wrapper's left-out towers only)
  model         the ModelSpec (sizes, norm, activation, positions, residual, tying, ...)
  parallel      the slice Layout (tp, heads and kv heads per rank, kv replication, padding, slot kinds)
  dtype         float dtype of unquantized tensors
  quantization  null, or {scheme, group_size, scale_dtype, embeddings, tensors {name: {group_size, rel_rms,
                sqnr_db, max_abs}}}
  extras        passthrough tensors (task heads) stored replicated under "extra.<hf name>"
  ranks         [{rank, files [{path, size, sha256}], tensors {name: {file, dtype, shape}}}]

Readers check the format version and confine every path to the output directory.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .errors import CONTROL_CHARS, EXIT_IO, FmError

FORMAT = "fmconvert"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = ("format", "format_version", "tool_version", "source", "model", "parallel", "dtype", "quantization",
             "ranks")
_FLOATS = ("float32", "float16", "bfloat16")
_DTYPES = _FLOATS + ("int8", "int64")      # int64: integer slots (DeepSeek-V4's token -> expert table)
MAX_MANIFEST_BYTES = 64 << 20
MAX_DIM = 1 << 24
MAX_POSITIONS = 1 << 22   # the runtime builds RoPE tables this long at load: a lie here must not cost gigabytes
# Position types read from a table (pos_embed.weight) at position + offset: learned (GPT-2, OPT), or fixed sinusoids
# the converter writes (XGLM)
TABLE_POSITIONS = ("learned", "sinusoidal")


def position_limit(model: dict) -> int | None:
    """The positions a model's table holds (learned or sinusoidal), or None: RoPE, ALiBi and T5's buckets have no
    end."""
    return model["max_positions"] if model["position"]["type"] in TABLE_POSITIONS else None
MAX_FILES, MAX_TENSORS = 1 << 16, 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WORD = re.compile(r"[A-Za-z0-9_.+\-]{1,128}")

# model: key -> check. Everything the runtime, inspect, reassemble and verify read from it.
_POS_INT = lambda x: type(x) is int and 0 < x < MAX_DIM  # noqa: E731
_NAT = lambda x: type(x) is int and 0 <= x < MAX_DIM  # noqa: E731
_NAT_SIZE = lambda x: type(x) is int and 0 <= x < 1 << 62  # noqa: E731
_BOOL = lambda x: type(x) is bool  # noqa: E731
_POS_NUM = lambda x: type(x) in (int, float) and 0 < x < math.inf  # noqa: E731
_FINITE = lambda x: type(x) in (int, float) and math.isfinite(x)  # noqa: E731
_NONNEG_NUM = lambda x: type(x) in (int, float) and 0 <= x < math.inf  # noqa: E731
_TOKEN = lambda x: x is None or _NAT(x)  # noqa: E731
_ENUM = lambda *vals: (lambda x: x in vals)  # noqa: E731
_MODEL = {
    "family": lambda x: isinstance(x, str) and _WORD.fullmatch(x), "architecture": lambda x: isinstance(x, str)
    and _WORD.fullmatch(x), "kind": _ENUM("decoder", "encoder"),
    **{k: _POS_INT for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                             "intermediate_size", "vocab_size", "embed_dim")},
    "max_positions": lambda x: type(x) is int and 0 <= x <= MAX_POSITIONS, "type_vocab_size": _NAT,
    "norm": _ENUM("rms", "layer", "rms_plus_one", "layer_plus_one", "rms_fp32"), "norm_eps": _POS_NUM,
    "attn_scale": _POS_NUM,
    "activation": _ENUM("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "geglu_erf", "reglu2",
                        "swiglu_oai", "swiglu_limit", "xielu", "quick_gelu"),
    "residual": _ENUM("pre", "post", "parallel", "normed", "hyper", "altup", "gated_hyper"),
    **{k: _BOOL for k in ("gated_mlp", "tied_embeddings", "embed_norm", "final_norm", "project", "pooler")},
    "position": lambda x: isinstance(x, dict), "bos_token_id": _TOKEN, "pad_token_id": _TOKEN,
    "eos_token_id": lambda x: _TOKEN(x) or (isinstance(x, list) and len(x) < 1024 and all(map(_NAT, x))),
    "slots": lambda x: isinstance(x, list) and all(isinstance(s, str) for s in x),
}
# Keys newer manifests carry, with the value an older manifest means by leaving them out. `validate` fills these in,
# so readers index the model section directly.
_MODEL_OPTIONAL = {
    "embed_scale": (1.0, _POS_NUM, "a positive number"), "num_experts": (0, _NAT, "a non-negative integer"),
    "experts_per_token": (0, _NAT, "a non-negative integer"), "experts_renormalize": (True, _BOOL, "true or false"),
    "shared_intermediate_size": (0, _NAT, "a non-negative integer"),
    "sliding_window": (0, _NAT, "a non-negative integer"),
    "window_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                      "null or a list of layer indices"),
    "attn_softcap": (0.0, _NONNEG_NUM, "a non-negative number"),
    "logit_softcap": (0.0, _NONNEG_NUM, "a non-negative number"),
    "logit_scale": (1.0, _POS_NUM, "a positive number"), "residual_scale": (1.0, _POS_NUM, "a positive number"),
    "qkv_layout": (None, _ENUM(None, "separate", "fused", "interleaved", "grouped", "mp_blocks"),
                   "separate, fused, interleaved, grouped or mp_blocks"),
    "qk_norm": ("head", _ENUM("head", "per_head", "full", "l2"), "head, per_head, full or l2"),
    "attn_chunk": (0, _NAT, "a non-negative integer"),
    "chunk_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                     "null or a list of layer indices"),
    "query_scale_offset": (0, _ENUM(0, 1), "0 or 1"), "query_scale_nope_only": (False, _BOOL, "true or false"),
    "experts_scale_input": (False, _BOOL, "true or false"),
    "dense_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                     "null or a list of layer indices"),
    "dense_intermediate_size": (0, _NAT, "a non-negative integer"),
    "router": ("softmax", _ENUM("softmax", "sigmoid", "sigmoid_logits", "sparsemixer", "sqrtsoftplus"),
               "softmax, sigmoid, sigmoid_logits, sparsemixer or sqrtsoftplus"),
    "router_jitter": (0.0, _NONNEG_NUM, "a non-negative number"),
    "router_groups": (1, _POS_INT, "a positive integer"), "router_topk_groups": (1, _POS_INT, "a positive integer"),
    "routed_scale": (1.0, _POS_NUM, "a positive number"), "shared_scale": (1.0, _POS_NUM, "a positive number"),
    "qk_norm_after_rope": (False, _BOOL, "true or false"),
    "query_scale_beta": (0.0, _NONNEG_NUM, "a non-negative number"),
    "query_scale_from": (0, _NAT, "a non-negative integer"),
    "glu_alpha": (0.0, _NONNEG_NUM, "a non-negative number"), "glu_limit": (0.0, _NONNEG_NUM, "a non-negative number"),
    "nope_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                    "null or a list of layer indices"),
    "mla": (None, lambda x: x is None or _mla(x), "null or the latent attention's widths"),
    "linear_attn": (None, lambda x: x is None or _linear_attn(x), "null or the linear attention's widths"),
    "ssm": (None, lambda x: x is None or _ssm(x), "null or the Mamba2 widths"),
    "short_conv": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"conv_kernel"}
                                                 and type(x["conv_kernel"]) is int and 2 <= x["conv_kernel"] <= 64),
                   "null or {\"conv_kernel\": taps}"),
    "mamba": (None, lambda x: x is None or _mamba(x), "null or the Mamba widths"),
    "mlstm": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"heads", "qk_dim", "v_dim",
                                                                               "gate_cap", "eps"}
                                            and all(_POS_INT(x[k]) for k in ("heads", "qk_dim", "v_dim"))
                                            and x["qk_dim"] % x["heads"] == 0 and x["v_dim"] % x["heads"] == 0
                                            and _POS_NUM(x["gate_cap"]) and _POS_NUM(x["eps"])),
              "null or the mLSTM's widths"),
    "rglru": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"width", "heads", "conv_kernel",
                                                                               "activation"}
                                            and all(_POS_INT(x[k]) for k in ("width", "heads", "conv_kernel"))
                                            and x["width"] % x["heads"] == 0 and 2 <= x["conv_kernel"] <= 64
                                            and x["activation"] in ("gelu", "gelu_tanh", "relu", "silu")),
              "null or the RG-LRU's widths"),
    "ssm_beside_attention": (False, _BOOL, "true or false"),
    "lightning": (False, _BOOL, "true or false"),
    "residual_factors": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"attn", "linear", "mlp"} and all(
            isinstance(v, list) and len(v) == 2 and all(map(_POS_NUM, v)) for v in x.values())),
        "null or {\"attn\", \"linear\", \"mlp\"} -> [alpha, beta]"),
    "hyper": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"streams", "rank"} and type(x["streams"]) is int
        and 2 <= x["streams"] <= 16 and _POS_INT(x["rank"])) or (
        isinstance(x, dict) and set(x) in ({"streams", "magnitude", "eps"},
                                           {"streams", "magnitude", "eps", "sinkhorn", "post_eps"})
        and type(x["streams"]) is int and 2 <= x["streams"] <= 16 and _POS_NUM(x["magnitude"]) and _POS_NUM(x["eps"])
        and (type(x.get("sinkhorn", 1)) is int and 1 <= x.get("sinkhorn", 1) <= 100)
        and type(x.get("post_eps", True)) is bool),
        "null or {\"streams\": 2..16, \"magnitude\", \"eps\"} (and DeepSeek-V4's \"sinkhorn\": 1..100, \"post_eps\"), "
        "or Qwen4-Exp's {\"streams\": 2..16, \"rank\"}"),
    "moa": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"experts", "top_k"}
                                          and all(map(_POS_INT, x.values())) and x["top_k"] <= x["experts"]),
            "null or the attention experts' {experts, top_k}"),
    "final_norm_eps": (0.0, _NONNEG_NUM, "a non-negative number"),
    "qsa": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"heads", "dim", "budget", "rate"}
                                          and all(map(_POS_INT, x.values())) and x["budget"] % x["rate"] == 0),
            "null or the QSA indexer's {heads, dim, budget (whole blocks), rate}"),
    "ngram": (None, lambda x: x is None or _ngram(x), "null or the n-gram embeddings' widths and hash tables"),
    "compressed": (None, lambda x: x is None or _compressed(x), "null or the compressed attention's widths"),
    "altup": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"streams", "correct_scale",
                                                                                "laurel_rank"}
                                            and type(x["streams"]) is int and 2 <= x["streams"] <= 16
                                            and type(x["correct_scale"]) is bool and _POS_INT(x["laurel_rank"])),
              "null or {\"streams\": 2..16, \"correct_scale\", \"laurel_rank\"}"),
    "per_layer_vocab": (0, _NAT, "a non-negative integer"),
    "gate_sparsity": (None, lambda x: x is None or (isinstance(x, list) and all(
        type(v) in (int, float) and 0 <= v < 1 for v in x)), "null or a number in [0, 1) per layer"),
    "hash_layers": (None, lambda x: x is None or (isinstance(x, list) and x and all(map(_NAT, x))
                                                  and x == sorted(set(x))), "null or a list of layer indices"),
    "experts_glu_limit": (0.0, _NONNEG_NUM, "a non-negative number"),
    "norm_gate_rank": (0, _NAT, "a non-negative integer"),
    "block_sparse": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"heads", "dim", "block", "topk", "local", "layers"}
        and all(_POS_INT(x[k]) for k in ("heads", "dim", "block", "topk")) and _NAT(x["local"])
        and isinstance(x["layers"], list) and x["layers"] and all(map(_NAT, x["layers"]))
        and x["layers"] == sorted(set(x["layers"]))),
        "null or the block indexer's {heads, dim, block, topk, local, layers}"),
    "row_scales": (None, lambda x: x is None or _row_scales(x), "null or slot -> {\"input\", \"parts\"} factors"),
    "linear_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                      "null or a list of layer indices"),
    "attn_gate": (False, _BOOL, "true or false"), "attn_gate_heads": (False, _BOOL, "true or false"),
    "attn_gate_fn": ("sigmoid", _ENUM("sigmoid", "softplus"), "sigmoid or softplus"),
    "layer_heads": (None, lambda x: x is None or (isinstance(x, list) and all(map(_POS_INT, x))),
                    "null or a q head count per layer"),
    "router_softcap": (0.0, _NONNEG_NUM, "a non-negative number"),
    "v_head_dim": (0, _NAT, "a non-negative integer"),
    "residual_depth_scale": (False, _BOOL, "true or false"),
    "query_scale_kind": ("log", _ENUM("log", "power"), "log or power"),
    "value_scale": (1.0, _POS_NUM, "a positive number"),
    "sink_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                    "null or a list of layer indices"),
    "global_attn": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"head_dim", "num_kv_heads"}
                                                  and all(map(_POS_INT, x.values()))),
                    "null or the global layers' {\"head_dim\", \"num_kv_heads\"}"),
    "value_is_key": (False, _BOOL, "true or false"), "v_norm": (False, _BOOL, "true or false"),
    "moe_beside_dense": (False, _BOOL, "true or false"),
    "shortcut_experts": (False, _BOOL, "true or false"), "zero_experts": (0, _NAT, "a non-negative integer"),
    "first_attn_norm": (True, _BOOL, "true or false"),
    "per_layer_input": (0, _NAT, "a non-negative integer"),
    "head_vocab_size": (0, _NAT, "a non-negative integer"),
    "kv_source": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                  "null or a layer index per layer"),
    "wide_mlp_layers": (None, lambda x: x is None or (isinstance(x, list) and all(map(_NAT, x))),
                        "null or a list of layer indices"),
    "wide_intermediate_size": (0, _NAT, "a non-negative integer"),
    "linear_pre_norm": (False, _BOOL, "true or false"),
    "head_activation": (None, _ENUM(None, "gelu", "gelu_tanh", "relu", "relu2", "silu"),
                        "null or gelu, gelu_tanh, relu, relu2 or silu"),
    "qkv_clip": (0.0, _NONNEG_NUM, "a non-negative number"),
    "norm_affine": (True, _BOOL, "true or false"),
    "block_parts": (None, lambda x: x is None or (isinstance(x, list) and all(p in ("mixer", "mlp", "hybrid")
                                                                              for p in x)),
                    "null or a list of mixer / mlp / hybrid per layer"),
    "shared_blocks": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"count", "rank", "qkv_lora"}
                                                    and _POS_INT(x["count"]) and _POS_INT(x["rank"])
                                                    and type(x["qkv_lora"]) is bool),
                      "null or the shared blocks' {count, rank, qkv_lora}"),
    "attn_input": (0, _NAT, "a non-negative integer"),
    "diff_attn": (False, _BOOL, "true or false"),
    "dyn_mask": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"keep_window"}
                                               and _POS_INT(x["keep_window"])),
                 "null or {keep_window: a positive integer}"),
    "cca": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"depthwise", "grouped"}
                                          and all(_POS_INT(v) and v <= 64 for v in x.values())),
            "null or {depthwise, grouped: integers from 1 to 64}"),
    "router_dim": (0, _NAT, "a non-negative integer"),
    "loop": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"stack_layers", "h_cycles", "l_cycles"}
                                           and all(_POS_INT(v) and v <= 4096 for v in x.values())),
             "null or {stack_layers, h_cycles, l_cycles: positive integers}"),
    "embed_proj": (False, _BOOL, "true or false"),
    "headless": (False, _BOOL, "true or false"),
    "shared_layers": (False, _BOOL, "true or false"),
    "causal_encoder": (False, _BOOL, "true or false"),
    "eos_pool": (None, lambda x: x is None or (isinstance(x, dict) and set(x) == {"eos_id"} and type(x["eos_id"]) is int
                                               and x["eos_id"] >= -1), "null or {eos_id (-1: the largest id)}"),
    "proj_dim": (0, _NAT, "a non-negative integer"),
    "audio_mels": (0, _NAT, "a non-negative integer"),
    "wave": (None, lambda x: x is None or _wave(x),
             "null or the waveform front end's {conv_dim, kernel, stride (lists, as long as each other), bias, norm "
             "(group or layer), act, feat_norm, pos_kernel, pos_groups, pos_layers (optional, 0 to 16), pos_conv "
             "(optional: false)}"),
    "conformer": (None, lambda x: x is None or _conformer(x),
                  "null or Wav2Vec2-Conformer's block {position (rotary, relative, relative_key or none), "
                  "rotary_base, depthwise_kernel (odd), norm_eps; conv_norm (batch or layer), causal (optional); "
                  "max_left, max_right (with relative_key)}"),
    "features": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"dim", "kernel", "stride"} and _POS_INT(x["dim"])
        and all(isinstance(x[k], list) and 0 < len(x[k]) <= 8 and all(_POS_INT(i) for i in x[k])
                for k in ("kernel", "stride")) and len(x["kernel"]) == len(x["stride"])),
        "null or the feature rows' {dim, kernel, stride (lists, as long as each other)}"),
    "adapter": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"layers", "kernel", "stride", "act", "width", "ffn"}
        and all(_POS_INT(x[k]) for k in ("layers", "kernel", "stride", "width")) and x["layers"] <= 64
        and isinstance(x["act"], str) and type(x["ffn"]) is bool and x["kernel"] >= x["stride"] // 2 * 2),
        "null or Wav2Vec2-BERT's adapter {layers (at most 64), kernel, stride (kernel at least stride // 2 * 2), "
        "act, width, ffn (bool)}"),
    "classifier": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) - {"layer_sum", "tdnn"} == {"pool", "steps"} and x.get("layer_sum", True) is True
        and x["pool"] in ("first", "pooler", "mean", "late", "tokens", "spans", "eos", "xvector")
        and ("tdnn" in x) == (x["pool"] == "xvector") and (x["pool"] != "xvector" or len(x["steps"]) >= 2)
        and (x.get("tdnn") is None or (isinstance(x["tdnn"], list) and 0 < len(x["tdnn"]) <= 16 and all(
            isinstance(t, dict) and set(t) == {"name", "kernel", "dilation"} and isinstance(t["name"], str)
            and _POS_INT(t["kernel"]) and t["kernel"] <= 64 and _POS_INT(t["dilation"]) and t["dilation"] <= 64
            for t in x["tdnn"])))
        and isinstance(x["steps"], list) and 0 < len(x["steps"]) <= 8 and all(
            isinstance(s, dict) and set(s) == {"op", "name", "bias", "act"} and s["op"] in ("linear", "norm")
            and isinstance(s["name"], str) and type(s["bias"]) is bool
            and s["act"] in ("none", "tanh", "gelu", "gelu_tanh", "relu", "silu") for s in x["steps"])),
        "null or {pool (first, pooler, mean, late, tokens, spans, eos or xvector), steps: [{op (linear or norm), "
        "name, bias, act}], layer_sum (optional: true), tdnn (xvector's, and only its: [{name, kernel, dilation}])}"),
    "disentangled": (None, lambda x: x is None or (
        isinstance(x, dict) and set(x) == {"span", "buckets", "max_position", "c2p", "p2c"}
        and _POS_INT(x["span"]) and _NAT(x["buckets"]) and _POS_INT(x["max_position"])
        and type(x["c2p"]) is bool and type(x["p2c"]) is bool and (x["buckets"] in (0, x["span"]))
        and (x["buckets"] == 0 or (x["buckets"] % 2 == 0 and x["max_position"] > x["buckets"] // 2 + 1))),
        "null or {span, buckets (0 or the span, even), max_position, c2p, p2c}"),
    "rel_bias": (None, lambda x: x is None or (isinstance(x, dict) and set(x) - {"per_layer", "causal"}
                                               == {"buckets", "max_distance"}
                                               and x.get("per_layer", False) in (False, True)
                                               and x.get("causal", False) in (False, True)
                                               and _POS_INT(x["buckets"]) and x["buckets"] % 4 == 0
                                               and _POS_INT(x["max_distance"])
                                               and x["max_distance"] > x["buckets"] // 4),
                 "null or {buckets (a multiple of 4), max_distance (past a quarter of them), per_layer, causal}"),
    "encoder": (None, lambda x: x is None or x == "encoder", "null or \"encoder\""),
    "decoder_start_token_id": (None, _TOKEN, "null or a token id"),
    "embed_from": (None, lambda x: x is None or x == "..", "null or \"..\""),
}


def _wave(x) -> bool:
    """Wav2Vec2's front end: a conv stack of positive widths, kernels and strides, one each a layer; its norm and
    activation; the positional conv's kernel and groups."""
    lists = [x.get(k) for k in ("conv_dim", "kernel", "stride")] if isinstance(x, dict) else []
    return (isinstance(x, dict)
            and set(x) - {"pos_layers", "pos_conv"} == {"conv_dim", "kernel", "stride", "bias", "norm", "act",
                                                        "feat_norm", "pos_kernel", "pos_groups"}
            and type(x.get("pos_layers", 0)) is int and 0 <= x.get("pos_layers", 0) <= 16
            and x.get("pos_conv", False) is False
            and all(isinstance(v, list) and 0 < len(v) <= 32 and all(_POS_INT(i) and i <= 65536 for i in v)
                    for v in lists) and len({len(v) for v in lists}) == 1
            and type(x["bias"]) is bool and type(x["feat_norm"]) is bool and x["norm"] in ("group", "layer")
            and x["act"] in ("gelu", "gelu_tanh", "relu", "silu") and _POS_INT(x["pos_kernel"])
            and x["pos_kernel"] <= 1024 and _POS_INT(x["pos_groups"]))


def _conformer(x) -> bool:
    """A Conformer block: its positions, the depthwise conv's odd taps, the norms' eps; Wav2Vec2-BERT's conv module
    (a LayerNorm for BatchNorm, causal) and relative_key's clamp."""
    rk = x.get("position") == "relative_key" if isinstance(x, dict) else False
    return (isinstance(x, dict)
            and set(x) - {"conv_norm", "causal"} == {"position", "rotary_base", "depthwise_kernel", "norm_eps"}
            | ({"max_left", "max_right"} if rk else set())
            and x["position"] in ("rotary", "relative", "relative_key", "none") and _POS_NUM(x["rotary_base"])
            and _POS_INT(x["depthwise_kernel"]) and x["depthwise_kernel"] % 2 == 1 and _POS_NUM(x["norm_eps"])
            and x.get("conv_norm", "batch") in ("batch", "layer") and type(x.get("causal", False)) is bool
            and all(type(x[k]) is int and x[k] >= 0 for k in ("max_left", "max_right") if rk))


def _ssm(x) -> bool:
    """Mamba2's widths: positive heads, head_dim, groups (dividing the heads), state and conv taps; the step's clamp."""
    return (isinstance(x, dict) and set(x) - {"gate", "norm_eps"} == {"heads", "head_dim", "groups", "state",
                                                                     "conv_kernel", "dt_min", "dt_max"}
            and _POS_NUM(x.get("norm_eps", 1.0))
            and x.get("gate", "norm_first") in ("norm_first", "none")
            and all(_POS_INT(x[k]) for k in ("heads", "head_dim", "groups", "state", "conv_kernel"))
            and x["heads"] % x["groups"] == 0 and 2 <= x["conv_kernel"] <= 64 and _NONNEG_NUM(x["dt_min"])
            and (x["dt_max"] is None or (_POS_NUM(x["dt_max"]) and x["dt_max"] > x["dt_min"])))


_ROW_SCALE_PARTS = {"qkv": 3, "attn_out": 1, "mlp_in": 2, "mlp_out": 1, "ssm_in": 5, "ssm_out": 1, "q_b": 1,
                   "kv_a_norm": 1}


def _row_scales(x) -> bool:
    """Falcon-H1's multipliers: for known slots, a finite non-zero factor on the input and one per part of the
    output rows."""
    factor = lambda v: type(v) in (int, float) and math.isfinite(v) and v != 0  # noqa: E731
    return (isinstance(x, dict) and bool(x) and all(
        k in _ROW_SCALE_PARTS and isinstance(v, dict) and set(v) == {"input", "parts"} and factor(v["input"])
        and isinstance(v["parts"], list) and len(v["parts"]) == _ROW_SCALE_PARTS[k] and all(map(factor, v["parts"]))
        for k, v in x.items()))


def _mamba(x) -> bool:
    """Mamba (1)'s widths: positive channels, state (at most 256), dt rank and conv taps; the dt/B/C norms."""
    return (isinstance(x, dict) and set(x) == {"inner", "state", "dt_rank", "conv_kernel", "norms", "norm_eps"}
            and all(_POS_INT(x[k]) for k in ("inner", "state", "dt_rank", "conv_kernel")) and x["state"] <= 256
            and 2 <= x["conv_kernel"] <= 64 and x["norms"] in (None, "plain", "weighted") and _POS_NUM(x["norm_eps"]))


def _linear_attn(x) -> bool:
    """Gated DeltaNet's widths: positive heads and head widths, the value heads a multiple of the key heads; KDA's
    (decay "channel") as many value heads as key heads, maybe full-width gates and a bounded decay (Ling 2.5)."""
    if not isinstance(x, dict):
        return False
    widths = {k: x.get(k) for k in ("k_heads", "v_heads", "k_dim", "v_dim", "conv_kernel")}
    return (set(x) - {"decay", "beta_scale", "norm_eps", "gates", "decay_bound", "gate"} == set(widths)
            and x.get("gate", "sigmoid") == "sigmoid"
            and x.get("decay", "channel") == "channel" and x.get("gates", "full") == "full"
            and (("gates" not in x and "decay_bound" not in x) or "decay" in x)
            and ("decay_bound" not in x or (type(x["decay_bound"]) in (int, float) and -1e4 < x["decay_bound"] < 0))
            and all(_POS_NUM(x[k]) for k in ("beta_scale", "norm_eps") if k in x)
            and all(_POS_INT(v) for v in widths.values()) and x["v_heads"] % x["k_heads"] == 0
            and 2 <= x["conv_kernel"] <= 64 and ("decay" not in x or x["k_heads"] == x["v_heads"]))


def _ngram(x) -> bool:
    """Qwen4-Exp's n-gram embeddings: sizes in range, the width in whole heads, and for each of its layers (in
    order) one odd 63-bit hash multiplier per place in the n-gram, each head's table size and offset (the tables
    side by side) and the rows (the tables padded)."""
    keys = {"layers", "size", "heads", "dim", "conv_kernel", "eos", "parts", "tables"}
    if not (isinstance(x, dict) and set(x) == keys and type(x["size"]) is int and 2 <= x["size"] <= 8
            and type(x["heads"]) is int and 1 <= x["heads"] <= 64 and _POS_INT(x["dim"]) and _POS_INT(x["parts"])
            and x["dim"] % ((x["size"] - 1) * x["heads"]) == 0 and type(x["conv_kernel"]) is int
            and 2 <= x["conv_kernel"] <= 64 and _NAT(x["eos"]) and isinstance(x["layers"], list) and x["layers"]
            and all(map(_NAT, x["layers"])) and x["layers"] == sorted(set(x["layers"]))
            and isinstance(x["tables"], dict) and set(x["tables"]) == {str(i) for i in x["layers"]}):
        return False
    heads = (x["size"] - 1) * x["heads"]
    for t in x["tables"].values():
        if not (isinstance(t, dict) and set(t) == {"multipliers", "sizes", "offsets", "rows"}
                and isinstance(t["multipliers"], list) and len(t["multipliers"]) == x["size"]
                and all(type(v) is int and 0 < v < 1 << 63 and v % 2 for v in t["multipliers"])
                and isinstance(t["sizes"], list) and len(t["sizes"]) == heads
                and all(type(v) is int and 1 < v < 1 << 40 for v in t["sizes"])
                and t["offsets"] == [sum(t["sizes"][:h]) for h in range(heads)]
                and type(t["rows"]) is int and sum(t["sizes"]) <= t["rows"] < 1 << 42):
            return False
    return True


def _mla(x) -> bool:
    """Latent attention's widths: q_rank may be 0 (no q bottleneck), the others positive, and the latent norms' eps;
    a sparse attention indexer's (`index`) when there is one; Dots3 Note's latent scales (`q_scale`, `kv_scale`) and
    the windowed layers' own widths (`local`)."""
    return (isinstance(x, dict) and set(x) - {"index", "gated_q", "local", "q_scale", "kv_scale"}
            == {"q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim", "norm_eps"}
            and x.get("gated_q", True) is True and (not x.get("gated_q") or x["q_rank"] > 0)
            and _NAT(x["q_rank"]) and all(_POS_INT(x[k]) for k in ("kv_rank", "nope_dim", "rope_dim", "v_dim"))
            and _POS_NUM(x["norm_eps"]) and ("index" not in x or _index(x["index"], x))
            and _latent_scales(x) and ("local" not in x or _latent_local(x["local"], x)))


def _latent_scales(x) -> bool:
    """Dots3 Note: q_scale and kv_scale come together, positive, and q_scale needs a q bottleneck to scale."""
    return (("q_scale" in x) == ("kv_scale" in x)
            and ("q_scale" not in x or (_POS_NUM(x["q_scale"]) and _POS_NUM(x["kv_scale"]) and x["q_rank"] > 0)))


def _latent_local(x, mla) -> bool:
    """Dots3 Note's mla.local: the windowed layers' heads and latent widths (a q bottleneck always), with their own
    latent scales where the model has them."""
    return (isinstance(x, dict) and set(x) - {"q_scale", "kv_scale"} == {"heads", "q_rank", "kv_rank", "nope_dim",
                                                                         "rope_dim", "v_dim"}
            and all(_POS_INT(x[k]) for k in ("heads", "q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim"))
            and ("q_scale" in x) == ("q_scale" in mla) and _latent_scales(x) and "gated_q" not in mla)


def latent_at(mla, window_layers, i: int):
    """Latent attention's widths in layer i: mla.local's over mla's own in a windowed layer (Dots3 Note: with its
    own `heads`, and no indexer), else mla as it is (None without latent attention)."""
    if not mla or "local" not in mla or window_layers is None or i not in window_layers:
        return mla
    return {**{k: v for k, v in mla.items() if k not in ("local", "index")}, **mla["local"]}


def _index(x, mla) -> bool:
    """DeepSeek Sparse Attention's indexer: positive widths, at least the rotated width, a q bottleneck to read, a
    RoPE style, and the layers that run it in order, the first layer among them (a shared layer reuses an earlier
    one's choice)."""
    return (isinstance(x, dict) and set(x) - {"rope_at", "norm_eps"} == {"heads", "dim", "topk", "rope_style", "layers"}
            and x.get("rope_at", "first") in ("first", "last") and _POS_NUM(x.get("norm_eps", 1e-6))
            and all(_POS_INT(x[k]) for k in ("heads", "dim", "topk")) and x["dim"] >= mla["rope_dim"]
            and mla["q_rank"] > 0 and x["rope_style"] in ("neox", "gptj") and isinstance(x["layers"], list)
            and x["layers"][:1] == [0] and all(_NAT(i) for i in x["layers"]) and x["layers"] == sorted(set(x["layers"])))
_PARALLEL = ("tp", "heads_per_rank", "kv_heads_per_rank", "kv_replication", "intermediate_chunk",
             "intermediate_per_rank", "vocab_padded", "vocab_per_rank")


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"


def check_rel(rel) -> str:
    """Lexical half of `safe_path`: a relative path with no '..', no absolute or drive prefix, no odd characters."""
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or CONTROL_CHARS.search(rel) or "\\" in rel:
        raise FmError(f"manifest: file path {rel!r} is not a plain relative path")
    if rel.startswith("/") or os.path.isabs(rel) or ".." in Path(rel).parts or rel.strip("/.") == "":
        raise FmError(f"manifest: file path {rel!r} escapes the output directory")
    return rel


def safe_path(root: Path, rel) -> Path:
    """A manifest path, confined to root: no absolute paths, no '..', no symlink escaping it."""
    check_rel(rel)
    p = Path(root) / rel
    try:
        real, base = p.resolve(), Path(root).resolve()
    except (OSError, RuntimeError):
        raise FmError(f"manifest: file path {rel!r} cannot be resolved (a symlink loop?)") from None
    if base != real and base not in real.parents:
        raise FmError(f"manifest: file path {rel!r} resolves outside the output directory (a symlink?)")
    return p


def _need(cond, msg: str):
    if not cond:
        raise FmError(f"manifest: {msg}")


def _no_control(x, depth: int = 0):
    """No string anywhere may carry control characters: they would end up in one-line errors and terminals."""
    _need(depth < 32, "nested too deeply")
    if isinstance(x, str):
        _need(not CONTROL_CHARS.search(x), f"string {x[:40]!r} contains control characters")
    elif isinstance(x, dict):
        for k, v in x.items():
            _no_control(k, depth + 1)
            _no_control(v, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _no_control(v, depth + 1)


def validate(m) -> dict:
    """Every field a reader uses, its type, its range and its agreement with the others, so nothing downstream meets
    a KeyError, a TypeError or a size that would make it allocate on a lie."""
    _need(isinstance(m, dict), "expected a JSON object")
    _need(m.get("format") == FORMAT, f"format is {str(m.get('format'))[:40]!r}, expected {FORMAT!r}")
    v = m.get("format_version")
    _need(type(v) is int, "format_version must be an integer")
    if v > FORMAT_VERSION:
        raise FmError(f"manifest: format_version {v} is newer than this fmconvert understands ({FORMAT_VERSION}); "
                      "upgrade fmconvert")
    _need(v == FORMAT_VERSION, f"format_version {v} is not supported")
    for k in _REQUIRED:
        _need(k in m, f"missing key {k!r}")
    _no_control(m)
    _need(isinstance(m["tool_version"], str) and _WORD.fullmatch(m["tool_version"]), "tool_version is malformed")
    model, par = m["model"], m["parallel"]
    _need(isinstance(model, dict) and isinstance(par, dict), "model and parallel must be objects")
    for k, ok in _MODEL.items():
        _need(k in model and ok(model[k]), f"model.{k} is missing or malformed")
    _position(model)
    # A key this version does not know changes the network in a way it would silently ignore: refuse instead.
    odd = sorted(set(model) - set(_MODEL) - set(_MODEL_OPTIONAL))
    _need(not odd, f"model.{str(odd[0])[:40]} is not a key this fmconvert understands; upgrade fmconvert" if odd else "")
    for k, (default, ok, what) in _MODEL_OPTIONAL.items():
        _need(ok(model.setdefault(k, default)), f"model.{k} must be {what}")
    experts, topk = model["num_experts"], model["experts_per_token"]
    _need(topk <= experts if experts else topk == 0, "model.experts_per_token does not fit model.num_experts")
    _need(model["residual"] in ("pre", "altup")
          or not any("post_norm" in s or "layer_scale" in s for s in model["slots"]),
          "model.slots: output norms (attn_post_norm, mlp_post_norm) and layer_scale need the pre-norm residual (or "
          "AltUp's)")
    _need(model["residual"] == "pre" or model["residual_scale"] == 1.0,
          "model.residual_scale needs the pre-norm residual")
    layers = model["window_layers"]
    _need(layers is None or (model["sliding_window"] and layers == sorted(set(layers))
                             and all(i < model["num_layers"] for i in layers)),
          "model.window_layers must be distinct layer indices in order, with a sliding_window")
    nope = model["nope_layers"]
    _need(nope is None or (model["position"]["type"] == "rope" and nope == sorted(set(nope))
                           and all(i < model["num_layers"] for i in nope)),
          "model.nope_layers must be distinct layer indices in order, in a RoPE model")
    _need(model["num_heads"] % model["num_kv_heads"] == 0, "model.num_heads is not a multiple of num_kv_heads")
    _need(not (model["attn_chunk"] and model["sliding_window"]),
          "model.attn_chunk and sliding_window exclude each other")
    chunks = model["chunk_layers"]
    _need(chunks is None or (model["attn_chunk"] and chunks == sorted(set(chunks))
                             and all(i < model["num_layers"] for i in chunks)),
          "model.chunk_layers must be distinct layer indices in order, with an attn_chunk")
    mla = model["mla"]
    _need(mla is None or (mla["nope_dim"] + mla["rope_dim"] == model["head_dim"] and model["num_kv_heads"] == 1
                          and (model["position"].get("rotary_dim") == mla["rope_dim"]
                               or model["position"].get("type") == "none")),
          "model.mla does not fit head_dim, num_kv_heads and the rotary width")
    _need(mla is None or "index" not in mla or mla["index"]["layers"][-1] < model["num_layers"],
          "model.mla.index.layers names a layer past the last")
    local = (mla or {}).get("local")
    lrot = model["position"].get("local", {}).get("rotary_dim", model["position"].get("rotary_dim"))
    _need(local is None or (model["sliding_window"] > 0 and model["window_layers"] is not None
                            and "local" in model["position"] and lrot == local["rope_dim"]
                            and not set(mla.get("index", {}).get("layers", ())) & set(model["window_layers"])),
          "model.mla.local needs windowed layers (window_layers), none of them indexed, with a RoPE of their own "
          "(position.local) over its rope_dim")
    _need(not model["ssm_beside_attention"] or (model["ssm"] is not None and mla is None
                                                and model["linear_layers"] == list(range(model["num_layers"]))),
          "model.ssm_beside_attention needs Mamba2 layers in every layer")
    rs = model["row_scales"] or {}
    _need(("ssm_in" not in rs and "ssm_out" not in rs or model["ssm"] is not None)
          and ("mlp_in" not in rs or model["gated_mlp"]) and ("qkv" not in rs or mla is None)
          and ("q_b" not in rs and "kv_a_norm" not in rs or mla is not None),
          "model.row_scales names a slot this model does not have")
    la, ll, ssm, sc, mb = (model[k] for k in ("linear_attn", "linear_layers", "ssm", "short_conv", "mamba"))
    lt, rg, ml = model["lightning"] or None, model["rglru"], model["mlstm"]
    _need((la is not None) + (ssm is not None) + (sc is not None) + (mb is not None) + (lt is not None)
          + (rg is not None) + (ml is not None) <= 1,
          "model.linear_attn, model.ssm, model.short_conv, model.mamba, model.rglru, model.mlstm and model.lightning "
          "exclude each other")
    _need(ml is None or ll == list(range(model["num_layers"])), "model.mlstm needs it in every layer")
    _need(((la or ssm or sc or mb or lt or rg or ml) is None) == (ll is None)
          and (ll is None or (ll and ll == sorted(set(ll)) and ll[-1] < model["num_layers"])),
          "model.linear_layers must be distinct layer indices in order, with linear_attn, ssm, short_conv, mamba "
          "or lightning")
    _need((model["residual"] == "normed") == (model["residual_factors"] is not None)
          and (model["residual"] != "normed" or (model["residual_scale"] == 1.0 and not model["residual_depth_scale"]
                                                 and not any("post_norm" in s or "layer_scale" in s
                                                             for s in model["slots"]))),
          "model.residual normed and model.residual_factors go together, with no other residual scaling or output "
          "norms")
    hc = model["hyper"]
    gated = model["residual"] == "gated_hyper"
    _need(gated == (hc is not None and "rank" in hc) and (not gated or (
        model["kind"] == "decoder" and model["residual_scale"] == 1.0 and not model["final_norm"]
        and model["linear_attn"] is not None and model["qsa"] is not None)),
          "model.residual gated_hyper and model.hyper's rank go together, in a hybrid decoder with a QSA indexer "
          "and no final norm")
    _need(model["rel_bias"] is None or (model["kind"] == "decoder") == bool(model["rel_bias"].get("causal")),
          "model.rel_bias is causal in a decoder (T5's) and bidirectional in an encoder")
    _need(model["embed_from"] is None or (model["kind"] == "encoder" and "embed.weight" not in model["slots"]),
          "model.embed_from is an encoder half's, whose embeddings are the decoder's (no embed.weight of its own)")
    cross = {f"layers.cross_{s}.weight" for s in ("norm", "q", "kv", "out")}
    _need((model["encoder"] is not None) == bool(cross & set(model["slots"])) and (model["encoder"] is None or (
        cross <= set(model["slots"]) and model["kind"] == "decoder" and model["residual"] in ("pre", "post")
        and model["decoder_start_token_id"] is not None and model["decoder_start_token_id"] < model["vocab_size"]
        and model["num_kv_heads"] == model["num_heads"] and not model["mla"] and not model["linear_layers"]
        and not model["num_experts"] and model["loop"] is None and not model["block_parts"])),
          "model.encoder and the cross-attention slots go together, in a pre- or post-norm decoder with a start token, "
          "full attention heads, and no mixture, linear layers or loops")
    _need(model["rel_bias"] is None or model["disentangled"] is None,       # the runtime adds one bias or the other
          "model.rel_bias and model.disentangled do not go together")
    _need((not model["causal_encoder"] and model["eos_pool"] is None) or model["kind"] == "encoder",
          "model.causal_encoder and model.eos_pool are an encoder's")
    _need(not model["shared_layers"] or (model["loop"] is None and not model["block_parts"]
                                         and not model["num_experts"]),
          "model.shared_layers (every layer reads layer 0's weights) goes with uniform layers only")
    _need(not model["headless"] or (model["kind"] == "decoder" and not model["tied_embeddings"]),
          "model.headless is for decoders with an untied head")
    _need(model["classifier"] is None or (model["kind"] == "encoder" and (model["classifier"]["pool"] not in
                                                                           ("pooler", "eos") or model["pooler"]))
          or (model["encoder"] is not None and model["classifier"]["pool"] == "eos"
              and model["eos_token_id"] is not None),
          "model.classifier is an encoder's (pooling with the pooler only where there is one), or an "
          "encoder-decoder's at the eos token")
    _need(model["disentangled"] is None or (model["kind"] == "encoder" and model["num_kv_heads"] == model["num_heads"]
                                            and model["mla"] is None),
          "model.disentangled is for encoders with plain multi-head attention")
    _need(not model["embed_proj"] or (model["embed_dim"] != model["hidden_size"] and not model["project"]),
          "model.embed_proj needs an embed_dim other than hidden_size, and no project")
    _need(not model["diff_attn"] or (model["num_heads"] % 2 == 0 and model["num_kv_heads"] % 2 == 0
                                     and model["mla"] is None and not model["v_head_dim"] and not model["attn_gate"]
                                     and model["kind"] == "decoder"),
          "model.diff_attn needs an even number of heads and of kv heads, in a decoder with plain attention")
    # Doge: its bias and keep window ride on plain causal attention with a cache of every position
    dm, doge_slots = model["dyn_mask"], {"layers.dmask_dt.weight", "layers.dmask_a"}
    _need((dm is not None) == bool(doge_slots & set(model["slots"])) and (dm is None or (
        doge_slots <= set(model["slots"]) and model["kind"] == "decoder" and model["position"]["type"] != "alibi"
        and model["mla"] is None and model["compressed"] is None and not model["diff_attn"] and model["moa"] is None
        and model["linear_layers"] is None and model["block_parts"] is None and model["kv_source"] is None
        and model["global_attn"] is None and model["block_sparse"] is None and model["qsa"] is None
        and not model["sliding_window"] and not model["attn_chunk"] and not model["attn_softcap"]
        and not model["attn_gate"] and not model["v_head_dim"] and model["layer_heads"] is None
        and "layers.attn_sinks.weight" not in model["slots"])),
          "model.dyn_mask and the dmask slots go together, in a decoder with plain causal attention (no window, "
          "chunks, sinks, soft-cap or ALiBi)")
    _need(not {"layers.attn_residual", "layers.mlp_residual"} & set(model["slots"]) or (
        {"layers.attn_residual", "layers.mlp_residual"} <= set(model["slots"]) and model["residual"] == "pre"
        and model["residual_scale"] == 1.0 and not model["residual_depth_scale"] and model["block_parts"] is None
        and not any("post_norm" in s or "layer_scale" in s or s.startswith("layers.ple_") for s in model["slots"])),
          "model.slots: attn_residual and mlp_residual go together, with the pre-norm residual and no other "
          "residual scaling or output norms")
    # HRM-Text: the virtual layers run two stacks' blocks over and over, each run on the plain pre-norm block
    lp = model["loop"]
    _need((lp is None) == ("loop_init" not in model["slots"]) and (lp is None or (
        model["num_layers"] == lp["stack_layers"] * lp["h_cycles"] * (lp["l_cycles"] + 1)
        and model["kind"] == "decoder" and model["residual"] == "pre" and model["final_norm"] and not model["norm_affine"]
        and model["residual_scale"] == 1.0 and not model["residual_depth_scale"] and not model["num_experts"]
        and model["block_parts"] is None and model["linear_layers"] is None and model["kv_source"] is None
        and model["mla"] is None and model["hyper"] is None and not model["altup"] and not model["per_layer_input"]
        and not any("post_norm" in s or "layer_scale" in s or "_residual" in s for s in model["slots"]))),
          "model.loop and the loop_init slot go together, in a pre-norm decoder of stack_layers * h_cycles * "
          "(l_cycles + 1) plain layers whose norms have no weight")
    # ZAYA: CCA computes q, k and v itself and keeps its conv's and v's state beside plain per-head keys
    cca, cca_slots = model["cca"], {"layers.cca_conv0.weight", "layers.cca_conv1.weight", "layers.cca_temp",
                                    "layers.attn_res.gain", "layers.mlp_res.gain"}
    _need((cca is not None) == bool(cca_slots & set(model["slots"])) and (cca is None or (
        cca_slots <= set(model["slots"]) and model["kind"] == "decoder" and model["residual"] == "pre"
        and model["num_kv_heads"] * model["head_dim"] % 2 == 0 and model["mla"] is None
        and model["compressed"] is None and model["linear_layers"] is None and model["block_parts"] is None
        and model["kv_source"] is None and model["global_attn"] is None and model["moa"] is None
        and not model["diff_attn"] and model["dyn_mask"] is None and not model["attn_gate"]
        and not model["v_head_dim"] and model["layer_heads"] is None)),
          "model.cca and the cca slots go together, in a pre-norm decoder with plain attention of an even kv width")
    _need((model["router_dim"] > 0) == ("layers.router_in.weight" in model["slots"]) and (
        not model["router_dim"] or (experts and model["experts_per_token"] == 1 and model["router"] == "softmax")),
          "model.router_dim and the router_in slot go together, with experts picked one at a time")
    sb, bp = model["shared_blocks"], model["block_parts"]
    _need((sb is None) == ("hybrid" not in (bp or ())) and (sb is None or (
        model["ssm"] is not None and model["linear_layers"] == list(range(model["num_layers"]))
        and sb["count"] <= bp.count("hybrid") and model["attn_input"] > 0 and not model["num_experts"]
        and model["residual"] == "pre")),
          "model.shared_blocks and hybrid block_parts go together, with Mamba2 in every layer and no experts")
    moa = model["moa"]
    _need(moa is None or (model["num_heads"] == moa["top_k"] * model["num_kv_heads"] and model["mla"] is None
                          and model["kind"] == "decoder" and model["residual"] == "pre" and not model["attn_gate"]
                          and model["linear_layers"] is None),
          "model.moa needs num_heads = top_k * num_kv_heads, in a pre-norm decoder without latent attention, gates "
          "or linear layers")
    qs, ng = model["qsa"], model["ngram"]
    _need(qs is None or (model["position"].get("type") == "rope" and qs["dim"] >= model["position"]["rotary_dim"]
                         and model["mla"] is None and model["sliding_window"] == 0),
          "model.qsa needs RoPE no wider than its heads, and no window or latent attention")
    _need(ng is None or (gated and set(ng["layers"]) <= set(model["linear_layers"] or ())),
          "model.ngram needs the gated_hyper residual and names linear layers only")
    _need(gated or (model["residual"] == "hyper") == (hc is not None)
          and (hc is None or (model["kind"] == "decoder" and model["residual_scale"] == 1.0
                              and not model["residual_depth_scale"] and not model["shortcut_experts"]
                              and not any("post_norm" in s or "layer_scale" in s or s.startswith("ple_")
                                          for s in model["slots"]))),
          "model.residual hyper and model.hyper go together, in a decoder with no other residual scaling, output "
          "norms or per-layer inputs")
    bsp = model["block_sparse"]
    _need(bsp is None or (bsp["layers"][-1] < model["num_layers"] and bsp["heads"] == model["num_kv_heads"]
                          and model["mla"] is None and model["position"].get("type") == "rope"
                          and bsp["dim"] >= model["position"].get("rotary_dim", 0)
                          and not set(bsp["layers"]) & set(model["linear_layers"] or ())
                          and (model["window_layers"] is not None or not model["sliding_window"])
                          and not set(bsp["layers"]) & set(model["window_layers"] or ())),
          "model.block_sparse needs attention layers with RoPE, no window, one indexer head per kv head and an "
          "indexer at least as wide as the rotated part")
    au = model["altup"]
    _need((model["residual"] == "altup") == (au is not None)
          and (au is None or (model["kind"] == "decoder" and model["per_layer_input"] > 0
                              and "layers.attn_post_norm.weight" in model["slots"])),
          "model.residual altup and model.altup go together, with per-layer inputs and output norms")
    _need(model["per_layer_vocab"] <= (model["vocab_size"] if model["per_layer_input"] else 0),
          "model.per_layer_vocab needs per-layer inputs and at most vocab_size ids")
    gs = model["gate_sparsity"]
    _need(gs is None or (len(gs) == model["num_layers"] and model["gated_mlp"] and not model["num_experts"]),
          "model.gate_sparsity needs a value per layer of a gated dense MLP")
    cp = model["compressed"]
    _need(cp is None or (model["num_kv_heads"] == 1 and model["mla"] is None and model["kind"] == "decoder"
                         and model["num_heads"] % cp["o_groups"] == 0 and model["sliding_window"] > 0
                         and model["window_layers"] is None and model["position"].get("type") == "rope"
                         and model["position"].get("rotary_dim") == cp["rope_dim"] <= model["head_dim"]
                         and model["linear_layers"] is None and model["global_attn"] is None
                         and all(i < model["num_layers"] for i in cp["csa_layers"] + cp["hca_layers"])),
          "model.compressed needs one kv head, RoPE over its rope_dim, a window in every layer, heads in whole "
          "output groups and its layers within the model")
    hl = model["hash_layers"]
    _need(hl is None or (model["num_experts"] and hl[-1] < model["num_layers"]
                         and not set(hl) & set(model["dense_layers"] or ())),
          "model.hash_layers needs a mixture's layers")
    _need(model["activation"] != "swiglu_limit" or model["glu_limit"] > 0,
          "model.activation swiglu_limit needs model.glu_limit")
    _need(not model["experts_glu_limit"] or (model["num_experts"] and model["activation"] == "swiglu"),
          "model.experts_glu_limit needs experts with a SwiGLU activation")
    _need(model["attn_gate"] or not model["attn_gate_heads"], "model.attn_gate_heads needs attn_gate")
    _need(model["attn_gate"] or model["attn_gate_fn"] == "sigmoid", "model.attn_gate_fn needs attn_gate")
    lh = model["layer_heads"]
    _need(lh is None or (len(lh) == model["num_layers"] and mla is None and model["global_attn"] is None
                         and all(n % model["num_kv_heads"] == 0 for n in lh)),
          "model.layer_heads must give one multiple of num_kv_heads per layer, with no latent or global attention")
    _need(not model["router_softcap"] or experts, "model.router_softcap needs experts")
    ga = model["global_attn"]
    _need(model["v_head_dim"] < model["head_dim"] and (not model["v_head_dim"] or (
        mla is None and (not isinstance(ga, dict) or ga.get("head_dim") == model["head_dim"]))),
          "model.v_head_dim must be smaller than head_dim, without latent attention or a global head_dim of its own")
    _need(not model["residual_depth_scale"] or (model["residual"] == "pre" and model["residual_scale"] == 1.0
                                                and "layers.layer_scale.weight" not in model["slots"]),
          "model.residual_depth_scale needs the pre-norm residual, no residual_scale and no layer scalar")
    _need(model["attn_gate"] or "layers.attn_gate.bias" not in model["slots"], "the attn_gate slot needs attn_gate")
    sl = model["sink_layers"]
    _need(sl is None or (sl == sorted(set(sl)) and all(i < model["num_layers"] for i in sl)),
          "model.sink_layers must be distinct layer indices in order")
    ga = model["global_attn"]
    _need(ga is None or (model["window_layers"] and mla is None and model["num_heads"] % ga["num_kv_heads"] == 0
                         and ga["head_dim"] % 2 == 0),
          "model.global_attn needs window_layers (the other layers are global), no latent attention, an even "
          "head_dim and kv heads that divide num_heads")
    _need(ga is not None or not model["value_is_key"], "model.value_is_key needs global_attn")
    _need(not model["moe_beside_dense"] or (experts and model["shared_intermediate_size"]
                                            and model["residual"] == "pre"),
          "model.moe_beside_dense needs experts, a dense MLP beside them (shared_intermediate_size) and the pre-norm "
          "residual")
    _need(not model["shortcut_experts"] or (experts and model["shared_intermediate_size"] and model["residual"] == "pre"
                                            and model["dense_layers"] == list(range(1, model["num_layers"], 2))
                                            and model["num_layers"] % 2 == 0),
          "model.shortcut_experts needs experts with a dense MLP beside them (shared_intermediate_size) in every "
          "first layer of a pair, the second dense (dense_layers), and the pre-norm residual")
    _need(not model["zero_experts"] or (experts and not model["experts_scale_input"]),
          "model.zero_experts needs experts, weighed on their output")
    _need(model["block_parts"] is None or len(model["block_parts"]) == model["num_layers"],
          "model.block_parts must name one part per layer")
    _need((model["head_activation"] is None) == ("head_dense.weight" not in model["slots"])
          and (model["head_activation"] is None or model["kind"] == "decoder"),
          "model.head_activation and the head_dense slot go together, in a decoder")
    _need(not model["per_layer_input"] or (model["residual"] in ("pre", "altup") and not experts
                                           and model["kind"] == "decoder"),
          "model.per_layer_input needs the pre-norm residual, a decoder and no experts")
    src, L = model["kv_source"], model["num_layers"]
    windowed = set(model["window_layers"] or ())
    _need(src is None or (len(src) == L and mla is None and ll is None and not experts
                          and all(j <= i and src[j] == j and (i in windowed) == (j in windowed)
                                  for i, j in enumerate(src))),
          "model.kv_source must give each layer itself or an earlier layer of its kind that keeps its own cache, "
          "with no latent attention, linear layers or experts")
    wl, ws = model["wide_mlp_layers"], model["wide_intermediate_size"]
    _need((wl is None) == (ws == 0) and (wl is None or (wl and wl == sorted(set(wl)) and wl[-1] < L and not experts)),
          "model.wide_mlp_layers must be distinct layer indices in order, with wide_intermediate_size, and no experts")
    _need(model["first_attn_norm"] or model["residual"] == "pre",
          "model.first_attn_norm false needs the pre-norm residual")
    _need(not model["linear_pre_norm"] or (ll and model["residual"] == "pre"),
          "model.linear_pre_norm needs linear_layers and the pre-norm residual")
    _need((model["activation"] == "swiglu_oai") == (model["glu_alpha"] > 0 and model["glu_limit"] > 0),
          "model.glu_alpha and glu_limit must be positive with the swiglu_oai activation, and 0 without it")
    for k in _PARALLEL:
        _need(_POS_INT(par.get(k)), f"parallel.{k} must be a positive int")
    tp = par["tp"]
    _need(tp <= 4096, "parallel.tp is larger than 4096")
    _need(moa is None or model["num_kv_heads"] % tp == 0, "model.moa needs num_kv_heads to be a multiple of "
          "parallel.tp")
    _need(model["cca"] is None or model["num_kv_heads"] % tp == 0, "model.cca needs num_kv_heads to be a multiple "
          "of parallel.tp")
    _need(not model["diff_attn"] or (model["num_heads"] % (2 * tp) == 0 and model["num_kv_heads"] % (2 * tp) == 0),
          "model.diff_attn needs half the heads and half the kv heads to be multiples of parallel.tp")
    _need(model["dyn_mask"] is None or model["num_kv_heads"] * model["head_dim"] % tp == 0,
          "model.dyn_mask needs parallel.tp to divide the value channels (num_kv_heads * head_dim)")
    # a hybrid's linear layers hold whole heads (Mamba2's groups too, unless one serves every head) or channels
    _need(la is None or (la["k_heads"] % tp == 0 and la["v_heads"] % tp == 0),
          "model.linear_attn's heads must be a multiple of parallel.tp")
    _need(ssm is None or (ssm["heads"] % tp == 0 and (ssm["groups"] % tp == 0 or ssm["groups"] == 1)),
          "model.ssm's heads must be a multiple of parallel.tp, and its groups too (or 1)")
    _need(sc is None or model["hidden_size"] % tp == 0, "model.short_conv needs hidden_size to be a multiple of "
          "parallel.tp")
    _need(mb is None or mb["inner"] % tp == 0, "model.mamba's channels (inner) must be a multiple of parallel.tp")
    _need(ml is None or ml["heads"] % tp == 0, "model.mlstm's heads must be a multiple of parallel.tp")
    _need(par["heads_per_rank"] * tp == model["num_heads"], "parallel.heads_per_rank * tp != model.num_heads")
    _need(all(n % tp == 0 for n in model["layer_heads"] or ()), "model.layer_heads must be multiples of parallel.tp")
    _need(((model["mla"] or {}).get("local") or {"heads": tp})["heads"] % tp == 0,
          "model.mla.local.heads must be a multiple of parallel.tp")
    _need(par["kv_heads_per_rank"] * tp == model["num_kv_heads"] * par["kv_replication"],
          "parallel.kv_heads_per_rank does not fit model.num_kv_heads")
    _need(ga is None or (_POS_INT(par.get("global_kv_heads_per_rank")) and _POS_INT(par.get("global_kv_replication"))
                         and par["global_kv_heads_per_rank"] * tp == ga["num_kv_heads"] * par["global_kv_replication"]),
          "parallel.global_kv_heads_per_rank and global_kv_replication do not fit model.global_attn")
    _need(par["vocab_per_rank"] * tp == par["vocab_padded"] >= model["vocab_size"],
          "parallel.vocab_per_rank * tp != vocab_padded, or it is smaller than model.vocab_size")
    _need(par["intermediate_per_rank"] >= par["intermediate_chunk"] and
          par["intermediate_chunk"] * tp >= model["intermediate_size"],
          "parallel.intermediate_* does not cover model.intermediate_size")
    shared, sc = model["shared_intermediate_size"], par.get("shared_intermediate_chunk", 0)
    _need(not shared or (experts and _POS_INT(sc) and _POS_INT(par.get("shared_intermediate_per_rank"))
                         and par["shared_intermediate_per_rank"] >= sc and sc * tp >= shared),
          "model.shared_intermediate_size needs experts and parallel.shared_intermediate_* covering it")
    dense, dc, dl = model["dense_intermediate_size"], par.get("dense_intermediate_chunk", 0), model["dense_layers"]
    _need(not (dense or dl) or (experts and dense and dl and dl == sorted(set(dl)) and dl[-1] < model["num_layers"]
                                and len(dl) < model["num_layers"] and _POS_INT(dc)
                                and _POS_INT(par.get("dense_intermediate_per_rank"))
                                and par["dense_intermediate_per_rank"] >= dc and dc * tp >= dense),
          "model.dense_layers needs experts, distinct layer indices in order, a dense_intermediate_size and "
          "parallel.dense_intermediate_* covering it")
    hv = model["head_vocab_size"]
    _need(not hv or (hv < model["vocab_size"] and not model["tied_embeddings"] and model["kind"] == "decoder"
                     and _POS_INT(par.get("head_vocab_per_rank"))
                     and par["head_vocab_per_rank"] * tp == par.get("head_vocab_padded") >= hv),
          "model.head_vocab_size needs fewer rows than the vocab, an untied lm_head and parallel.head_vocab_* "
          "covering it")
    wc = par.get("wide_intermediate_chunk", 0)
    _need(not ws or (_POS_INT(wc) and _POS_INT(par.get("wide_intermediate_per_rank"))
                     and par["wide_intermediate_per_rank"] >= wc and wc * tp >= ws),
          "model.wide_intermediate_size needs parallel.wide_intermediate_* covering it")
    _need(model["num_experts"] % model["router_groups"] == 0 and model["router_topk_groups"] <= model["router_groups"],
          "model.router_groups must divide num_experts, and router_topk_groups must not exceed it")
    _need(m["dtype"] in _FLOATS, f"dtype {str(m['dtype'])[:40]!r} is not a float dtype")
    _source(m["source"])
    _need(isinstance(m.get("extras", []), list) and all(isinstance(e, str) for e in m.get("extras", [])),
          "extras must be a list of tensor names")
    _quantization(m["quantization"])
    ranks = m["ranks"]
    _need(isinstance(ranks, list) and len(ranks) == tp, f"expected {tp} rank entries (parallel.tp)")
    seen: set[str] = set()
    for i, r in enumerate(ranks):
        _need(isinstance(r, dict) and r.get("rank") == i, f"rank entry {i} is malformed")
        files, tensors = r.get("files"), r.get("tensors")
        _need(isinstance(files, list) and isinstance(tensors, dict), f"rank {i}: files/tensors malformed")
        _need(len(files) <= MAX_FILES and len(tensors) <= MAX_TENSORS, f"rank {i}: too many files or tensors")
        names = set()
        for f in files:
            _need(isinstance(f, dict), f"rank {i}: file entry malformed")
            path = check_rel(f.get("path"))
            _need(path not in seen, f"rank {i}: file {path} is listed twice")
            _need(type(f.get("size")) is int and 0 <= f["size"] < 1 << 50, f"rank {i}: {path}: bad size")
            _need(isinstance(f.get("sha256"), str) and _HEX64.fullmatch(f["sha256"]), f"rank {i}: {path}: bad sha256")
            seen.add(path)
            names.add(path)
        for name, t in tensors.items():
            _need(isinstance(t, dict) and isinstance(t.get("file"), str) and t["file"] in names,
                  f"rank {i}: tensor {name} names an unknown file")
            _need(t.get("dtype") in _DTYPES, f"rank {i}: tensor {name} has a bad dtype")
            shape = t.get("shape")
            _need(isinstance(shape, list) and len(shape) <= 4 and
                  all(type(d) is int and 0 <= d < 1 << 31 for d in shape), f"rank {i}: tensor {name} has a bad shape")
    return m


def _compressed(x) -> bool:
    """DeepSeek-V4's model.compressed: its widths, rates and layer lists, each well-formed (the cross-checks with
    the rest of the model are `validate`'s)."""
    keys = {"q_rank", "rope_dim", "o_groups", "o_rank", "rates", "csa_layers", "hca_layers", "index"}
    if not isinstance(x, dict) or set(x) != keys or not all(_POS_INT(x[k]) for k in ("q_rank", "rope_dim", "o_groups",
                                                                                       "o_rank")):
        return False
    rates, ix = x["rates"], x["index"]
    layers = [x["csa_layers"], x["hca_layers"]]
    return (isinstance(rates, dict) and set(rates) <= {"csa", "hca"} and all(type(v) is int and 1 <= v <= 4096
                                                                              for v in rates.values())
            and all(isinstance(ls, list) and all(map(_NAT, ls)) and ls == sorted(set(ls)) for ls in layers)
            and not set(layers[0]) & set(layers[1])
            and bool(layers[0]) == ("csa" in rates) == (ix is not None) and bool(layers[1]) == ("hca" in rates)
            and (ix is None or (isinstance(ix, dict) and set(ix) == {"heads", "dim", "topk"}
                                and all(map(_POS_INT, ix.values())) and ix["dim"] >= x["rope_dim"])))


def block_owners(block_parts, shared_blocks) -> dict[int, int]:
    """Zamba2: each hybrid layer -> the layer that holds its shared block's weights (the first hybrid layer that runs
    it: the j-th hybrid layer runs block j % count)."""
    if not shared_blocks:
        return {}
    hybrid = [i for i, p in enumerate(block_parts or ()) if p == "hybrid"]
    return {i: hybrid[j % shared_blocks["count"]] for j, i in enumerate(hybrid)}


def loop_owners(loop, num_layers: int = 0, shared_layers: bool = False) -> dict[int, int]:
    """Each layer whose weights another holds -> that layer. HRM-Text's virtual layers: run c (c = i //
    stack_layers) is the L stack's unless c % (l_cycles + 1) == l_cycles, the H stack's; the first run of each
    (layers 0.. and l_cycles * stack_layers..) holds them. ALBERT (shared_layers): every layer reads layer 0's."""
    if shared_layers:
        return {i: 0 for i in range(num_layers)}
    if not loop:
        return {}
    P, L = loop["stack_layers"], loop["l_cycles"]
    return {i: (L * P if i // P % (L + 1) == L else 0) + i % P for i in range(P * loop["h_cycles"] * (L + 1))}


def is_global_layer(global_attn, window_layers, linear_layers, i: int) -> bool:
    """Whether layer i takes model.global_attn's widths: an attention layer outside window_layers (Gemma 4)."""
    return (global_attn is not None and window_layers is not None and i not in window_layers
            and i not in (linear_layers or ()))


def source_kv_bytes(model: dict, parallel: dict, itemsize: int) -> int:
    """An encoder-decoder's decoder: the bytes one rank keeps per source token, every layer's cross-attention keys
    and values of it (0 for any other model)."""
    if not model.get("encoder"):
        return 0
    return model["num_layers"] * 2 * parallel["heads_per_rank"] * model["head_dim"] * itemsize


def kv_cache_bytes(model: dict, parallel: dict, itemsize: int) -> tuple[int, int, int]:
    """What one rank's KV cache holds, as the runtime sizes it: (bytes a token in the layers that keep every
    position, bytes a token in the windowed layers, their window). A windowed layer's ring stops growing at its
    window (Llama 4's chunked layers: at their chunk); linear layers keep a fixed-size state instead and count nothing
    here."""
    full = windowed = 0
    linear, ga, mla = set(model["linear_layers"] or ()), model["global_attn"], model["mla"]
    layers, chunks = model["window_layers"], model["chunk_layers"]
    parts = model["block_parts"] or [None] * model["num_layers"]
    src = model.get("kv_source") or range(model["num_layers"])       # Gemma 4 E2B/E4B: some read another's cache
    for i in range(model["num_layers"]):
        if (i in linear and not model["ssm_beside_attention"] and parts[i] != "hybrid") or parts[i] == "mlp" \
                or src[i] != i:
            continue
        windowed_layer = (model["sliding_window"] > 0 and (layers is None or i in layers)) or (
            model["attn_chunk"] > 0 and (chunks is None or i in chunks))
        if model.get("compressed"):       # DeepSeek-V4: one key (= value) row in the window's ring, and each
            cp = model["compressed"]      # compressor's entries (a row per `rate` tokens), counted per token
            windowed += model["head_dim"] * itemsize
            rate = cp["rates"]["csa"] if i in cp["csa_layers"] else cp["rates"].get("hca", 0) \
                if i in cp["hca_layers"] else 0
            if rate:
                width = model["head_dim"] + (cp["index"]["dim"] if i in cp["csa_layers"] else 0)
                full += -(-width * itemsize // rate)
            continue
        if mla:                                   # one latent row a token, on every rank
            lm = latent_at(mla, layers, i)        # (Dots3 Note: the windowed layers' own width)
            n = lm["kv_rank"] + lm["rope_dim"]
            if i in mla.get("index", {}).get("layers", ()):       # and the indexer's key
                n += mla["index"]["dim"]
        elif model.get("block_sparse") and i in model["block_sparse"]["layers"]:   # MiniMax-M3: + the block key
            n = 2 * parallel["kv_heads_per_rank"] * model["head_dim"] + model["block_sparse"]["dim"]
        elif model.get("qsa"):                    # Qwen4-Exp: + the QSA indexer's raw key
            n = 2 * parallel["kv_heads_per_rank"] * model["head_dim"] + model["qsa"]["dim"]
        elif is_global_layer(ga, layers, model["linear_layers"], i):
            n = 2 * parallel["global_kv_heads_per_rank"] * ga["head_dim"]
        else:      # DiffLlama: heads twice as wide in the cache (k zero-padded, v both halves' values)
            n = 2 * parallel["kv_heads_per_rank"] * model["head_dim"] * (2 if model.get("diff_attn") else 1)
            if model.get("dyn_mask"):           # Doge: and each key's bias, one a kv head
                n += parallel["kv_heads_per_rank"]
        if windowed_layer:
            windowed += n * itemsize
        else:
            full += n * itemsize
    return full, windowed, model["sliding_window"] or model["attn_chunk"]


def _position(model: dict):
    pos = model["position"]
    kind = pos.get("type")
    _need(kind in ("rope", "alibi", *TABLE_POSITIONS, "none"),
          "model.position.type must be rope, alibi, learned, sinusoidal or none")
    if kind == "rope":
        rd, ga = pos.get("rotary_dim"), model.get("global_attn")
        head = ga["head_dim"] if isinstance(ga, dict) and _POS_INT(ga.get("head_dim")) else model["head_dim"]
        _need(type(rd) is int and 0 < rd <= head and rd % 2 == 0,
              "model.position.rotary_dim must be an even int no larger than head_dim")
        _need(pos.get("style") in ("neox", "gptj"), "model.position.style must be neox or gptj")
        _need(_POS_NUM(pos.get("theta")) and _POS_NUM(pos.get("attention_scaling", 1.0)),
              "model.position.theta/attention_scaling must be positive numbers")
        local = pos.get("local", {})            # the windowed layers' own RoPE (Gemma 3)
        _need(isinstance(local, dict) and (not local or (_POS_NUM(local.get("theta"))
                                                         and _POS_NUM(local.get("attention_scaling", 1.0)))),
              "model.position.local must hold a positive theta and attention_scaling")
        # Gemma 4: the windowed layers' narrower heads; Laguna: a share of the head of their own
        lrd = local.get("rotary_dim", rd) if isinstance(local, dict) else rd
        mla = model.get("mla")
        lm = mla.get("local") if isinstance(mla, dict) else None     # Dots3 Note: the windowed layers' latent heads
        lhead = lm["nope_dim"] + lm["rope_dim"] if isinstance(lm, dict) and _POS_INT(lm.get("nope_dim")) \
            and _POS_INT(lm.get("rope_dim")) else model["head_dim"]
        _need(type(lrd) is int and 0 < lrd <= lhead and lrd % 2 == 0,
              "model.position.local.rotary_dim must be an even int no larger than head_dim")
        _need("long_from" not in pos or (type(pos["long_from"]) is int and 0 < pos["long_from"] < 1 << 32),
              "model.position.long_from must be a positive int")
        _need(pos.get("reversed", False) in (False, True), "model.position.reversed must be true or false")
    if kind in TABLE_POSITIONS:
        _need(type(pos.get("offset")) is int and 0 <= pos["offset"] < 1 << 16, "model.position.offset is malformed")
        _need("pad_id" not in pos or (type(pos["pad_id"]) is int and pos["pad_id"] + 1 == pos["offset"]
                                      and pos["pad_id"] < model["vocab_size"]),
              "model.position.pad_id must be an int one below model.position.offset")
        _need(pos.get("style", "fairseq") in ("fairseq", "marian") and (kind == "sinusoidal" or "style" not in pos),
              "model.position.style of a sinusoidal table must be fairseq or marian")


def _source(src):
    _need(isinstance(src, dict), "source must be an object")
    _need(all(isinstance(src.get(k), str) for k in ("architecture", "family", "prefix")),
          "source.architecture/family/prefix must be strings")
    _need(src.get("config_sha256") is None or isinstance(src["config_sha256"], str), "source.config_sha256 malformed")
    aliases = src.get("aliases", {})
    _need(isinstance(aliases, dict) and all(isinstance(k, str) and _NAT(v) for k, v in aliases.items()),
          "source.aliases malformed")
    files = src.get("files", {})
    _need(isinstance(files, dict) and all(isinstance(v, str) for v in files.values()), "source.files malformed")
    prints = src.get("fingerprints", {})      # absent from manifests written before fmconvert recorded them
    _need(isinstance(prints, dict) and all(
        isinstance(v, dict) and _NAT_SIZE(v.get("size")) and isinstance(v.get("head_sha256"), str)
        and _HEX64.fullmatch(v["head_sha256"]) for v in prints.values()), "source.fingerprints malformed")
    dropped = src.get("dropped", {"tensors": 0, "bytes": 0, "prefixes": []})   # a vision-language wrapper's towers
    _need(isinstance(dropped, dict) and _NAT(dropped.get("tensors")) and _NAT_SIZE(dropped.get("bytes"))
          and isinstance(dropped.get("prefixes"), list) and all(isinstance(p, str) for p in dropped["prefixes"])
          and dropped.get("what", "vision") in ("vision", "mtp", "copies"),
          "source.dropped malformed")
    mx = src.get("mxfp4", [])
    _need(isinstance(mx, list) and all(isinstance(n, str) for n in mx), "source.mxfp4 malformed")
    f8 = src.get("fp8", {"block": [1, 1], "tensors": 0})
    _need(isinstance(f8, dict) and set(f8) in ({"block", "tensors"}, {"block", "tensors", "fp4_tensors"})
          and isinstance(f8["block"], list) and len(f8["block"]) == 2 and all(map(_POS_INT, f8["block"]))
          and _NAT(f8["tensors"]) and _NAT(f8.get("fp4_tensors", 0)), "source.fp8 malformed")
    i4 = src.get("int4", {"method": "gptq", "tensors": 0})
    _need(isinstance(i4, dict) and set(i4) == {"method", "tensors"} and i4["method"] in ("gptq", "awq")
          and _NAT(i4["tensors"]), "source.int4 malformed")
    _need(isinstance(src.get("flipped", []), list) and all(isinstance(k, str) for k in src.get("flipped", [])),
          "source.flipped malformed")
    side = src.get("sidecar_files", [])
    _need(isinstance(side, list) and all(isinstance(f, str) for f in side), "source.sidecar_files malformed")
    flags = src.get("flags", {})      # the table's flags as this config set them (absent from older manifests)
    _need(isinstance(flags, dict) and len(flags) <= 256 and all(
        isinstance(k, str) and type(v) is bool for k, v in flags.items()), "source.flags malformed")


def _quantization(q):
    if q is None:
        return
    _need(isinstance(q, dict), "quantization must be null or an object")
    g = q.get("group_size")
    _need(type(g) is int and 0 < g < MAX_DIM and g & (g - 1) == 0, "quantization.group_size must be a power of two")
    _need(q.get("scale_dtype") in _FLOATS, "quantization.scale_dtype must be a float dtype")
    _need(type(q.get("embeddings", False)) is bool, "quantization.embeddings must be true or false")
    _need(type(q.get("lm_head", False)) is bool, "quantization.lm_head must be true or false")
    tensors = q.get("tensors")
    _need(isinstance(tensors, dict), "quantization.tensors must be an object")
    for name, t in tensors.items():
        ok = isinstance(t, dict) and type(t.get("group_size")) is int and t["group_size"] > 0
        ok = ok and _FINITE(t.get("rel_rms")) and _FINITE(t.get("max_abs"))
        ok = ok and "sqnr_db" in t and (t["sqnr_db"] is None or _FINITE(t["sqnr_db"]))  # None: exact (infinite)
        _need(ok, f"quantization.tensors.{name} is malformed")


def read(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FmError(f"{out_dir} does not exist or is not a directory")
    path = out_dir / MANIFEST
    if not path.is_file():
        raise FmError(f"{out_dir} has no {MANIFEST}; is it an fmconvert output?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise FmError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FmError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except OSError as e:
        raise FmError(f"{path}: cannot read it ({e.strerror or e})", EXIT_IO) from None
    return validate(m)
