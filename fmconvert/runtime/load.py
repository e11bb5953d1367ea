"""Load one rank of a converted checkpoint: manifest, sha256 of this rank's files, tensors, FusedModel."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import manifest as mf
from ..errors import FmError
from ..kernels import int8_gemv_cpu
from ..policy import (ATTENTION_SLOTS, DENSE_SLOTS, FLOAT32_SLOTS, LINEAR_SLOTS, SHARED_BLOCK_SLOTS, SPARSE_SLOTS,
                      adapter_shapes, adapter_slots, features_shapes, wave_shapes, wave_slots)
from ..read import check_safetensors
from .comm import SingleComm, init_distributed
from .model import FusedModel
from .ops import ExpertWeights, Int8Weight, make_ops

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
       "int64": torch.int64}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):     # Python 3.11+: one reused buffer, the GIL released throughout
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while chunk := f.read(1 << 22):
            h.update(chunk)
        return h.hexdigest()


_ST_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "I64": "int64"}
_INT8_OK = ("qkv.weight", "attn_out.weight", "mlp_in.weight", "mlp_out.weight", "embed.weight", "lm_head.weight",
            "ple_embed.weight", "ngram_embed.weight",
            "experts_in.weight", "experts_out.weight", "shared_in.weight", "shared_out.weight",
            "q_a.weight", "q_b.weight", "kv_a.weight", "kv_b.weight", "attn_out_a.weight", "lin_in.weight",
            "lin_out.weight",
            "lin_qkv.weight", "lin_gate.weight",
            "ssm_in.weight", "ssm_out.weight", "sconv_in.weight", "sconv_out.weight", "mamba_in.weight",
            "mamba_out.weight", "rg_in.weight", "rg_out.weight", "moa_q.weight", "moa_kv.weight", "moa_out.weight",
            "mlstm_in.weight", "mlstm_out.weight", "cross_q.weight", "cross_kv.weight", "cross_out.weight",
            "macaron_in.weight", "macaron_out.weight", "conv_in.weight", "conv_out.weight")
_EXPERTS = ("experts_in.weight", "experts_out.weight")
_MOA_EXPERTS = ("moa_q.weight", "moa_out.weight")      # JetMoe's attention experts, split per expert too
ROPE_TENSORS = ("rope.inv_freq", "rope_local.inv_freq", "rope_long.inv_freq")   # derived, kept float32
_ROW_BIAS = ("attn_out.bias", "mlp_out.bias", "experts_out.bias", "ssm_out.bias", "sconv_out.bias", "mamba_out.bias",
             "rg_out.bias", "moa_out.bias", "experts_shared.bias", "cross_out.bias", "macaron_out.bias")


def check_layout(m: dict, rank: int):
    """The tensors this rank's manifest lists against the model spec and layout: every one the runtime needs is
    there, and each has the shape (and, for int8, the scales) those imply. Headers are checked against the manifest
    separately, so a lie anywhere is caught before a byte of tensor data is read."""
    sp, par = m["model"], m["parallel"]
    h, hd, e, pos = sp["hidden_size"], sp["head_dim"], sp["embed_dim"], sp["position"]
    hpr, ipr, vpr = par["heads_per_rank"], par["intermediate_per_rank"], par["vocab_per_rank"]
    dpr = par.get("dense_intermediate_per_rank") or ipr      # a mixture's dense layers have their own width
    glu = 2 if sp["gated_mlp"] else 1               # gate; up in the MLP, each expert and the shared expert
    mlp = dpr * glu
    hvpr = par.get("head_vocab_per_rank") or vpr      # Apertus 1.5: an lm_head pruned to the text tokens
    pe = e if sp["embed_proj"] else h               # ELECTRA: its positions, types and their norm are embed_dim wide
    glob = {"embed.weight": (vpr, e), "lm_head.weight": (hvpr, e), "lm_head.bias": (hvpr,),
            "type_embed.weight": (sp["type_vocab_size"], pe), "embed_proj.weight": (h, e), "embed_proj.bias": (h,),
            "rel_bias.weight": (hpr, (sp["rel_bias"] or {}).get("buckets", 0)),
            "rel_embed.weight": (2 * (sp["disentangled"] or {}).get("span", 0), h),
            "text_proj.weight": (sp["proj_dim"], h),
            **{f"rel_embed_norm.{p}": (h,) for p in ("weight", "bias")},
            "pos_embed.weight": (sp["max_positions"] + pos.get("offset", 0), pe), "project_in.weight": (h, e),
            "project_out.weight": (e, h), "pooler.weight": (h, h), "pooler.bias": (h,),
            **{n: (pos.get("rotary_dim", 0) // 2,) for n in ROPE_TENSORS},
            "rope_local.inv_freq": (pos.get("local", pos).get("rotary_dim", pos.get("rotary_dim", 0)) // 2,),
            "alibi.slopes": (hpr,),
            **{f"{n}.{p}": (h,) for n in ("final_norm", "head_norm") for p in ("weight", "bias")},
            **{f"embed_norm.{p}": (pe,) for p in ("weight", "bias")},
            "head_dense.weight": (h, h), "head_dense.bias": (h,), "loop_init": (h,),
            "audio_conv1.weight": (h, sp["audio_mels"], 3), "audio_conv1.bias": (h,),
            "audio_conv2.weight": (h, h, 3), "audio_conv2.bias": (h,), **wave_shapes(sp.get("wave"), h),
            **features_shapes(sp.get("features"), h),
            **adapter_shapes(sp.get("adapter"), h, sp["intermediate_size"]),
            "conformer_rope.inv_freq": (hd // 2,)}
    au = sp.get("altup")                 # Gemma 3n: AltUp's projections of the copies, replicated
    if au:
        glob.update({"altup_proj.weight": ((au["streams"] - 1) * h, h),
                     "altup_unembed.weight": ((au["streams"] - 1) * h, h)})
    P = sp["per_layer_input"]          # Gemma 4 E2B/E4B: the per-layer embeddings (vocab-parallel), the rest whole
    if P:
        glob.update({"ple_embed.weight": (vpr, sp["num_layers"] * P), "ple_proj.weight": (sp["num_layers"] * P, h),
                     "ple_proj_norm.weight": (P,)})
    E = sp["num_experts"]
    R = E + sp["zero_experts"]          # the router's outputs: LongCat-Flash also scores identity experts
    hc = sp.get("hyper")
    n = hc["streams"] if hc else 0      # HY-V4's hyper-connections: replicated weights over every copy
    glob.update({"hc_head.fn": (n, n * h), "hc_head.base": (n,), "hc_head.scale": (1,)})
    # the slots of the families below (each only where the spec has it), beside the layer table's
    extra = {f"{half}.{k}": v for half in ("attn_hc", "mlp_hc", "hc_head")      # Qwen4-Exp's gated mixes
             for k, v in (("norm", (n * h,)), ("down", (hc["rank"], n * h)), ("up", (n * h, hc["rank"])),
                          ("inject", (n, n * h)))} if hc and "rank" in hc else {}
    glob.update({k: v for k, v in extra.items() if k.startswith("hc_head.") and not k.endswith(".inject")})
    moa = sp.get("moa")             # JetMoe's attention experts: this rank's kv heads of each
    if moa:
        Ea, w = moa["experts"], par["kv_heads_per_rank"] * sp["head_dim"]
        extra.update({"moa_router.weight": (Ea, h), "moa_q.weight": (Ea * w, h), "moa_kv.weight": (2 * w, h),
                      "moa_out.weight": (Ea * h, w)})
    extra.update({"moa_out.bias": (h,), "experts_shared.bias": (h,), "diff_lambda": (4 * sp["head_dim"],),
                  "attn_rel_bias.weight": (hpr, (sp["rel_bias"] or {}).get("buckets", 0))})   # UMT5: one per layer
    KV = sp["num_kv_heads"]     # Doge: dt_proj's columns of this rank's value channels, A and the residuals whole
    extra.update({"dmask_dt.weight": (KV, KV * sp["head_dim"] // par["tp"]), "dmask_dt.bias": (KV,), "dmask_a": (KV,),
                  "attn_residual": (h,), "mlp_residual": (h,)})
    sb = sp.get("shared_blocks")    # Zamba2: the shared block's norm and each layer's adapters and projection
    if sb:
        r, w = sb["rank"], sp["attn_input"]
        extra.update({"mem_norm.weight": (w,), "qkv_lora_down.weight": (3 * r, w),
                      "qkv.lora_up": ((hpr + 2 * par["kv_heads_per_rank"]) * sp["head_dim"], 3 * r),
                      "mlp_lora_down.weight": (r, h), "mlp_in.lora_up": (2 * ipr if sp["gated_mlp"] else ipr, r),
                      "mem_proj.weight": (h, h)})
    qs, ng = sp.get("qsa"), sp.get("ngram")     # Qwen4-Exp's QSA indexer and n-gram layers, replicated but for
    if qs:                                      # the tables' width
        extra.update({"qsa_qk.weight": ((qs["heads"] + 1) * qs["dim"], h), "qsa_q_norm.weight": (qs["dim"],),
                      "qsa_k_norm.weight": (qs["dim"],)})
    if ng:
        extra.update({"ngram_key.weight": (n * h, ng["dim"]), "ngram_value.weight": (h, ng["dim"]),
                      **{f"ngram_{k}_norm.weight": (n * h,) for k in ("key", "query", "conv")},
                      "ngram_conv.weight": (n * h, ng["conv_kernel"])})
    r = sp.get("norm_gate_rank", 0)     # A.X K2's gated norms, replicated
    bsp = sp.get("block_sparse") or {"heads": 0, "dim": 0}     # MiniMax-M3's block indexer, replicated

    def attention(d: int, kvpr: int, hpr: int = hpr) -> dict:
        """This rank's attention slots for hpr q heads d wide and kvpr kv heads (Gemma 4's global layers: their own;
        Laguna: each layer its own q heads)."""
        gate = hpr * (1 if sp["attn_gate_heads"] else d) if sp["attn_gate"] else 0   # LFM3: a gate row a head
        vd = sp["v_head_dim"] or d                     # MiMo-V2-Flash: narrower v heads
        qkv = (hpr + kvpr) * d + kvpr * vd + gate
        q_norm, k_norm = {"head": ((d,), (d,)), "per_head": ((hpr, d), (kvpr, d)),
                          "full": ((hpr * d,), (kvpr * d,)), "l2": ((d,), (d,))}[sp["qk_norm"]]
        return {"qkv.weight": (qkv, sp.get("attn_input") or h), "qkv.bias": (qkv,), "q_norm.weight": q_norm,
                "k_norm.weight": k_norm,
                "q_norm.bias": (d,), "k_norm.bias": (d,), "attn_out.weight": (h, hpr * vd),
                "attn_sub_norm.weight": (hpr * vd,), "attn_sinks.weight": (hpr,), "attn_gate.bias": (hpr,),
                "rel_gate.weight": (8, d), "rel_gate.bias": (8,), "rel_gate.const": (hpr,)}

    layer = {**attention(hd, par["kv_heads_per_rank"]),
             "router.weight": (R, h), "experts_in.weight": (E * glu * ipr, h), "experts_out.weight": (E * h, ipr),
             "router.bias": (R,), "experts_in.bias": (E * glu * ipr,), "experts_out.bias": (E * h,),
             "shared_in.weight": (glu * par.get("shared_intermediate_per_rank", 0), h), "shared_gate.weight": (1, h),
             "shared_out.weight": (h, par.get("shared_intermediate_per_rank", 0)),
             "attn_out.bias": (h,),
             "mlp_in.weight": (mlp, h), "mlp_in.bias": (mlp,), "mlp_out.weight": (h, dpr), "mlp_out.bias": (h,),
             "mlp_sub_norm.weight": (dpr,),
             "router.correction_bias": (R,),
             "act.alpha_p": (1,), "act.alpha_n": (1,), "act.beta": (), "act.eps": (),
             **{f"{n}.{p}": (h,) for n in ("attn_norm", "mlp_norm") for p in ("weight", "bias")},
             "attn_post_norm.weight": (h,), "mlp_post_norm.weight": (h,), "moe_post_norm.weight": (h,),
             "layer_scale.weight": (1,), "router.scale": (h,), "router.expert_factor": (E,),
             "experts_norm.weight": (h,), "experts_post_norm.weight": (h,), "shared_post_norm.weight": (h,),
             "ple_gate.weight": (P, h), "ple_out.weight": (h, P), "ple_post_norm.weight": (h,),
             **{f"{half}.{k}": v for half in ("attn_hc", "mlp_hc")
                for k, v in ((("fn", ((2 + n) * n, n * h)), ("base", ((2 + n) * n,)), ("scale", (3,)))
                             if hc and hc.get("sinkhorn") else
                             (("fn", (2 * n, n * h)), ("base", (2 * n,)), ("scale", (2,))))},
             "router.token_experts": (sp["vocab_size"], sp["experts_per_token"]),
             **({"altup_router.weight": (au["streams"], h), "altup_router_norm.weight": (h,),
                 "altup_predict.weight": (au["streams"] ** 2, au["streams"]),
                 "altup_correct.weight": (au["streams"], au["streams"]), "altup_out_scale.weight": (h,),
                 "laurel_left.weight": (au["laurel_rank"], h), "laurel_right.weight": (h, au["laurel_rank"]),
                 "laurel_norm.weight": (h,)} if au else {}),
             **{f"{g}_norm_gate_{d}.weight": s for g in ("attn", "moe") for d, s in (("down", (r, h)), ("up", (h, r)))},
             "block_index_q.weight": (bsp["heads"] * bsp["dim"], h), "block_index_k.weight": (bsp["dim"], h),
             "block_index_q_norm.weight": (bsp["dim"],), "block_index_k_norm.weight": (bsp["dim"],),
             **{k: v for k, v in extra.items() if not k.startswith("hc_head.")},
             # an encoder-decoder's cross-attention over this rank's heads (T5)
             **{f"cross_norm.{p}": (h,) for p in ("weight", "bias")}, "cross_q.weight": (hpr * hd, h),
             "cross_q.bias": (hpr * hd,), "cross_kv.weight": (2 * hpr * hd, h), "cross_kv.bias": (2 * hpr * hd,),
             "cross_out.weight": (h, hpr * hd), "cross_out.bias": (h,)}
    cf = sp.get("conformer")
    if cf:              # Wav2Vec2-Conformer: the first feed-forward like the MLP; the conv module's channels and
        c = hpr * hd    # relative attention's heads this rank's
        layer.update({"macaron_in.weight": (ipr, h), "macaron_in.bias": (ipr,), "macaron_out.weight": (h, ipr),
                      "macaron_out.bias": (h,), "conv_in.weight": (2 * c, h),
                      "conv_dw.weight": (c, cf["depthwise_kernel"]),
                      **{f"conv_bn.{n}": (c,) for n in ("weight", "bias", "mean", "var")}, "conv_bn.count": (),
                      "conv_out.weight": (h, c), "conv_dw_norm.weight": (c,), "conv_dw_norm.bias": (c,),
                      "rel_dist.weight": (cf.get("max_left", 0) + cf.get("max_right", 0) + 1, hd),
                      "rel_pos.weight": (c, h), "rel_pos.u": (hpr, hd),
                      "rel_pos.v": (hpr, hd),
                      **{f"{n}.{p}": (h,) for n in ("macaron_norm", "conv_norm", "block_norm")
                         for p in ("weight", "bias")}})
    mla = sp["mla"]

    def latent(a: dict, hpr: int) -> dict:
        """This rank's latent attention slots for widths a and hpr heads: the latent's projections replicated,
        q_b and kv_b this rank's heads."""
        qr, kr, rd, d = a["q_rank"], a["kv_rank"], a["rope_dim"], a["nope_dim"] + a["rope_dim"]
        return {"q_a.weight": (qr, h), "q_a.bias": (qr,), "q_a_norm.weight": (qr,),
                "q_b.weight": (hpr * (d + a["v_dim"]), 2 * qr) if a.get("gated_q") else (hpr * d, qr or h),
                "kv_a.weight": (kr + rd, h), "kv_a.bias": (kr + rd,), "kv_a_norm.weight": (kr,),
                "kv_a_rope_norm.weight": (rd,), "kv_b.weight": (hpr * (a["nope_dim"] + a["v_dim"]), kr),
                "attn_out.weight": (h, hpr * a["v_dim"]),
                "attn_gate.weight": (hpr * (1 if sp["attn_gate_heads"] else a["v_dim"]), h)}
    if mla:
        qr = mla["q_rank"]
        layer.update(latent(mla, hpr))
        ix = mla.get("index")
        if ix:          # the sparse attention indexer, replicated: every rank picks the same keys
            layer.update({"index_q.weight": (ix["heads"] * ix["dim"], qr), "index_k.weight": (ix["dim"], h),
                          "index_k_norm.weight": (ix["dim"],), "index_k_norm.bias": (ix["dim"],),
                          "index_w.weight": (ix["heads"], h)})
    cp = sp.get("compressed")
    if cp:              # DeepSeek-V4: q_b, the sinks and the output groups this rank's; the rest replicated
        G = cp["o_groups"] // par["tp"]
        layer.update({"q_a.weight": (cp["q_rank"], h), "q_a_norm.weight": (cp["q_rank"],),
                      "q_b.weight": (hpr * hd, cp["q_rank"]), "kv_a.weight": (hd, h), "kv_a_norm.weight": (hd,),
                      "attn_out_a.weight": (G * cp["o_rank"], sp["num_heads"] * hd // cp["o_groups"]),
                      "attn_out.weight": (h, G * cp["o_rank"]), "comp_norm.weight": (hd,)})
        if cp["index"]:
            Hi, Di = cp["index"]["heads"], cp["index"]["dim"]
            layer.update({"index_q.weight": (Hi * Di, cp["q_rank"]), "index_w.weight": (Hi, h),
                          "index_kv.weight": (2 * Di, h), "index_gate.weight": (2 * Di, h),
                          "index_norm.weight": (Di,)})
    la, tp = sp["linear_attn"], par["tp"]
    if sp["lightning"]:  # MiniMax: this rank's heads of q|k|v (interleaved per head), of the gate and the norm
        w = par["heads_per_rank"] * sp["head_dim"]
        layer.update({"lin_qkv.weight": (3 * w, h), "lin_gate.weight": (w, h), "lin_out_norm.weight": (w,),
                      "lin_out.weight": (h, w)})
    if la:              # Gated DeltaNet: this rank's heads of q|k|v|z|b|a, of the conv's channels, of the decay
        Kd, Vd, Hv = la["k_heads"] * la["k_dim"] // tp, la["v_heads"] * la["v_dim"] // tp, la["v_heads"] // tp
        layer.update({"lin_in.weight": (2 * Kd + 2 * Vd + 2 * Hv, h),
                      "lin_conv.weight": (2 * Kd + Vd, la["conv_kernel"]),
                      "lin_conv.bias": (2 * Kd + Vd,), "lin_decay.a_log": (Hv,), "lin_decay.dt_bias": (Hv,),
                      "lin_norm.weight": (la["v_dim"],), "lin_out.weight": (h, Vd)})
        if la.get("decay") == "channel":    # KDA: q|k|v|b and the whole low-rank f_a|g_a; a step bias per channel
            dk, dv = la["k_dim"], la["v_dim"]
            fw, gw = (Kd, Vd) if la.get("gates") == "full" else (dk, dv)   # Ling 2.5: this rank's f and g rows
            layer.update({"lin_in.weight": (2 * Kd + Vd + Hv + fw + gw, h), "lin_f_b.weight": (Kd, dk),
                          "lin_g_b.weight": (Vd, dv), "lin_decay.dt_bias": (Kd,)})
    ssm = sp["ssm"]
    if ssm:             # Mamba2: this rank's heads of z|x|dt, B and C whole groups (or the one, replicated)
        I, H = ssm["heads"] * ssm["head_dim"] // tp, ssm["heads"] // tp
        BC = ssm["state"] * (ssm["groups"] // tp if ssm["groups"] % tp == 0 else ssm["groups"])
        layer.update({"ssm_in.weight": (2 * I + 2 * BC + H, h), "ssm_in.bias": (2 * I + 2 * BC + H,),
                      "ssm_conv.weight": (I + 2 * BC, ssm["conv_kernel"]), "ssm_conv.bias": (I + 2 * BC,),
                      "ssm.a_log": (H,), "ssm.dt_bias": (H,), "ssm.d": (H,), "ssm_norm.weight": (I,),
                      "ssm_out.weight": (h, I), "ssm_out.bias": (h,)})
    sc = sp["short_conv"]
    if sc:              # LFM2: this rank's channels of B, C and x
        hc = h // tp
        layer.update({"sconv_in.weight": (3 * hc, h), "sconv_in.bias": (3 * hc,),
                      "sconv_conv.weight": (hc, sc["conv_kernel"]), "sconv_conv.bias": (hc,),
                      "sconv_out.weight": (h, hc), "sconv_out.bias": (h,)})
    rg = sp.get("rglru")
    if rg:              # RecurrentGemma: this rank's channels of y|x and of the conv, its heads' gates
        W, Hr, bw = rg["width"] // tp, rg["heads"] // tp, rg["width"] // rg["heads"]
        layer.update({"rg_in.weight": (2 * W, h), "rg_in.bias": (2 * W,), "rg_conv.weight": (W, rg["conv_kernel"]),
                      "rg_conv.bias": (W,), "rg_gate_x.weight": (Hr, bw, bw), "rg_gate_x.bias": (Hr, bw),
                      "rg_gate_a.weight": (Hr, bw, bw), "rg_gate_a.bias": (Hr, bw), "rg_a": (W,),
                      "rg_out.weight": (h, W), "rg_out.bias": (h,)})
    ml = sp.get("mlstm")
    if ml:              # xLSTM: this rank's heads of q|k|v|o, of the gates and of the norm
        Q, V, Hm = ml["qk_dim"] // tp, ml["v_dim"] // tp, ml["heads"] // tp
        layer.update({"mlstm_in.weight": (2 * Q + 2 * V, h), "mlstm_in.bias": (2 * Q + 2 * V,),
                      "mlstm_gates.weight": (2 * Hm, h), "mlstm_gates.bias": (2 * Hm,), "mlstm_norm.weight": (V,),
                      "mlstm_norm.bias": (V,), "mlstm_out.weight": (h, V), "mlstm_out.bias": (h,)})
    mb = sp["mamba"]
    if mb:              # Mamba 1: this rank's channels of x|z, of the conv, dt_proj, A and D; x_proj's columns
        D, N, R = mb["inner"] // tp, mb["state"], mb["dt_rank"]
        layer.update({"mamba_in.weight": (2 * D, h), "mamba_in.bias": (2 * D,),
                      "mamba_conv.weight": (D, mb["conv_kernel"]), "mamba_conv.bias": (D,),
                      "mamba_x.weight": (R + 2 * N, D), "mamba_dt_norm.weight": (R,), "mamba_b_norm.weight": (N,),
                      "mamba_c_norm.weight": (N,), "mamba_dt.weight": (D, R), "mamba_dt.bias": (D,),
                      "mamba.a_log": (D, N), "mamba.d": (D,), "mamba_out.weight": (h, D), "mamba_out.bias": (h,)})
    cca, rd = sp.get("cca"), sp.get("router_dim", 0)
    if cca:             # ZAYA: the convs over this rank's q and kv heads' channels, the key scales of its kv heads
        C, kvpr = (hpr + par["kv_heads_per_rank"]) * hd, par["kv_heads_per_rank"]
        layer.update({"cca_conv0.weight": (C, cca["depthwise"]), "cca_conv0.bias": (C,),
                      "cca_conv1.weight": (C, hd, cca["grouped"]), "cca_conv1.bias": (C,), "cca_temp": (kvpr,),
                      **{f"{half}.{k}": (h,) for half in ("attn_res", "mlp_res")
                         for k in ("out_gain", "out_shift", "gain", "shift")}})
        glob.update({"input_gain": (h,), "input_shift": (h,)})
    if rd:              # and its router, replicated: the last of its E + 1 classes the skip expert
        layer.update({"router_in.weight": (rd, h), "router_in.bias": (rd,), "router_eda": (rd,),
                      "router_norm.weight": (rd,), "router_fc1.weight": (rd, rd), "router_fc1.bias": (rd,),
                      "router_fc2.weight": (rd, rd), "router_fc2.bias": (rd,), "router.weight": (E + 1, rd),
                      "router.balance": (E + 1,)})
    ga = sp["global_attn"]
    wide = {**layer, **attention(ga["head_dim"], par["global_kv_heads_per_rank"])} if ga else layer
    src = sp["kv_source"] or range(sp["num_layers"])      # Gemma 4 E2B/E4B: q only where a layer reads another's
    wide_mlp = set(sp["wide_mlp_layers"] or ())           # cache; some layers' MLP wider
    wpr = par.get("wide_intermediate_per_rank", 0)

    def shapes(i: int) -> dict:
        glob_layer = mf.is_global_layer(ga, sp["window_layers"], sp["linear_layers"], i)
        out = wide if glob_layer else layer
        if src[i] != i:
            out = {**out, **attention(ga["head_dim"] if glob_layer else hd, 0)}
        if i in wide_mlp:
            out = {**out, "mlp_in.weight": (wpr * glu, h), "mlp_out.weight": (h, wpr), "mlp_sub_norm.weight": (wpr,)}
        if sp["layer_heads"] and sp["layer_heads"][i] != sp["num_heads"]:
            out = {**out, **attention(hd, par["kv_heads_per_rank"], sp["layer_heads"][i] // tp)}
        lm = mf.latent_at(mla, sp["window_layers"], i)
        if lm is not mla:                       # Dots3 Note: a windowed layer's own latent heads and widths
            out = {**out, **latent(lm, lm["heads"] // tp)}
        if ng and i in ng["layers"]:           # Qwen4-Exp: this layer's n-gram table, a slice of every row
            heads = (ng["size"] - 1) * ng["heads"]
            out = {**out, "ngram_embed.weight": (ng["tables"][str(i)]["rows"], ng["dim"] // heads // tp)}
        if cp and (i in cp["csa_layers"] or i in cp["hca_layers"]):    # DeepSeek-V4's compressors, by kind
            two, rate = (2, cp["rates"]["csa"]) if i in cp["csa_layers"] else (1, cp["rates"]["hca"])
            out = {**out, "comp_kv.weight": (two * hd, h), "comp_gate.weight": (two * hd, h),
                   "comp_bias": (rate, two * hd),
                   **({"index_bias": (rate, 2 * cp["index"]["dim"])} if two == 2 else {})}
        return out
    layer_shapes = [shapes(i) for i in range(sp["num_layers"])]      # once per layer, not once per tensor
    tensors = m["ranks"][rank]["tensors"]
    wave = sp.get("wave")
    front = {f"audio_conv{j}.{p}" for j in (1, 2) for p in ("weight", "bias")} if sp["audio_mels"] else \
        set(wave_slots(wave)) - ({"pos_conv.g", "pos_conv.v", "pos_conv.bias"} if wave.get("pos_conv") is False
                                 else set()) if wave else \
        set(features_shapes(sp["features"], h)) | set(adapter_slots(sp.get("adapter"), h)) \
        if sp.get("features") else \
        {"embed.weight"} if not sp["embed_from"] else set()       # Whisper's, Wav2Vec2's convs in place of a table
    need = front | {s for s in sp["slots"] if not s.startswith("layers.")}
    need |= {s for s, on in [("lm_head.weight", sp["kind"] == "decoder" and not sp["tied_embeddings"]
                              and not sp["headless"]),
                             ("final_norm.weight", sp["final_norm"] and sp["norm_affine"]),
                             ("embed_norm.weight", sp["embed_norm"] and sp["norm_affine"]),
                             ("project_in.weight", sp["project"]), ("project_out.weight", sp["project"]),
                             ("embed_proj.weight", sp["embed_proj"]), ("embed_proj.bias", sp["embed_proj"]),
                             ("rel_bias.weight", sp["rel_bias"] is not None
                              and not sp["rel_bias"].get("per_layer")),
                             ("rel_embed.weight", sp["disentangled"] is not None),
                             ("pooler.weight", sp["pooler"]), ("pos_embed.weight", pos["type"] in mf.TABLE_POSITIONS),
                             ("head_dense.weight", sp["head_activation"] is not None),
                             ("head_norm.weight", sp["head_activation"] is not None),
                             ("rope.inv_freq", pos["type"] == "rope"), ("rope_local.inv_freq", "local" in pos),
                             ("rope_long.inv_freq", "long_from" in pos),
                             ("alibi.slopes", pos["type"] == "alibi")] if on}
    per_layer = {"attn_out.weight"} | ({"q_b.weight", "kv_a.weight", "kv_a_norm.weight", "kv_b.weight"} if mla
                                       else set() if sp.get("compressed") else {"qkv.weight"})
    if sp.get("moa"):           # JetMoe: attention experts in place of qkv and attn_out
        per_layer = {"moa_router.weight", "moa_q.weight", "moa_kv.weight", "moa_out.weight"}
    if mla and mla["q_rank"]:
        per_layer |= {"q_a.weight", "q_a_norm.weight"}
    if (sp["rel_bias"] or {}).get("per_layer"):
        per_layer |= {"attn_rel_bias.weight"}
    if sp.get("encoder"):
        per_layer |= {"cross_q.weight", "cross_kv.weight", "cross_out.weight"}
    index = set()                                   # the indexer's slots, in the layers that run one
    if mla and mla.get("index"):
        index = {"index_q.weight", "index_k.weight", "index_k_norm.weight", "index_k_norm.bias", "index_w.weight"}
        per_layer |= index
    index_layers = set(mla["index"]["layers"]) if index else set()
    compressed = set()                              # DeepSeek-V4: the compressors' slots, in their layers
    if cp:
        compressed = {"comp_kv.weight", "comp_gate.weight", "comp_bias", "comp_norm.weight"}
        per_layer |= {"q_a.weight", "q_a_norm.weight", "q_b.weight", "kv_a.weight", "kv_a_norm.weight",
                      "attn_out_a.weight"}
        index = {"index_q.weight", "index_w.weight", "index_kv.weight", "index_gate.weight", "index_bias",
                 "index_norm.weight"} if cp["index"] else set()
        index_layers = set(cp["csa_layers"])
    hashed = set(sp.get("hash_layers") or ())       # DeepSeek-V4: by token id (a table), not by a biased score
    if sp.get("block_sparse"):                      # MiniMax-M3's block indexer, in its sparse layers
        index = {"block_index_q.weight", "block_index_k.weight", "block_index_q_norm.weight",
                 "block_index_k_norm.weight"}
        per_layer |= index
        index_layers = set(sp["block_sparse"]["layers"])
    per_layer |= {"router.weight", *_EXPERTS} if E else {"mlp_in.weight", "mlp_out.weight"}
    dense_layers = set(sp["dense_layers"] or ())
    if dense_layers:                                # a mixture's dense layers (GLM-4.5's first)
        per_layer |= {"mlp_in.weight", "mlp_out.weight"}
    if not sp["slots"] or "layers.attn_norm.weight" in sp["slots"]:    # OLMo 2 norms only each half's output
        per_layer.add("attn_norm.weight")
        if sp["residual"] != "parallel":            # GPT-J and Phi feed the MLP from the attention's norm
            per_layer.add("mlp_norm.weight")
    per_layer |= {s[len("layers."):] for s in sp["slots"] if s.startswith("layers.")}
    # HRM-Text: only the first run of each block holds weights; the other virtual layers borrow them
    looped = mf.loop_owners(sp.get("loop"), sp["num_layers"], sp["shared_layers"])   # (ALBERT: every layer 0's)
    borrowed = {i for i, o in looped.items() if o != i}
    if (sp["num_layers"] - len(borrowed)) * len(per_layer) > 2 * len(tensors) * (1 + 2 * bool(sp["block_parts"])) \
            + sp["num_layers"] * len(_ROW_BIAS):                                                     # before naming
        raise FmError(f"manifest: rank {rank} lists {len(tensors)} tensors, too few for {sp['num_layers']} layers")
    # In a mixture, dense layers have the dense MLP's slots and the others the mixture's
    sparse_only = {s for s in per_layer if s.startswith(SPARSE_SLOTS)}
    dense_only = {s for s in per_layer if s.startswith(DENSE_SLOTS)} if E else set()
    # and in a hybrid, linear-attention layers the lin_ slots, the others attention's
    linear_layers = set(sp["linear_layers"] or ())
    if linear_layers and la:
        per_layer |= {"lin_in.weight", "lin_conv.weight", "lin_decay.a_log", "lin_decay.dt_bias", "lin_norm.weight",
                      "lin_out.weight"} | ({"lin_f_b.weight", "lin_g_b.weight"}
                                           if la.get("decay") and la.get("gates") != "full" else set())
    if linear_layers and sp["lightning"]:
        per_layer |= {"lin_qkv.weight", "lin_gate.weight", "lin_out_norm.weight", "lin_out.weight"}
    if linear_layers and sc:
        per_layer |= {"sconv_in.weight", "sconv_conv.weight", "sconv_out.weight"}
    if linear_layers and ssm:
        per_layer |= {"ssm_in.weight", "ssm_conv.weight", "ssm.a_log", "ssm.dt_bias", "ssm.d", "ssm_out.weight"}
        if ssm.get("gate") != "none":       # Falcon-H1 may gate the output without a norm
            per_layer.add("ssm_norm.weight")
    if linear_layers and sp.get("mlstm"):
        per_layer |= {"mlstm_in.weight", "mlstm_gates.weight", "mlstm_gates.bias", "mlstm_norm.weight",
                      "mlstm_out.weight"}
    if linear_layers and rg:
        per_layer |= {"rg_in.weight", "rg_conv.weight", "rg_gate_x.weight", "rg_gate_a.weight", "rg_a",
                      "rg_out.weight"}
    if linear_layers and mb:
        per_layer |= {"mamba_in.weight", "mamba_conv.weight", "mamba_x.weight", "mamba_dt.weight", "mamba_dt.bias",
                      "mamba.a_log", "mamba.d", "mamba_out.weight"}
        if mb["norms"] == "weighted":
            per_layer |= {"mamba_dt_norm.weight", "mamba_b_norm.weight", "mamba_c_norm.weight"}
    linear_only = {s for s in per_layer if s.startswith(LINEAR_SLOTS)}
    ngram_layers = set((sp.get("ngram") or {}).get("layers", ()))      # Qwen4-Exp's n-gram layers
    attention_only = {s for s in per_layer if s.startswith(ATTENTION_SLOTS)}
    # and where a layer holds one half only (Nemotron-H), the other half's slots and norm are not there
    parts = sp["block_parts"] or [None] * sp["num_layers"]
    mixer = attention_only | linear_only | {"attn_norm.weight"}
    # Zamba2: a shared block's weights are held by its first hybrid layer only
    shared_only = {s for s in per_layer if s.startswith(SHARED_BLOCK_SLOTS)}
    owners = set(mf.block_owners(sp["block_parts"], sp.get("shared_blocks")).values())
    mlp = sparse_only | {s for s in per_layer if s.startswith(DENSE_SLOTS)} | {"mlp_norm.weight"}
    need |= {f"layers.{i}.{s}" for i in range(sp["num_layers"])
             for s in (per_layer - sparse_only if i in dense_layers else per_layer - dense_only)
             - (linear_only if i not in linear_layers else set() if sp["ssm_beside_attention"] or parts[i] == "hybrid"
                else attention_only)
             - (shared_only if parts[i] == "hybrid" and i not in owners else set())
             - (per_layer if i in borrowed else set())
             - {"mixer": mlp, "mlp": mixer}.get(parts[i], set())
             - ({"attn_norm.weight", "attn_norm.bias"} if i == 0 and not sp["first_attn_norm"] else set())
             - ({"k_norm.weight"} if src[i] != i else set())
             - (index if i not in index_layers else set())
             - ({s for s in per_layer if s.startswith("ngram_")} if i not in ngram_layers else set())
             - (compressed if cp and i not in cp["csa_layers"] + cp["hca_layers"] else set())
             - ({"router.correction_bias"} if i in hashed else {"router.token_experts"})
             - ({"router_eda"} if i == 0 else set())          # ZAYA: the first router has no state to scale
             - ({"attn_sinks.weight"} if sp["sink_layers"] is not None and i not in sp["sink_layers"] else set())
             - (({"attn_post_norm.weight", "mlp_post_norm.weight"} if i in linear_layers else
                 {"attn_norm.weight", "mlp_norm.weight"}) if sp["linear_pre_norm"] else set())
             if not (rank > 0 and s in _ROW_BIAS)}
    missing = sorted(need - set(tensors))
    if missing:
        raise FmError(f"manifest: rank {rank} has no tensor {missing[0]}, which the model needs")
    # the classifier's steps: each reads what the one before it gave (the first, Wav2Vec2-BERT's adapter's width)
    width = (sp.get("adapter") or {}).get("width", h)
    for n, s in enumerate((sp["classifier"] or {}).get("steps", [])):
        w, b = tensors.get(f"extra.{s['name']}.weight"), tensors.get(f"extra.{s['name']}.bias")
        fits = w is not None and (w["shape"] == [width] if s["op"] == "norm" else
                                  len(w["shape"]) == 2 and w["shape"][1] == width)
        if not fits or (b is not None) != s["bias"] or (b is not None and b["shape"] != w["shape"][:1]):
            raise FmError(f"manifest: rank {rank}: the classifier's {s['name']} ({s['op']}, bias {s['bias']}) is "
                          f"missing or does not fit a {width}-wide input")
        width = w["shape"][0]
        if n == 0 and sp["classifier"].get("tdnn"):     # an x-vector's TDNN layers, then [mean | std]
            for t in sp["classifier"]["tdnn"]:
                w, b = tensors.get(f"extra.{t['name']}.weight"), tensors.get(f"extra.{t['name']}.bias")
                if w is None or b is None or len(w["shape"]) != 2 or w["shape"][1] != t["kernel"] * width or \
                        b["shape"] != w["shape"][:1]:
                    raise FmError(f"manifest: rank {rank}: the x-vector's {t['name']} is missing or does not fit "
                                  f"{t['kernel']} frames of a {width}-wide input")
                width = w["shape"][0]
            width *= 2
    lw = tensors.get("extra.layer_weights")
    if (sp["classifier"] or {}).get("layer_sum") and (lw is None or lw["shape"] != [sp["num_layers"] + 1]):
        raise FmError(f"manifest: rank {rank}: the classifier's layer_weights are missing or not one per layer and "
                      f"one for the input ({sp['num_layers'] + 1})")
    if (sp["classifier"] or {}).get("pool") == "spans" and width != 2:
        raise FmError(f"manifest: rank {rank}: a question-answering head gives 2 logits a token, not {width}")
    for name, t in tensors.items():
        if name.startswith("extra."):
            continue
        base = name[:-len("_scale")] if name.endswith("_scale") else name
        parts = base.split(".", 2)
        if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < sp["num_layers"]:
            i = int(parts[1])
            slot = parts[2]
            want = layer_shapes[i].get(slot)
        else:
            slot, want = base, glob.get(base)
        if want is None:
            raise FmError(f"manifest: rank {rank} lists tensor {name}, which is not part of a {sp['architecture']}")
        if name != base:  # an int8 weight's scales: one row per weight row, whole groups along K
            w = tensors.get(base)
            s = t["shape"]
            if w is None or w["dtype"] != "int8" or len(s) != 2 or s[0] != want[0] or not s[1] or want[1] % s[1]:
                raise FmError(f"manifest: rank {rank}: {name} {s} does not fit an int8 {base} of shape {list(want)}")
            continue
        if t["shape"] != list(want):
            raise FmError(f"manifest: rank {rank}: tensor {name} has shape {t['shape']}, but the model spec and "
                          f"layout imply {list(want)}")
        if t["dtype"] == "int8" and (slot not in _INT8_OK or name + "_scale" not in tensors):
            raise FmError(f"manifest: rank {rank}: tensor {name} is int8 without {name}_scale or is not quantizable")


def read_rank(out_dir: Path, manifest: dict, rank: int, check_hashes: bool = True) -> dict[str, torch.Tensor]:
    """This rank's tensors, read only from this rank's files, each checked against the manifest."""
    tensors, hashes = _read_rank(out_dir, manifest, rank, check_hashes)
    hashes.wait()
    return tensors


class _HashCheck:
    """sha256 of a rank's files on threads (hashlib releases the GIL), so tensors can be built meanwhile; `wait`
    raises on the first mismatch. Nothing built before `wait` returns is handed to the caller."""

    def __init__(self, files: list[tuple[Path, dict]]):
        self.files = files
        self.pool = ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) if files else None
        self.futures = [self.pool.submit(sha256_file, p) for p, _ in files] if files else []

    def wait(self):
        try:
            for (_, f), fut in zip(self.files, self.futures):
                if fut.result() != f["sha256"]:
                    raise FmError(f"{f['path']}: sha256 does not match the manifest (file changed or corrupt); "
                                  "reconvert, or pass --no-verify-hashes to load it anyway")
        finally:
            self.cancel()

    def cancel(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _read_rank(out_dir: Path, manifest: dict, rank: int, check_hashes: bool):
    if not 0 <= rank < len(manifest["ranks"]):
        raise FmError(f"rank {rank} is out of range: {out_dir} has {len(manifest['ranks'])} rank(s)")
    check_layout(manifest, rank)
    return _read_entry(out_dir, manifest["ranks"][rank], rank, check_hashes)


def _read_entry(out_dir: Path, entry: dict, rank: int, check_hashes: bool):
    """A rank entry's tensors (its "files" and "tensors", or a part of them), each checked against it, and the sha256
    check of its files, running meanwhile."""
    headers, to_hash = {}, []
    for f in entry["files"]:
        p = mf.safe_path(out_dir, f["path"])
        if not p.is_file():
            raise FmError(f"{f['path']} is missing from {out_dir}")
        if p.stat().st_size != f["size"]:
            raise FmError(f"{f['path']}: size {p.stat().st_size} differs from the manifest's {f['size']}")
        if check_hashes:
            to_hash.append((p, f))
        headers[f["path"]] = (p, check_safetensors(p, f["path"]))
    hashes = _HashCheck(to_hash)     # runs while the headers are checked and the tensors built
    try:
        return _read_tensors(entry, headers, rank), hashes
    except BaseException:
        hashes.cancel()
        raise


def _borrowed_embed(out_dir: Path, m: dict, rank: int, check_hashes: bool) -> dict[str, torch.Tensor]:
    """An encoder half's embeddings from the decoder's conversion it lies in (model.embed_from): that rank's
    embed.weight (and int8 scales), which must have the shape this half's spec and layout give it."""
    parent = out_dir / m["model"]["embed_from"]
    try:
        pm = mf.read(parent)
    except FmError as e:
        raise FmError(f"{out_dir} is an encoder-decoder's encoder, whose embeddings are stored with its decoder in "
                      f"{parent.resolve()}, which cannot be read ({e})") from None
    sp, psp = m["model"], pm["model"]
    if psp.get("encoder") is None or (parent / psp["encoder"]).resolve() != out_dir.resolve() or \
            pm["parallel"]["tp"] != m["parallel"]["tp"] or psp["vocab_size"] != sp["vocab_size"] or \
            psp["embed_dim"] != sp["embed_dim"]:
        raise FmError(f"{out_dir}: its embeddings are the decoder's in {parent}, which is not the encoder-decoder it "
                      f"belongs to (or has another vocabulary, width or tp)")
    entry = pm["ranks"][rank]
    names = [n for n in ("embed.weight", "embed.weight_scale") if n in entry["tensors"]]
    if not names:
        raise FmError(f"{parent}: rank {rank} holds no embed.weight for its encoder")
    files = {entry["tensors"][n]["file"] for n in names}
    out, hashes = _read_entry(parent, {"files": [f for f in entry["files"] if f["path"] in files],
                                       "tensors": {n: entry["tensors"][n] for n in names}}, rank, check_hashes)
    hashes.wait()
    want = [m["parallel"]["vocab_per_rank"], sp["embed_dim"]]
    if list(out["embed.weight"].shape) != want:
        raise FmError(f"{parent}: embed.weight is {list(out['embed.weight'].shape)} on rank {rank}, its encoder needs "
                      f"{want}")
    return out


def _read_tensors(entry: dict, headers: dict, rank: int) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for name, t in entry["tensors"].items():
        got = headers[t["file"]][1].get(name)
        if got is None:
            raise FmError(f"tensor {name} listed in the manifest is not in {t['file']}")
        dt, shape = _ST_NAMES.get(got[0], got[0]), list(got[1])
        if dt != t["dtype"] or shape != t["shape"]:
            raise FmError(f"tensor {name} is {dt} {shape} in {t['file']}, the manifest says {t['dtype']} {t['shape']}")
        by_file.setdefault(t["file"], []).append(name)
    out = {}
    for fname, names in by_file.items():
        try:
            with safe_open(headers[fname][0], framework="pt") as h:
                for name in names:
                    out[name] = h.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise FmError(f"{fname}: cannot read rank {rank}'s tensors ({str(e).strip().splitlines()[0]})") from None
    return out


# On CPU, int8 weights at least this big stay int8 for the CPU GEMV; smaller ones decode faster dequantized (the
# compiled call's fixed cost, ~25 us, outweighs the bytes saved).
CPU_INT8_MIN_ELEMS = 1 << 20


def _part_rows(m: dict, slot: str) -> list[int]:
    """The rows of each part of a rank's qkv (q|k|v) or ssm_in (Mamba2's z|x|B|C|dt); [] for the others."""
    sp, par = m["model"], m["parallel"]
    tp = par["tp"]
    if slot == "qkv":
        kv = par["kv_heads_per_rank"]
        return [par["heads_per_rank"] * sp["head_dim"], kv * sp["head_dim"], kv * (sp["v_head_dim"] or sp["head_dim"])]
    if slot == "ssm_in":
        s = sp["ssm"]
        I, H = s["heads"] * s["head_dim"] // tp, s["heads"] // tp
        BC = s["state"] * (s["groups"] // tp if s["groups"] % tp == 0 else s["groups"])
        return [I, I, BC, BC, H]
    return []


def fold_row_scales(m: dict, raw: dict) -> dict:
    """Falcon-H1's multipliers (`model.row_scales`) folded into this rank's weights, once at load: each part of a
    slot's output rows times its factor (the weight, its bias, or an int8 weight's scales), and the weight (or its
    scales) times the factor on the slot's input. New tensors: what was read stays as it is."""
    scales, out = m["model"]["row_scales"], dict(raw)
    for name, t in raw.items():
        if not name.startswith("layers."):
            continue
        slot, _, kind = name.split(".", 2)[2].partition(".")
        f = scales.get(slot)
        if f is None or kind not in ("weight", "bias", "weight_scale") or (kind == "weight" and t.dtype == torch.int8):
            continue
        sizes = _part_rows(m, slot) or [t.shape[0] // len(f["parts"])] * len(f["parts"])     # gate|up: halves
        if sum(sizes) != t.shape[0]:
            raise FmError(f"{name}: its {t.shape[0]} rows do not split into {slot}'s parts {sizes}")
        rows = torch.cat([torch.full((r,), v, dtype=torch.float32) for r, v in zip(sizes, f["parts"])])
        if kind != "bias":
            rows = rows * f["input"]
        out[name] = (t.float() * rows.view(-1, *([1] * (t.dim() - 1)))).to(t.dtype)
    return out


def _assemble(manifest: dict, raw: dict, device, int8: str, dtype) -> dict:
    """Pair int8 weights with their scales; move to the device. int8: "keep", "dequantize", or "pack" (CPU: big
    weights a matmul reads stay int8, reordered for the int8 GEMV; the rest are dequantized once)."""
    out = {}
    tied = manifest["model"]["tied_embeddings"]
    head = manifest["model"]["classifier"]          # the passthrough tensors a classifier runs, loaded; no others
    keep = {f"extra.{s['name']}.{p}" for s in head["steps"] + head.get("tdnn", []) for p in ("weight", "bias")} | (
        {"extra.layer_weights"} if head.get("layer_sum") else set()) if head else set()
    for name, t in raw.items():
        if name.endswith("_scale"):
            continue
        experts = manifest["model"]["num_experts"] if name.endswith(_EXPERTS) else \
            manifest["model"]["moa"]["experts"] if name.endswith(_MOA_EXPERTS) else 0    # split per expert
        if t.dtype == torch.int8:
            scale = raw.get(name + "_scale")
            if scale is None:
                raise FmError(f"int8 tensor {name} has no {name}_scale")
            g = t.shape[1] // scale.shape[1] if scale.dim() == 2 and scale.shape[1] else 0
            if not g or g * scale.shape[1] != t.shape[1] or scale.shape[0] != t.shape[0]:
                raise FmError(f"{name}_scale has shape {list(scale.shape)}, which does not fit {list(t.shape)}")
            whole = Int8Weight(t.to(device), scale.to(device), g)
            ws = []
            for q, s in (zip(whole.q.chunk(experts), whole.scale.chunk(experts)) if experts else
                         [(whole.q, whole.scale)]):
                w = Int8Weight(q, s, g)
                if name == "ple_embed.weight" or name.endswith(".ngram_embed.weight"):
                    pass               # Gemma 4 E2B/E4B's per-layer table, Qwen4-Exp's n-gram tables: only ever
                    #                    looked up, a row at a time
                elif int8 == "pack" and q.numel() >= CPU_INT8_MIN_ELEMS and (name != "embed.weight" or tied):
                    w.packed = int8_gemv_cpu.pack(w.q, w.scale, g)
                elif int8 != "keep":
                    w = w.dequantize(dtype)
                ws.append(w)
            # A mixture's experts: one weight each, views of the whole (kept int8 when its experts are).
            out[name] = ExpertWeights(ws, whole if int8 == "keep" else None) if experts else ws[0]
        elif name.startswith("extra."):
            if name in keep:
                out[name] = t.to(device=device, dtype=dtype)
        elif t.is_floating_point() and name not in (*ROPE_TENSORS, "alibi.slopes") and (
                (name.split(".", 2)[2] if name.startswith("layers.") else name) not in FLOAT32_SLOTS
                or t.dtype != torch.float32):       # those stay fp32 (as the model reads them)
            out[name] = t.to(device=device, dtype=dtype)
            if experts:
                out[name] = ExpertWeights(out[name].chunk(experts), out[name])
        else:
            out[name] = t.to(device)
    return out


def load(out_dir, rank: int | None = None, device=None, backend: str = "auto", check_hashes: bool = True,
         comm=None, dtype=None, dequantize: bool | None = None, verbose: bool = False, _embed=None) -> FusedModel:
    """Load this process's rank of OUT_DIR and build its FusedModel.

    Under torchrun the rank and the collective group come from torch.distributed (world size must equal the
    manifest's tp). `dequantize=None` keeps int8 weights on CUDA; on CPU it keeps the big ones, packed for the
    int8 GEMV (kernels/int8_gemv_cpu.py), when that kernel builds here, and dequantizes the rest once at load;
    encoders keep theirs int8 for the blocked matmul (`Int8Weight.matmul_cpu`).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    m = mf.read(out_dir)
    tp = m["parallel"]["tp"]
    if comm is None:
        comm = init_distributed() if tp > 1 else SingleComm()
    if comm.world != tp:
        hint = f"run it under `torchrun --nproc-per-node {tp}`" if comm.world == 1 else "relaunch with that many ranks"
        raise FmError(f"{out_dir} was converted for tp={tp} but this job has {comm.world} rank(s); {hint}")
    rank = comm.rank if rank is None else rank
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise FmError(f"--device: cannot use {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FmError(f"--device {device}: no CUDA device is available")
    ops = make_ops(backend, device)
    if dequantize is not None:
        int8 = "dequantize" if dequantize else "keep"
    elif device.type == "cpu":      # without a C++ compiler for torch.compile, float matmuls it is
        decodes = m["model"]["kind"] == "decoder"     # encoders only ever run whole sequences: the blocked matmul
        int8 = ("pack" if int8_gemv_cpu.available() else "dequantize") if decodes else "keep"
    else:
        int8 = "dequantize" if ops.name == "torch" else "keep"
    dtype = dtype or _DT[m["dtype"]]
    raw, hashes = _read_rank(out_dir, m, rank, check_hashes)
    if m["model"]["embed_from"] and _embed is None:     # an encoder half loaded on its own: the decoder's table
        raw.update(_borrowed_embed(out_dir, m, rank, check_hashes))
    if m["model"]["row_scales"]:
        raw = fold_row_scales(m, raw)
    nbytes = sum(t.numel() * t.element_size() for t in raw.values())
    # The hashers hold cores meanwhile; torch ops split over as many threads as there are cores would then wait at
    # every barrier for a thread that is not running. (The setting is per process: ranks loading as threads of one
    # process leave it alone.)
    threads = torch.get_num_threads()
    fewer = (bool(hashes.futures) and device.type == "cpu" and threads > 1
             and threading.current_thread() is threading.main_thread())
    if fewer:
        torch.set_num_threads(max(1, threads - len(hashes.futures)))
    try:
        tensors = _assemble(m, raw, device, int8, dtype)
    except BaseException:
        hashes.cancel()
        raise
    finally:
        if fewer:
            torch.set_num_threads(threads)
    hashes.wait()
    if _embed is not None and m["model"]["embed_from"]:     # the decoder's embeddings, on the device: the same tensor
        tensors["embed.weight"] = _embed
    if dtype != _DT[m["dtype"]]:
        m = {**m, "dtype": {v: k for k, v in _DT.items()}[dtype]}
    model = FusedModel(m, tensors, rank, comm=comm, ops=ops, device=device)
    if m["model"]["encoder"]:       # an encoder-decoder: its encoder, converted beside it, on the same rank
        try:
            em = mf.read(out_dir / m["model"]["encoder"])
        except FmError as e:
            raise FmError(f"{out_dir} is an encoder-decoder whose encoder ({m['model']['encoder']}/) cannot be read: "
                          f"{e}") from None
        if em["parallel"]["tp"] != tp or em["model"]["kind"] != "encoder" or \
                em["model"]["hidden_size"] != m["model"]["hidden_size"] or \
                em["source"].get("config_sha256") != m["source"].get("config_sha256"):
            raise FmError(f"{out_dir / m['model']['encoder']} is not this decoder's encoder: it is a "
                          f"{em['model']['kind']} of hidden size {em['model']['hidden_size']} converted for "
                          f"tp={em['parallel']['tp']} from another config.json (the decoder: hidden size "
                          f"{m['model']['hidden_size']}, tp={tp})")
        model.source_encoder = load(out_dir / m["model"]["encoder"], rank, device, backend, check_hashes, comm, dtype,
                                    dequantize, _embed=tensors["embed.weight"])
        nbytes += model.source_encoder.load_stats["bytes"]
    model.load_stats = {"gib": nbytes / 2**30, "seconds": time.perf_counter() - t0, "bytes": nbytes}
    if verbose and rank == 0:
        s = model.load_stats
        print(f"loaded rank {rank}/{tp} of {out_dir}: {s['gib']:.3f} GiB in {s['seconds']:.2f} s "
              f"({ops.name} backend, {device})", flush=True)
    return model
