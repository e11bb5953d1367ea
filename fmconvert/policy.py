"""Policies: the per-architecture tables in `fmconvert/configs/` and the one rewrite hook that applies them.

A policy answers three questions for one HF config: what the model is (the spec the runtime needs), which HF
tensors feed each canonical slot (with the shape each must have), and how to turn those tensors into the canonical
fused layout and back (`fuse` / `unfuse`). Nothing here knows about ranks or int8.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch

from .errors import FmError
from .manifest import TABLE_POSITIONS, block_owners, is_global_layer, latent_at, loop_owners

ENCODER_DIR = "encoder"      # where an encoder-decoder's conversion keeps its encoder's (a conversion of its own)
CONFIG_DIR = Path(os.environ.get("FMCONVERT_CONFIGS", Path(__file__).resolve().parent / "configs"))

LAYER_SLOTS = (
    "attn_norm.weight", "attn_norm.bias", "qkv.weight", "qkv.bias", "attn_out.weight", "attn_out.bias",
    "mlp_norm.weight", "mlp_norm.bias", "mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias",
    "q_norm.weight", "k_norm.weight", "q_norm.bias", "k_norm.bias",   # Persimmon: q/k LayerNorms with biases
    "attn_rel_bias.weight",   # UMT5: each layer's own relative-position bias table (MPNet's and T5's: rel_bias)
    "attn_post_norm.weight", "mlp_post_norm.weight",                 # Gemma 2: each half's output normed too
    "moe_post_norm.weight",                                          # A.X K1: the mixture's output only
    "layer_scale.weight",                                            # Gemma 4: the stream times it after the layer
    "attn_sub_norm.weight", "mlp_sub_norm.weight",   # BitNet: RMSNorms inside each half, before its output projection
    # Gemma 4's E2B/E4B: each layer's per-layer input (PLE) gates a narrow projection of the stream, which is
    # projected back, normed and added after the MLP
    "ple_gate.weight", "ple_out.weight", "ple_post_norm.weight",
    # Gemma 4's 26B-A4B: a dense MLP (shared_*) beside the mixture, each branch normed on its way in and out, and a
    # router that reads the stream RMS-normed and scaled (router.scale), its weights times router.expert_factor
    "router.scale", "router.expert_factor", "experts_norm.weight", "experts_post_norm.weight",
    "shared_post_norm.weight",
    "router.weight", "experts_in.weight", "experts_out.weight",      # mixture of experts, in place of mlp_in/out
    "router.bias", "experts_in.bias", "experts_out.bias",            # GPT-OSS: biases on all three
    "attn_sinks.weight",                                             # GPT-OSS: a learned softmax sink per head
    "rel_gate.weight", "rel_gate.bias", "rel_gate.const",            # WavLM: the gate on the relative-position bias
    "attn_gate.bias",                            # Beam: a bias per head on the attention gate, before its sigmoid
    "attn_gate.weight",          # Ling 2.5's latent attention: its own gate projection, sigmoid(gate . x) per head
    "shared_in.weight", "shared_out.weight", "shared_gate.weight",   # Qwen2-MoE: an always-on expert beside them
    "router.correction_bias",        # GLM-4.5: added to the sigmoid scores when choosing experts, not when weighing
    "act.alpha_p", "act.alpha_n", "act.beta", "act.eps",             # Apertus: each layer's xIELU parameters
    # Multi-head latent attention (DeepSeek-V2/V3) in place of qkv: q through a low-rank bottleneck (q_a, normed,
    # then q_b; q_b alone reads the hidden state when there is no bottleneck), and one latent per token (kv_a: the
    # compressed kv, normed, then the shared rotated key) that kv_b expands into every head's k and v
    "q_a.weight", "q_a.bias", "q_a_norm.weight", "q_b.weight",
    "kv_a.weight", "kv_a.bias", "kv_a_norm.weight", "kv_b.weight",
    "kv_a_rope_norm.weight",         # Dots3 Note: an RMS norm of the shared key's rope part before RoPE turns it
    # DeepSeek Sparse Attention's indexer (DeepSeek-V3.2, GLM-5) beside latent attention: its heads' queries from the
    # q bottleneck (index_q), one key per token from the stream (index_k, LayerNormed), a weight per head (index_w)
    "index_q.weight", "index_k.weight", "index_k_norm.weight", "index_k_norm.bias", "index_w.weight",
    # Gated DeltaNet (Qwen3-Next, Qwen3.5) in place of attention, in the layers a hybrid gives it: one projection of
    # q|k|v|z|b|a, a causal depthwise conv over q|k|v, the decay's two per-head parameters, the gated output norm
    # (one [v_dim] weight every head shares) and the output projection
    "lin_in.weight", "lin_conv.weight", "lin_conv.bias", "lin_decay.a_log", "lin_decay.dt_bias", "lin_norm.weight",
    "lin_out.weight",
    # Kimi Linear's KDA widens two low-rank projections per head: its decay per key channel (lin_f_b) and its output
    # gate (lin_g_b); their narrow halves (f_a, g_a) are part of lin_in
    "lin_f_b.weight", "lin_g_b.weight",
    # MiniMax's lightning attention in place of attention: one projection of each head's q|k|v (interleaved per
    # head), an RMS norm over every head's output, a sigmoid output gate read off the layer's input, the output
    # projection (lin_out)
    "lin_qkv.weight", "lin_out_norm.weight", "lin_gate.weight",
    # Mamba2 (Granite 4.0's hybrids) in place of attention: one projection of z|x|B|C|dt, a causal depthwise conv
    # with SiLU over x|B|C, each head's decay, step bias and skip (ssm.*), the gated norm over x's width (grouped)
    # and the output projection
    "ssm_in.weight", "ssm_in.bias", "ssm_conv.weight", "ssm_conv.bias", "ssm.a_log", "ssm.dt_bias", "ssm.d",
    "ssm_norm.weight", "ssm_out.weight", "ssm_out.bias",
    # LFM2's short convolution in place of attention: one projection of B|C|x, a causal depthwise conv over B * x
    # (no activation), C times its output, and the output projection
    "sconv_in.weight", "sconv_in.bias", "sconv_conv.weight", "sconv_conv.bias", "sconv_out.weight", "sconv_out.bias",
    # Mamba (1) (Mamba, FalconMamba, Jamba) in place of attention: one projection of x|z, a causal depthwise conv
    # with SiLU over x, x_proj (row-parallel: dt's low rank|B|C), the norms Jamba puts on those three, dt_proj
    # back to a step per channel, each channel's decay row and skip (mamba.*), and the output projection
    "mamba_in.weight", "mamba_in.bias", "mamba_conv.weight", "mamba_conv.bias", "mamba_x.weight",
    "mamba_dt_norm.weight", "mamba_b_norm.weight", "mamba_c_norm.weight", "mamba_dt.weight", "mamba_dt.bias",
    "mamba.a_log", "mamba.d", "mamba_out.weight", "mamba_out.bias",
    # HY-V4's hyper-connections, one set before each half (residual "hyper"): from the RMS-normed copies of the
    # stream, fn gives the logits of each copy's input weight and output weight; base and scale shift and scale them
    "attn_hc.fn", "attn_hc.base", "attn_hc.scale", "mlp_hc.fn", "mlp_hc.base", "mlp_hc.scale",
    # A.X K2's gated norms: the norm's output y times sigmoid(up(silu(down(y)))), a low-rank gate read off y, on the
    # attention's input norm in every layer and on the MLP's in the mixture layers (moe_: absent from dense ones)
    "attn_norm_gate_down.weight", "attn_norm_gate_up.weight", "moe_norm_gate_down.weight", "moe_norm_gate_up.weight",
    # MiniMax-M3's block indexer in its sparse layers: heads of queries and one key per token from the stream, each
    # RMS-normed per head, which pick the blocks of keys each kv head's queries attend to (model.block_sparse)
    "block_index_q.weight", "block_index_k.weight", "block_index_q_norm.weight", "block_index_k_norm.weight",
    # DeepSeek-V4's compressed attention (model.compressed) reuses q_a, q_a_norm, q_b (the q bottleneck), kv_a and
    # kv_a_norm (its one kv head), attn_sinks and attn_out (wo_b); attn_out_a is the grouped first half of its output
    # projection (wo_a). Its compressed layers pool windows of kv projections (comp_kv) by a softmax over a gate
    # (comp_gate plus comp_bias, one row per place in the window) and norm the entry (comp_norm); the sparse ones'
    # indexer has its own such compressor (index_kv, index_gate, index_bias, index_norm) beside index_q and index_w
    "attn_out_a.weight", "comp_kv.weight", "comp_gate.weight", "comp_bias", "comp_norm.weight",
    "index_kv.weight", "index_gate.weight", "index_bias", "index_norm.weight",
    "router.token_experts",          # DeepSeek-V4's hash layers: each token id's experts, [vocab, top-k] integers
    # Gemma 3n's AltUp (residual "altup"): the router over the active copy (its norm and [copies, hidden] weight),
    # the copy-mixing coefficients of the prediction [copies^2, copies] and of the correction [copies, copies], and
    # the scale on the corrected active copy; LAuReL beside attention (a low-rank left/right pair and its norm)
    "altup_router.weight", "altup_router_norm.weight", "altup_predict.weight", "altup_correct.weight",
    "altup_out_scale.weight", "laurel_left.weight", "laurel_right.weight", "laurel_norm.weight",
    # RecurrentGemma's RG-LRU in place of attention: one projection of its y branch (through the activation) and x
    # branch, a causal depthwise conv over x, each head's block-diagonal input and recurrence gates ([heads, w, w]
    # with a [heads, w] bias), the recurrence's parameter per channel (rg_a) and the output projection
    "rg_in.weight", "rg_in.bias", "rg_conv.weight", "rg_conv.bias", "rg_gate_x.weight", "rg_gate_x.bias",
    "rg_gate_a.weight", "rg_gate_a.bias", "rg_a", "rg_out.weight", "rg_out.bias",
    # Qwen4-Exp's gated hyper-connections (residual "gated_hyper"), one set before each half: the per-copy RMS
    # norm of the stream's copies (norm), the low-rank input mix (down, up) and each copy's share of the output
    # (inject)
    "attn_hc.norm", "attn_hc.down", "attn_hc.up", "attn_hc.inject", "mlp_hc.norm", "mlp_hc.down", "mlp_hc.up",
    "mlp_hc.inject",
    # Qwen4-Exp's QSA indexer beside each attention layer (model.qsa): one projection of its heads' queries and its
    # one key (qsa_qk), each RMS-normed per head (the key after pooling a block)
    "qsa_qk.weight", "qsa_q_norm.weight", "qsa_k_norm.weight",
    # Qwen4-Exp's hashed n-gram embeddings in some linear layers (model.ngram): the table (its rows hashed n-grams,
    # each head's width), the key per copy and the shared value projected from a token's heads, three per-copy RMS
    # norms (key, the stream as query, the gated value) and the dilated depthwise conv over the gated value
    "ngram_embed.weight", "ngram_key.weight", "ngram_value.weight", "ngram_key_norm.weight",
    "ngram_query_norm.weight", "ngram_conv_norm.weight", "ngram_conv.weight",
    # JetMoe's mixture of attention heads (model.moa) in place of qkv and attn_out: a router, each expert's q
    # projection and output projection (stacked, [experts * rows, ...]), one kv projection (k, then v) every expert
    # shares, and the output's bias; and the bias its MLP mixture adds once to the weighted sum (experts_shared)
    "moa_router.weight", "moa_q.weight", "moa_kv.weight", "moa_out.weight", "moa_out.bias", "experts_shared.bias",
    # Zamba2's shared transformer blocks (model.shared_blocks), in its hybrid layers: the norm of the stream beside
    # the embeddings (mem_norm, twice hidden wide), attention (qkv, attn_out), its MLP (mlp_norm, mlp_in, mlp_out),
    # all held by the block's first layer and read by every layer that uses the block; each layer's own low-rank
    # adapters on q|k|v and on the MLP's input (a down projection replicated, the up one split like what it adapts),
    # and its projection of the block's output (mem_proj)
    "mem_norm.weight", "qkv_lora_down.weight", "qkv.lora_up", "mlp_lora_down.weight", "mlp_in.lora_up",
    "mem_proj.weight",
    "diff_lambda",       # DiffLlama's differential attention: lambda_q1, lambda_k1, lambda_q2, lambda_k2 ([4 * head_dim])
    # Doge's dynamic mask attention (model.dyn_mask): dt_proj over every kv head's values [kv_heads, kv_heads *
    # head_dim] (and its bias), A [kv_heads]; its weighted residuals, the stream's weight per channel before each
    # half's output joins it (input_residual, post_attention_residual)
    "dmask_dt.weight", "dmask_dt.bias", "dmask_a", "attn_residual", "mlp_residual",
    # xLSTM's mLSTM in place of attention: one projection of q|k|v|o (o: the output gate), the input and forget
    # gates' projection (one logit each per head, with a bias), the per-head LayerNorm of its output and the output
    # projection
    "mlstm_in.weight", "mlstm_in.bias", "mlstm_gates.weight", "mlstm_gates.bias", "mlstm_norm.weight",
    "mlstm_norm.bias", "mlstm_out.weight", "mlstm_out.bias",
    # ZAYA's CCA (model.cca): the depthwise and the per-head grouped convs over q|k (weights, biases) and the key's
    # scale per kv head; its residual scaling, (out + out_shift) * out_gain + (stream + shift) * gain, as each half
    # joins the stream; its router (model.router_dim): down_proj (router_in), the scale on the previous layer's
    # router state (router_eda, from layer 1 on), the router MLP's norm and two layers, and the pick's fp32 biases
    "cca_conv0.weight", "cca_conv0.bias", "cca_conv1.weight", "cca_conv1.bias", "cca_temp",
    "attn_res.out_gain", "attn_res.out_shift", "attn_res.gain", "attn_res.shift",
    "mlp_res.out_gain", "mlp_res.out_shift", "mlp_res.gain", "mlp_res.shift",
    "router_in.weight", "router_in.bias", "router_eda", "router_norm.weight", "router_fc1.weight", "router_fc1.bias",
    "router_fc2.weight", "router_fc2.bias", "router.balance",
    # An encoder-decoder's cross-attention (T5), between each decoder layer's self-attention and its MLP: its input
    # norm, q from the decoder's stream, k|v from the encoder's output (computed once per source), the output
    # projection
    "cross_norm.weight", "cross_norm.bias", "cross_q.weight", "cross_q.bias", "cross_kv.weight", "cross_kv.bias",
    "cross_out.weight", "cross_out.bias",
    # Wav2Vec2-Conformer's block (model.conformer): the first, half-step feed-forward beside mlp_* (the second), its
    # norm; the convolution module: its LayerNorm, the pointwise conv to the GLU's value|gate, the depthwise conv,
    # the BatchNorm (running statistics and the batch counter, kept for reassembly), the pointwise conv back; the
    # block's closing LayerNorm; relative attention's position projection and its two biases per head (u, v)
    "macaron_norm.weight", "macaron_norm.bias", "macaron_in.weight", "macaron_in.bias", "macaron_out.weight",
    "macaron_out.bias", "conv_norm.weight", "conv_norm.bias", "conv_in.weight", "conv_dw.weight", "conv_bn.weight",
    "conv_bn.bias", "conv_bn.mean", "conv_bn.var", "conv_bn.count", "conv_out.weight", "block_norm.weight",
    "block_norm.bias", "rel_pos.weight", "rel_pos.u", "rel_pos.v",
    # Wav2Vec2-BERT's: the LayerNorm after the depthwise conv (in place of BatchNorm), and relative_key's learned
    # row per clamped offset [max_left + max_right + 1, head_dim], one table read by every head
    "conv_dw_norm.weight", "conv_dw_norm.bias", "rel_dist.weight",
)
# Slots written in float32 whatever the output dtype: small tensors the model only ever reads in fp32, which
# transformers keeps in fp32 when it loads the model in half precision (and vLLM too): a sigmoid router's
# correction bias (rounding it to bf16 moves which experts win a close choice) and HY-V4's hyper-connection weights.
FLOAT32_SLOTS = ("router.correction_bias", "attn_hc.fn", "attn_hc.base", "attn_hc.scale", "mlp_hc.fn",
                 "mlp_hc.base", "mlp_hc.scale", "hc_head.fn", "hc_head.base", "hc_head.scale", "comp_bias",
                 "index_bias", "router.balance", "conformer_rope.inv_freq")
# Slots that hold integers (token ids -> expert ids), written as int64 and never cast or quantized
INT_SLOTS = ("router.token_experts", "conv_bn.count")


def stored_dtype(slot: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an unquantized slot is written in when the output's is `dtype` (FLOAT32_SLOTS: float32; INT_SLOTS:
    int64)."""
    return torch.int64 if slot in INT_SLOTS else torch.float32 if slot in FLOAT32_SLOTS else dtype
# A mixture's slots and a dense MLP's: a model with both kinds of layer (GLM-4.5's first layers are dense) gives each
# layer the one set its kind has.
SPARSE_SLOTS = ("router.", "experts_", "shared_", "moe_")
DENSE_SLOTS = ("mlp_in.", "mlp_out.")
# Slots stored as a depthwise Conv1d's weight, [channels, 1, taps]
DEPTHWISE = ("lin_conv.weight", "ssm_conv.weight", "sconv_conv.weight", "mamba_conv.weight", "rg_conv.weight",
             "ngram_conv.weight", "cca_conv0.weight", "conv_dw.weight")
# Slots stored as a pointwise (kernel 1) Conv1d's weight, [out, in, 1]: a linear layer (Wav2Vec2-Conformer)
POINTWISE = ("conv_in.weight", "conv_out.weight")
# A hybrid's linear-attention layers have the lin_ slots and its attention layers the attention's.
LINEAR_SLOTS = ("lin_", "ssm", "sconv", "mamba", "rg_", "mlstm")
ATTENTION_SLOTS = ("qkv.", "q_norm.", "k_norm.", "attn_out.", "q_a", "q_b.", "kv_a", "kv_b.", "attn_gate.", "index_",
                   "block_index_", "attn_out_a.", "comp_", "qsa_", "moa_", "mem_", "qkv_lora_", "mlp_lora_",
                   "mlp_in.lora_up", "diff_", "dmask_")
GLOBAL_SLOTS = (
    "embed.weight", "pos_embed.weight", "type_embed.weight", "embed_norm.weight", "embed_norm.bias",
    "project_in.weight", "project_out.weight", "embed_proj.weight", "embed_proj.bias", "final_norm.weight",
    "final_norm.bias", "pooler.weight", "pooler.bias", "text_proj.weight", "rel_bias.weight", "rel_embed.weight",
    "rel_embed_norm.weight",
    "rel_embed_norm.bias", "lm_head.weight", "lm_head.bias",
    "head_dense.weight", "head_dense.bias", "head_norm.weight", "head_norm.bias",
    # Gemma 4's E2B/E4B: the per-layer embeddings [vocab, layers * dim], and the projection of the embedded token
    # into the same per-layer inputs with its norm (over one layer's dim)
    "ple_embed.weight", "ple_proj.weight", "ple_proj_norm.weight",
    # HY-V4: the weights that fold the stream's copies into one before the final norm (Qwen4-Exp: its gated mix,
    # which gives the head's input)
    "hc_head.fn", "hc_head.base", "hc_head.scale", "hc_head.norm", "hc_head.down", "hc_head.up",
    # Gemma 3n: the projections that make the other AltUp copies of the embedding, and that bring them back at the end
    # ([copies - 1] x [hidden, hidden], stacked)
    "altup_proj.weight", "altup_unembed.weight",
    "audio_conv1.weight", "audio_conv1.bias", "audio_conv2.weight", "audio_conv2.bias",   # Whisper's front end
    # Wav2Vec2 / HuBERT: the raw waveform's conv stack (wave_conv{c}, its norms wave_norm{c}: `{c}` expands over the
    # conv layers), the projection of its features, and the positional conv, kept weight-normed (g, v) as stored
    "wave_conv{c}.weight", "wave_conv{c}.bias", "wave_norm{c}.weight", "wave_norm{c}.bias",
    "feat_norm.weight", "feat_norm.bias", "feat_proj.weight", "feat_proj.bias",
    "pos_conv.g", "pos_conv.v", "pos_conv.bias",
    "pos_conv{p}.weight", "pos_conv{p}.bias",       # Data2Vec-Audio: a stack of plain positional convs instead
    "loop_init",      # HRM-Text: the low-level state's start, [hidden] (z_L_init)
    "input_gain", "input_shift",      # ZAYA: the embeddings enter the stream as (e + shift) * gain
    "conformer_rope.inv_freq",        # Wav2Vec2-Conformer's rotary frequencies, as its checkpoint keeps them
    # Wav2Vec2-BERT's adapter after the blocks (`{a}` expands over its layers): the feed-forward before it, the
    # projection to its width, then per layer the strided convs (GLU) of the residual and of attention's input,
    # attention (q|k|v, no positions) and a feed-forward
    "adapter_ffn_in.weight", "adapter_ffn_in.bias", "adapter_ffn_out.weight", "adapter_ffn_out.bias",
    "adapter_proj.weight", "adapter_proj.bias", "adapter_proj_norm.weight", "adapter_proj_norm.bias",
    *(f"adapter{{a}}.{n}.{p}" for n in ("res_norm", "res_conv", "attn_norm", "attn_conv", "qkv", "attn_out",
                                        "mlp_norm", "mlp_in", "mlp_out") for p in ("weight", "bias")),
)

# CodeGen's fused qkv_proj is laid out for this many model-parallel shards (qkv layout mp_blocks).
MP_BLOCKS = 4

# The activation of a gated MLP's gate -> the canonical gated epilogue.
_GATED = {"silu": "swiglu", "gelu_tanh": "geglu", "gelu": "geglu_erf", "relu2": "reglu2"}

# HF activation names -> the runtime's canonical epilogues.
_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu", "relu2": "relu2", "xielu": "xielu", "quick_gelu": "quick_gelu",
}


@dataclass
class ModelSpec:
    """Everything the runtime needs to rebuild the network. Serialized as the manifest's `model` section."""

    family: str
    architecture: str
    kind: str                      # decoder | encoder
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    embed_dim: int                 # width of the embedding table (OPT's word_embed_proj_dim), else hidden_size
    norm: str                      # rms | layer | rms_plus_one (Gemma: scale by 1 + weight) | rms_fp32 (Gemma 4)
    norm_eps: float
    activation: str                # gelu | gelu_tanh | relu | relu2 | silu | xielu (Apertus: parameters per layer,
    #                                the act.* slots) | swiglu / geglu (silu / gelu_tanh over
    #                                gate|up) | swiglu_oai (GPT-OSS: gate and up clamped, then
    #                                gate * sigmoid(glu_alpha * gate) * (up + 1))
    gated_mlp: bool
    residual: str                  # pre | post | parallel (attention and MLP read the same stream, one sum) | normed
    #                                (MiniMax: the stream restarts from each norm's output; see residual_factors) |
    #                                hyper (HY-V4: hyper-connections over several copies of the stream; see hyper)
    position: dict                 # {"type": rope|alibi|learned, ...}
    tied_embeddings: bool
    embed_norm: bool
    final_norm: bool
    project: bool                  # OPT project_in / project_out
    pooler: bool
    type_vocab_size: int
    attn_scale: float              # softmax scale, 1/sqrt(head_dim) for every supported family
    embed_scale: float = 1.0       # embeddings are multiplied by this, in the model dtype (Gemma: sqrt(hidden))
    qkv_layout: str | None = None  # how the source stores q|k|v (separate, interleaved, grouped); None: the table's
    num_experts: int = 0           # mixture of experts (Mixtral): experts per layer, 0 for a dense MLP
    shared_intermediate_size: int = 0  # a shared expert's width (Qwen2-MoE), 0 for none
    dense_layers: list | None = None   # a mixture's layers that have a dense MLP instead (GLM-4.5's first); None: none
    dense_intermediate_size: int = 0   # their MLP's width (intermediate_size is then the experts')
    router: str = "softmax"        # softmax over the expert logits, or "sigmoid": each expert scored on its own, the
    #                                choice made with router.correction_bias added, within the best router_topk_groups
    #                                of router_groups groups (DeepSeek-V3's scheme, GLM-4.5); "sigmoid_logits": the
    #                                same weights, the choice made on the logits plus the bias (Kolibri)
    router_groups: int = 1
    router_topk_groups: int = 1
    routed_scale: float = 1.0      # the routing weights are multiplied by it after any renormalisation
    shared_scale: float = 1.0      # the shared expert's output is multiplied by it (Cohere 2 MoE's "average": 0.5)
    router_jitter: float = 0.0     # router "sparsemixer" (Phi-MoE): how close to a pick's score another must be to
    #                                share its softmax (2 * router_jitter, relative)
    experts_per_token: int = 0     # top-k experts each token is routed to
    sliding_window: int = 0        # attention limited to this many recent positions (Mistral, Gemma 2); 0: none
    window_layers: list | None = None  # the layers that use that window; None: every layer
    nope_layers: list | None = None    # layers without RoPE (SmolLM3's every fourth); None: RoPE in every layer
    attn_softcap: float = 0.0      # attention scores capped as c * tanh(s / c) (Gemma 2); 0: none
    logit_softcap: float = 0.0     # the same on the output logits
    residual_scale: float = 1.0    # each half's output is multiplied by it as it joins the stream (Granite)
    logit_scale: float = 1.0       # output logits are multiplied by it (Cohere: 0.0625; Granite: 1 / logits_scaling)
    experts_renormalize: bool = True   # the top-k routing weights are rescaled to sum to 1 (Mixtral; Qwen3-MoE: a flag)
    qk_norm: str = "head"          # q_norm/k_norm: "l2" an RMS norm without weight after RoPE, in RoPE layers only
    #                                (Llama 4); "head" one [head_dim] weight for every head (Qwen3, Gemma 3);
    #                                "per_head" a [heads, head_dim] weight, each head its own (Command R+); "full" one
    #                                RMS over all heads of the projection, weight [heads * head_dim] (OLMo 2, OLMoE)
    glu_alpha: float = 0.0         # swiglu_oai's sigmoid gain and clamp limit (0: another activation)
    glu_limit: float = 0.0
    qk_norm_after_rope: bool = False   # q_norm/k_norm apply to the rotated q and k (Hunyuan), not before RoPE
    query_scale_beta: float = 0.0  # Ministral 3 (Llama 4's scaling): rotated q times 1 + beta * log(1 + floor(p / n))
    query_scale_from: int = 0      # at position p, n = query_scale_from; 0 and 0: none
    attn_chunk: int = 0            # chunked attention (Llama 4): a query at p sees keys j <= p with j // attn_chunk ==
    chunk_layers: list | None = None   # p // attn_chunk, in these layers (None: every layer); 0: none
    query_scale_offset: int = 0    # Llama 4: floor((p + 1) / n) where Ministral 3 has floor(p / n)
    query_scale_nope_only: bool = False    # Llama 4 scales q in its layers without RoPE only
    experts_scale_input: bool = False      # Llama 4: each expert's routing weight scales its input, not its output
    mla: dict | None = None        # multi-head latent attention (DeepSeek-V2/V3): q_rank (0: no q bottleneck),
    #                                kv_rank, nope_dim + rope_dim (= head_dim, each q and k head), v_dim, and the
    #                                eps of the two latent norms; num_kv_heads is then 1, the latent every head reads.
    #                                `index` (DeepSeek Sparse Attention, V3.2 / GLM-5; else absent): the indexer's
    #                                heads, dim, topk, rope_style and layers (those that run it; the others reuse the
    #                                choice of the last one before them)
    linear_attn: dict | None = None    # Gated DeltaNet's widths (Qwen3-Next, Qwen3.5): k_heads, v_heads (a multiple of
    #                                k_heads; v head j reads q/k head j // (v_heads / k_heads)), k_dim, v_dim, and
    #                                conv_kernel, the causal conv's taps
    ssm: dict | None = None        # Mamba2's widths (Granite 4.0 hybrids): heads, head_dim, groups (B and C, shared
    #                                by heads // groups heads each), state (N), conv_kernel, and dt_min / dt_max (the
    #                                step's clamp; dt_max None: none). Its layers are linear_layers
    short_conv: dict | None = None  # LFM2's gated short convolution: conv_kernel (its taps), in linear_layers
    mlstm: dict | None = None      # xLSTM's mLSTM: {"heads", "qk_dim", "v_dim" (all heads'), "gate_cap" (the gates'
    #                                soft cap), "eps"}; in every layer (linear_layers)
    rglru: dict | None = None      # RecurrentGemma's RG-LRU: width (channels), heads (of width / heads channels,
    #                                each with its own gates), conv_kernel, activation (of the y branch). Its layers
    #                                are linear_layers
    mamba: dict | None = None      # Mamba (1)'s widths: inner (channels), state (N), dt_rank, conv_kernel, and the
    #                                RMS norms on dt, B and C: norms None (Mamba), "plain" (FalconMamba: no weight)
    #                                or "weighted" (Jamba), with their norm_eps. Its layers are linear_layers
    lightning: bool = False        # MiniMax's lightning attention: linear attention over num_heads heads of
    #                                head_dim whose [head_dim, head_dim] state decays by a constant per head and layer
    linear_layers: list | None = None  # the layers that use one of these in place of attention; None: none
    residual_factors: dict | None = None   # residual "normed" (MiniMax): {"attn", "linear", "mlp"} -> [alpha, beta]:
    #                                        each half's sum is alpha * its normed input + beta * its output
    hyper: dict | None = None      # residual "hyper" (HY-V4): the stream is `streams` copies of the hidden state;
    #                                each half reads a sigmoid-weighted sum of them and adds its output to each,
    #                                weighted by magnitude * sigmoid(...) (slots attn_hc.*, mlp_hc.*, hc_head.*).
    #                                residual "gated_hyper" (Qwen4-Exp): {"streams", "rank"}, the low-rank gated
    #                                mix of configs/qwen4_exp.toml
    moa: dict | None = None        # JetMoe's mixture of attention heads: {"experts", "top_k"}; a token's q heads are
    #                                its top_k experts' projections of num_kv_heads heads each (num_heads = their
    #                                product), attending over the shared k and v, each expert's output projected by
    #                                its own moa_out and weighted by the router
    final_norm_eps: float = 0.0    # the final norm's eps where it differs from the layers' (JetMoe); 0: norm_eps
    shared_blocks: dict | None = None  # Zamba2: {"count", "rank", "qkv_lora"}: its hybrid layers (block_parts
    #                                "hybrid") run shared transformer block j % count (j: the layer's place among them,
    #                                its weights held by that block's first hybrid layer) on the stream beside the
    #                                embeddings, with low-rank adapters of `rank` of their own (on q|k|v where
    #                                qkv_lora); see configs/zamba2.toml
    attn_input: int = 0            # the width attention's q|k|v read where it is not hidden_size (Zamba2: twice it)
    proj_dim: int = 0               # CLIPTextModelWithProjection: the width text_proj takes the pooled state to
    audio_mels: int = 0             # Whisper's encoder: log-mel bins in, through two convs (audio_conv1, audio_conv2:
    #                                 kernel 3, the second stride 2), in place of an embedding table
    wave: dict | None = None        # Wav2Vec2, HuBERT: a raw 16 kHz waveform in, through a conv stack {conv_dim,
    #                                 kernel, stride (lists, a conv layer each), bias, norm ("group": the first layer
    #                                 only, "layer": every layer), act, feat_norm}, projected to hidden, plus a grouped
    #                                 positional conv {pos_kernel, pos_groups, pos_layers (0: one weight-normed
    #                                 conv; n: n plain ones, each LayerNormed without weights)}, in place of an
    #                                 embedding table
    features: dict | None = None    # Wav2Vec2-BERT: feature rows in ({dim}: SeamlessM4TFeatureExtractor's stacked
    #                                 fbank), LayerNormed and projected to hidden, in place of an embedding table;
    #                                 kernel and stride (lists): the extractor's framing of the samples, for counting
    #                                 a clip's frames as a conv stack's are counted (frames_of)
    conformer: dict | None = None   # Wav2Vec2-Conformer: Conformer blocks {position ("rotary": q and k read the
    #                                 block's input rotated per head, half-split; "relative": Transformer-XL's
    #                                 sinusoidal table through rel_pos, biases u and v; "relative_key": Shaw's rows
    #                                 rel_dist over offsets clamped to [-max_left, max_right]; "none"), rotary_base,
    #                                 depthwise_kernel (odd, 'same' padding), norm_eps (the block's own LayerNorms and
    #                                 BatchNorm's, which transformers leaves at 1e-5); Wav2Vec2-BERT's conv module
    #                                 adds conv_norm "layer" (a LayerNorm after the depthwise conv, not BatchNorm)
    #                                 and causal (left padding only, padded frames zeroed before it), and
    #                                 max_left, max_right}
    adapter: dict | None = None     # Wav2Vec2-BERT's adapter after the blocks {layers, kernel, stride, act, width
    #                                 (output_hidden_size; a projection to it and its LayerNorm where it is not
    #                                 hidden), ffn (a relu feed-forward before it, added at half weight)}
    causal_encoder: bool = False    # CLIP's text encoder: an encoder whose tokens see only those before them
    eos_pool: dict | None = None    # CLIP: {"eos_id"}: the pooled output is the first eos token's state (eos_id -1:
    #                                 the largest id's, as checkpoints with the old eos id 2 do), through text_proj
    shared_layers: bool = False     # ALBERT: one set of layer weights, which every layer reads (stored in layer 0)
    headless: bool = False          # a decoder saved without its untied lm_head (a bare *Model, or an embedding model
    #                                 such as Qwen3-Embedding-8B): hidden states only, for `embed`
    classifier: dict | None = None  # an encoder's sequence- (or token-) classification head, run from its passthrough
    #                                 tensors: {"pool": first | pooler | mean | tokens, "steps": [{"linear" | "norm":
    #                                 name, "act"}]}
    disentangled: dict | None = None   # DeBERTa-v2/v3: {"span", "buckets", "max_position", "c2p", "p2c"}: scores
    #                                    plus q . k_rel and k . q_rel of the log-bucketed offset (see runtime.md)
    rel_bias: dict | None = None   # MPNet: {"buckets", "max_distance"}: a score bias per head from the bucket of the
    #                                key's offset from the query (T5's bidirectional buckets), rel_bias [heads, buckets]
    embed_proj: bool = False       # ELECTRA: the embeddings, positions, types and their norm are embed_dim wide, and
    #                                embed_proj (weight and bias) takes their sum to hidden_size
    loop: dict | None = None       # HRM-Text: {"stack_layers", "h_cycles", "l_cycles"}: num_layers virtual layers
    #                                running two stacks' blocks in turn, each virtual layer its own KV cache (see
    #                                configs/hrm_text.toml)
    dyn_mask: dict | None = None   # Doge's dynamic mask attention: {"keep_window"}: key j's scores gain exp(A
    #                                softplus(dt_proj(v_j))) per kv head, and a query keeps its keep_window keys
    #                                of largest bias (see configs/doge.toml)
    diff_attn: bool = False        # DiffLlama: differential attention; q head p pairs with p + heads / 2 (see
    #                                configs/diffllama.toml)
    qsa: dict | None = None        # Qwen4-Exp's QSA indexer in every attention layer: `heads` queries and one key of
    #                                `dim` per token; each query keeps the `budget` / `rate` best complete blocks of
    #                                `rate` keys (pooled), and the keys after the last complete block
    ngram: dict | None = None      # Qwen4-Exp's hashed n-gram embeddings, in `layers`: n-grams up to `size` tokens,
    #                                `heads` hashed heads of each order from 2, `dim` wide all together, a dilated
    #                                conv of `conv_kernel` taps, `eos` (where a segment starts) and per layer its
    #                                hash `tables` {multipliers, sizes, offsets} and padded `rows`
    experts_glu_limit: float = 0.0  # HY-V4: the routed experts' gate clamped above at it, their up to [-it, it]
    norm_gate_rank: int = 0        # A.X K2: the width of its norms' low-rank gates (*_norm_gate_* slots); 0: none
    block_sparse: dict | None = None   # MiniMax-M3: in `layers`, an indexer of `heads` heads of `dim` (one a kv
    #                                group) scores every earlier key, max-pools the scores per `block` keys, and
    #                                each query's group attends to its `topk` best blocks, its own `local` latest
    #                                blocks always among them
    compressed: dict | None = None     # DeepSeek-V4's attention (see configs/deepseek_v4.toml): q_rank, rope_dim (the
    #                                last columns of each head that turn), o_groups and o_rank (the grouped output
    #                                projection), rates {"csa", "hca"} (tokens a compressed entry pools), csa_layers
    #                                and hca_layers (the layers of each kind; the rest only slide), index {heads, dim,
    #                                topk} (the sparse layers' indexer); one kv head (num_kv_heads 1), key and value
    hash_layers: list | None = None    # DeepSeek-V4: the mixture layers that pick experts by token id
    #                                    (router.token_experts), not by score; None: none
    block_parts: list | None = None    # per layer, "mixer" or "mlp" where a layer has only that half (Nemotron-H:
    #                                each layer is one Mamba2, attention, MLP or mixture, with its own norm); None:
    #                                both halves in every layer
    qkv_clip: float = 0.0          # OLMo, MPT: q, k and v clamped to [-qkv_clip, qkv_clip]; 0: not clamped
    norm_affine: bool = True       # False: the block and final norms have no weight or bias (OLMo's LayerNorm)
    ssm_beside_attention: bool = False  # Falcon-H1: the linear layers attend too, attention and the SSM side by side
    #                                on one normed input, their outputs added
    row_scales: dict | None = None  # Falcon-H1's muP multipliers, folded into the weights at load: slot ->
    #                                {"input": factor on its input (the weight only), "parts": a factor per part of
    #                                its output rows (weight and bias)}; None: none
    attn_gate: bool = False        # Qwen3-Next, Qwen3.5: the attention output times sigmoid of a per-head gate that
    #                                q_proj computes beside q (qkv then holds q|k|v|gate)
    attn_gate_heads: bool = False  # LFM3: that gate is one logit per head, broadcast over head_dim
    attn_gate_fn: str = "sigmoid"  # what the gate goes through: sigmoid, or softplus (Laguna)
    layer_heads: list | None = None    # per layer, its q heads where layers differ (Laguna; the kv heads, and so the
    #                                    cache, stay alike); None: num_heads in every layer
    router_softcap: float = 0.0    # the router's logits capped as c * tanh(l / c) before scoring (Laguna); 0: none
    v_head_dim: int = 0            # MiMo-V2-Flash: each v head this wide, narrower than q and k's head_dim (the
    #                                runtime pads v to head_dim in the cache); 0: head_dim
    value_scale: float = 1.0       # MiMo-V2-Flash: v times this as projected, before it is cached
    residual_depth_scale: bool = False  # Beam: the stream's k-th addition (k = 2 for layer 0's attention, then one
    #                                     more each half) is x / sqrt(k) + stream * sqrt((k - 1) / k)
    query_scale_kind: str = "log"  # the query temperature's form: "log", Llama 4's 1 + beta * log(1 + floor((p +
    #                                offset) / n)), or "power" (Beam): exp(beta * log1p((p + offset) / n))
    sink_layers: list | None = None    # the layers whose heads have a softmax sink (attn_sinks), where not every
    #                                    layer has (MiMo-V2-Flash: the windowed ones); None: every layer that has one
    global_attn: dict | None = None    # Gemma 4: the layers outside window_layers have their own head_dim and
    #                                    num_kv_heads ({"head_dim", "num_kv_heads"}); None: every layer alike
    value_is_key: bool = False     # Gemma 4 (attention_k_eq_v): those layers have no v_proj, v is k's projection;
    #                                qkv holds k's rows twice
    v_norm: bool = False           # Gemma 4: each v head RMS-normed without a weight
    moe_beside_dense: bool = False  # Gemma 4 26B-A4B: the dense MLP (the shared_* slots) and the mixture each read
    #                                 the stream through their own norm, and their outputs are normed before adding
    shortcut_experts: bool = False  # LongCat-Flash: the layers come in pairs; the first of each runs a dense MLP
    #                                 (the shared_* slots) beside the mixture, whose output joins the stream after
    #                                 the second layer's MLP (dense_layers: the second of each pair)
    zero_experts: int = 0          # LongCat-Flash: the router also scores this many identity experts (ids from
    #                                num_experts on), which pass a token through times its weight
    first_attn_norm: bool = True   # False: layer 0 has no attention norm; it reads the (normed) embeddings as they
    #                                are (ModernBERT's decoder)
    head_activation: str | None = None  # the head's transform before lm_head: norm(act(head_dense(h))) (ModernBERT's
    #                                     decoder); None: lm_head reads the final norm's output
    head_vocab_size: int = 0       # the lm_head's rows where it is pruned to the first ones of the vocab (Apertus
    #                                1.5: the text tokens of a vocab that also holds image and audio codes); 0: all
    per_layer_input: int = 0       # Gemma 4 E2B/E4B: the width of each layer's per-layer input (PLE); 0: none
    per_layer_vocab: int = 0       # Gemma 3n: the per-layer embeddings cover the first ids only (the rest read row
    #                                0); 0: the whole vocab
    altup: dict | None = None      # residual "altup" (Gemma 3n): {"streams", "correct_scale", "laurel_rank"}; see
    #                                configs/gemma3n.toml
    gate_sparsity: list | None = None  # Gemma 3n: per layer, the MLP gate's target sparsity (0: none); the gate
    #                                    keeps relu(gate - (mean + std * z)), z the normal quantile of it
    kv_source: list | None = None  # per layer, the layer whose keys and values it attends over: its own index, or
    #                                an earlier layer's of its kind (Gemma 4 E2B/E4B's last layers, which compute
    #                                q only); None: every layer its own
    wide_mlp_layers: list | None = None  # layers whose MLP is wide_intermediate_size wide (Gemma 4 E2B's layers
    wide_intermediate_size: int = 0      # that read another's cache: twice as wide); None: none
    linear_pre_norm: bool = False  # OLMo Hybrid: only the linear layers norm each half's input (attn_norm,
    #                                mlp_norm); the attention layers norm each half's output (attn_post_norm,
    #                                mlp_post_norm) instead, as OLMo 2/3 do
    cca: dict | None = None        # ZAYA's compressed convolutional attention: {"depthwise", "grouped"}, the taps of
    #                                its two causal convs over q|k (see configs/zaya.toml); with it an fp32 stream
    #                                and the attn_res / mlp_res scaling
    router_dim: int = 0            # ZAYA's router: its MLP's width (router_* slots), top 1 of the experts and a skip
    #                                expert, its state carried to the next layer's router; 0: none
    encoder: str | None = None     # an encoder-decoder's decoder (T5): the subdirectory holding its encoder's
    #                                conversion, whose output every layer's cross-attention reads (cross_* slots)
    decoder_start_token_id: int | None = None   # and the token its decoder starts from
    embed_from: str | None = None  # an encoder-decoder's encoder half: ".." when its embeddings are the table the
    #                                decoder (in the directory above) stores, read from there and not stored twice
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    slots: list = field(default_factory=list)   # canonical global + per-layer slots present

    def to_dict(self) -> dict:
        return asdict(self)

    def global_layer(self, layer: int | None) -> bool:
        """Whether this layer takes global_attn's geometry (an attention layer outside window_layers)."""
        return layer is not None and is_global_layer(self.global_attn, self.window_layers, self.linear_layers, layer)

    def kv_shared(self, layer: int | None) -> bool:
        """Whether this layer attends over an earlier layer's keys and values (and so computes q only)."""
        return layer is not None and self.kv_source is not None and self.kv_source[layer] != layer

    def index_layer(self, layer: int | None) -> bool:
        """Whether this layer runs a sparse attention indexer of its own (DeepSeek-V3.2, GLM-5's full layers,
        DeepSeek-V4's compressed sparse layers)."""
        if self.compressed:
            return layer in self.compressed["csa_layers"]
        ix = (self.mla or {}).get("index")
        return layer is not None and ix is not None and layer in ix["layers"]

    def at(self, layer: int | None) -> "ModelSpec":
        """The spec as this layer sees it: global_attn's head_dim and num_kv_heads in a global layer; no kv heads
        of its own in a layer that reads another's cache; a wide MLP's width; the layer's own q heads."""
        from dataclasses import replace
        spec = self
        if self.global_layer(layer):
            spec = replace(spec, head_dim=self.global_attn["head_dim"], num_kv_heads=self.global_attn["num_kv_heads"],
                           global_attn=None)
        if self.kv_shared(layer):
            spec = replace(spec, num_kv_heads=0, value_is_key=False)
        if layer in (self.wide_mlp_layers or ()):
            spec = replace(spec, intermediate_size=self.wide_intermediate_size)
        if self.layer_heads is not None and layer is not None:
            spec = replace(spec, num_heads=self.layer_heads[layer])
        lm = latent_at(self.mla, self.window_layers, layer) if layer is not None else self.mla
        if lm is not self.mla:          # Dots3 Note: a windowed layer's own latent heads and widths
            spec = replace(spec, mla=lm, num_heads=lm["heads"], head_dim=lm["nope_dim"] + lm["rope_dim"])
        if self.ngram and layer is not None:           # Qwen4-Exp: this layer's n-gram table, if any
            spec = replace(spec, ngram={**self.ngram, "here": layer})
        if self.compressed and layer is not None:      # DeepSeek-V4: which compressor this layer has, if any
            cp = self.compressed
            spec = replace(spec, compressed={**cp, "here": "csa" if layer in cp["csa_layers"] else
                                             "hca" if layer in cp["hca_layers"] else None})
        return spec

    @property
    def v_dim(self) -> int:
        """The width of a v head (and of each head's attention output): v_head_dim, or head_dim."""
        return self.v_head_dim or self.head_dim

    @property
    def gate_width(self) -> int:
        """Rows of the attention gate per q head in qkv: head_dim (Qwen3.5), 1 (LFM3) or 0 (no gate)."""
        return 0 if not self.attn_gate else 1 if self.attn_gate_heads else self.head_dim


def _number(c: dict, key: str, default: float, zero_ok: bool = False) -> float:
    """An optional finite number from [config] (soft-caps, multipliers, scales), or the default: positive, or
    non-negative with zero_ok (a soft-cap of 0 means none)."""
    v = c.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v if zero_ok else 0 < v) or v == math.inf:
        raise FmError(f"config.json: {key} must be a {'non-negative' if zero_ok else 'positive'} number, got {v!r}")
    return float(v)


_MASK64, _SPLITMIX = (1 << 64) - 1, (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _ngram_multipliers(vocab: int, size: int, index: int, seed: int) -> list[int]:
    """Qwen4-Exp's odd hash multipliers of its index-th n-gram layer, one per place in the n-gram: SplitMix64 of a
    seed that steps by 10007 a layer, reduced so that a token id times one stays within int64."""
    half = max(1, ((1 << 63) - 1) // max(vocab, 1) // 2)
    out = []
    for k in range(size):
        z = (seed + 10007 * index + _SPLITMIX[0] * (k + 1) + _SPLITMIX[0]) & _MASK64
        z = ((z ^ (z >> 30)) * _SPLITMIX[1]) & _MASK64
        z = ((z ^ (z >> 27)) * _SPLITMIX[2]) & _MASK64
        out.append(2 * ((z ^ (z >> 31)) % half) + 1)
    return out


def _primes_from(start: int, n: int) -> list[int]:
    """The first n primes >= start (each hashed n-gram head's table size)."""
    out, x = [], start
    while len(out) < n:
        if x == 2 or (x > 2 and x % 2 and all(x % d for d in range(3, math.isqrt(x) + 1, 2))):
            out.append(x)
        x += 1
    return out


def per_layer_type(params: dict) -> bool:
    """Whether RoPE parameters come one set per layer kind (Gemma 3), not as one set."""
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def _rope_params(params: dict) -> dict:
    return {"rope_type": params.get("rope_type", params.get("type", "default")),
            "theta": float(params.get("rope_theta", 10000.0)),
            "parameters": {k: v for k, v in sorted(params.items()) if k not in ("rope_type", "type")}}


def _yarn_mscale(params: dict) -> float:
    """DeepSeek's YaRN attention factor for its softmax scale: 1 + 0.1 * mscale_all_dim * ln(factor), or 1."""
    factor, m = params.get("factor") or 1.0, params.get("mscale_all_dim") or 0.0
    if type(factor) not in (int, float) or type(m) not in (int, float) or not 0 < factor < math.inf:
        raise FmError(f"config.json: rope_parameters factor={factor!r} and mscale_all_dim={m!r} must be numbers")
    return 1.0 if factor <= 1 or not m else 0.1 * m * math.log(factor) + 1.0


def _attr(config, name: str, default=None):
    """A config attribute; a dotted name reads inside a sub-config or dict (MPT's attn_config.clip_qkv), or a list
    by index (Falcon-H1's mlp_multipliers.0)."""
    v = config
    for part in name.split("."):
        if isinstance(v, (list, tuple)):
            v = v[int(part)] if part.isdigit() and int(part) < len(v) else None
        else:
            v = v.get(part) if isinstance(v, dict) else getattr(v, part, None)
        if v is None:
            return default
    return v


def _operand(config, x: str):
    if re.fullmatch(r"'[^']*'", x):        # a string literal: topk_method == 'group_limited_greedy'
        return x[1:-1]
    return int(x) if re.fullmatch(r"-?\d+", x) else _attr(config, x)


def _eval_config_term(config, term: str, known: dict):
    term = term.strip()
    if term.startswith("!"):
        return not _eval_config_term(config, term[1:], known)
    for op in ("!=", "=="):
        if op in term:
            a, b = (_operand(config, x.strip()) for x in term.split(op))
            return (a != b) if op == "!=" else (a == b)
    if term in known:                      # a flag defined above this one
        return known[term]
    return bool(_attr(config, term, False))


def _eval_flag(config, expr, known: dict | None = None) -> bool:
    """A flag: terms joined by " and ", alternatives by " or " (and binds tighter). A term is a config attribute,
    `!term`, `a == b` / `a != b` (attributes, integers or 'strings'), or the name of a flag defined before it."""
    if isinstance(expr, bool):
        return expr
    known = known or {}
    return any(all(_eval_config_term(config, t, known) for t in alt.split(" and ")) for alt in expr.split(" or "))


def _pick(value, flags: dict, where: str):
    """A three-item list [flag, if_true, if_false] picks by a flag; either branch may itself be such a list."""
    while isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        if value[0] not in flags:
            raise FmError(f"{where} names flag {value[0]!r}, which [flags] does not define")
        value = value[1] if flags[value[0]] else value[2]
    return value


def _config_value(config, spec, key: str, flags: dict | None = None):
    """Resolve a `[config]` entry: "a|b" alternatives, "4*x" multiples and "x*y" products, "x/y" ratios,
    "x+1" (a non-negative integer plus a constant), "sqrt(x)", "sqrt(x/y)", "len(x)" (a list's length), a number as
    the last alternative ("x|0": x where the config sets it), {value = ...} constants, and [flag, if_true, if_false]
    picks of any of these."""
    spec = _pick(spec, flags or {}, f"config.{key}")
    if isinstance(spec, dict):
        return spec["value"]
    for alt in spec.split("|"):
        if re.fullmatch(r"\d+(\.\d+)?", alt):
            return float(alt) if "." in alt else int(alt)
        m = re.fullmatch(r"([\w.]+)\*([\w.]+)", alt)
        if m:
            a, v = _operand(config, m.group(1)), _attr(config, m.group(2))
            if a is not None and v is not None:
                return a * v
            continue
        m = re.fullmatch(r"(\w+)\+(\d+)", alt)     # ModernBERT: its half window, the keys either side, plus one
        if m:
            a = getattr(config, m.group(1), None)
            if isinstance(a, int) and not isinstance(a, bool):
                if a < 0:
                    raise FmError(f"config: {m.group(1)}={a} must be a non-negative integer")
                return a + int(m.group(2))
            continue
        m = re.fullmatch(r"sqrt\((\w+)\)", alt)               # T5's tied head: d_model^-0.5 on its input
        if m:
            a = getattr(config, m.group(1), None)
            if type(a) in (int, float) and a > 0:
                return math.sqrt(a)
            continue
        m = re.fullmatch(r"sqrt\((\w+)/(\w+)\)", alt)      # LongCat-Flash's latent attention scales
        if m:
            a, b = getattr(config, m.group(1), None), getattr(config, m.group(2), None)
            if type(a) in (int, float) and type(b) in (int, float) and a > 0 and b > 0:
                return math.sqrt(a / b)
            continue
        m = re.fullmatch(r"(\w+)/(\w+)", alt)
        if m:
            a = getattr(config, m.group(1), None)
            b = int(m.group(2)) if m.group(2).isdigit() else getattr(config, m.group(2), None)   # "x/2"
            if isinstance(a, int) and isinstance(b, int) and b > 0:
                if a % b:
                    raise FmError(f"config: {m.group(1)}={a} is not divisible by {m.group(2)}={b}")
                return a // b
            continue
        m = re.fullmatch(r"len\((\w+)\)", alt)         # Nemotron-H: the layers are its list of layer kinds
        if m:
            v = getattr(config, m.group(1), None)
            if isinstance(v, (list, tuple)):
                return len(v)
            continue
        v = _attr(config, alt)
        if v is not None:
            return v
    raise FmError(f"config.json has no usable value for {key} (looked for {spec})")


def _windowed(windows: dict, num_layers: int) -> list[int]:
    """The windowed layers `Policy._windows` describes: window_layers, or every layer when that is None and there is
    a window, or none."""
    layers = windows.get("window_layers")
    if layers is None:
        return list(range(num_layers)) if windows.get("sliding_window") else []
    return list(layers)


# Zamba2: a shared block's weights, held by the first hybrid layer that runs it (the others read that layer's)
SHARED_BLOCK_SLOTS = ("mem_norm.", "qkv.weight", "attn_out.", "mlp_norm.", "mlp_in.weight", "mlp_out.")


def _experts(names: list[str], spec: ModelSpec) -> range:
    """Names with `{e}` repeat once per expert, in expert order (all of one expert's names, then the next's); names
    with `{p}`, once per part of a table stored in pieces along its rows (Qwen4-Exp's n-gram tables)."""
    if any("{p}" in n for n in names):
        return range(spec.ngram["parts"] if spec.ngram else 1)
    return range(spec.num_experts) if any("{e}" in n for n in names) else range(1)


@dataclass
class SlotSource:
    """Where one canonical slot comes from: HF names (concatenated along dim 0) and each part's expected shape."""

    slot: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    optional: bool = False
    aliases: list[list[str]] = field(default_factory=list)   # other spellings of `names`, tried when it is absent
    layer: int | None = None        # the layer it belongs to (None: a global slot); see ModelSpec.at


class Policy:
    def __init__(self, table: dict, path: Path):
        self.table = table
        self.path = path
        self.family: str = table["family"]
        self.kind: str = table["kind"]
        self.prefixes: list[str] = table["prefixes"]
        self.architectures: dict = table["architectures"]
        self.layout: dict = table["layout"]
        self.transposed: set[str] = set(self.layout.get("transposed", []))
        self.as_row: set[str] = set(self.layout.get("as_row", []))    # a vector stored as [1, n] (ERNIE 4.5)
        # a vector stored in another shape, -1 its length (Kimi Linear's A_log: [1, 1, heads, 1])
        self.stored_shape: dict[str, list] = dict(self.layout.get("stored_shape", {}))
        # slot -> the index of a part the checkpoint does not store, zeros in the fused tensor (Whisper's k_proj has
        # no bias: qkv.bias is q's, zeros, v's); `reassemble` leaves it out again
        self.zero_parts: dict[str, int] = dict(self.layout.get("zero_parts", {}))
        bad = [k for k, v in self.zero_parts.items() if type(v) is not int or v < 0]
        if bad:
            raise FmError(f"{path.name}: layout.zero_parts.{bad[0]} must be a part's index")
        # how many of our layers one checkpoint layer holds (LongCat-Flash: 2, named layers.{i}.<part>.{s})
        self.sublayers: int = self.layout.get("sublayers", 1)
        if type(self.sublayers) is not int or not 1 <= self.sublayers <= 8:
            raise FmError(f"{path.name}: layout.sublayers must be an integer from 1 to 8, got {self.sublayers!r}")
        for key, values in (("experts", ("per_expert", "stacked", "flat")),
                            ("gate_up", ("halves", "interleaved", "up_first"))):
            if self.layout.get(key, values[0]) not in values:
                raise FmError(f"{path.name}: layout.{key} must be {' or '.join(values)}, got {self.layout[key]!r}")
        # A layer slot present in some layers only is a flag's (when = ...) or the layout's (dense, linear or part
        # layers) to decide: `optional` would leave the fused slot with no tensors to fuse in a layer without it.
        optional = [slot for slot, e in table.get("tensors", {}).get("layer", {}).items()
                    if isinstance(e, dict) and e.get("optional")]
        if optional:
            raise FmError(f"{path.name}: tensors.layer.{optional[0]} is optional, which only global slots may be; "
                          "use when = \"<flag>\" for a slot some checkpoints lack")
        self.wrapper: str | None = None                  # set on a view through a vision-language wrapper
        self.text_arch: str | None = None                # then: the architecture whose flags the text model takes
        self.head_prefixes: dict[str, str] = {}          # body prefix -> lm_head's prefix ("" unless wrapped)
        # an encoder-decoder's decoder table: [seq2seq] encoders (its architecture -> the encoder's, whose table
        # converts the encoder half into ENCODER_DIR), encoder_prefixes (the names the decoder leaves to that half)
        # and decoder_prefixes (the names the encoder half leaves to this one)
        self.seq2seq: dict | None = table.get("seq2seq")
        self.drop: list[str] = list(table.get("drop", []))   # name prefixes left out (a wrapper's vision tower,
        #                                                          Qwen3.5's multi-token-prediction head mtp.)

    def through(self, wrapper: str, text_arch: str | None = None) -> Policy:
        """This family as the language model inside a vision-language wrapper (configs/wrappers/): its tensors
        under the wrapper's prefixes, the wrapper's other towers left out, and the flags of `text_arch` (Qwen2's
        biases for Qwen2.5-VL)."""
        w = wrappers()[wrapper]
        view = copy.copy(self._variant(w["variant"]) if "variant" in w else self)
        view.wrapper, view.text_arch = wrapper, text_arch
        view.prefixes = [body for body, _ in w["prefixes"]]
        view.head_prefixes = {body: head for body, head in w["prefixes"]}
        view.drop = self.drop + list(w["drop"])
        return view

    def _variant(self, name: str) -> Policy:
        """This table with its `[variants.<name>]` laid over it: layout keys and tensor names of another spelling
        of the same model (MiniMax-M3 as published, inside its vision-language wrapper: MiniMax's own names, one
        tensor per expert, gate and up apart, where transformers' text class saves its own)."""
        v = self.table.get("variants", {}).get(name)
        if v is None:
            raise FmError(f"{self.path.name} has no variant {name!r}")
        t = copy.deepcopy(self.table)
        t["layout"] = {**t["layout"], **v.get("layout", {})}
        vt = v.get("tensors", {})
        t["tensors"]["layer"] = {**t["tensors"]["layer"], **vt.get("layer", {})}
        t["tensors"]["head"] = {**t["tensors"].get("head", {}), **vt.get("head", {})}
        t["tensors"].update({k: e for k, e in vt.items() if k not in ("layer", "head")})
        return Policy(t, self.path)

    def flipped(self, slots) -> Policy:
        """This table with these stacked slots read in the other orientation: transformers accepts a stacked expert
        tensor either way ([E, out, in] or [E, in, out], told apart by shape), and checkpoints hold both (Qwen3-VL-MoE
        as published is [E, in, out]; transformers 5 saves [E, out, in])."""
        view = copy.copy(self)
        view.transposed = self.transposed ^ set(slots)
        return view

    def flippable(self, slot: str) -> bool:
        return self._stacked(slot) and slot.endswith(".weight")

    def head_prefix(self, prefix: str) -> str:
        return self.head_prefixes.get(prefix, "")

    # -- spec -----------------------------------------------------------------------------------------------
    def flags(self, config, architecture: str) -> dict[str, bool]:
        flags: dict[str, bool] = {}
        for k, v in self.table.get("flags", {}).items():          # in order: a flag may use those above it
            flags[k] = _eval_flag(config, v, flags)
        flags.update(self.architectures.get(self.text_arch or architecture, {}))
        return flags

    def _layout(self, key: str, flags: dict, default=None):
        if key not in self.layout:       # a default is a value, never the name of a flag (Cohere 2 MoE has one
            return default               # called "sigmoid")
        v = self.layout[key]
        if key not in ("transposed", "as_row", "stored_shape", "zero_parts") and isinstance(v, list):
            return _pick(v, flags, f"{self.path.name}: layout.{key}")
        if isinstance(v, str) and v in flags:
            return flags[v]
        return v

    def spec(self, config, architecture: str) -> ModelSpec:
        if vars(config).get("_heterogeneity_spec") is None:
            return self._spec(config, architecture)
        # transformers' per_layer_config: sizes that vary by layer. A table that reads them (global_attn) takes the
        # config's own values as the windowed layers'; any other would silently read one layer's for all.
        if not self.layout.get("global_attn") and not self.layout.get("windowed_latent"):
            raise FmError(f"{architecture}: config.json gives per-layer sizes (per_layer_config), which the "
                          f"{self.family} table does not read")
        from transformers import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()        # its warning on each such read: we read them on purpose
        config.allow_global_per_layer_attribute_access = True
        try:
            return self._spec(config, architecture)
        finally:
            config.allow_global_per_layer_attribute_access = False
            hf_logging.set_verbosity(verbosity)

    def _spec(self, config, architecture: str) -> ModelSpec:
        flags = self.flags(config, architecture)
        if flags.get("unsupported"):
            expr = self.table["flags"]["unsupported"]
            if isinstance(expr, str):       # name the alternative that holds, not all of them
                expr = next((a for a in expr.split(" or ") if _eval_flag(config, a, flags)), expr)
            raise FmError(f"{architecture}: this config uses a variant fmconvert does not support ({expr})")
        c = {k: _config_value(config, v, k, flags) for k, v in self.table["config"].items()}
        if c.get("ffn_adjust"):
            c["intermediate_size"] = self._ffn_adjusted(c)
        if "ffn_factor" in c:          # xLSTM: hidden x ffn_proj_factor, rounded up to a multiple
            f, of = c["ffn_factor"], c.get("ffn_round")
            if type(f) not in (int, float) or not 0 < f < 1e3 or type(of) is not int or of < 1:
                raise FmError(f"config.json: ffn_proj_factor must be a positive number and ffn_round_up_to_multiple_of "
                              f"a positive integer, got {f!r} and {of!r}")
            c["intermediate_size"] = int((c["hidden_size"] * f + of - 1) // of * of)
        parts = self._block_parts(config, c) if self.layout.get("block_parts") else {}
        if isinstance(c.get("intermediate_size"), (list, tuple)):      # Gemma 3n: one width per layer, all alike
            widths = set(c["intermediate_size"])
            if len(widths) != 1 or len(c["intermediate_size"]) != c["num_layers"]:
                raise FmError(f"config.json: intermediate_size per layer must be one width for every layer, got "
                              f"{str(c['intermediate_size'])[:80]}")
            c["intermediate_size"] = widths.pop()
        mla = self._mla(c, flags) if "kv_rank" in c else None
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                    "vocab_size"):
            if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] <= 0:
                raise FmError(f"config.json: {key} must be a positive integer, got {c[key]!r}")
        if c["num_heads"] % c["num_kv_heads"]:
            raise FmError(f"config.json: num_attention_heads={c['num_heads']} is not a multiple of "
                          f"num_key_value_heads={c['num_kv_heads']}")
        gated = bool(self._layout("gated_mlp", flags))
        act_name = c["activation"]
        if not isinstance(act_name, str) or act_name not in _ACTIVATIONS:
            raise FmError(f"{architecture}: activation {act_name!r} is not supported "
                          f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        act = _ACTIVATIONS[act_name]
        if gated:
            if act not in _GATED:
                raise FmError(f"{architecture}: gated MLP with {act_name!r} is not supported "
                              f"(SiLU gives SwiGLU, GELU gives GeGLU, exact or tanh-approximated, ReLU² gives "
                              f"ReGLU²)")
            act = _GATED[act]
        glu = {}
        if "all_glu_limit" in c:         # DeepSeek-V4: every SwiGLU clamps its inputs, the shared expert's too
            limit = c["all_glu_limit"]
            if act != "swiglu" or isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                    or not 0 < limit < math.inf:
                raise FmError(f"{architecture}: swiglu_limit must be a positive number, with a SiLU gate, got "
                              f"{limit!r} and {act_name!r}")
            act, glu = "swiglu_limit", {"glu_limit": float(limit)}
        if "glu_limit" in c:             # GPT-OSS: SwiGLU with clamped inputs, a sigmoid gain, and up + 1
            if act != "swiglu":
                raise FmError(f"{architecture}: a clamped GLU needs a SiLU gate, got {act_name!r}")
            act = "swiglu_oai"
            glu = {"glu_alpha": _number(c, "glu_alpha", 1.0), "glu_limit": _number(c, "glu_limit", 1.0)}
        compressed = self._compressed(config, c) if self.layout.get("attention") == "compressed" else None
        windows = self._windows(config, c) if compressed is None else self._slide_everywhere(c)
        global_attn = self._global_attn(config, c, windows) if self.layout.get("global_attn") else None
        if global_attn:
            c["global_head_dim"] = global_attn["head_dim"]
        if self.layout.get("windowed_latent"):       # Dots3 Note: the windowed layers' latent widths, the scales
            self._windowed_latent(config, c, windows, mla)
        position = self._position(config, flags, c)
        if "pad_id" in position:        # RoBERTa's table holds rows 0..pad too: its usable length is the rest
            c["max_positions"] = (c.get("max_positions") or 0) - position["offset"]
            if c["max_positions"] <= 0:
                raise FmError(f"config.json: max_position_embeddings must exceed pad_token_id + 1 "
                              f"({position['offset']})")
        if compressed:                  # the last rotary_dim columns of each head turn (and of each indexer head)
            compressed["rope_dim"] = position["rotary_dim"]
            if compressed["index"] and compressed["index"]["dim"] < position["rotary_dim"]:
                raise FmError(f"config.json: index_head_dim={compressed['index']['dim']} is narrower than the rotated "
                              f"width {position['rotary_dim']}")
        scale = _number(c, "attn_scale", 1.0 / math.sqrt(_number(c, "query_scale_dim", c["head_dim"])))
        disentangled = self._disentangled(config, c) if self.layout.get("disentangled") else None
        if disentangled:       # DeBERTa: each of the score's terms (content, c2p, p2c) scaled by 1/sqrt(d * terms)
            scale = 1.0 / math.sqrt(c["head_dim"] * (1 + disentangled["c2p"] + disentangled["p2c"]))
        if mla and position.get("rope_type", "default") != "default":
            scale *= _yarn_mscale(position["parameters"]) ** 2      # DeepSeek: YaRN's mscale sharpens the softmax
        experts, topk = c.get("num_experts") or 0, c.get("experts_per_token") or 0
        if type(experts) is not int or type(topk) is not int:     # Hunyuan's configs may give a list per layer
            raise FmError(f"config.json: the expert count and top-k must be integers (one for every layer), got "
                          f"{str(experts)[:60]} and {str(topk)[:60]}")
        if experts and not 1 <= topk <= experts:
            raise FmError(f"config.json: num_experts_per_tok={topk} must be between 1 and num_local_experts={experts}")
        mixed = self._dense_layers(c, experts) if experts else {}
        shortcut = bool(experts) and bool(self._layout("shortcut_experts", flags, False))
        if shortcut:      # LongCat-Flash: the mixture in the first layer of each pair, a dense MLP in the second
            if c["num_layers"] % 2 or not c.get("shared_intermediate_size") or not c.get("dense_intermediate_size"):
                raise FmError("config.json: a shortcut mixture needs layers in pairs and a dense MLP width "
                              "(ffn_hidden_size)")
            mixed = {"dense_layers": list(range(1, c["num_layers"], 2)),
                     "dense_intermediate_size": c["dense_intermediate_size"]}
        zero = c.get("zero_experts") or 0
        if type(zero) is not int or zero < 0 or (zero and not experts):
            raise FmError(f"config.json: zero_expert_num must be a non-negative integer, with experts, got {zero!r}")
        tied = bool(self._layout("tied", flags) if "tied" in self.layout else        # T5: by its own flag
                    getattr(config, "tie_word_embeddings", False)) and self.kind == "decoder"
        linear = self._linear(config, c, flags)
        if linear.get("lightning") and act != "swiglu":     # its q|k|v go through the MLP's gate activation
            raise FmError(f"{architecture}: lightning attention with hidden_act {act_name!r} is not supported "
                          f"(only silu)")
        eps = c["norm_eps"]
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise FmError(f"config.json: norm epsilon must be a positive number, got {eps!r}")
        spec = ModelSpec(
            family=self.family, architecture=architecture, kind=self.kind,
            hidden_size=c["hidden_size"], num_layers=c["num_layers"], num_heads=c["num_heads"],
            num_kv_heads=c["num_kv_heads"], head_dim=c["head_dim"], intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"], max_positions=int(c.get("max_positions") or 0),
            embed_dim=int(c.get("embed_dim") or c["hidden_size"]),
            norm=self._layout("norm", flags), norm_eps=float(eps), activation=act, gated_mlp=gated,
            residual=self._layout("residual", flags), residual_factors=self._residual_factors(c, flags),
            hyper=self._hyper(c, flags), experts_glu_limit=self._experts_glu_limit(c, experts),
            qsa=self._qsa(config, c, position), ngram=self._ngram(config, c, linear.get("linear_layers")),
            moa=self._moa(c), final_norm_eps=_number(c, "final_norm_eps", 0.0, zero_ok=True),
            shared_blocks=self._shared_blocks(c, parts, flags),
            attn_input=2 * c["hidden_size"] if self.layout.get("shared_blocks") else 0,
            diff_attn=self._diff_attn(c), rel_bias=self._rel_bias(c, flags), disentangled=disentangled,
            dyn_mask=self._dyn_mask(c), loop=self._loop(c),
            causal_encoder=self.kind == "encoder" and bool(self._layout("causal", flags, False)),
            proj_dim=int(c.get("proj_dim") or 0), audio_mels=int(c.get("audio_mels") or 0),
            wave=self._wave(config, flags), features=self._features(config, flags),
            conformer=self._conformer(config, flags),
            adapter=self._adapter(config, flags, architecture, c["num_heads"]),
            shared_layers=bool(self._layout("shared_layers", flags, False)),
            eos_pool=self._eos_pool(config) if self.layout.get("pool") == "eos" else None,
            embed_proj=bool(self._layout("embed_proj", flags, False)) and int(c.get("embed_dim") or c["hidden_size"])
            != c["hidden_size"],
            norm_gate_rank=self._norm_gate_rank(c), block_sparse=self._block_sparse(config, c),
            compressed=compressed, hash_layers=self._hash_layers(c, experts),
            altup=self._altup(c, flags), gate_sparsity=self._gate_sparsity(c),
            position=position, tied_embeddings=tied,
            embed_norm=bool(self._layout("embed_norm", flags, False)),
            final_norm=bool(self._layout("final_norm", flags, False)),
            project=bool(flags.get("project", False)), pooler=False,
            type_vocab_size=int(c.get("type_vocab_size") or 0),
            attn_scale=scale, mla=mla, **linear, **parts,
            attn_gate=bool(self._layout("attn_gate", flags, False)),
            attn_gate_heads=self._layout("attn_gate", flags, False) == "head",
            attn_gate_fn=self._gate_fn(flags), layer_heads=self._layer_heads(c),
            router_softcap=_number(c, "router_softcap", 0.0, zero_ok=True) if experts else 0.0,
            v_head_dim=self._v_head_dim(c, mla), value_scale=_number(c, "value_scale", 1.0),
            sink_layers=self._sink_layers(c, windows, flags),
            residual_depth_scale=bool(self._layout("depth_scaled_residual", flags, False)),
            qkv_clip=_number(c, "qkv_clip", 0.0, zero_ok=True),
            ssm_beside_attention=bool(self.layout.get("ssm_beside_attention", False)),
            row_scales=self._row_scales(config, flags),
            norm_affine=bool(self._layout("norm_weights", flags, True)),
            embed_scale=self._embed_scale(c, flags), qkv_layout=self._layout("qkv", flags, "separate"),
            num_experts=experts, experts_per_token=topk if experts else 0,
            shared_intermediate_size=self._shared_size(c, experts),
            experts_renormalize=bool(self._layout("experts_renormalize", flags, True)),
            experts_scale_input=self._layout("experts_weigh", flags, "output") == "input",
            qk_norm=self._qk_norm(flags), qk_norm_after_rope=bool(self._layout("qk_norm_after_rope", flags, False)),
            **glu, **mixed, **self._router(c, experts, topk, flags), **self._query_scale(config, c, flags),
            **windows, nope_layers=self._nope_layers(config, c, position, mixed.get("dense_layers"), flags),
            global_attn=global_attn,
            value_is_key=bool(global_attn) and bool(self._layout("value_is_key", flags, False)),
            v_norm=bool(self._layout("v_norm", flags, False)),
            moe_beside_dense=bool(experts) and bool(self._layout("moe_beside_dense", flags, False)),
            shortcut_experts=shortcut, zero_experts=zero,
            first_attn_norm=bool(self._layout("first_attn_norm", flags, True)),
            head_activation=self._head_activation(architecture, c, flags),
            linear_pre_norm=bool(self._layout("linear_pre_norm", flags, False)),
            cca=self._cca(c), router_dim=self._router_dim(c, experts, topk),
            **self._per_layer_parts(c, flags, windows, experts), head_vocab_size=self._head_vocab(c, tied),
            shared_scale=_number(c, "shared_scale", 1.0),
            attn_softcap=_number(c, "attn_softcap", 0.0, zero_ok=True),
            logit_softcap=_number(c, "logit_softcap", 0.0, zero_ok=True),
            logit_scale=1.0 / _number(c, "logit_divisor", 1.0) * _number(c, "logit_scale", 1.0),
            residual_scale=_number(c, "residual_scale", 1.0) * (       # MiniCPM3: scale_depth / sqrt(layers)
                _number(c, "residual_scale_depth", 1.0) / math.sqrt(c["num_layers"]) if "residual_scale_depth" in c
                else 1.0),
            bos_token_id=getattr(config, "bos_token_id", None), eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )
        if self.seq2seq:
            start = getattr(config, "decoder_start_token_id", None)
            if type(start) is not int or not 0 <= start < c["vocab_size"]:
                raise FmError(f"config.json: decoder_start_token_id must be a token id below vocab_size="
                              f"{c['vocab_size']}, got {start!r}")
            spec.encoder, spec.decoder_start_token_id = ENCODER_DIR, start
        return spec

    @staticmethod
    def _cca(c: dict) -> dict | None:
        """ZAYA's CCA, from [config] cca_depthwise and cca_grouped (cca_time0, cca_time1): each conv's taps. v is
        two halves of the kv heads' channels (the token's and the one before's), so their count must be even."""
        if "cca_depthwise" not in c:
            return None
        taps = c["cca_depthwise"], c.get("cca_grouped")
        if any(type(t) is not int or not 1 <= t <= 64 for t in taps):
            raise FmError(f"config.json: cca_time0 and cca_time1 must be integers from 1 to 64, got {taps[0]!r} and "
                          f"{taps[1]!r}")
        if c["num_kv_heads"] * c["head_dim"] % 2:
            raise FmError(f"config.json: num_key_value_heads * head_dim must be even (CCA's v is a current and a "
                          f"delayed half), got {c['num_kv_heads']} * {c['head_dim']}")
        return {"depthwise": taps[0], "grouped": taps[1]}

    @staticmethod
    def _router_dim(c: dict, experts: int, topk: int) -> int:
        """ZAYA's router ([config] router_dim, router_hidden_size): its width; it picks one expert (or none)."""
        if "router_dim" not in c:
            return 0
        r = c["router_dim"]
        if type(r) is not int or r <= 0 or not experts or topk != 1:
            raise FmError(f"config.json: ZAYA's router needs a positive router_hidden_size and num_experts_per_tok=1, "
                          f"got {r!r} and {topk!r}")
        return r

    def _residual_factors(self, c: dict, flags: dict) -> dict | None:
        """Residual "normed" (MiniMax): [config] attn_alpha / attn_beta, linear_alpha / linear_beta (the linear
        layers' attention half) and mlp_alpha / mlp_beta, each 1 when unset."""
        if self._layout("residual", flags) != "normed":
            return None
        return {k: [_number(c, k + "_alpha", 1.0), _number(c, k + "_beta", 1.0)] for k in ("attn", "linear", "mlp")}

    def _hyper(self, c: dict, flags: dict) -> dict | None:
        """Residual "hyper" (HY-V4's hyper-connections): [config] hc_streams copies of the stream (at least 2),
        hc_magnitude (the output weights' ceiling) and hc_eps (added to every weight)."""
        kind = self._layout("residual", flags)
        if kind not in ("hyper", "gated_hyper"):
            return None
        n = c.get("hc_streams")
        if type(n) is not int or not 2 <= n <= 16:
            raise FmError(f"config.json: {'hc_count' if kind == 'gated_hyper' else 'hc_mult'} must be an integer from "
                          f"2 to 16, got {n!r}")
        if kind == "gated_hyper":           # Qwen4-Exp: the input mix through a low-rank bottleneck
            rank = c.get("hc_rank")
            if type(rank) is not int or not 1 <= rank <= 1 << 16:
                raise FmError(f"config.json: hc_lowrank must be a positive integer, got {rank!r}")
            return {"streams": n, "rank": rank}
        out = {"streams": n, "magnitude": _number(c, "hc_magnitude", float(self.layout.get("hc_magnitude", 2.0))),
               "eps": _number(c, "hc_eps", 1e-6)}
        if "hc_sinkhorn" in c:      # DeepSeek-V4's mHC: a copy-to-copy mix too, made doubly stochastic
            iters = c["hc_sinkhorn"]
            if type(iters) is not int or not 1 <= iters <= 100:
                raise FmError(f"config.json: hc_sinkhorn_iters must be an integer from 1 to 100, got {iters!r}")
            out.update(sinkhorn=iters, post_eps=bool(self.layout.get("hc_post_eps", True)))
        return out

    def _shared_blocks(self, c: dict, parts: dict, flags: dict) -> dict | None:
        """Zamba2's shared blocks ([config] shared_count, shared_rank; flag qkv_lora): on its hybrid layers."""
        if not self.layout.get("shared_blocks"):
            return None
        n, r = c.get("shared_count"), c.get("shared_rank")
        hybrid = [i for i, p in enumerate(parts.get("block_parts") or ()) if p == "hybrid"]
        if type(n) is not int or type(r) is not int or not 1 <= n <= max(len(hybrid), 1) or not 1 <= r <= 1 << 16:
            raise FmError(f"config.json: num_mem_blocks must be a positive integer no more than the hybrid layers "
                          f"({len(hybrid)}) and adapter_rank a positive integer, got {n!r} and {r!r}")
        if flags.get("untied"):     # transformers ties the blocks only with the embeddings: untied, each hybrid
            n = len(hybrid)         # layer runs its own copy
        return {"count": n, "rank": r, "qkv_lora": bool(flags.get("qkv_lora"))}

    def _wave(self, config, flags) -> dict | None:
        """Wav2Vec2's and HuBERT's front end, from the table's `[wave]` (config attribute names): the conv stack's
        widths, kernels and strides (one per conv layer), its bias and norm, the activation, whether the features
        are normed before their projection, and the positional conv's kernel and groups."""
        w = self.table.get("wave")
        if w is None:
            return None
        v = {k: _config_value(config, name, f"wave.{k}", flags) for k, name in w.items()}
        lists = [v["conv_dim"], v["kernel"], v["stride"]]
        if not all(isinstance(x, (list, tuple)) and x and all(type(i) is int and 0 < i <= 65536 for i in x)
                   for x in lists) or len({len(x) for x in lists}) != 1 or len(lists[0]) > 32:
            raise FmError(f"config.json: conv_dim, conv_kernel and conv_stride must be lists of positive integers, one "
                          f"per conv layer, got {lists[0]!r}, {lists[1]!r}, {lists[2]!r}")
        if v["norm"] not in ("group", "layer"):
            raise FmError(f"config.json: feat_extract_norm must be group or layer, got {v['norm']!r}")
        act = _ACTIVATIONS.get(v["act"]) if isinstance(v["act"], str) else None
        if act not in ("gelu", "gelu_tanh", "relu", "silu"):
            raise FmError(f"config.json: feat_extract_activation {v['act']!r} is not supported")
        h = int(_config_value(config, self.table["config"]["hidden_size"], "hidden_size", flags))
        k, groups, layers = v["pos_kernel"], v["pos_groups"], v.get("pos_layers", 0)
        if type(k) is not int or not 0 < k <= 1024 or type(groups) is not int or groups <= 0 or h % groups:
            raise FmError(f"config.json: the positional conv's kernel ({w['pos_kernel']}) must be a positive integer "
                          f"and its groups ({w['pos_groups']}) one that divides hidden_size, got {k!r} and {groups!r}")
        if type(layers) is not int or not 0 <= layers <= 16:
            raise FmError(f"config.json: {w['pos_layers']} must be a small positive integer, got {layers!r}")
        out = {"conv_dim": list(v["conv_dim"]), "kernel": list(v["kernel"]), "stride": list(v["stride"]),
               "bias": bool(v["bias"]), "norm": v["norm"], "act": act, "feat_norm": bool(v.get("feat_norm", True)),
               "pos_kernel": k, "pos_groups": groups, "pos_layers": layers}
        if v.get("pos_conv", True) is False:      # Wav2Vec2-Conformer: its pos_conv_embed is built, never run
            out["pos_conv"] = False
        return out

    def _conformer(self, config, flags) -> dict | None:
        """Wav2Vec2-Conformer's block, from the table's `[conformer]` (config attribute names): the attention's
        position scheme, the rotary base, the depthwise conv's taps."""
        cf = self.table.get("conformer")
        if cf is None:
            return None
        pos = _attr(config, cf["position"]) or "none"
        known = ("rotary", "relative", "relative_key", "none") if "max_left" in cf else ("rotary", "relative", "none")
        if pos not in known:
            raise FmError(f"config.json: {cf['position']} must be {', '.join(known[:-1])} or null, got {pos!r}")
        base = _config_value(config, cf["rotary_base"], "conformer.rotary_base", flags)
        k = _config_value(config, cf["depthwise_kernel"], "conformer.depthwise_kernel", flags)
        if type(k) is not int or not 0 < k <= 1024 or k % 2 == 0:
            raise FmError(f"config.json: {cf['depthwise_kernel']} must be an odd positive integer, got {k!r}")
        if type(base) not in (int, float) or not base > 0:
            raise FmError(f"config.json: {cf['rotary_base']} must be a positive number, got {base!r}")
        out = {"position": pos, "rotary_base": float(base), "depthwise_kernel": k, "norm_eps": 1e-5}
        if "norm_eps" in cf:        # Wav2Vec2-BERT's blocks take the model's eps
            out["norm_eps"] = float(_config_value(config, cf["norm_eps"], "conformer.norm_eps", flags))
        if "conv_norm" in cf and _config_value(config, cf["conv_norm"], "conformer.conv_norm", flags) == "layer":
            out.update(conv_norm="layer", causal=bool(_config_value(config, cf["causal"], "conformer.causal", flags)))
        if pos == "relative_key":
            lr = [_config_value(config, cf[k], f"conformer.{k}", flags) for k in ("max_left", "max_right")]
            if not all(type(v) is int and 0 <= v <= 65536 for v in lr):
                raise FmError(f"config.json: {cf['max_left']} and {cf['max_right']} must be non-negative integers, "
                              f"got {lr[0]!r} and {lr[1]!r}")
            out.update(max_left=lr[0], max_right=lr[1])
        return out

    def _adapter(self, config, flags, architecture: str, heads: int) -> dict | None:
        """Wav2Vec2-BERT's adapter, from the table's `[adapter]` where its flag holds: layers, the convs' kernel
        and stride, the feed-forward's activation, its width, and whether a feed-forward precedes it."""
        a = self.table.get("adapter")
        if a is None or not flags.get("adapter"):
            return None
        if not architecture.endswith(("Model", "ForCTC")):
            # transformers refuses the frame and clip classifiers with it; an x-vector's layer sum would mix the
            # encoder's frames with the adapter's
            raise FmError(f"{architecture}: this config uses a variant fmconvert does not support (add_adapter "
                          f"with a classifier head)")
        v = {k: _config_value(config, name, f"adapter.{k}", flags) for k, name in a.items()}
        for k in ("layers", "kernel", "stride", "width"):
            if type(v[k]) is not int or not 0 < v[k] <= 65536:
                raise FmError(f"config.json: {a[k]} must be a positive integer, got {v[k]!r}")
        if v["act"] not in _ACTIVATIONS:
            raise FmError(f"config.json: {a['act']} {v['act']!r} is not an activation fmconvert knows")
        if v["width"] % heads or v["kernel"] - 2 * (v["stride"] // 2) < 0:
            raise FmError(f"config.json: {a['width']} must divide into the attention heads, and "
                          f"{a['kernel']} be at least {a['stride']} // 2 * 2")
        return {**{k: v[k] for k in ("layers", "kernel", "stride", "width")}, "act": _ACTIVATIONS[v["act"]],
                "ffn": bool(v["ffn"])}

    def _features(self, config, flags) -> dict | None:
        """Wav2Vec2-BERT's input, from the table's `[features]`: the width of a feature row, and the feature
        extractor's framing of the samples as (kernel, stride) pairs."""
        f = self.table.get("features")
        if f is None:
            return None
        v = {k: _config_value(config, name, f"features.{k}", flags) for k, name in f.items()}
        if type(v["dim"]) is not int or not 0 < v["dim"] <= 65536:
            raise FmError(f"config.json: {f['dim']} must be a positive integer, got {v['dim']!r}")
        return {"dim": v["dim"], "kernel": list(v["kernel"]), "stride": list(v["stride"])}

    def _eos_pool(self, config) -> dict:
        """CLIP's pooled output: the state of each text's first eos token, or (checkpoints whose config still says
        eos 2, from before transformers fixed it) of its largest token id, which is where CLIP's eos sits."""
        eos = getattr(config, "eos_token_id", None)
        if type(eos) is not int or eos < 0:
            raise FmError(f"config.json: CLIP's pooling needs an integer eos_token_id, got {eos!r}")
        return {"eos_id": -1 if eos == 2 else eos}

    def _disentangled(self, config, c: dict) -> dict | None:
        """DeBERTa-v2/v3's relative attention, from its config: which of content->position (c2p) and
        position->content (p2c) terms, over how many relative-embedding rows (2 * span)."""
        if not getattr(config, "relative_attention", False):
            return None
        kinds = getattr(config, "pos_att_type", None) or []
        kinds = [k.strip() for k in kinds.lower().split("|")] if isinstance(kinds, str) else list(kinds)
        unsupported = [(getattr(config, "conv_kernel_size", 0) or 0) > 0 and "conv_kernel_size (a convolution after "
                       "the first layer)", not getattr(config, "share_att_key", False) and "share_att_key false (own "
                       "position projections)", not set(kinds) <= {"c2p", "p2c"} and f"pos_att_type {kinds}",
                       int(getattr(config, "embedding_size", None) or c["hidden_size"]) != c["hidden_size"]
                       and "embedding_size other than hidden_size"]
        unsupported = [u for u in unsupported if u]
        if unsupported:
            raise FmError(f"config.json: DeBERTa with {unsupported[0]} is not supported")
        buckets = getattr(config, "position_buckets", -1) or -1
        max_pos = getattr(config, "max_relative_positions", -1) or -1
        max_pos = max_pos if max_pos >= 1 else c.get("max_positions") or 0
        span = buckets if buckets > 0 else max_pos
        if type(span) is not int or span < 1 or (buckets > 0 and (buckets % 2 or max_pos <= buckets // 2 + 1)):
            raise FmError(f"config.json: position_buckets={buckets} and max_relative_positions={max_pos} do not make "
                          f"a relative-position span (buckets even, below 2 * max_relative_positions)")
        return {"span": span, "buckets": max(buckets, 0), "max_position": max_pos, "c2p": "c2p" in kinds,
                "p2c": "p2c" in kinds}

    def _rel_bias(self, c: dict, flags: dict) -> dict | None:
        """MPNet: the bucketed relative-position bias every layer adds to its scores (an encoder's)."""
        if "rel_buckets" not in c:
            return None
        b, d = c["rel_buckets"], c["rel_max_distance"]
        if type(b) is not int or b < 4 or b % 4 or type(d) is not int or d <= b // 4:
            raise FmError(f"config.json: a relative position bias needs buckets a multiple of 4 and a max distance "
                          f"past a quarter of them, got {b!r} and {d!r}")
        return {"buckets": b, "max_distance": d,
                **({"per_layer": True} if self._layout("rel_bias_per_layer", flags, False) else {}),
                **({"causal": True} if self.kind == "decoder" else {})}     # T5's decoder: earlier keys' buckets

    def _loop(self, c: dict) -> dict | None:
        """HRM-Text (layout loop): [config] loop_stack_layers blocks in each of two stacks, run l_cycles times (L)
        then once (H), h_cycles times over; transformers' num_hidden_layers counts every run's layers."""
        names = self.layout.get("loop")
        if not names:
            return None
        if not isinstance(names, list) or len(names) != 2 or not all(isinstance(n, str) and n for n in names):
            raise FmError(f"{self.path.name}: layout.loop must name the two stacks, [L, H], got {names!r}")
        P, H, L = (c.get(k) for k in ("loop_stack_layers", "loop_h_cycles", "loop_l_cycles"))
        if any(type(v) is not int or not 1 <= v <= 4096 for v in (P, H, L)):
            raise FmError(f"config.json: num_layers_per_stack, H_cycles and L_cycles must be positive integers, got "
                          f"{P!r}, {H!r} and {L!r}")
        if c["num_layers"] != P * H * (L + 1):
            raise FmError(f"config.json: num_hidden_layers={c['num_layers']} must be num_layers_per_stack * H_cycles * "
                          f"(L_cycles + 1) = {P * H * (L + 1)}, one per block run")
        return {"stack_layers": P, "h_cycles": H, "l_cycles": L}

    @staticmethod
    def _dyn_mask(c: dict) -> dict | None:
        """Doge's dynamic mask attention, from [config] keep_window: the keys a query keeps at most."""
        if "keep_window" not in c:
            return None
        w = c["keep_window"]
        if type(w) is not int or not 0 < w < 1 << 24:
            raise FmError(f"config.json: keep_window_size must be a positive integer, got {w!r}")
        return {"keep_window": w}

    def _diff_attn(self, c: dict) -> bool:
        """DiffLlama: its heads pair across the two halves, q head p with p + heads / 2 and kv head j with
        j + kv_heads / 2, so both counts must be even."""
        if not self.layout.get("diff_attention"):
            return False
        if c["num_heads"] % 2 or c["num_kv_heads"] % 2:
            raise FmError(f"config.json: differential attention pairs heads across its two halves: "
                          f"num_attention_heads={c['num_heads']} and num_key_value_heads={c['num_kv_heads']} must "
                          f"be even")
        return True

    @staticmethod
    def _moa(c: dict) -> dict | None:
        """JetMoe's mixture of attention heads: [config] moa_experts and moa_top_k; the q heads are num_kv_heads
        times top_k (each expert's projection holds num_kv_heads heads)."""
        if "moa_experts" not in c:
            return None
        E, k = c.get("moa_experts"), c.get("moa_top_k")
        if type(E) is not int or type(k) is not int or not 1 <= k <= E or c["num_heads"] != k * c["num_kv_heads"]:
            raise FmError(f"config.json: the attention experts (num_local_experts, num_experts_per_tok) must be "
                          f"integers with 1 <= top-k <= experts, and num_attention_heads their top-k times "
                          f"num_key_value_heads, got {E!r}, {k!r} and {c['num_heads']} heads")
        return {"experts": E, "top_k": k}

    @staticmethod
    def _qsa(config, c: dict, position: dict) -> dict | None:
        """Qwen4-Exp's QSA indexer ([config] qsa_heads, qsa_kv_heads (one), qsa_dim, qsa_budget, qsa_rate): on every
        attention layer; its queries turn like the attention's, over the first rotary_dim columns."""
        if "qsa_heads" not in c:
            return None
        q = {k: c.get("qsa_" + k) for k in ("heads", "kv_heads", "dim", "budget", "rate")}
        if any(type(v) is not int or not 0 < v <= 1 << 20 for v in q.values()) or q["kv_heads"] != 1 \
                or q["budget"] % q["rate"] or q["dim"] < position.get("rotary_dim", 0):
            raise FmError(f"config.json: the QSA indexer (indexer_n_heads, indexer_kv_heads, indexer_head_dim, "
                          f"indexer_budget, indexer_compress_ratio) needs positive integers, one key head, a budget "
                          f"in whole blocks and heads at least as wide as the rotated part, got {q}")
        del q["kv_heads"]
        return q

    @staticmethod
    def _ngram(config, c: dict, linear_layers) -> dict | None:
        """Qwen4-Exp's hashed n-gram embeddings ([config] ngram_layers, one-indexed, and the widths and hashing
        settings beside them). Each layer's hash multipliers and its heads' prime table sizes are made here, as
        transformers makes them, so the runtime needs neither the config nor transformers."""
        ids = c.get("ngram_layers") or []
        if not ids:
            return None
        L = c["num_layers"]
        keys = ("size", "heads", "dim", "conv_kernel", "base", "multiple", "seed")
        g = {k: c.get("ngram_" + k) for k in keys}
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if not isinstance(ids, (list, tuple)) or any(type(i) is not int or not 1 <= i <= L for i in ids) \
                or any(type(v) is not int for v in g.values()) or not 2 <= g["size"] <= 8 \
                or not 1 <= g["heads"] <= 64 or g["dim"] < 1 or g["dim"] % ((g["size"] - 1) * g["heads"]) \
                or not 2 <= g["conv_kernel"] <= 64 or not 2 <= g["base"] < 1 << 40 or g["multiple"] < 1 \
                or g["seed"] < 0 or type(eos) is not int or eos < 0:
            raise FmError(f"config.json: the n-gram embeddings (ple_layer_ids, ngram_size 2..8, heads_per_ngram, "
                          f"ple_embed_dim a multiple of the heads, ple_conv_kernel_size, ngram_vocab_size_base, "
                          f"eos_token_id) are malformed, got {str(ids)[:40]} and {g}")
        layers = sorted({i - 1 for i in ids})
        if not set(layers) <= set(linear_layers or ()):
            raise FmError(f"config.json: ple_layer_ids must name linear attention layers, got {str(ids)[:60]}")
        heads = (g["size"] - 1) * g["heads"]
        primes = _primes_from(g["base"], heads * len(layers))
        tables = {}
        for j, i in enumerate(layers):
            sizes = primes[j * heads:(j + 1) * heads]
            offsets = [sum(sizes[:h]) for h in range(heads)]
            tables[str(i)] = {"multipliers": _ngram_multipliers(c["vocab_size"], g["size"], j, g["seed"]),
                              "sizes": sizes, "offsets": offsets,
                              "rows": -(-sum(sizes) // g["multiple"]) * g["multiple"]}
        parts = c.get("ngram_parts") or 1       # how many pieces the checkpoint stores each table in
        if type(parts) is not int or not 1 <= parts <= 1 << 16:
            raise FmError(f"config.json: split_ngram_parts must be a positive integer, got {parts!r}")
        return {"layers": layers, "size": g["size"], "heads": g["heads"], "dim": g["dim"],
                "conv_kernel": g["conv_kernel"], "eos": eos, "parts": parts, "tables": tables}

    def _altup(self, c: dict, flags: dict) -> dict | None:
        """Residual "altup" (Gemma 3n): [config] altup_streams copies, altup_correct_scale, laurel_rank."""
        if self._layout("residual", flags) != "altup":
            return None
        n, r = c.get("altup_streams"), c.get("laurel_rank")
        if type(n) is not int or not 2 <= n <= 16 or type(r) is not int or r < 1:
            raise FmError(f"config.json: altup_num_inputs must be an integer from 2 to 16 and laurel_rank a positive "
                          f"integer, got {n!r} and {r!r}")
        return {"streams": n, "correct_scale": bool(c.get("altup_correct_scale")), "laurel_rank": r}

    @staticmethod
    def _gate_sparsity(c: dict) -> list | None:
        """[config] gate_sparsity (Gemma 3n's activation_sparsity_pattern): a target in [0, 1) per layer."""
        v = c.get("gate_sparsity")
        if v is None:
            return None
        L = c["num_layers"]
        v = [v] * L if type(v) in (int, float) else v
        if not isinstance(v, (list, tuple)) or len(v) != L or any(
                isinstance(x, bool) or type(x) not in (int, float) or not 0 <= x < 1 for x in v):
            raise FmError(f"config.json: activation_sparsity_pattern must give a number in [0, 1) for each of the {L} "
                          f"layers, got {str(v)[:80]}")
        return [float(x) for x in v] if any(v) else None

    @staticmethod
    def _slide_everywhere(c: dict) -> dict:
        """DeepSeek-V4: every layer attends through the window (its compressed entries besides)."""
        w = c.get("sliding_window")
        if type(w) is not int or w < 1:
            raise FmError(f"config.json: sliding_window must be a positive integer, got {w!r}")
        return {"sliding_window": w, "window_layers": None}

    def _compressed(self, config, c: dict) -> dict:
        """DeepSeek-V4's attention: [config] q_rank, o_groups, o_rank, compress_kinds (layer_types: sliding_attention,
        compressed_sparse_attention or heavily_compressed_attention per layer), compress_rates (tokens per entry of
        each compressed kind), index_heads / index_dim / index_topk; the rotated width is the position's."""
        L, H = c["num_layers"], c["num_heads"]
        if c.get("num_kv_heads") != 1:
            raise FmError(f"config.json: compressed attention has one kv head, got num_key_value_heads="
                          f"{c.get('num_kv_heads')!r}")
        kinds, rates = c.get("compress_kinds"), c.get("compress_rates")
        names = {"sliding_attention": None, "compressed_sparse_attention": "csa",
                 "heavily_compressed_attention": "hca"}
        if not isinstance(kinds, (list, tuple)) or len(kinds) != L or any(k not in names for k in kinds):
            raise FmError(f"config.json: layer_types must name sliding_attention, compressed_sparse_attention or "
                          f"heavily_compressed_attention for each of the {L} layers, got {str(kinds)[:80]}")
        rates = {names[k]: v for k, v in (rates or {}).items() if names.get(k)}
        need = {names[k] for k in kinds} - {None}
        if any(type(rates.get(k)) is not int or not 1 <= rates[k] <= 4096 for k in need):
            raise FmError(f"config.json: compress_rates must give a positive integer (up to 4096) for each compressed "
                          f"kind, got {c.get('compress_rates')!r}")
        cp = {k: c.get(k) for k in ("q_rank", "o_groups", "o_rank")}
        if any(type(v) is not int or v < 1 for v in cp.values()) or H % cp["o_groups"]:
            raise FmError(f"config.json: q_lora_rank, o_groups and o_lora_rank must be positive integers, o_groups "
                          f"dividing num_attention_heads={H}, got {cp}")
        ix = {k: c.get("index_" + k) for k in ("heads", "dim", "topk")}
        if "csa" in need and any(type(v) is not int or v < 1 for v in ix.values()):
            raise FmError(f"config.json: index_n_heads, index_head_dim and index_topk must be positive integers, "
                          f"got {ix}")
        return {**cp, "rope_dim": 0, "rates": {k: rates[k] for k in sorted(need)},
                "csa_layers": [i for i, k in enumerate(kinds) if names[k] == "csa"],
                "hca_layers": [i for i, k in enumerate(kinds) if names[k] == "hca"],
                "index": ix if "csa" in need else None}

    @staticmethod
    def _hash_layers(c: dict, experts: int) -> list | None:
        """DeepSeek-V4's mlp_layer_types ([config] hash_kinds): "hash_moe" layers pick experts by token id."""
        kinds = c.get("hash_kinds")
        if kinds is None or not experts:
            return None
        if not isinstance(kinds, (list, tuple)) or len(kinds) != c["num_layers"] \
                or any(k not in ("hash_moe", "moe") for k in kinds):
            raise FmError(f"config.json: mlp_layer_types must name hash_moe or moe for each of the {c['num_layers']} "
                          f"layers, got {str(kinds)[:80]}")
        return [i for i, k in enumerate(kinds) if k == "hash_moe"] or None

    def _block_sparse(self, config, c: dict) -> dict | None:
        """MiniMax-M3's block-sparse attention: [config] bindex_heads (one per kv head), bindex_dim, bindex_block,
        bindex_topk, bindex_local, in the layers layer_types calls "minimax_m3_sparse"."""
        if "bindex_heads" not in c:
            return None
        bs = {k: c.get("bindex_" + k) for k in ("heads", "dim", "block", "topk", "local")}
        if any(type(v) is not int or v < (0 if k == "local" else 1) for k, v in bs.items()):
            raise FmError(f"config.json: the block indexer's index_n_heads, index_head_dim, index_block_size and "
                          f"index_topk_blocks must be positive integers, index_local_blocks non-negative, got {bs}")
        if c["num_heads"] % bs["heads"] or bs["heads"] != c["num_kv_heads"]:
            raise FmError(f"config.json: the block indexer needs one head per kv head ({c['num_kv_heads']}), got "
                          f"index_n_heads={bs['heads']}")
        types = getattr(config, "layer_types", None) or []
        layers = [i for i, t in enumerate(types) if t == "minimax_m3_sparse"]
        return {**bs, "layers": layers} if layers else None

    @staticmethod
    def _norm_gate_rank(c: dict) -> int:
        """[config] norm_gate_rank (A.X K2's gated_norm_rank): its norms' gates' width; 0 or unset: no gates."""
        r = c.get("norm_gate_rank") or 0
        if type(r) is not int or r < 0:
            raise FmError(f"config.json: gated_norm_rank must be a positive integer, got {r!r}")
        return r

    @staticmethod
    def _experts_glu_limit(c: dict, experts: int) -> float:
        """[config] experts_glu_limit (HY-V4's swiglu_limit): the routed experts' SwiGLU inputs clamped; at or below
        0: not clamped."""
        v = c.get("experts_glu_limit")
        if v is None or not experts:
            return 0.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FmError(f"config.json: swiglu_limit must be a finite number, got {v!r}")
        return float(v) if v > 0 else 0.0

    @staticmethod
    def _v_head_dim(c: dict, mla) -> int:
        """[config] v_head_dim (MiMo-V2-Flash): v heads narrower than q and k's head_dim; 0 when as wide."""
        vd = c.get("v_head_dim")
        if vd is None or mla or vd == c["head_dim"]:
            return 0
        if type(vd) is not int or not 0 < vd < c["head_dim"]:
            raise FmError(f"config.json: v_head_dim must be a positive integer up to head_dim={c['head_dim']}, got "
                          f"{vd!r}")
        return vd

    def _sink_layers(self, c: dict, windows: dict, flags: dict) -> list | None:
        """Layout sinks = "windowed": only the windowed layers' heads have softmax sinks (MiMo-V2-Flash)."""
        if self._layout("sinks", flags, "all") != "windowed":
            return None
        return _windowed(windows, c["num_layers"])

    def _gate_fn(self, flags: dict) -> str:
        """Layout attn_gate_fn: what the attention output gate goes through (sigmoid, the default, or softplus)."""
        fn = self._layout("attn_gate_fn", flags, "sigmoid")
        if fn not in ("sigmoid", "softplus"):
            raise FmError(f"{self.path.name}: layout.attn_gate_fn must be sigmoid or softplus, got {fn!r}")
        return fn

    @staticmethod
    def _layer_heads(c: dict) -> list | None:
        """[config] layer_heads: each layer's q head count (Laguna's num_attention_heads_per_layer), a multiple of
        the kv heads; None where the config gives none or every layer has num_heads."""
        heads = c.get("layer_heads")
        if heads is None:
            return None
        if not isinstance(heads, (list, tuple)) or len(heads) != c["num_layers"] or any(
                type(n) is not int or n <= 0 or n % c["num_kv_heads"] for n in heads):
            raise FmError(f"config.json: num_attention_heads_per_layer must list one positive multiple of "
                          f"num_key_value_heads={c['num_kv_heads']} per layer ({c['num_layers']}), got "
                          f"{str(heads)[:80]}")
        return None if all(n == c["num_heads"] for n in heads) else list(heads)

    @staticmethod
    def _head_vocab(c: dict, tied: bool) -> int:
        """[config] head_vocab: the lm_head's rows when fewer than the vocab (0: as many)."""
        n = c.get("head_vocab") or 0
        if n == c["vocab_size"]:
            return 0
        if type(n) is not int or n < 0 or n > c["vocab_size"] or (n and tied):
            raise FmError(f"config.json: output_vocab_size must be a positive integer up to vocab_size "
                          f"({c['vocab_size']}), with an lm_head of its own, got {n!r}")
        return n

    def _per_layer_parts(self, c: dict, flags: dict, windows: dict, experts: int) -> dict:
        """Gemma 4 E2B/E4B. Layout per_layer_input: each layer's per-layer input, [config] ple_dim wide (ple_vocab
        must be the vocab). Layout kv_sharing: the last [config] kv_shared layers attend over the keys and values of
        the last earlier layer of their kind (windowed or global) and compute q only; layout double_wide_mlp (a
        flag): those layers' MLP is twice as wide."""
        out, L = {}, c["num_layers"]
        dim = (c.get("ple_dim") or 0) if self._layout("per_layer_input", flags, False) else 0
        shared = (c.get("kv_shared") or 0) if self._layout("kv_sharing", flags, False) else 0
        if (dim or shared) and experts:
            raise FmError("config.json: per-layer inputs or shared kv caches with a mixture of experts are not "
                          "supported")
        if dim:
            pv = c.get("ple_vocab")
            # Gemma 3n's table may cover the first ids only (layout ple_first_ids: the rest read row 0); Gemma 4
            # looks every id up, so there it must be the whole vocab
            short = self.layout.get("ple_first_ids", False)
            if type(dim) is not int or dim < 0 or type(pv) is not int or not 0 < pv <= c["vocab_size"] \
                    or (pv != c["vocab_size"] and not short):
                raise FmError(f"config.json: hidden_size_per_layer_input must be a non-negative integer and "
                              f"vocab_size_per_layer_input {'a positive one up to' if short else ''} the vocab size "
                              f"({c['vocab_size']}), got {dim!r} and {pv!r}")
            out["per_layer_input"] = dim
            if pv < c["vocab_size"]:          # Gemma 3n: the ids past it read row 0
                out["per_layer_vocab"] = pv
        if shared:
            first = L - shared if type(shared) is int else 0
            windowed = set(_windowed(windows, L))
            if type(shared) is not int or not 0 < first < L:
                raise FmError(f"config.json: num_kv_shared_layers must be an integer from 0 to "
                              f"num_hidden_layers - 1 ({L - 1}), got {shared!r}")
            source = list(range(L))
            for i in range(first, L):
                same = [j for j in range(first) if (j in windowed) == (i in windowed)]
                if not same:
                    raise FmError(f"config.json: layer {i} shares the kv cache of an earlier layer of its kind, and "
                                  f"none of the first {first} layers is one")
                source[i] = same[-1]
            out["kv_source"] = source
            if self._layout("double_wide_mlp", flags, False):
                out.update(wide_mlp_layers=list(range(first, L)), wide_intermediate_size=2 * c["intermediate_size"])
        return out

    def _head_activation(self, architecture: str, c: dict, flags: dict) -> str | None:
        """The activation of the head's dense layer (layout head_transform), canonical and ungated."""
        if not self._layout("head_transform", flags, False):
            return None
        name = c.get("head_activation")
        if not isinstance(name, str) or name not in _ACTIVATIONS or _ACTIVATIONS[name] == "xielu":
            raise FmError(f"{architecture}: the head's activation {name!r} is not supported "
                          f"(supported: {', '.join(sorted(k for k, v in _ACTIVATIONS.items() if v != 'xielu'))})")
        return _ACTIVATIONS[name]

    @staticmethod
    def _global_attn(config, c, windows) -> dict | None:
        """Gemma 4: the full-attention layers' own head_dim and kv head count, from transformers' per_layer_config
        (its global_head_dim and num_global_key_value_heads); None when they are the windowed layers'."""
        n, layers = c["num_layers"], windows.get("window_layers")
        if "global_kv_heads" in c:     # MiMo-V2-Flash: [config] gives the global layers' kv heads outright
            kv = c["global_kv_heads"]
            if type(kv) is not int or kv <= 0 or c["num_heads"] % kv:
                raise FmError(f"config.json: the global layers' kv heads ({kv!r}) must divide "
                              f"num_attention_heads={c['num_heads']}")
            if not _windowed(windows, n):                                        # every layer global
                c["num_kv_heads"] = kv
            if not layers or kv == c["num_kv_heads"]:
                return None
            return {"head_dim": c["head_dim"], "num_kv_heads": kv}
        per = getattr(config, "per_layer_config", None)
        if per is None or not layers:
            return None
        try:
            shapes = [(per[i].head_dim, per[i].num_key_value_heads) for i in range(n)]
        except Exception as e:
            raise FmError(f"config.json: per_layer_config cannot be read ({type(e).__name__}: {e})") from None
        local = {shapes[i] for i in layers}
        wide = {s for i, s in enumerate(shapes) if i not in layers}
        if local != {(c["head_dim"], c["num_kv_heads"])} or len(wide) != 1:
            raise FmError("config.json: per_layer_config must give the windowed layers the model's head_dim and kv "
                          "heads, and every global layer one shape of its own")
        (hd, kv), = wide
        if type(hd) is not int or type(kv) is not int or hd <= 0 or kv <= 0 or hd % 2 or c["num_heads"] % kv:
            raise FmError(f"config.json: the global layers' head_dim (global_head_dim={hd!r}) must be a positive "
                          f"even integer and their kv heads (num_global_key_value_heads={kv!r}) divide "
                          f"num_attention_heads={c['num_heads']}")
        if (hd, kv) == (c["head_dim"], c["num_kv_heads"]):
            return None
        return {"head_dim": hd, "num_kv_heads": kv}

    _LATENT_WIDTHS = {"heads": "num_attention_heads", "q_rank": "q_lora_rank", "kv_rank": "kv_lora_rank",
                      "nope_dim": "qk_nope_head_dim", "rope_dim": "qk_rope_head_dim", "v_dim": "v_head_dim"}

    def _windowed_latent(self, config, c: dict, windows: dict, mla: dict | None) -> None:
        """Dots3 Note (layout windowed_latent): its sliding_attention layers' latent attention takes heads and
        widths of its own from transformers' per_layer_config (mla.local, where they differ from the model's); only
        the indexed_attention layers run the indexer; each kind turns its own rope_dim with its own default RoPE.
        Layout latent_scale: every layer's normed q and kv latents times sqrt(hidden / their rank) (q_scale,
        kv_scale). Edits mla in place and records the windowed layers' rotated width for `_position`."""
        L = c["num_layers"]
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * L)
        if not mla or not mla["q_rank"] or mla.get("gated_q"):
            raise FmError("config.json: this latent attention reads a q bottleneck, but q_lora_rank is not set")
        windowed = set(_windowed(windows, L))
        if len(windowed) == L or {"full_attention", "indexed_attention"} <= set(types):
            raise FmError("config.json: layer_types must hold indexed_attention or full_attention layers, not both, "
                          "beside any sliding_attention ones")
        indexed = [i for i, t in enumerate(types) if t == "indexed_attention"]
        if "index" in mla and indexed[:1] != [0]:
            if indexed:
                raise FmError("config.json: the first layer must be an indexed_attention one when any is")
            del mla["index"]                    # use_dsa false: plain latent attention outside the window
        elif "index" in mla:
            mla["index"]["layers"] = indexed
        own = {"heads": c["num_heads"], **{k: mla[k] for k in self._LATENT_WIDTHS if k != "heads"}}
        per, names = getattr(config, "per_layer_config", None), self._LATENT_WIDTHS
        try:
            widths = [{k: getattr(per[i], n) for k, n in names.items()} for i in range(L)] if per is not None \
                else [own] * L
            heads = [getattr(per[i], "head_dim") if per is not None else c["head_dim"] for i in range(L)]
        except Exception as e:
            raise FmError(f"config.json: per_layer_config cannot be read ({type(e).__name__}: {e})") from None
        local = {tuple(sorted(widths[i].items())) for i in windowed}
        if any(widths[i] != own for i in range(L) if i not in windowed) or len(local) > 1:
            raise FmError("config.json: per_layer_config must give the sliding_attention layers one latent geometry "
                          "of their own and leave the others the model's")
        lw = dict(local.pop()) if local else own
        if any(type(v) is not int or v <= 0 for v in lw.values()):
            raise FmError(f"config.json: the sliding_attention layers' latent widths (swa_num_attention_heads, "
                          f"swa_q_lora_rank, swa_kv_lora_rank, swa_qk_nope_head_dim, swa_qk_rope_head_dim, "
                          f"swa_v_head_dim) must be positive integers, got {lw}")
        params = dict(getattr(config, "rope_parameters", None) or {})
        for i in ([min(windowed)] if windowed else []) + [min(set(range(L)) - windowed)]:
            kind, w = types[i], widths[i]
            p = params.get(kind) if per_layer_type(params) else params
            if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
                raise FmError(f"config.json: rope_parameters.{kind} must be default RoPE (the attention scale takes "
                              f"no RoPE factor here), got {str(p)[:80]}")
            rot = p.get("partial_rotary_factor", 1.0)
            rot = int(heads[i] * rot) if type(rot) in (int, float) and type(heads[i]) is int else None
            if rot != w["rope_dim"]:      # transformers sizes each kind's RoPE by head_dim times its factor
                raise FmError(f"config.json: the {kind} layers' RoPE turns head_dim * partial_rotary_factor = {rot} "
                              f"columns, not their qk_rope_head_dim={w['rope_dim']}")
        if self.layout.get("latent_scale"):     # as transformers computes them: (hidden / rank) ** 0.5
            for w, into in ((own, mla), (lw, lw)):
                into.update(q_scale=(c["hidden_size"] / w["q_rank"]) ** 0.5,
                            kv_scale=(c["hidden_size"] / w["kv_rank"]) ** 0.5)
        if windowed:
            c["local_rotary_dim"] = lw["rope_dim"]
            if {k: lw[k] for k in own} != own:
                mla["local"] = lw

    def _mla(self, c, flags) -> dict:
        """Multi-head latent attention's widths from [config] (q_rank, kv_rank, nope_dim, rope_dim, v_dim). Each q and
        k head is nope_dim + rope_dim wide (head_dim); there is one kv head, the latent every head reads. With
        `index_heads`, DeepSeek Sparse Attention's indexer too (`_index`)."""
        mla = {k: c.get(k) for k in ("q_rank", "kv_rank", "nope_dim", "rope_dim", "v_dim")}
        if any(type(v) is not int or v < 0 or (v == 0 and k != "q_rank") for k, v in mla.items()):
            raise FmError("config.json: the latent attention's widths (q_lora_rank, kv_lora_rank, qk_nope_head_dim, "
                          f"qk_rope_head_dim, v_head_dim) must be positive integers, got {mla}")
        c["head_dim"], c["num_kv_heads"] = mla["nope_dim"] + mla["rope_dim"], 1
        c["rotary_dim"] = mla["rope_dim"]
        out = {**mla, "norm_eps": _number(c, "latent_norm_eps", 1e-6)}
        if self._layout("q_gate", flags, False):     # A.X K2: q_b reads [normed | raw] q latent, gives q | gate
            if not mla["q_rank"]:
                raise FmError("config.json: a gated query reads the q bottleneck, but q_lora_rank is 0 (none)")
            out["gated_q"] = True
        if "index_heads" in c:
            out["index"] = self._index(c, mla, flags)
        return out

    def _index(self, c, mla: dict, flags) -> dict:
        """DeepSeek Sparse Attention's indexer: index_heads heads of index_dim, each query attending to its index_topk
        best-scored earlier tokens; RoPE over the first rope_dim columns in `index_rope_style`. `index_kinds` (GLM-5's
        indexer_types) names each layer "full" (runs the indexer) or "shared" (reuses the last full layer's choice);
        absent, every layer is full."""
        ix = {"heads": c.get("index_heads"), "dim": c.get("index_dim"), "topk": c.get("index_topk")}
        if any(type(v) is not int or v <= 0 for v in ix.values()):
            raise FmError("config.json: the sparse attention indexer's index_n_heads, index_head_dim and index_topk "
                          f"must be positive integers, got {ix}")
        if not mla["q_rank"]:
            raise FmError("config.json: a sparse attention indexer reads the q bottleneck, but q_lora_rank is 0 (none)")
        if ix["dim"] < mla["rope_dim"]:
            raise FmError(f"config.json: index_head_dim={ix['dim']} is narrower than the rotated "
                          f"qk_rope_head_dim={mla['rope_dim']}")
        L, kinds = c["num_layers"], c.get("index_kinds") or None
        if kinds is not None and (not isinstance(kinds, (list, tuple)) or len(kinds) != L or kinds[0] != "full"
                                  or any(k not in ("full", "shared") for k in kinds)):
            raise FmError(f"config.json: indexer_types must name full or shared for each of the {L} layers, the "
                          f"first full, got {str(kinds)[:60]}")
        layers = list(range(L)) if kinds is None else [i for i, k in enumerate(kinds) if k == "full"]
        out = {**ix, "rope_style": self._layout("index_rope_style", flags, "neox"), "layers": layers}
        if self._layout("index_rope_at", flags, "first") == "last":   # HY-V4: the last rope_dim columns turn
            out["rope_at"] = "last"
        if "index_norm_eps" in c:          # the key's LayerNorm eps where it is not 1e-6 (HY-V4: rms_norm_eps)
            out["norm_eps"] = _number(c, "index_norm_eps", 1e-6)
        return out

    def _linear(self, config, c, flags) -> dict:
        """A hybrid's linear layers: Gated DeltaNet (Qwen3-Next, Qwen3.5: [config] lin_k_heads, lin_v_heads, lin_k_dim,
        lin_v_dim, lin_conv) or Mamba2 (Granite 4.0: ssm_heads, ssm_head_dim, ssm_groups, ssm_state, ssm_conv,
        ssm_dt_limit), the layers layer_types calls "linear_attention" (transformers reads the older "mamba" as
        that); or LFM2's short convolution ([config] sconv: its taps), the layers it calls "conv"."""
        kind = "linear_attention"
        if "sconv" in c:
            K = c["sconv"]
            if type(K) is not int or not 2 <= K <= 64:
                raise FmError(f"config.json: conv_L_cache must be an integer from 2 to 64, got {K!r}")
            key, mixer, kind = "short_conv", {"conv_kernel": K}, "conv"
        elif "ssm_heads" in c:
            key, mixer = "ssm", self._ssm(c)
            gate = self._layout("ssm_gate", flags, "gate_first")
            if gate not in ("gate_first", "norm_first", "none"):
                raise FmError(f"{self.path.name}: ssm_gate {gate!r} is not gate_first, norm_first or none")
            if gate != "gate_first":         # Falcon-H1: normed before the gate, or not at all
                mixer["gate"] = gate
        elif "mamba_state" in c:
            key, mixer = "mamba", self._mamba(c, flags)
        elif "mlstm_heads" in c:           # xLSTM: an mLSTM in every layer
            factors = [c.get("mlstm_qk_factor"), c.get("mlstm_v_factor")]
            if any(type(x) not in (int, float) or not 0 < x <= 64 for x in factors):
                raise FmError(f"config.json: qk_dim_factor and v_dim_factor must be positive numbers, got {factors}")
            ml = {"heads": c["mlstm_heads"], "qk_dim": int(c["hidden_size"] * factors[0]),      # as its layers
                  "v_dim": int(c["hidden_size"] * factors[1])}                                  # size them
            if any(type(v) is not int or v < 1 for v in ml.values()) or ml["qk_dim"] % ml["heads"] \
                    or ml["v_dim"] % ml["heads"] or c.get("embed_dim", c["hidden_size"]) != c["hidden_size"]:
                raise FmError(f"config.json: the mLSTM's heads must divide its q/k and v widths (hidden_size times "
                              f"qk_dim_factor, v_dim_factor) and embedding_dim must be hidden_size, got {ml}")
            ml.update(gate_cap=_number(c, "mlstm_gate_cap", 15.0), eps=_number(c, "mlstm_eps", 1e-6))
            return {"mlstm": ml, "linear_layers": list(range(c["num_layers"]))}
        elif "rglru_width" in c:           # RecurrentGemma
            rg = {"width": c["rglru_width"], "heads": c["rglru_heads"], "conv_kernel": c.get("rglru_conv")}
            if any(type(v) is not int or v < 1 for v in rg.values()) or rg["width"] % rg["heads"] \
                    or rg["conv_kernel"] < 2:
                raise FmError(f"config.json: lru_width and num_attention_heads must be positive integers, the width a "
                              f"multiple of the heads, and conv1d_width at least 2, got {rg}")
            key, mixer = "rglru", {**rg, "activation": _ACTIVATIONS.get(c["activation"], c["activation"])}
        elif "lin_k_heads" in c:
            la = {k: c.get("lin_" + k) for k in ("k_heads", "v_heads", "k_dim", "v_dim", "conv")}
            if any(type(v) is not int or not 0 < v <= 1 << 16 for v in la.values()) \
                    or la["v_heads"] % la["k_heads"] or la["conv"] < 2:
                raise FmError("config.json: the linear attention's widths (linear_num_key_heads, "
                              "linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, "
                              "linear_conv_kernel_dim) must be positive integers, the value heads a multiple of the "
                              f"key heads and the conv at least 2 wide, got {la}")
            la["conv_kernel"] = la.pop("conv")
            for key in ("beta_scale", "norm_eps"):     # OLMo Hybrid: beta in (0, 2); its gated norm's own eps
                if c.get("lin_" + key) is not None:
                    la[key] = _number(c, "lin_" + key, 1.0)
            gate = c.get("lin_gate")                   # Qwen4-Exp: the output gate's activation, silu or sigmoid
            if gate is not None:
                if gate not in ("silu", "sigmoid"):
                    raise FmError(f"config.json: output_gate_type must be silu or sigmoid, got {str(gate)[:40]!r}")
                if gate == "sigmoid":
                    la["gate"] = "sigmoid"
            if self._layout("linear_decay", flags, "head") == "channel":     # Kimi Linear's KDA
                if la["k_heads"] != la["v_heads"]:
                    raise FmError(f"config.json: KDA needs as many key heads as value heads, got {la}")
                la["decay"] = "channel"
                if self._layout("linear_gates", flags, "low_rank") == "full":   # Ling 2.5: f and g full projections
                    la["gates"] = "full"
                bound = c.get("lin_decay_bound") or 0
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not -1e4 < bound <= 0:
                    raise FmError(f"config.json: kda_lower_bound must be a negative number, got {bound!r}")
                if bound:                      # Ling 2.5's safe gate: g = bound * sigmoid(exp(A_log) (f + dt_bias))
                    la["decay_bound"] = float(bound)
            key, mixer = "linear_attn", la
        elif self._layout("lightning", flags, False):    # MiniMax: over the attention's own heads and head_dim
            key, mixer = "lightning", True
        else:
            return {}
        if self.layout.get("ssm_beside_attention") or self.layout.get("shared_blocks"):
            return {key: mixer, "linear_layers": list(range(c["num_layers"]))}   # Falcon-H1, Zamba2: every layer
        types = getattr(config, "layer_types", None)
        if not isinstance(types, (list, tuple)) or len(types) != c["num_layers"]:
            raise FmError(f"config.json: layer_types (or block_types) must list one kind per layer "
                          f"({c['num_layers']}), "
                          f"{kind} or full_attention")
        layers = [i for i, t in enumerate(types) if t == kind]
        return {key: mixer, "linear_layers": layers} if layers else {}

    @staticmethod
    def _ffn_adjusted(c) -> int:
        """LFM2's MLP width (block_auto_adjust_ff_dim): 2/3 of intermediate_size, times block_ffn_dim_multiplier and
        rounded up to block_multiple_of when the multiplier is set, as transformers sizes it."""
        size, mult, of = c["intermediate_size"], c.get("ffn_multiplier"), c.get("ffn_multiple_of")
        if type(size) is not int or (mult is not None and type(mult) not in (int, float)) or type(of) is not int \
                or of <= 0:
            raise FmError(f"config.json: intermediate_size, block_ffn_dim_multiplier and block_multiple_of must be "
                          f"numbers, got {size!r}, {mult!r}, {of!r}")
        size = int(2 * size / 3)
        if mult is not None:
            size = of * -(-int(mult * size) // of)
        return size

    @staticmethod
    def _block_parts(config, c) -> dict:
        """Layout `block_parts` (Nemotron-H): each layer holds one part, named by layer_types: a token mixer
        (linear_attention: Mamba2; full_attention) or an MLP (mlp: dense; moe: a mixture). Without a moe layer the
        model is dense (the config's expert settings are defaults then); with one, the mlp layers are a mixture's
        dense layers."""
        types = getattr(config, "layer_types", None)
        kinds = {"linear_attention": "mixer", "full_attention": "mixer", "mlp": "mlp", "moe": "mlp",
                 "hybrid": "hybrid"}           # Zamba2: a Mamba2 layer fed by a shared transformer block too
        if not isinstance(types, (list, tuple)) or len(types) != c["num_layers"] or any(t not in kinds for t in types):
            raise FmError(f"config.json: layers_block_type must name one of {', '.join(kinds)} for each of the "
                          f"{c['num_layers']} layers, got {str(types)[:80]}")
        if "hybrid" in types:                # Zamba2: the dense MLP is the shared blocks'
            return {"block_parts": [kinds[t] for t in types]}
        if "moe" not in types:
            c.update(num_experts=0, experts_per_token=0, shared_intermediate_size=0,
                     intermediate_size=c.get("dense_intermediate_size"), dense_intermediate_size=None)
        else:
            c["dense_list"] = [i for i, t in enumerate(types) if t == "mlp"]
        return {"block_parts": [kinds[t] for t in types]}

    # The slots [row_scales] may name, with how many parts their output rows have (gated: gate|up)
    ROW_SCALE_PARTS = {"qkv": 3, "attn_out": 1, "mlp_in": 2, "mlp_out": 1, "ssm_in": 5, "ssm_out": 1, "q_b": 1,
                       "kv_a_norm": 1}

    def _row_scales(self, config, flags) -> dict | None:
        """Falcon-H1's muP multipliers: `[row_scales]` slot -> one config value per part of its output rows,
        `[input_scales]` slot -> one on its input. Each a finite non-zero number; None when every factor is 1."""
        rows, inputs = self.table.get("row_scales", {}), self.table.get("input_scales", {})
        out = {}
        for slot in sorted(set(rows) | set(inputs)):
            if slot not in self.ROW_SCALE_PARTS:
                raise FmError(f"{self.path.name}: [row_scales] slot {slot!r} is not one of "
                              f"{', '.join(self.ROW_SCALE_PARTS)}")
            n = self.ROW_SCALE_PARTS[slot]
            parts = rows.get(slot, ["1"] * n)
            if len(parts) != n:
                raise FmError(f"{self.path.name}: [row_scales] {slot} needs {n} factors, one per part")
            values = [_config_value(config, e, f"row_scales.{slot}", flags) for e in [inputs.get(slot, "1"), *parts]]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0
                   for v in values):
                raise FmError(f"config.json: the multipliers of {slot} must be finite non-zero numbers, got "
                              f"{str(values)[:80]}")
            if any(v != 1 for v in values):
                out[slot] = {"input": float(values[0]), "parts": [float(v) for v in values[1:]]}
        return out or None

    @staticmethod
    def _ssm(c) -> dict:
        ssm = {k: c.get("ssm_" + k) for k in ("heads", "head_dim", "groups", "state", "conv")}
        if any(type(v) is not int or not 0 < v <= 1 << 16 for v in ssm.values()) or ssm["heads"] % ssm["groups"] \
                or ssm["conv"] < 2:
            raise FmError("config.json: the Mamba2 widths (mamba_n_heads, mamba_d_head, mamba_n_groups, "
                          "mamba_d_state, mamba_d_conv) must be positive integers, the heads a multiple of the "
                          f"groups and the conv at least 2 wide, got {ssm}")
        limit = c.get("ssm_dt_limit") or (c.get("ssm_dt_min") or 0.0, math.inf)     # Zamba2: time_step_min
        if not isinstance(limit, (list, tuple)) or len(limit) != 2 or any(type(v) not in (int, float) for v in limit) \
                or not 0 <= limit[0] < limit[1]:
            raise FmError(f"config.json: time_step_limit must be two numbers, low below high, got {limit!r}")
        ssm["conv_kernel"] = ssm.pop("conv")
        if c.get("ssm_norm_eps") is not None:       # Zamba2: its gated norm's own eps
            ssm["norm_eps"] = _number(c, "ssm_norm_eps", 1e-5)
        return {**ssm, "dt_min": float(limit[0]), "dt_max": None if limit[1] == math.inf else float(limit[1])}

    def _mamba(self, c, flags) -> dict:
        """Mamba (1)'s widths from [config] (mamba_inner, mamba_state, mamba_dt_rank, mamba_conv) and layout
        `mamba_norms` (none, plain or weighted: RMS norms on dt's low rank, B and C, eps `mamba_norm_eps`, by default
        the model's)."""
        m = {k: c.get("mamba_" + k) for k in ("inner", "state", "dt_rank", "conv")}
        if any(type(v) is not int or not 0 < v <= 1 << 20 for v in m.values()) or m["conv"] < 2 or m["state"] > 256:
            raise FmError("config.json: the Mamba widths (intermediate size, state_size, time_step_rank, conv_kernel) "
                          f"must be positive integers, the conv at least 2 wide and the state at most 256, got {m}")
        norms = self._layout("mamba_norms", flags, "none")
        if norms not in ("none", "plain", "weighted"):
            raise FmError(f"{self.path.name}: layout.mamba_norms must be none, plain or weighted, got {norms!r}")
        eps = c.get("mamba_norm_eps") or c["norm_eps"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
            raise FmError(f"config.json: the Mamba norms' epsilon must be a positive number, got {eps!r}")
        m["conv_kernel"] = m.pop("conv")
        return {**m, "norms": None if norms == "none" else norms, "norm_eps": float(eps)}

    def _dense_layers(self, c, experts: int) -> dict:
        """A mixture's layers with a dense MLP instead: the first `first_dense` (GLM-4.5's first_k_dense_replace),
        those after `last_sparse`, those in `dense_list`, and with `sparse_step` n every layer i where
        (i + 1) % n != 0 (Qwen3-MoE's mlp_only_layers and decoder_sparse_step; ERNIE 4.5's moe_layer_*). Their MLP
        is `dense_intermediate_size` wide."""
        L = c["num_layers"]
        first, listed, step = c.get("first_dense") or 0, c.get("dense_list") or [], c.get("sparse_step") or 1
        kinds = c.get("mlp_kinds")             # K-EXAONE's mlp_layer_types: "dense" or "sparse" per layer
        if kinds is not None:
            if not isinstance(kinds, (list, tuple)) or len(kinds) != L or any(k not in ("dense", "sparse")
                                                                              for k in kinds):
                raise FmError(f"config.json: mlp_layer_types must name dense or sparse for each of the {L} layers, "
                              f"got {str(kinds)[:60]}")
            listed = list(listed) + [i for i, k in enumerate(kinds) if k == "dense"]
        counts = c.get("expert_counts")        # Jamba's layers_num_experts: 1 where a layer is dense
        if counts is not None:
            if not isinstance(counts, (list, tuple)) or len(counts) != L or any(type(n) is not int or n < 1
                                                                                for n in counts):
                raise FmError(f"config.json: the experts of each of the {L} layers must be positive integers, got "
                              f"{str(counts)[:60]}")
            listed = list(listed) + [i for i, n in enumerate(counts) if n == 1]
        sparse = c.get("sparse_list")          # Llama 4's moe_layers: the mixtures, every other layer dense
        if sparse is not None:
            if not isinstance(sparse, (list, tuple)) or any(type(i) is not int or not 0 <= i < L for i in sparse):
                raise FmError(f"config.json: moe_layers must list layer indices below {L}, got {str(sparse)[:60]}")
            listed = list(listed) + [i for i in range(L) if i not in sparse]
        last = c.get("last_sparse", L - 1)
        last = L - 1 if last is None or last == -1 else last
        if type(first) is not int or first < 0 or type(step) is not int or step < 1 or type(last) is not int \
                or not isinstance(listed, (list, tuple)) or any(type(i) is not int or not 0 <= i < L for i in listed):
            raise FmError(f"config.json: the dense layers of this mixture are malformed (first_k_dense_replace="
                          f"{first!r}, mlp_only_layers={str(listed)[:60]}, decoder_sparse_step={step!r})")
        dense = sorted(i for i in range(L) if i < first or i > last or i in listed or (i + 1) % step)
        if not dense:
            return {}
        if len(dense) == L:
            raise FmError("config.json: every layer of this mixture of experts is dense; it has no experts to route")
        size = c.get("dense_intermediate_size")
        if type(size) is not int or size <= 0:
            raise FmError(f"config.json: intermediate_size (the dense layers' width) must be a positive integer, "
                          f"got {size!r}")
        return {"dense_layers": dense, "dense_intermediate_size": size}

    def _router(self, c, experts: int, topk: int, flags: dict) -> dict:
        """How a mixture picks and weighs its experts: layout `router` ("softmax", the default, "sigmoid",
        "sigmoid_logits": the correction bias added to the logits rather than the scores for the choice, or
        "sparsemixer": Phi-MoE's two sequential picks, with [config] router_jitter), and the expert groups and the
        scale from [config] (router_groups, router_topk_groups, routed_scale): a sigmoid router ranks a group by its
        two best experts, a softmax one (DeepSeek-V2) by its best."""
        how = self._layout("router", flags, "softmax")
        if how == "sqrtsoftplus" and c.get("scoring", how) != how:     # DeepSeek-V4's scoring_func may say otherwise
            how = c["scoring"]
            if how not in ("softmax", "sigmoid"):
                raise FmError(f"config.json: scoring_func must be sqrtsoftplus, sigmoid or softmax, got {how!r}")
        if how not in ("softmax", "sigmoid", "sigmoid_logits", "sparsemixer", "sqrtsoftplus"):
            raise FmError(f"{self.path.name}: layout.router must be softmax, sigmoid, sigmoid_logits, sparsemixer or "
                          f"sqrtsoftplus, got {how!r}")
        if experts and how == "sparsemixer":            # Phi-MoE: two picks, one after the other
            if topk != 2:
                raise FmError(f"config.json: SparseMixer routing picks exactly 2 experts, got num_experts_per_tok="
                              f"{topk}")
            return {"router": how, "router_jitter": _number(c, "router_jitter", 0.0, zero_ok=True)}
        if not experts or (how == "softmax" and "router_groups" not in c and "routed_scale" not in c):
            return {}
        groups, top = c.get("router_groups") or 1, c.get("router_topk_groups") or 1
        if type(groups) is not int or type(top) is not int or groups < 1 or experts % groups \
                or not 1 <= top <= groups or topk > top * (experts // groups):
            raise FmError(f"config.json: n_group={groups!r} and topk_group={top!r} must split the {experts} experts "
                          f"evenly and leave room for num_experts_per_tok={topk}")
        return {"router": how, "router_groups": groups, "router_topk_groups": top,
                "routed_scale": _number(c, "routed_scale", 1.0)}

    def _query_scale(self, config, c: dict, flags: dict) -> dict:
        """Llama 4's attention scaling: from [config] query_scale_beta and query_scale_from (Llama 4's attn_scale
        and floor_scale, in its layers without RoPE, counting p + 1: layout query_scale = "nope"), or from
        rope_parameters (Ministral 3: llama_4_scaling_beta and the original_max_position_embeddings it counts in)."""
        if "query_scale_beta" in c:
            beta, n = c["query_scale_beta"], c.get("query_scale_from")
            if not beta:
                return {}
            if type(beta) not in (int, float) or not 0 < beta < math.inf or type(n) is not int or n <= 0:
                raise FmError(f"config.json: the query temperature needs a positive attn_scale and a positive "
                              f"integer floor_scale, got {beta!r} and {n!r}")
            nope = self._layout("query_scale", flags, "all") == "nope"
            kind = self._layout("query_scale_kind", flags, "log")
            if kind not in ("log", "power"):
                raise FmError(f"{self.path.name}: layout.query_scale_kind must be log or power, got {kind!r}")
            return {"query_scale_beta": float(beta), "query_scale_from": n, "query_scale_offset": int(nope),
                    "query_scale_nope_only": nope, "query_scale_kind": kind}
        params = getattr(config, "rope_parameters", None) or {}
        beta = params.get("llama_4_scaling_beta") if isinstance(params, dict) else None
        if not beta:
            return {}
        n = params.get("original_max_position_embeddings")
        if type(beta) not in (int, float) or not 0 < beta < math.inf or type(n) is not int or n <= 0:
            raise FmError(f"config.json: llama_4_scaling_beta={beta!r} needs a positive beta and a positive integer "
                          f"original_max_position_embeddings, got {n!r}")
        return {"query_scale_beta": float(beta), "query_scale_from": n}

    def _qk_norm(self, flags) -> str:
        how = self._layout("qk_norm", flags, "head")
        if how not in ("head", "per_head", "full", "l2"):
            raise FmError(f"{self.path.name}: layout.qk_norm must be head, per_head, full or l2, got {how!r}")
        return how

    def _shared_size(self, c, experts: int) -> int:
        size = c.get("shared_intermediate_size") or 0
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or (size and not experts):
            raise FmError(f"config.json: shared_expert_intermediate_size must be a non-negative integer, with "
                          f"experts, got {size!r}")
        return size

    def _windows(self, config, c) -> dict:
        """The sliding window and the layers that use it. transformers 5 names each layer's kind in
        `layer_types` (Gemma 2 alternates; Qwen2 windows the layers from max_window_layers on); without it the
        window, if any, holds in every layer (Mistral, Phi-3)."""
        window = c.get("sliding_window") or 0
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise FmError(f"config.json: sliding_window must be a non-negative integer, got {window!r}")
        types = self._kind_names(getattr(config, "layer_types", None))
        named = c.get("window_kinds")     # GPT-Neo's attention_layers: "local" (layout window_kind) or "global"
        if named is not None:
            if not isinstance(named, (list, tuple)) or len(named) != c["num_layers"]:
                raise FmError(f"config.json: attention_layers must name one kind per layer ({c['num_layers']}), "
                              f"got {str(named)[:80]}")
            local = self.layout.get("window_kind", "local")
            types = ["sliding_attention" if k == local else "full_attention" for k in named]
        if types is None:
            return {"sliding_window": window, "window_layers": None}
        if not isinstance(types, (list, tuple)) or len(types) != c["num_layers"]:
            raise FmError(f"config.json: layer_types must list one kind per layer ({c['num_layers']})")
        kinds = {"full_attention", "sliding_attention", "chunked_attention"} | (
            {"linear_attention"} if "lin_k_heads" in c or "ssm_heads" in c or "mamba_state" in c or "rglru_width" in c
            or self.layout.get("lightning") else set()) | (
            {"conv"} if "sconv" in c else set()) | (
            {"indexed_attention"} if "index_heads" in c or "qsa_heads" in c else set()) | (
            {"minimax_m3_sparse"} if "bindex_heads" in c else set()) | (
            {"hybrid"} if self.layout.get("ssm_beside_attention") or self.layout.get("shared_blocks") else set()) | (
            {"mlp", "moe"} if self.layout.get("block_parts") else set())
        odd = sorted({str(t) for t in types} - kinds)
        if odd:
            raise FmError(f"config.json: layer kind {odd[0]!r} is not supported ({', '.join(sorted(kinds))})")
        out = {}
        chunked = [i for i, t in enumerate(types) if t == "chunked_attention"]
        if chunked:                      # Llama 4: attention within aligned chunks of attention_chunk_size
            chunk = c.get("attn_chunk")
            if type(chunk) is not int or chunk <= 0:
                raise FmError(f"config.json: chunked_attention layers need attention_chunk_size, a positive "
                              f"integer, got {chunk!r}")
            out = {"attn_chunk": chunk, "chunk_layers": None if len(chunked) == len(types) else chunked}
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if not window or not layers:
            return {"sliding_window": 0, "window_layers": None, **out}
        if chunked:
            raise FmError("config.json: sliding and chunked layers in one model are not supported")
        return {"sliding_window": window, "window_layers": None if len(layers) == len(types) else layers}

    def _kind_names(self, kinds):
        """Layout `layer_kinds`: a family's own names of layer kinds (ZAYA's hybrid, hybrid_sliding) -> the common
        ones (full_attention, sliding_attention), in layer_types and rope_parameters' keys alike."""
        names = self.layout.get("layer_kinds")
        if not names or not isinstance(kinds, (list, tuple, dict)):
            return kinds
        if isinstance(kinds, dict):
            return {names.get(k, k): v for k, v in kinds.items()}
        return [names.get(k, k) for k in kinds]

    def _nope_layers(self, config, c, position: dict, dense=None, picks=None) -> list | None:
        """The layers with no positional encoding at all. `uses_rope`: a per-layer list, 1 where a layer applies
        RoPE and 0 where it does not (SmolLM3 calls it no_rope_layers). Layout `nope_unwindowed`: when the config
        sets a sliding window, every layer that is not a sliding one goes without (EXAONE 4's global layers), except
        a mixture's dense layers where layout `rope_dense` holds (Cohere 2 MoE's force_rope)."""
        flags = c.get("uses_rope")
        if self.layout.get("nope_unwindowed") and c.get("sliding_window"):
            types = getattr(config, "layer_types", None) or []
            keep = set(dense or ()) if self._layout("rope_dense", picks or {}, False) else set()
            flags = [int(t == "sliding_attention" or i in keep) for i, t in enumerate(types)]
        if flags is None:
            return None
        if position["type"] != "rope" or not isinstance(flags, (list, tuple)) or len(flags) != c["num_layers"] \
                or any(f not in (0, 1) for f in flags):
            raise FmError(f"config.json: no_rope_layers must list 0 or 1 for each of the {c['num_layers']} layers "
                          f"of a RoPE model, got {str(flags)[:80]}")
        return [i for i, f in enumerate(flags) if not f] or None

    def _embed_scale(self, c, flags) -> float:
        how = self._layout("embed_scale", flags)
        if how is None:
            return _number(c, "embed_multiplier", 1.0)          # Granite: a number in the config
        if how == "sqrt_hidden":
            return float(c["hidden_size"]) ** 0.5
        if how == "sqrt_hidden_bf16":                            # RecurrentGemma: its normalizer is a bf16 buffer
            return float(torch.tensor(float(c["hidden_size"]) ** 0.5, dtype=torch.bfloat16))
        if how == "none":                                       # AFMoE without muP
            return 1.0
        raise FmError(f"{self.path.name}: layout.embed_scale must be \"sqrt_hidden\" or \"none\", got {how!r}")

    def _position(self, config, flags, c) -> dict:
        kind = self._layout("position", flags)
        if kind == "sinusoidal_marian":     # Marian's, Pegasus's: w_i = 10000^(-2i/d), from position 0, no pad row
            return {"type": "sinusoidal", "offset": 0, "style": "marian"}
        if kind == "none":           # no positional encoding at all (Granite 4.0's hybrids: the Mamba2 layers order)
            return {"type": "none"}
        if kind in TABLE_POSITIONS:            # sinusoidal (XGLM): a fixed table the converter writes
            if self.layout.get("position_ids") == "from_ids":
                # RoBERTa (fairseq's make_positions): a row's non-pad tokens count up from pad_token_id + 1, and a
                # pad token reads row pad_token_id, wherever the padding sits
                pad = self.layout.get("position_pad_id", getattr(config, "pad_token_id", None))   # MPNet: always 1
                if type(pad) is not int or not 0 <= pad < c["vocab_size"]:
                    raise FmError(f"{self.path.name}: positions counted from the ids need a pad_token_id in the "
                                  f"vocabulary, got {pad!r}")
                return {"type": kind, "offset": pad + 1, "pad_id": pad}
            return {"type": kind, "offset": int(self.layout.get("position_offset", 0))}
        if kind == "alibi":
            return {"type": "alibi"}
        if kind == "rope":
            params = dict(getattr(config, "rope_parameters", None) or {})
            if not params:  # transformers < 5 spells these as top-level keys
                params = dict(getattr(config, "rope_scaling", None) or {})
                params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
            local = None
            if c.get("layer_thetas") is not None:
                params, local = self._layer_thetas(config, c, params)
            if set(params) == {"full_attention", "sliding_attention"} and params["full_attention"] is None \
                    and isinstance(params["sliding_attention"], dict) and self._layout("nope_unwindowed", flags, False):
                params = dict(params["sliding_attention"])   # Beam: RoPE in the windowed layers only, theirs
            if self.layout.get("rope_tables") == "main_compress":
                # DeepSeek-V4: the compressed layers' RoPE (and their compressors') is the main table, the purely
                # sliding layers' the local one
                if not isinstance(params.get("compress"), dict) or not isinstance(params.get("main"), dict):
                    raise FmError("config.json: rope_parameters must give main and compress RoPE parameters")
                params, local = dict(params["compress"]), dict(params["main"])
            elif per_layer_type(params):          # Gemma 3: one RoPE for full-attention layers, one for windowed ones
                params = self._kind_names(params)
                if "indexed_attention" in params and "full_attention" not in params:    # Dots3 Note's name for them
                    params["full_attention"] = params.pop("indexed_attention")
                if "full_attention" not in params or set(params) - {"full_attention", "sliding_attention"}:
                    raise FmError(f"config.json: rope_parameters per layer kind must name full_attention (and "
                                  f"optionally sliding_attention), got {', '.join(map(str, params))}")
                local, params = params.get("sliding_attention"), dict(params["full_attention"])
            # The rotated width: GPT-J names it (rotary_dim), others give a fraction of the head (transformers 5
            # moved partial_rotary_factor into rope_parameters; GPT-NeoX once called it rotary_pct).
            partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
            partial = float(partial if partial is not None else getattr(config, "rotary_pct", None) or 1.0)
            head = c.get("global_head_dim", c["head_dim"])      # Gemma 4: the main RoPE is its global layers'
            rotary = c.get("rotary_dim") or int(head * partial)
            kinds = [_rope_params(p)["rope_type"] for p in (params, local) if p]
            if "proportional" in kinds:
                # LFM3: rotary over the whole head, its partial factor zeroing the back frequencies (transformers'
                # inv_freq holds the zeros); a RoPE of another type beside it must rotate the whole head too
                if any(k != "proportional" and float(p.get("partial_rotary_factor", 1.0)) != 1.0
                       for k, p in zip(kinds, (x for x in (params, local) if x))):
                    raise FmError("config.json: proportional RoPE beside a partial RoPE of another type is not "
                                  "supported")
                rotary = head
            if not isinstance(rotary, int) or not 2 <= rotary <= head or rotary % 2:
                raise FmError(f"config.json: the rotary width must be an even number of dimensions between 2 and "
                              f"head_dim={head}, got {rotary!r}")
            pos = {"type": "rope", "style": self._layout("rope_style", flags, "neox"), **_rope_params(params),
                   "rotary_dim": rotary}
            if self._layout("rope_reversed", flags, False):
                pos["reversed"] = True     # nanochat: rotates by -angle (its rotate_half is cat(x2, -x1))
            if pos["rope_type"] == "dynamic" and params.get("alpha") is not None:
                # Hunyuan labels it dynamic, but a fixed alpha only stretches the base: static (transformers calls
                # it ntk_alpha)
                alpha = params["alpha"]
                if type(alpha) not in (int, float) or not 0 < alpha < math.inf or rotary != c["head_dim"]:
                    raise FmError(f"config.json: rope_parameters.alpha must be a positive number, with RoPE over the "
                                  f"whole head, got {alpha!r}")
                pos["rope_type"] = "ntk_alpha"
            if pos["rope_type"] == "longrope":
                # LongRoPE (Phi-3/3.5 128k, Phi-4-mini): short factors while a forward stays inside the original
                # context, long factors once it reaches past it. Both tables are written; the switch is recorded.
                orig = params.get("original_max_position_embeddings",
                                  getattr(config, "original_max_position_embeddings", None) or c.get("max_positions"))
                if type(orig) is not int or not 0 < orig <= (c.get("max_positions") or orig):
                    raise FmError(f"config.json: longrope needs original_max_position_embeddings, a positive "
                                  f"integer no larger than max_position_embeddings, got {orig!r}")
                pos["long_from"] = orig
            if local is not None:
                pos["local"] = _rope_params(local)
                if pos["local"]["rope_type"] == "longrope":
                    raise FmError("config.json: longrope for the windowed layers' RoPE is not supported")
                if c.get("local_rotary_dim"):   # Dots3 Note: the windowed layers' latent attention turns its own
                    if c["local_rotary_dim"] != rotary:           # rope_dim
                        pos["local"]["rotary_dim"] = c["local_rotary_dim"]
                elif head != c["head_dim"]:       # Gemma 4: the windowed layers' narrower heads, rotated whole
                    pos["local"]["rotary_dim"] = c["head_dim"]
                elif "proportional" not in kinds and local.get("partial_rotary_factor") is not None:
                    # Laguna: the windowed layers rotate a share of the head of their own
                    own = local["partial_rotary_factor"]
                    own = int(head * float(own)) if type(own) in (int, float) and 0 < own <= 1 else None
                    if not own or own % 2:
                        raise FmError(f"config.json: rope_parameters.sliding_attention.partial_rotary_factor must "
                                      f"give an even rotary width between 2 and head_dim={head}, got "
                                      f"{local['partial_rotary_factor']!r}")
                    if own != rotary:
                        pos["local"]["rotary_dim"] = own
            elif head != c["head_dim"]:
                raise FmError("config.json: global layers with their own head_dim need a RoPE of their own for the "
                              "windowed layers (rope_parameters.sliding_attention)")
            return pos
        raise FmError(f"{self.path.name}: unknown position scheme {kind!r}")

    @staticmethod
    def _layer_thetas(config, c, params: dict) -> tuple[dict, dict | None]:
        """Granite SWA's layer_rope_theta: a RoPE base per layer, 0 for none. The layers at 0 go without positional
        encoding (recorded as `uses_rope`); the others take one base per layer kind: the full-attention layers'
        (the main RoPE) and the windowed layers' (Gemma 3's local RoPE), or one for all. -> (main, local or None)."""
        thetas, n = c["layer_thetas"], c["num_layers"]
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        if not isinstance(thetas, (list, tuple)) or len(thetas) != n or len(types) != n or any(
                type(t) not in (int, float) or not 0 <= t < math.inf for t in thetas):
            raise FmError(f"config.json: layer_rope_theta must give a non-negative RoPE base for each of the {n} "
                          f"layers, got {str(thetas)[:80]}")
        c["uses_rope"] = [int(t != 0) for t in thetas]
        full = {float(t) for t, k in zip(thetas, types) if t and k != "sliding_attention"}
        window = {float(t) for t, k in zip(thetas, types) if t and k == "sliding_attention"}
        if len(full) > 1 or len(window) > 1:
            raise FmError("config.json: layer_rope_theta gives layers of one kind different RoPE bases; fmconvert "
                          "supports one base for the full-attention layers and one for the windowed ones")
        main = {**params, "rope_theta": next(iter(full or window), params.get("rope_theta", 10000.0))}
        local = {**params, "rope_theta": next(iter(window))} if full and window and window != full else None
        return main, local

    # -- tensors ----------------------------------------------------------------------------------------------
    def _entries(self, section: dict, flags: dict, dense: bool = False, part: str | None = None,
                 wave: dict | None = None, adapter: dict | None = None):
        """(slot, names, optional, aliases) of a section's entries whose flag holds. dense: a dense layer of a
        model with a mixture, which takes an entry's `dense_name` where it has one (A.X K2's MLP norm). part: the
        layer's part (block_parts), whose `<part>_name` an entry may give (Zamba2's hybrid layers). wave: a
        Wav2Vec2 front end, over whose conv layers an entry with `{c}` repeats (those it has, `wave_slots`).
        adapter: Wav2Vec2-BERT's, over whose layers an entry with `{a}` repeats."""
        have = set(wave_slots(wave)) if wave else set()
        for slot, names, optional, aliases in self._plain_entries(section, flags, dense, part):
            field = next((f for f in ("{c}", "{p}", "{a}") if f in slot), None)
            if field is None:
                yield slot, names, optional, aliases
                continue
            n = (adapter or {}).get("layers", 0) if field == "{a}" else 0 if not wave else \
                len(wave["conv_dim"]) if field == "{c}" else wave.get("pos_layers", 0)
            for c in map(str, range(n)):
                if field == "{a}" or slot.replace(field, c) in have:
                    yield (slot.replace(field, c), [x.replace(field, c) for x in names], optional,
                           [[x.replace(field, c) for x in a] for a in aliases])

    def _plain_entries(self, section: dict, flags: dict, dense: bool = False, part: str | None = None):
        for slot, entry in section.items():
            aliases = []
            if isinstance(entry, dict):
                if "when" in entry and not flags.get(entry["when"], False):
                    continue
                key = f"{part}_name" if part and f"{part}_name" in entry else \
                    "dense_name" if dense and "dense_name" in entry else "name"
                names, optional = entry[key], entry.get("optional", False)
                aliases = [[a] if isinstance(a, str) else list(a) for a in entry.get("aliases", [])]
            else:
                names, optional = entry, False
            if isinstance(names, list) and len(names) == 3 and names[0] in flags:    # [flag, if_true, if_false] (T5:
                names = _pick(names, flags, f"tensors.{slot}")                    # gated wi_0|wi_1, or one wi)
            yield slot, ([names] if isinstance(names, str) else list(names)), optional, aliases

    def canonical_shape(self, spec: ModelSpec, slot: str) -> tuple[int, ...]:
        h, hd, H, KV, vd = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.v_dim
        dense = spec.dense_intermediate_size or spec.intermediate_size
        glu = 2 if spec.gated_mlp else 1     # experts and shared experts are gated like the MLP (ungated: Nemotron-H)
        inter = dense * glu
        e = spec.embed_dim
        pe = e if spec.embed_proj else h            # ELECTRA: positions, types and their norm as wide as the embeddings
        shapes = {
            "embed.weight": (spec.vocab_size, e), "lm_head.weight": (spec.head_vocab_size or spec.vocab_size, e),
            "lm_head.bias": (spec.head_vocab_size or spec.vocab_size,),
            "pos_embed.weight": (spec.max_positions + spec.position.get("offset", 0), pe),
            "type_embed.weight": (spec.type_vocab_size, pe),
            "embed_norm.weight": (pe,), "embed_norm.bias": (pe,), "final_norm.weight": (h,), "final_norm.bias": (h,),
            "project_in.weight": (h, e), "project_out.weight": (e, h), "embed_proj.weight": (h, e),
            "embed_proj.bias": (h,), "rel_bias.weight": (H, (spec.rel_bias or {}).get("buckets", 0)),
            "text_proj.weight": (spec.proj_dim, h),
            "audio_conv1.weight": (h, spec.audio_mels, 3), "audio_conv1.bias": (h,), "audio_conv2.weight": (h, h, 3),
            "audio_conv2.bias": (h,), **wave_shapes(spec), **features_shapes(spec.features, h),
            **adapter_shapes(spec.adapter, h, spec.intermediate_size),
            "attn_rel_bias.weight": (H, (spec.rel_bias or {}).get("buckets", 0)),
            "rel_embed.weight": (2 * (spec.disentangled or {}).get("span", 0), h), "rel_embed_norm.weight": (h,),
            "rel_embed_norm.bias": (h,),
            "pooler.weight": (h, h), "pooler.bias": (h,),
            "head_dense.weight": (h, h), "head_dense.bias": (h,), "head_norm.weight": (h,), "head_norm.bias": (h,),
            "q_norm.weight": {"per_head": (H, hd), "full": (H * hd,)}.get(spec.qk_norm, (hd,)),
            "k_norm.weight": {"per_head": (KV, hd), "full": (KV * hd,)}.get(spec.qk_norm, (hd,)),
            "q_norm.bias": (hd,), "k_norm.bias": (hd,),
            "router.weight": (spec.num_experts + spec.zero_experts, h),
            "router.bias": (spec.num_experts + spec.zero_experts,),
            "experts_in.weight": (spec.num_experts * glu * spec.intermediate_size, h),     # per expert: gate; up
            "experts_in.bias": (spec.num_experts * glu * spec.intermediate_size,),
            "experts_out.weight": (spec.num_experts * h, spec.intermediate_size),
            "experts_out.bias": (spec.num_experts * h,), "attn_sinks.weight": (H,), "attn_gate.bias": (H,),
            # WavLM: the gate each head puts on the relative-position bias, from its slice of the attention's input
            "rel_gate.weight": (8, hd), "rel_gate.bias": (8,), "rel_gate.const": (H,),
            **conformer_shapes(spec),
            "router.correction_bias": (spec.num_experts + spec.zero_experts,),
            "act.alpha_p": (1,), "act.alpha_n": (1,), "act.beta": (), "act.eps": (),
            "shared_in.weight": (glu * spec.shared_intermediate_size, h),                 # gate; up
            "shared_out.weight": (h, spec.shared_intermediate_size), "shared_gate.weight": (1, h),
            "attn_norm.weight": (h,), "attn_norm.bias": (h,), "mlp_norm.weight": (h,), "mlp_norm.bias": (h,),
            "attn_post_norm.weight": (h,), "mlp_post_norm.weight": (h,), "moe_post_norm.weight": (h,),
            "layer_scale.weight": (1,), "router.scale": (h,), "router.expert_factor": (spec.num_experts,),
            "attn_sub_norm.weight": (H * vd,), "mlp_sub_norm.weight": (dense,),
            "ple_embed.weight": (spec.per_layer_vocab or spec.vocab_size, spec.num_layers * spec.per_layer_input),
            "ple_proj.weight": (spec.num_layers * spec.per_layer_input, h),
            "ple_proj_norm.weight": (spec.per_layer_input,), "ple_gate.weight": (spec.per_layer_input, h),
            "ple_out.weight": (h, spec.per_layer_input), "ple_post_norm.weight": (h,),
            "experts_norm.weight": (h,), "experts_post_norm.weight": (h,), "shared_post_norm.weight": (h,),
            "qkv.weight": ((H + KV) * hd + KV * vd + H * spec.gate_width, spec.attn_input or h),   # q|k|v, gate
            "qkv.bias": ((H + KV) * hd + KV * vd + H * spec.gate_width,),
            "attn_out.weight": (h, H * vd), "attn_out.bias": (h,),
            "mlp_in.weight": (inter, h), "mlp_in.bias": (inter,),
            "mlp_out.weight": (h, dense), "mlp_out.bias": (h,),
            "cross_norm.weight": (h,), "cross_norm.bias": (h,), "cross_q.weight": (H * hd, h),
            "cross_q.bias": (H * hd,),
            "cross_kv.weight": (2 * H * hd, h), "cross_kv.bias": (2 * H * hd,), "cross_out.weight": (h, H * hd),
            "cross_out.bias": (h,),
        }
        if spec.mla:
            a = spec.mla
            shapes.update({
                "q_a.weight": (a["q_rank"], h), "q_a.bias": (a["q_rank"],), "q_a_norm.weight": (a["q_rank"],),
                # A.X K2 (gated_q): each head's q then its output gate, from the normed and the raw q latent
                "q_b.weight": (H * (hd + a["v_dim"]), 2 * a["q_rank"]) if a.get("gated_q") else
                (H * hd, a["q_rank"] or h),
                "kv_a.weight": (a["kv_rank"] + a["rope_dim"], h), "kv_a.bias": (a["kv_rank"] + a["rope_dim"],),
                "kv_a_norm.weight": (a["kv_rank"],), "kv_b.weight": (H * (a["nope_dim"] + a["v_dim"]), a["kv_rank"]),
                "kv_a_rope_norm.weight": (a["rope_dim"],),
                "attn_out.weight": (h, H * a["v_dim"]),
                # Ling 2.5: a gate a head from the stream; HY-V4: one per output channel (v_dim a head)
                "attn_gate.weight": (H * (1 if spec.attn_gate_heads else a["v_dim"]), h),
            })
            if "index" in a:
                ix = a["index"]
                shapes.update({"index_q.weight": (ix["heads"] * ix["dim"], a["q_rank"]), "index_k.weight": (ix["dim"], h),
                               "index_k_norm.weight": (ix["dim"],), "index_k_norm.bias": (ix["dim"],),
                               "index_w.weight": (ix["heads"], h)})
        if spec.mlstm:              # xLSTM: q|k|v|o, the gates (i then f, a logit per head), the heads' norm
            a = spec.mlstm
            Q, V, H = a["qk_dim"], a["v_dim"], a["heads"]
            shapes.update({"mlstm_in.weight": (2 * Q + 2 * V, h), "mlstm_in.bias": (2 * Q + 2 * V,),
                           "mlstm_gates.weight": (2 * H, h), "mlstm_gates.bias": (2 * H,),
                           "mlstm_norm.weight": (V,), "mlstm_norm.bias": (V,), "mlstm_out.weight": (h, V),
                           "mlstm_out.bias": (h,)})
        if spec.rglru:              # RecurrentGemma: y|x, the conv, the gates per head, the recurrence
            W, Hr, K = spec.rglru["width"], spec.rglru["heads"], spec.rglru["conv_kernel"]
            shapes.update({"rg_in.weight": (2 * W, h), "rg_in.bias": (2 * W,), "rg_conv.weight": (W, K),
                           "rg_conv.bias": (W,), "rg_gate_x.weight": (Hr, W // Hr, W // Hr),
                           "rg_gate_x.bias": (Hr, W // Hr), "rg_gate_a.weight": (Hr, W // Hr, W // Hr),
                           "rg_gate_a.bias": (Hr, W // Hr), "rg_a": (W,), "rg_out.weight": (h, W),
                           "rg_out.bias": (h,)})
        if spec.altup:              # Gemma 3n: AltUp's copies and LAuReL, replicated
            n, r = spec.altup["streams"], spec.altup["laurel_rank"]
            shapes.update({"altup_proj.weight": ((n - 1) * h, h), "altup_unembed.weight": ((n - 1) * h, h),
                           "altup_router.weight": (n, h), "altup_router_norm.weight": (h,),
                           "altup_predict.weight": (n * n, n), "altup_correct.weight": (n, n),
                           "altup_out_scale.weight": (h,), "laurel_left.weight": (r, h),
                           "laurel_right.weight": (h, r), "laurel_norm.weight": (h,)})
        if spec.compressed:         # DeepSeek-V4: its one kv head, the grouped output, the compressors
            cp, n = spec.compressed, {"csa": 2, "hca": 1}.get(spec.compressed.get("here"), 1)
            m = cp["rates"].get(cp.get("here"), 1)        # overlapping windows (csa): two series a row
            shapes.update({"q_a.weight": (cp["q_rank"], h), "q_a_norm.weight": (cp["q_rank"],),
                           "q_b.weight": (H * hd, cp["q_rank"]), "kv_a.weight": (hd, h), "kv_a_norm.weight": (hd,),
                           "attn_out_a.weight": (cp["o_groups"] * cp["o_rank"], H * hd // cp["o_groups"]),
                           "attn_out.weight": (h, cp["o_groups"] * cp["o_rank"]),
                           "comp_kv.weight": (n * hd, h), "comp_gate.weight": (n * hd, h), "comp_bias": (m, n * hd),
                           "comp_norm.weight": (hd,),
                           "router.token_experts": (spec.vocab_size, spec.experts_per_token)})
            if cp["index"]:
                Hi, Di = cp["index"]["heads"], cp["index"]["dim"]
                shapes.update({"index_q.weight": (Hi * Di, cp["q_rank"]), "index_w.weight": (Hi, h),
                               "index_kv.weight": (2 * Di, h), "index_gate.weight": (2 * Di, h),
                               "index_bias": (m, 2 * Di), "index_norm.weight": (Di,)})
        if spec.moa:                # JetMoe: each attention expert's q and output projections, stacked
            E = spec.moa["experts"]
            shapes.update({"moa_router.weight": (E, h), "moa_q.weight": (E * KV * hd, h),
                           "moa_kv.weight": (2 * KV * hd, h), "moa_out.weight": (E * h, KV * hd),
                           "moa_out.bias": (h,)})
        shapes["experts_shared.bias"] = (h,)
        if spec.cca:                # ZAYA: the two convs over q|k ([channels, taps], [channels, head_dim, taps])
            C = (H + KV) * hd
            shapes.update({"cca_conv0.weight": (C, spec.cca["depthwise"]), "cca_conv0.bias": (C,),
                           "cca_conv1.weight": (C, hd, spec.cca["grouped"]), "cca_conv1.bias": (C,),
                           "cca_temp": (KV,), **{f"{half}.{k}": (h,) for half in ("attn_res", "mlp_res")
                                                 for k in ("out_gain", "out_shift", "gain", "shift")}})
        if spec.router_dim:         # ZAYA's router MLP, its last class the skip expert
            r, E1 = spec.router_dim, spec.num_experts + 1
            shapes.update({"router_in.weight": (r, h), "router_in.bias": (r,), "router_eda": (r,),
                           "router_norm.weight": (r,), "router_fc1.weight": (r, r), "router_fc1.bias": (r,),
                           "router_fc2.weight": (r, r), "router_fc2.bias": (r,), "router.weight": (E1, r),
                           "router.balance": (E1,)})
        shapes.update({"input_gain": (h,), "input_shift": (h,)})
        shapes["diff_lambda"] = (4 * hd,)
        shapes["loop_init"] = (h,)
        shapes.update({"dmask_dt.weight": (KV, KV * hd), "dmask_dt.bias": (KV,), "dmask_a": (KV,),
                       "attn_residual": (h,), "mlp_residual": (h,)})
        if spec.shared_blocks:      # Zamba2: the shared block's norm over the stream and embeddings, the adapters
            r, w = spec.shared_blocks["rank"], spec.attn_input
            shapes.update({"mem_norm.weight": (w,), "qkv_lora_down.weight": (3 * r, w),
                           "qkv.lora_up": ((H + 2 * KV) * hd, 3 * r), "mlp_lora_down.weight": (r, h),
                           "mlp_in.lora_up": (inter, r), "mem_proj.weight": (h, h)})
        if spec.qsa:                # Qwen4-Exp: the QSA indexer's heads and its one key, in one projection
            shapes.update({"qsa_qk.weight": ((spec.qsa["heads"] + 1) * spec.qsa["dim"], h),
                           "qsa_q_norm.weight": (spec.qsa["dim"],), "qsa_k_norm.weight": (spec.qsa["dim"],)})
        if spec.ngram:              # Qwen4-Exp: the hashed n-gram table of this layer and what reads it
            ng = spec.ngram
            heads, n = (ng["size"] - 1) * ng["heads"], spec.hyper["streams"] if spec.hyper else 1
            rows = ng["tables"][str(ng["here"])]["rows"] if ng.get("here") in ng["layers"] else 0
            shapes.update({"ngram_embed.weight": (rows, ng["dim"] // heads), "ngram_key.weight": (n * h, ng["dim"]),
                           "ngram_value.weight": (h, ng["dim"]), "ngram_key_norm.weight": (n * h,),
                           "ngram_query_norm.weight": (n * h,), "ngram_conv_norm.weight": (n * h,),
                           "ngram_conv.weight": (n * h, ng["conv_kernel"])})
        if spec.block_sparse:       # MiniMax-M3: the block indexer's heads and its one key
            b = spec.block_sparse
            shapes.update({"block_index_q.weight": (b["heads"] * b["dim"], h), "block_index_k.weight": (b["dim"], h),
                           "block_index_q_norm.weight": (b["dim"],), "block_index_k_norm.weight": (b["dim"],)})
        if spec.norm_gate_rank:     # A.X K2: each gated norm's down and up projections
            r = spec.norm_gate_rank
            shapes.update({f"{n}_norm_gate_{d}.weight": s for n in ("attn", "moe")
                           for d, s in (("down", (r, h)), ("up", (h, r)))})
        if spec.hyper and "rank" in spec.hyper:      # Qwen4-Exp: each gated mix over every copy, flattened
            n, r = spec.hyper["streams"], spec.hyper["rank"]
            for half in ("attn_hc", "mlp_hc", "hc_head"):
                shapes.update({half + ".norm": (n * h,), half + ".down": (r, n * h), half + ".up": (n * h, r),
                               half + ".inject": (n, n * h)})
        elif spec.hyper:            # HY-V4: each set reads every copy of the stream, flattened
            n = spec.hyper["streams"]
            w, k = ((2 + n) * n, 3) if spec.hyper.get("sinkhorn") else (2 * n, 2)   # DeepSeek-V4: + the n x n mix
            for half in ("attn_hc", "mlp_hc"):
                shapes.update({half + ".fn": (w, n * h), half + ".base": (w,), half + ".scale": (k,)})
            shapes.update({"hc_head.fn": (n, n * h), "hc_head.base": (n,), "hc_head.scale": (1,)})
        if spec.short_conv:
            shapes.update({"sconv_in.weight": (3 * h, h), "sconv_in.bias": (3 * h,),            # B|C|x
                           "sconv_conv.weight": (h, spec.short_conv["conv_kernel"]), "sconv_conv.bias": (h,),
                           "sconv_out.weight": (h, h), "sconv_out.bias": (h,)})
        if spec.ssm:
            I, BC, H = _ssm_widths(spec)
            shapes.update({
                "ssm_in.weight": (2 * I + 2 * BC + H, h), "ssm_in.bias": (2 * I + 2 * BC + H,),  # z|x|B|C|dt
                "ssm_conv.weight": (I + 2 * BC, spec.ssm["conv_kernel"]), "ssm_conv.bias": (I + 2 * BC,),
                "ssm.a_log": (H,), "ssm.dt_bias": (H,), "ssm.d": (H,), "ssm_norm.weight": (I,),
                "ssm_out.weight": (h, I), "ssm_out.bias": (h,),
            })
        if spec.mamba:
            a = spec.mamba
            D, N, R = a["inner"], a["state"], a["dt_rank"]
            shapes.update({
                "mamba_in.weight": (2 * D, h), "mamba_in.bias": (2 * D,),                      # x|z
                "mamba_conv.weight": (D, a["conv_kernel"]), "mamba_conv.bias": (D,),
                "mamba_x.weight": (R + 2 * N, D),                                              # dt|B|C
                "mamba_dt_norm.weight": (R,), "mamba_b_norm.weight": (N,), "mamba_c_norm.weight": (N,),
                "mamba_dt.weight": (D, R), "mamba_dt.bias": (D,), "mamba.a_log": (D, N), "mamba.d": (D,),
                "mamba_out.weight": (h, D), "mamba_out.bias": (h,),
            })
        if spec.lightning:          # MiniMax: q|k|v interleaved per head
            w = spec.num_heads * spec.head_dim
            shapes.update({"lin_qkv.weight": (3 * w, h), "lin_out_norm.weight": (w,), "lin_gate.weight": (w, h),
                           "lin_out.weight": (h, w)})
        if spec.linear_attn and spec.linear_attn.get("decay") == "channel":   # KDA
            Kd, Vd, Hv = _linear_widths(spec)
            dk, dv = spec.linear_attn["k_dim"], spec.linear_attn["v_dim"]
            fw, gw = kda_gate_widths(spec.linear_attn)
            shapes.update({
                "lin_in.weight": (2 * Kd + Vd + Hv + fw + gw, h),                      # q|k|v|b|f_a|g_a (or f|g)
                "lin_conv.weight": (2 * Kd + Vd, spec.linear_attn["conv_kernel"]), "lin_conv.bias": (2 * Kd + Vd,),
                "lin_f_b.weight": (Kd, dk), "lin_g_b.weight": (Vd, dv),
                "lin_decay.a_log": (Hv,), "lin_decay.dt_bias": (Kd,),
                "lin_norm.weight": (dv,), "lin_out.weight": (h, Vd),
            })
        elif spec.linear_attn:
            Kd, Vd, Hv = _linear_widths(spec)
            shapes.update({
                "lin_in.weight": (2 * Kd + 2 * Vd + 2 * Hv, h),                        # q|k|v|z|b|a
                "lin_conv.weight": (2 * Kd + Vd, spec.linear_attn["conv_kernel"]), "lin_conv.bias": (2 * Kd + Vd,),
                "lin_decay.a_log": (Hv,), "lin_decay.dt_bias": (Hv,),
                "lin_norm.weight": (spec.linear_attn["v_dim"],), "lin_out.weight": (h, Vd),
            })
        return shapes[slot]

    def _part_rows(self, spec: ModelSpec, slot: str, n: int) -> list[int]:
        rows = self.canonical_shape(spec, slot)[0]
        if n == 1:
            return [rows]
        if slot.startswith("qkv."):
            q, kv, v = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim,
                        spec.num_kv_heads * spec.v_dim)
            if n == 4 and spec.attn_gate:                       # q, k, v, then a separate gate projection (AFMoE)
                return [q, kv, v, spec.num_heads * spec.gate_width]
            if n == 4 and spec.cca:            # ZAYA: v's current half, then its delayed half
                return [q, kv, v // 2, v // 2]
            return [q * (1 + spec.attn_gate), kv, v]           # a gated q_proj holds each head's q and gate
        if slot.startswith("lin_") and spec.linear_attn.get("decay") == "channel" and n in (3, 6):   # KDA
            Kd, Vd, Hv = _linear_widths(spec)
            return [Kd, Kd, Vd, Hv, *kda_gate_widths(spec.linear_attn)][:n]
        if slot == "lin_conv.weight" and n == 3:              # OLMo Hybrid: the q, k and v convs stored apart
            Kd, Vd, _ = _linear_widths(spec)
            return [Kd, Kd, Vd]
        if slot == "lin_in.weight" and n in (2, 4, 6):
            Kd, Vd, Hv = _linear_widths(spec)      # Qwen3-Next: qkvz, ba; Qwen3.5: qkv, z, b, a; OLMo Hybrid: each
            return {2: [2 * Kd + 2 * Vd, 2 * Hv], 4: [2 * Kd + Vd, Vd, Hv, Hv], 6: [Kd, Kd, Vd, Vd, Hv, Hv]}[n]
        if slot.startswith("mlstm_in.") and n == 4:     # xLSTM: q, k, v, o (q and k may be narrower)
            a = spec.mlstm
            return [a["qk_dim"], a["qk_dim"], a["v_dim"], a["v_dim"]]
        if slot == "ngram_embed.weight":       # torch.chunk's pieces, as transformers saves the table
            step = -(-rows // n)
            if step * (n - 1) >= rows:
                raise FmError(f"config.json: split_ngram_parts={n} is more than the n-gram table's {rows} rows "
                              f"divide into")
            return [step] * (n - 1) + [rows - step * (n - 1)]
        if n * (rows // n) == rows:
            return [rows // n] * n
        raise FmError(f"{self.path.name}: slot {slot} cannot be split into {n} equal parts")

    def _stored_rows(self, spec: ModelSpec, slot: str, n: int) -> list[int]:
        """The rows of each of a slot's n stored parts: `_part_rows`, less a part the layout fills with zeros."""
        if slot not in self.zero_parts:
            return self._part_rows(spec, slot, n)
        rows = self._part_rows(spec, slot, n + 1)
        return rows[:self.zero_parts[slot]] + rows[self.zero_parts[slot] + 1:]

    def sources(self, spec: ModelSpec, flags: dict, prefix: str, layer: int | None) -> list[SlotSource]:
        """The HF tensors of one layer (or the globals when layer is None), with the shape each must have."""
        t = self.table["tensors"]
        out = []
        sections = [(t["layer"], prefix)] if layer is not None else [
            ({k: v for k, v in t.items() if not isinstance(v, dict) or "name" in v}, prefix),
            (t.get("head", {}), self.head_prefix(prefix))]
        skip, part = (), None
        dense = False
        owners = block_owners(spec.block_parts, spec.shared_blocks)     # Zamba2's hybrid layers -> a block's holder
        looped = loop_owners(spec.loop, spec.num_layers, spec.shared_layers)   # HRM-Text, ALBERT: who holds them
        if layer is not None and looped and looped[layer] != layer:
            return []                         # its weights are that run's
        value_is_key = spec.value_is_key and spec.global_layer(layer)
        q_only = spec.kv_shared(layer)       # Gemma 4 E2B/E4B: reads an earlier layer's cache; q_proj alone
        spec = spec.at(layer)                # Gemma 4's global layers: their own head_dim and kv heads
        if layer is not None:            # a dense model has no mixture's slots, whatever the flags say
            dense = bool(spec.num_experts) and layer in (spec.dense_layers or ())
            skip = SPARSE_SLOTS if not spec.num_experts or dense else DENSE_SLOTS
            skip += (LINEAR_SLOTS if layer not in (spec.linear_layers or ()) else
                     () if spec.ssm_beside_attention else ATTENTION_SLOTS)
            part = spec.block_parts[layer] if spec.block_parts else None
            if part == "mixer":
                skip += SPARSE_SLOTS + DENSE_SLOTS + ("mlp_norm.",)
            elif part == "mlp":
                skip += ATTENTION_SLOTS + LINEAR_SLOTS + ("attn_norm.",)
            if layer == 0 and not spec.first_attn_norm:
                skip += ("attn_norm.",)
            if q_only:
                skip += ("k_norm.",)
            if spec.sink_layers is not None and layer not in spec.sink_layers:
                skip += ("attn_sinks.",)
            if not spec.index_layer(layer):          # GLM-5's shared layers reuse an earlier layer's choice
                skip += ("index_",)
            if not spec.block_sparse or layer not in spec.block_sparse["layers"]:    # MiniMax-M3's dense layers
                skip += ("block_index_",)
            if layer == 0 and spec.router_dim:      # ZAYA: the first router has no earlier state to scale
                skip += ("router_eda",)
            if not spec.ngram or layer not in spec.ngram["layers"]:      # Qwen4-Exp: the n-gram layers only
                skip += ("ngram_",)
            if not spec.compressed or spec.compressed["here"] is None:    # DeepSeek-V4's purely sliding layers
                skip += ("comp_",)
            skip += ("router.token_experts",) if layer not in (spec.hash_layers or ()) else \
                ("router.correction_bias",)       # DeepSeek-V4's hash layers: a table of experts, no bias
            if part == "hybrid":            # Zamba2: attention too (the shared block's), no mixture
                skip = tuple(x for x in skip if x not in ATTENTION_SLOTS) + SPARSE_SLOTS
                if owners[layer] != layer:   # its block's weights are another layer's
                    skip += SHARED_BLOCK_SLOTS
            if spec.linear_pre_norm:       # OLMo Hybrid: input norms in the linear layers, output norms elsewhere
                skip += (("attn_post_norm.", "mlp_post_norm.") if layer in (spec.linear_layers or ())
                         else ("attn_norm.", "mlp_norm."))
        # layout sublayers n (LongCat-Flash: 2): the checkpoint's layer i holds n of ours, its parts named by s
        i, sub = divmod(layer, self.sublayers) if layer is not None else (None, None)
        stack = None          # HRM-Text: the stack's name ({m}, layout loop) and the block's place in it ({i})
        if spec.loop and layer is not None:
            stack, i = self.layout["loop"][layer >= spec.loop["stack_layers"]], layer % spec.loop["stack_layers"]
        j = owner = None          # Zamba2: a hybrid layer's place among them (j) and its block's first layer (o)
        if layer in owners:
            j, owner = list(owners).index(layer), owners[layer]
        for section, pre in sections:
            for slot, names, optional, aliases in self._entries(section, flags, dense, part, spec.wave,
                                                                 spec.adapter):
                if (slot.startswith("lm_head.") and spec.kind != "decoder") or slot.startswith(skip):
                    continue
                names = [pre + n.format(i=i, s=sub, e=e, p=e, j=j, o=owner, m=stack) for e in _experts(names, spec)
                         for n in names]
                aliases = [[pre + n.format(i=i, s=sub, e=e, p=e, j=j, o=owner, m=stack) for e in _experts(a, spec)
                            for n in a]
                           for a in aliases if len(a) * len(_experts(a, spec)) == len(names)]
                if q_only and slot.startswith("qkv.") and len(names) == 3:
                    names, aliases = names[:1], [a[:1] for a in aliases]
                elif value_is_key and slot.startswith("qkv.") and len(names) == 3:
                    names[2] = names[1]          # Gemma 4: no v_proj; v is k's projection (its rows twice)
                    aliases = [[a[0], a[1], a[1]] for a in aliases]
                full = self.canonical_shape(spec, slot)
                if not full:                    # a scalar (Apertus's xIELU beta and eps)
                    shapes = [()]
                elif self._flat(slot):          # DBRX: each of gate, up, down one [E * I, hidden] tensor
                    shapes = [(spec.num_experts * spec.intermediate_size, spec.hidden_size)] * len(names)
                elif slot == "qkv.lora_up":     # Zamba2: q's, k's and v's adapters, each [rows, rank]
                    rank = spec.shared_blocks["rank"]
                    shapes = [(r, rank) for r in (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim,
                                                  spec.num_kv_heads * spec.head_dim)]
                elif self._stacked(slot):       # one [E, ...] tensor: each expert's matrix (transposed) or bias
                    E = spec.moa["experts"] if slot.startswith("moa_") else spec.num_experts
                    one = (full[0] // E, *full[1:])
                    shapes = [(E, *(reversed(one) if slot in self.transposed else one))]
                else:
                    rows = self._stored_rows(spec, slot, len(names))
                    shapes = [(r, *full[1:]) for r in rows]
                    if slot in self.transposed:
                        shapes = [tuple(reversed(s)) for s in shapes]
                    if slot in self.as_row:
                        shapes = [(1, *s) for s in shapes]
                    if slot in self.stored_shape:
                        shapes = [tuple(s[0] if d == -1 else d for d in self.stored_shape[slot]) for s in shapes]
                    if slot in DEPTHWISE:   # a depthwise Conv1d's [channels, 1, taps]
                        shapes = [(s[0], 1, s[1]) for s in shapes]
                    if slot in POINTWISE:   # a kernel-1 Conv1d's [out, in, 1]
                        shapes = [(*s, 1) for s in shapes]
                out.append(SlotSource(slot, names, shapes, optional, aliases, layer))
        return out

    def ignored(self, prefix: str, num_layers: int) -> list[re.Pattern]:
        """The tensors no slot takes that are left out: `ignore` under the body's prefix, `ignore_head` under the
        head's (Whisper's tied proj_out.weight, saved beside model.*)."""
        pats = []
        for pat in [prefix + p for p in self.table.get("ignore", [])] + \
                [self.head_prefix(prefix) + p for p in self.table.get("ignore_head", [])]:
            pat = re.escape(pat)
            for field in ("{i}", "{s}", "{e}"):
                pat = pat.replace(re.escape(field), r"\d+")
            pats.append(re.compile(pat))
        return pats

    def classifier(self, config, architecture: str, extras: list[str]) -> dict | None:
        """The table's [classifier] for a *ForSequenceClassification checkpoint: how its head turns the encoder's
        last hidden states into logits, over tensors kept as passthrough (each step's weight and, if present, bias
        must be among them). A value {config = "x"} is read from the config; activations take their canonical names."""
        if self.kind == "encoder" and architecture.endswith("ForTokenClassification"):
            # a label per token: a linear layer over each token's state in every family, unless the table says
            # otherwise (ModernBERT's prediction head first)
            head = {"pool": "tokens", **self.table.get("token_classifier", {"steps": [{"linear": "classifier"}]})}
        elif self.kind == "encoder" and architecture.endswith("ForQuestionAnswering"):
            # extractive QA: a start and an end logit per token, from qa_outputs unless the table says otherwise
            head = {"pool": "spans", **self.table.get("qa", {"steps": [{"linear": "qa_outputs"}]})}
        elif self.kind == "encoder" and architecture.endswith("ForCTC"):
            # speech recognition by CTC (Wav2Vec2, HuBERT): a character distribution per frame, from lm_head
            head = {"pool": "tokens", **self.table.get("ctc", {"steps": [{"linear": "lm_head"}]})}
        elif self.kind == "encoder" and architecture.endswith("ForAudioFrameClassification"):
            # speaker diarization and the like: labels per frame (Wav2Vec2's), as the table's [frame_classifier]
            head = self.table.get("frame_classifier")
            head = None if head is None else {"pool": "tokens", **head}
        elif self.kind == "encoder" and architecture.endswith("ForXVector"):
            # speaker verification: the table's [xvector], an embedding a clip
            head = self.table.get("xvector")
            head = None if head is None else {"pool": "xvector", **head}
        else:
            head = self.table.get("classifier")
        if head is None or not architecture.endswith(("ForSequenceClassification", "ForTokenClassification",
                                                      "ForQuestionAnswering", "ForCTC",
                                                      "ForAudioFrameClassification", "ForXVector")):
            return None
        have = set(extras)
        layer_sum = "layer_sum" in head and _eval_flag(config, head["layer_sum"])
        if layer_sum and "layer_weights" not in have:
            raise FmError(f"{architecture}: its classifier sums the layers' states ({head['layer_sum']}), but the "
                          f"checkpoint has no layer_weights")

        def value(v):
            if isinstance(v, dict):
                got = getattr(config, v["config"], None)
                if not isinstance(got, str):
                    raise FmError(f"config.json: {v['config']} must name the classifier's "
                                  f"{'pooling' if v is head['pool'] else 'activation'}, got {got!r}")
                return got
            return v

        pool = {"cls": "first", "bos": "first"}.get(value(head["pool"]), value(head["pool"]))
        if pool not in ("first", "pooler", "mean", "late", "tokens", "spans", "eos", "xvector"):
            raise FmError(f"config.json: classifier pooling {pool!r} is not first (cls, bos), mean, late or pooler")
        steps = []
        for s in head["steps"]:
            op = "linear" if "linear" in s else "norm"
            name = s[op]
            if f"{name}.weight" not in have:
                raise FmError(f"{architecture}: the classifier's {name}.weight is missing from the checkpoint")
            act = value(s.get("act", "none"))
            if act not in ("none", "tanh"):
                if _ACTIVATIONS.get(act) not in ("gelu", "gelu_tanh", "relu", "silu"):    # what a manifest's head takes
                    raise FmError(f"config.json: the classifier's activation {act!r} is not supported")
                act = _ACTIVATIONS[act]
            steps.append({"op": op, "name": name, "bias": f"{name}.bias" in have, "act": act})
        tdnn = self._tdnn(config, head, have, architecture) if pool == "xvector" else None
        return {"pool": pool, "steps": steps, **({"layer_sum": True} if layer_sum else {}),
                **({"tdnn": tdnn} if tdnn else {})}

    @staticmethod
    def _tdnn(config, head: dict, have: set, architecture: str) -> list[dict]:
        """An x-vector head's TDNN layers between its first step and the statistics pooling ([xvector] `tdnn`:
        the config's lists of kernels and dilations; each layer's weight is tdnn.{i}.kernel, a Linear over
        kernel * its input's width, run as a dilated conv over time, then ReLU)."""
        kernels = _config_value(config, head["tdnn"]["kernel"], "xvector.tdnn.kernel")
        dilations = _config_value(config, head["tdnn"]["dilation"], "xvector.tdnn.dilation")
        if not (isinstance(kernels, (list, tuple)) and isinstance(dilations, (list, tuple))
                and 0 < len(kernels) == len(dilations) <= 16
                and all(type(v) is int and 0 < v <= 64 for v in (*kernels, *dilations))):
            raise FmError(f"config.json: tdnn_kernel and tdnn_dilation must be lists of small positive integers, as "
                          f"long as each other, got {kernels!r} and {dilations!r}")
        out = []
        for i, (k, d) in enumerate(zip(kernels, dilations)):
            name = f"tdnn.{i}.kernel"
            if f"{name}.weight" not in have or f"{name}.bias" not in have:
                raise FmError(f"{architecture}: the x-vector head's {name} is missing from the checkpoint")
            out.append({"name": name, "kernel": k, "dilation": d})
        return out

    def passthrough(self) -> list[str]:
        return list(self.table.get("passthrough", []))

    def _stacked(self, slot: str) -> bool:
        """Layout `experts = "stacked"` (GPT-OSS): a mixture's slot is one tensor holding every expert, [E, ...],
        not one tensor per expert."""
        return self.layout.get("experts") == "stacked" and (slot.startswith(("experts_in.", "experts_out."))
                                                            or slot in ("moa_q.weight", "moa_out.weight"))

    def _flat(self, slot: str) -> bool:
        """Layout `experts = "flat"` (DBRX): every expert's gate rows in one [E * I, hidden] tensor, their up rows in
        another, and their down projections transposed in a third ([E * I, hidden], each expert's [I, hidden])."""
        return self.layout.get("experts") == "flat" and slot in ("experts_in.weight", "experts_out.weight")

    def _gate_up_interleaved(self, slot: str) -> bool:
        """Layout `gate_up = "interleaved"` (GPT-OSS's experts): gate and up rows alternate, where the canonical
        layout has all gate rows, then all up rows."""
        return self.layout.get("gate_up") == "interleaved" and slot.startswith("experts_in.")

    def _up_first(self, slot: str) -> bool:
        """Layout `gate_up = "up_first"` (GTE's up_gate_proj): a dense MLP's one fused input projection holds every up
        row, then every gate row, where the canonical layout has the gate first."""
        return self.layout.get("gate_up") == "up_first" and slot.startswith("mlp_in.")

    def _gate_first(self, slot: str, n_parts: int) -> bool:
        """Layout `attn_gate = "first"` (HRM-Text's gqkv_proj): one fused tensor holds the gate's rows, then q, k and
        v, where the canonical layout has the gate last."""
        return self.layout.get("attn_gate") == "first" and slot.startswith("qkv.") and n_parts == 1

    # -- the rewrite hook -------------------------------------------------------------------------------------
    def fuse(self, spec: ModelSpec, slot: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """HF tensors of a slot -> the canonical full (unsharded) tensor: transposes and de-interleaving, once."""
        if self._flat(slot):
            E, I, h = spec.num_experts, spec.intermediate_size, spec.hidden_size
            if slot == "experts_in.weight":            # [E * I, h] x (gate, up) -> per expert [gate; up]
                return torch.stack([p.reshape(E, I, h) for p in parts], 1).reshape(E * 2 * I, h).contiguous()
            return parts[0].reshape(E, I, h).transpose(1, 2).reshape(E * h, I).contiguous()
        if slot in self.as_row:
            parts = [p.squeeze(0) for p in parts]
        if slot in self.stored_shape:
            parts = [p.reshape(-1) for p in parts]
        if slot in self.transposed:
            parts = [p.transpose(-1, -2) for p in parts]     # a stacked slot: each expert's matrix
        if slot in DEPTHWISE:
            parts = [p.squeeze(1) for p in parts]
        if slot in POINTWISE:
            parts = [p.squeeze(-1) for p in parts]
        if slot == "lin_in.weight" and self.layout.get("linear_in") == "grouped":
            parts = self._ungroup_linear(spec, parts)
        if slot == "qkv.lora_up":        # Zamba2: block-diagonal, so one product adapts q, k and v at once
            return torch.block_diag(*parts).contiguous()
        if slot in self.zero_parts:
            at = self.zero_parts[slot]
            rows = self._part_rows(spec, slot, len(parts) + 1)[at]
            parts = [*parts[:at], parts[0].new_zeros(rows, *parts[0].shape[1:]), *parts[at:]]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if self._up_first(slot):                             # [up; gate] -> [gate; up] (its own inverse)
            t = torch.cat(t.chunk(2)[::-1])
        if self._gate_up_interleaved(slot):                  # per expert [(gate, up) x I] -> [gate x I; up x I]
            E, I = spec.num_experts, spec.intermediate_size
            t = t.reshape(E, I, 2, *t.shape[2:]).transpose(1, 2)
        if self._stacked(slot):
            t = t.reshape(-1, *t.shape[(3 if self._gate_up_interleaved(slot) else 2):])
        if self._gate_first(slot, len(parts)):            # HRM-Text: [gate; q; k; v] -> [q; k; v; gate]
            t = torch.cat([t[spec.num_heads * spec.gate_width:], t[:spec.num_heads * spec.gate_width]])
        elif slot.startswith("qkv.") and spec.attn_gate and len(parts) == 4:
            pass                                            # q, k, v, gate: already the canonical order (AFMoE)
        elif slot.startswith("qkv.") and spec.attn_gate:   # per head [q; gate] -> every head's q, ..., every gate
            H, hd, rest = spec.num_heads, spec.head_dim, t.shape[1:]
            qg, kv = t[:2 * H * hd].reshape(H, 2, hd, *rest), t[2 * H * hd:]
            t = torch.cat([qg[:, 0].reshape(H * hd, *rest), kv, qg[:, 1].reshape(H * hd, *rest)])
        elif slot.startswith("qkv."):
            H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
            layout, rest = self._qkv_layout(spec), t.shape[1:]
            if layout == "interleaved":
                # BLOOM, GPT-NeoX: [head, (q|k|v), head_dim]; canonical is [(q|k|v), head, head_dim].
                t = t.reshape(H, 3, hd, *rest).transpose(0, 1).reshape(t.shape)
            elif layout == "grouped":
                # Falcon's new decoder: per kv head, its H/KV query heads, then its k, then its v.
                g = t.reshape(KV, H // KV + 2, hd, *rest)
                t = torch.cat([g[:, :-2].reshape(H * hd, *rest), g[:, -2].reshape(KV * hd, *rest),
                               g[:, -1].reshape(KV * hd, *rest)], dim=0)
            elif layout == "mp_blocks":
                # CodeGen: MP_BLOCKS blocks (its training shards), each that block's q rows, then v's, then k's
                g = t.reshape(MP_BLOCKS, 3, t.shape[0] // (3 * MP_BLOCKS), *rest)
                t = torch.cat([g[:, j].reshape(-1, *rest) for j in (0, 2, 1)], dim=0)
        return t.contiguous()

    @staticmethod
    def _ungroup_linear(spec: ModelSpec, parts):
        """Qwen3-Next's in_proj_qkvz and in_proj_ba hold, per key head, its q, k, the v and z of the value heads it
        serves, and their b and a. -> [q; k; v; z] and [b; a], each part every head's in order."""
        la = spec.linear_attn
        Hk, r, dk, dv = la["k_heads"], la["v_heads"] // la["k_heads"], la["k_dim"], la["v_dim"]
        qkvz, ba = parts
        g = qkvz.reshape(Hk, -1, *qkvz.shape[1:]).split([dk, dk, r * dv, r * dv], dim=1)
        ba = ba.reshape(Hk, 2 * r, *ba.shape[1:]).split([r, r], dim=1)
        return [x.reshape(-1, *qkvz.shape[1:]) for x in (*g, *ba)]

    @staticmethod
    def _group_linear(spec: ModelSpec, t):
        Hk = spec.linear_attn["k_heads"]
        Kd, Vd, Hv = _linear_widths(spec)
        q, k, v, z, b, a = (x.reshape(Hk, -1, *t.shape[1:]) for x in t.split([Kd, Kd, Vd, Vd, Hv, Hv]))
        return [torch.cat([q, k, v, z], 1).reshape(-1, *t.shape[1:]), torch.cat([b, a], 1).reshape(-1, *t.shape[1:])]

    def _qkv_layout(self, spec: ModelSpec) -> str:
        layout = spec.qkv_layout or self.layout.get("qkv", "separate")
        if layout not in ("separate", "fused", "interleaved", "grouped", "mp_blocks"):   # fused: one tensor, q|k|v
            raise FmError(f"{self.path.name}: qkv layout {layout!r} is not separate, fused, interleaved, grouped or "
                          "mp_blocks")
        if layout == "mp_blocks" and (spec.num_kv_heads != spec.num_heads
                                      or spec.num_heads * spec.head_dim % MP_BLOCKS):
            raise FmError(f"config.json: a qkv_proj in {MP_BLOCKS} blocks needs as many kv heads as heads and a "
                          f"hidden size divisible by {MP_BLOCKS}")
        return layout

    def unfuse(self, spec: ModelSpec, slot: str, t: torch.Tensor, n_parts: int) -> list[torch.Tensor]:
        """Inverse of `fuse`: the canonical tensor back to the HF tensors, in HF layout."""
        if self._up_first(slot):
            t = torch.cat(t.chunk(2)[::-1])
        if self._flat(slot):
            E, I, h = spec.num_experts, spec.intermediate_size, spec.hidden_size
            if slot == "experts_in.weight":
                t = t.reshape(E, 2, I, h)
                return [t[:, 0].reshape(E * I, h).contiguous(), t[:, 1].reshape(E * I, h).contiguous()]
            return [t.reshape(E, h, I).transpose(1, 2).reshape(E * I, h).contiguous()]
        if self._stacked(slot):
            E = spec.moa["experts"] if slot.startswith("moa_") else spec.num_experts
            t = t.reshape(E, -1, *t.shape[1:])
            if self._gate_up_interleaved(slot):
                t = t.reshape(E, 2, spec.intermediate_size, *t.shape[2:]).transpose(1, 2).reshape(t.shape)
            return [(t.transpose(-1, -2) if slot in self.transposed else t).contiguous()]
        if slot == "lin_in.weight" and self.layout.get("linear_in") == "grouped" and n_parts == 2:
            return [p.contiguous() for p in self._group_linear(spec, t)]
        if slot == "qkv.lora_up":
            r, rows = spec.shared_blocks["rank"], self._part_rows(spec, slot, 3)
            return [b[:, k * r:(k + 1) * r].contiguous() for k, b in enumerate(torch.split(t, rows))]
        if slot in DEPTHWISE:            # one conv, or Kimi Linear's q, k and v convs
            parts = torch.split(t, self._part_rows(spec, slot, n_parts), dim=0) if n_parts > 1 else [t]
            return [p.unsqueeze(1).contiguous() for p in parts]
        if slot in POINTWISE:
            return [t.unsqueeze(-1).contiguous()]
        if self._gate_first(slot, n_parts):
            g = spec.num_heads * spec.gate_width
            return [torch.cat([t[-g:], t[:-g]]).contiguous()]
        if slot.startswith("qkv.") and spec.attn_gate and n_parts == 4:         # AFMoE: q, k, v, gate as stored
            return [p.contiguous() for p in torch.split(t, self._part_rows(spec, slot, 4), dim=0)]
        if slot.startswith("qkv.") and spec.attn_gate:
            H, hd, rest = spec.num_heads, spec.head_dim, t.shape[1:]
            q, kv, gate = t[:H * hd], t[H * hd:-H * hd], t[-H * hd:]
            t = torch.cat([torch.stack([q.reshape(H, hd, *rest), gate.reshape(H, hd, *rest)], 1)
                           .reshape(2 * H * hd, *rest), kv])
        elif slot.startswith("qkv."):
            H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
            layout, rest = self._qkv_layout(spec), t.shape[1:]
            if layout == "interleaved":
                t = t.reshape(3, H, hd, *rest).transpose(0, 1).reshape(t.shape)
            elif layout == "grouped":
                q, k, v = torch.split(t, [H * hd, KV * hd, KV * hd], dim=0)
                t = torch.cat([q.reshape(KV, H // KV, hd, *rest), k.reshape(KV, 1, hd, *rest),
                               v.reshape(KV, 1, hd, *rest)], dim=1).reshape(t.shape)
            elif layout == "mp_blocks":
                q, k, v = (x.reshape(MP_BLOCKS, -1, *rest) for x in torch.split(t, [H * hd, KV * hd, KV * hd]))
                t = torch.stack([q, v, k], 1).reshape(t.shape)
        if slot in self.zero_parts:
            parts = list(torch.split(t, self._part_rows(spec, slot, n_parts + 1), dim=0))
            del parts[self.zero_parts[slot]]
        else:
            parts = list(torch.split(t, self._part_rows(spec, slot, n_parts), dim=0)) if n_parts > 1 else [t]
        if slot in self.transposed:
            parts = [p.t() for p in parts]
        if slot in self.as_row:
            parts = [p.unsqueeze(0) for p in parts]
        if slot in self.stored_shape:
            parts = [p.reshape(self.stored_shape[slot]) for p in parts]
        return [p.contiguous() for p in parts]


def wave_slots(wave: dict) -> list[str]:
    """The slots of a Wav2Vec2 front end, in order: each conv's weight (and bias) and its norm's weight and bias
    where it has one (every layer's with "layer" norms, the first one's with "group"), the features' norm and
    projection, and the positional conv (weight-normed: g, v; Data2Vec-Audio: pos_layers plain convs)."""
    out = []
    for c in range(len(wave["conv_dim"])):
        out += [f"wave_conv{c}.weight"] + ([f"wave_conv{c}.bias"] if wave["bias"] else [])
        if wave["norm"] == "layer" or c == 0:
            out += [f"wave_norm{c}.weight", f"wave_norm{c}.bias"]
    out += ["feat_norm.weight", "feat_norm.bias"] if wave["feat_norm"] else []
    out += ["feat_proj.weight", "feat_proj.bias"]
    layers = wave.get("pos_layers", 0)
    out += [f"pos_conv{p}.{t}" for p in range(layers) for t in ("weight", "bias")] if layers else \
        ["pos_conv.g", "pos_conv.v", "pos_conv.bias"]
    return out


def wave_shapes(wave: dict | ModelSpec | None, hidden: int | None = None) -> dict:
    """The shapes of a Wav2Vec2 front end's slots (none without one). wave: its spec dict (or the ModelSpec)."""
    if isinstance(wave, ModelSpec):
        wave, hidden = wave.wave, wave.hidden_size
    if not wave:
        return {}
    dims, h, K = wave["conv_dim"], hidden, wave["pos_kernel"]
    out = {}
    for c, (d, k) in enumerate(zip(dims, wave["kernel"])):
        out.update({f"wave_conv{c}.weight": (d, dims[c - 1] if c else 1, k), f"wave_conv{c}.bias": (d,),
                    f"wave_norm{c}.weight": (d,), f"wave_norm{c}.bias": (d,)})
    out.update({"feat_norm.weight": (dims[-1],), "feat_norm.bias": (dims[-1],), "feat_proj.weight": (h, dims[-1]),
                "feat_proj.bias": (h,), "pos_conv.g": (1, 1, K), "pos_conv.v": (h, h // wave["pos_groups"], K),
                "pos_conv.bias": (h,)})
    for p in range(wave.get("pos_layers", 0)):
        out.update({f"pos_conv{p}.weight": (h, h // wave["pos_groups"], K), f"pos_conv{p}.bias": (h,)})
    return out


def conformer_shapes(spec: ModelSpec) -> dict:
    """The canonical shapes of Wav2Vec2-Conformer's layer slots (none without its block)."""
    cf = spec.conformer
    if not cf:
        return {}
    h, inter = spec.hidden_size, spec.intermediate_size
    return {"macaron_norm.weight": (h,), "macaron_norm.bias": (h,), "macaron_in.weight": (inter, h),
            "macaron_in.bias": (inter,), "macaron_out.weight": (h, inter), "macaron_out.bias": (h,),
            "conv_norm.weight": (h,), "conv_norm.bias": (h,), "conv_in.weight": (2 * h, h),     # GLU value|gate
            "conv_dw.weight": (h, cf["depthwise_kernel"]), **{f"conv_bn.{n}": (h,) for n in ("weight", "bias",
                                                                                             "mean", "var")},
            "conv_bn.count": (), "conv_out.weight": (h, h), "block_norm.weight": (h,), "block_norm.bias": (h,),
            "conv_dw_norm.weight": (h,), "conv_dw_norm.bias": (h,),
            "rel_dist.weight": (cf.get("max_left", 0) + cf.get("max_right", 0) + 1, spec.head_dim),
            "rel_pos.weight": (h, h), "rel_pos.u": (spec.num_heads, spec.head_dim),
            "conformer_rope.inv_freq": (spec.head_dim // 2,),
            "rel_pos.v": (spec.num_heads, spec.head_dim)}


def audio_front(spec: dict) -> dict | None:
    """A speech encoder's framing of the 16 kHz samples (a manifest's model section): the conv stack of one that
    reads the waveform (`wave`), the feature extractor's of one that reads feature rows (`features`); None for
    any other model. Both give kernel and stride lists, which frames_of and samples_for read. Wav2Vec2-BERT's
    adapter adds a layer a strided conv: padded by stride // 2 a side, it counts as kernel - 2 * (stride // 2)."""
    front, ad = spec.get("wave") or spec.get("features"), spec.get("adapter")
    if not front or not ad:
        return front
    n, pad = ad["layers"], ad["stride"] // 2
    return {**front, "kernel": [*front["kernel"], *[ad["kernel"] - 2 * pad] * n],
            "stride": [*front["stride"], *[ad["stride"]] * n]}


def adapter_shapes(adapter: dict | None, hidden: int, inter: int) -> dict:
    """The shapes of Wav2Vec2-BERT's adapter slots (none without one): width o, each layer's convs [2o, o, kernel]."""
    if not adapter:
        return {}
    o, k = adapter["width"], adapter["kernel"]
    out = {"adapter_ffn_in.weight": (inter, hidden), "adapter_ffn_in.bias": (inter,),
           "adapter_ffn_out.weight": (hidden, inter), "adapter_ffn_out.bias": (hidden,),
           "adapter_proj.weight": (o, hidden), "adapter_proj.bias": (o,), "adapter_proj_norm.weight": (o,),
           "adapter_proj_norm.bias": (o,)}
    for a in range(adapter["layers"]):
        out.update({f"adapter{a}.{n}.{p}": (o,) for n in ("res_norm", "attn_norm", "mlp_norm", "attn_out")
                    for p in ("weight", "bias")})
        out.update({f"adapter{a}.{n}.weight": (2 * o, o, k) for n in ("res_conv", "attn_conv")})
        out.update({f"adapter{a}.{n}.bias": (2 * o,) for n in ("res_conv", "attn_conv")})
        out.update({f"adapter{a}.qkv.weight": (3 * o, o), f"adapter{a}.qkv.bias": (3 * o,),
                    f"adapter{a}.attn_out.weight": (o, o), f"adapter{a}.mlp_in.weight": (inter, o),
                    f"adapter{a}.mlp_in.bias": (inter,), f"adapter{a}.mlp_out.weight": (o, inter),
                    f"adapter{a}.mlp_out.bias": (o,)})
    return out


def adapter_slots(adapter: dict | None, hidden: int) -> list[str]:
    """The slots an adapter has: its feed-forward's (ffn), its projection's (a width other than hidden), its
    layers'."""
    if not adapter:
        return []
    return [s for s in adapter_shapes(adapter, hidden, 1)
            if not (s.startswith("adapter_ffn") and not adapter["ffn"])
            and not (s.startswith("adapter_proj") and adapter["width"] == hidden)]


def features_shapes(features: dict | None, hidden: int) -> dict:
    """The shapes of Wav2Vec2-BERT's front end: the feature rows' LayerNorm and their projection to hidden."""
    if not features:
        return {}
    d = features["dim"]
    return {"feat_norm.weight": (d,), "feat_norm.bias": (d,), "feat_proj.weight": (hidden, d),
            "feat_proj.bias": (hidden,)}


def frames_of(wave: dict, samples: torch.Tensor | int):
    """How many frames the conv stack (or a feature extractor's framing, `audio_front`) makes of this many samples
    (per layer: (n - kernel) // stride + 1)."""
    for k, st in zip(wave["kernel"], wave["stride"]):
        samples = (samples - k) // st + 1
    return samples


def samples_for(wave: dict, frames: int = 1) -> int:
    """The fewest samples the conv stack makes this many frames of (frames_of's inverse)."""
    for k, st in reversed(list(zip(wave["kernel"], wave["stride"]))):
        frames = (frames - 1) * st + k
    return frames


def _linear_widths(spec: ModelSpec) -> tuple[int, int, int]:
    """(every q or k head's width, every v head's width, the v heads) of a hybrid's linear attention."""
    la = spec.linear_attn
    return la["k_heads"] * la["k_dim"], la["v_heads"] * la["v_dim"], la["v_heads"]


def kda_gate_widths(la: dict) -> tuple[int, int]:
    """The widths of KDA's decay input and output gate in lin_in: the low-rank halves (Kimi Linear: k_dim and
    v_dim, widened by lin_f_b and lin_g_b), or every head's channels (Ling 2.5's full f_proj and g_proj)."""
    if la.get("gates") == "full":
        return la["k_heads"] * la["k_dim"], la["v_heads"] * la["v_dim"]
    return la["k_dim"], la["v_dim"]


def _ssm_widths(spec: ModelSpec) -> tuple[int, int, int]:
    """(x's width, B's (or C's) width, the heads) of a hybrid's Mamba2 layers."""
    s = spec.ssm
    return s["heads"] * s["head_dim"], s["groups"] * s["state"], s["heads"]


@cache
def policies() -> dict[str, Policy]:
    """architecture string -> Policy, from every configs/*.toml."""
    if not CONFIG_DIR.is_dir():
        raise FmError(f"architecture tables not found at {CONFIG_DIR} (set FMCONVERT_CONFIGS)")
    table = {}
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        with open(path, "rb") as f:
            pol = Policy(tomllib.load(f), path)
        for arch in pol.architectures:
            table[arch] = pol
    return table


@cache
def wrappers() -> dict[str, dict]:
    """wrapper architecture -> its table, from configs/wrappers/*.toml (vision-language checkpoints)."""
    out = {}
    for path in sorted((CONFIG_DIR / "wrappers").glob("*.toml")):
        with open(path, "rb") as f:
            table = tomllib.load(f)
        for arch in table["architectures"]:
            out[arch] = table
    return out


def text_architecture(wrapper: str, model_type: str, config_class: str) -> str | None:
    """The architecture whose table serves a wrapper's language model: the wrapper table's `text` entry for its
    model_type (qwen2_5_vl_text -> Qwen2ForCausalLM), else the one named after its config class (LlamaConfig ->
    LlamaForCausalLM). None if no table serves it."""
    known = policies()
    arch = wrappers()[wrapper].get("text", {}).get(model_type)
    if arch is None:
        stem = config_class.removesuffix("Config")
        arch = next((a for a in (stem + "ForCausalLM", stem + "Model") if a in known), None)
    return arch if arch in known else None


def encoder_half(config, policy: Policy, architecture: str):
    """An encoder-decoder's config seen as its encoder's (T5ForConditionalGeneration -> T5EncoderModel): a shallow copy
    whose architectures name the encoder's table, and whose `fmconvert_skip` leaves the decoder's tensors out of the
    plan. The decoder's own plan leaves out the encoder's (`Policy.seq2seq`)."""
    enc = policy.seq2seq["encoders"].get(architecture)
    if enc is None:
        raise FmError(f"{policy.path.name}: [seq2seq.encoders] names no encoder for {architecture}")
    half = copy.copy(config)
    half.architectures = [enc]
    half.fmconvert_skip = tuple(policy.seq2seq["decoder_prefixes"])
    half.fmconvert_own = tuple(policy.seq2seq["encoder_prefixes"])      # an embedding table elsewhere is shared
    return half


def policy_of(config) -> tuple[Policy, str]:
    """policy_for a parsed config. For a vision-language wrapper `read.load_config` hands back the language
    model's config, its architectures naming the wrapper and `fmconvert_text_architecture` the table's."""
    text = getattr(config, "fmconvert_text_architecture", None)
    if text is None:
        return policy_for(config.architectures)
    wrapper = config.architectures[0]
    return policies()[text].through(wrapper, text), wrapper


def saved_as_owner(architecture: str, model_type) -> str | None:
    """The architecture whose table serves a checkpoint transformers saved under a generic class (EXAONE 3.x as a
    LlamaForCausalLM, Sarvam-30B as a Glm4MoeForCausalLM) with its own model_type: the table of that model_type's
    own class, when it lists `architecture` in its `saved_as`; None otherwise."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        return None
    stem = CONFIG_MAPPING_NAMES[model_type].removesuffix("Config")
    known = policies()
    own = next((a for a in (stem + "ForCausalLM", stem + "Model") if a in known), None)
    return own if own is not None and architecture in known[own].table.get("saved_as", []) else None


# Architectures transformers knows that fmconvert has looked at and does not serve, each with the reason: named in the
# error rather than drowned in the list of supported ones.
_INKLING = ("Thinking Machines' Inkling is not supported: its attention adds a bias mixed per head from each token's "
            "hidden state for every backward distance (r_proj, rel_logits_proj), which fmconvert's attention does "
            "not take, beside residual short convolutions on k, v and each half's output")
REFUSED = {
    "InklingForCausalLM": _INKLING,
    "InklingTextModel": _INKLING,
    "InklingForConditionalGeneration": _INKLING,
    "InklingModel": _INKLING,
}


def policy_for(architectures, family: str | None = None) -> tuple[Policy, str]:
    """The policy of the first known architecture. A vision-language wrapper needs `family`: its language
    model's, which `read.load_config` finds from the text config and the manifest records."""
    known = policies()
    for arch in architectures or []:
        if arch in known:
            return known[arch], arch
        if arch in wrappers() and family is not None:
            pol = next((p for p in known.values() if p.family == family), None)
            if pol is None:
                raise FmError(f"{arch}: its language model's family {family!r} is not supported")
            return pol.through(arch), arch
    refused = next((a for a in architectures or [] if a in REFUSED), None)
    if refused is not None:
        raise FmError(f"{refused}: {REFUSED[refused]}")
    raise FmError(f"unknown architecture {', '.join(map(str, architectures or [])) or '(none in config.json)'}; "
                  f"supported: {', '.join(sorted(known) + sorted(wrappers()))}")
