"""Synthetic LLaMA (and latent-attention) checkpoints for the benchmarks: random bf16 weights, saved by
transformers, cached by shape.

    python benchmarks/synth.py               # build (or find) the 1.1B shape and print its directory
    python benchmarks/synth.py --layers 44   # the twice-as-deep variant

The model is built on the meta device and its parameters are filled in bf16 one tensor at a time, so no float32
copy of the model ever exists. `save_pretrained(max_shard_size="1GB")` writes it the way a Hub checkpoint looks:
several safetensors shards plus model.safetensors.index.json. A finished directory is renamed into place, so a
killed build never leaves a half-written cache entry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

# TinyLlama-1.1B's shape.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
# A few MB: the smoke run, and the tests that keep these scripts from rotting.
SMOKE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000)
# DeepSeek-V2-Lite's latent attention (16 heads, kv_lora_rank 512, q straight from the hidden state, k 128 + 64,
# v 128) on 3 dense layers of TinyLlama's MLP and one mixture of 4 V2-Lite experts (2 shared): what decode against
# a long cache costs, without V2-Lite's 15 B expert weights.
MLA_LITE = dict(model="deepseek_v2", hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                num_attention_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=1408, vocab_size=32000)
MLA_SMOKE = dict(MLA_LITE, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 first_k_dense_replace=1, moe_intermediate_size=128, vocab_size=1000)

# Qwen3.5's hybrid layers at 2048 wide: 8 layers, 6 Gated DeltaNet (16 q/k heads, 32 v heads, 128 each, conv 4) and
# 2 gated attention (16 heads, 2 kv, head_dim 256, RoPE over a quarter), TinyLlama's vocab.
QWEN35_LITE = dict(model="qwen3_5", hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                   linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                   linear_conv_kernel_dim=4, vocab_size=32000)
QWEN35_SMOKE = dict(QWEN35_LITE, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                    head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                    linear_value_head_dim=32, vocab_size=1000)
# Granite 4.0-H's Mamba2 layers at 2048 wide, dense (as -H-Micro): 8 layers, 7 Mamba2 (64 heads of 64, one group,
# state 128, conv 4) and 1 attention (16 heads, 4 kv, no RoPE). A finite time_step_limit: transformers 5.24 cannot
# read back the infinity it writes for the default.
GRANITE_H_LITE = dict(model="granitemoehybrid", hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=0, shared_intermediate_size=8192,
                      layer_types=["mamba"] * 3 + ["attention"] + ["mamba"] * 4, mamba_n_heads=64, mamba_d_head=64,
                      mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, position_embedding_type=None,
                      time_step_limit=(0.0, 1e4), vocab_size=32000)
GRANITE_H_SMOKE = dict(GRANITE_H_LITE, hidden_size=256, intermediate_size=704, shared_intermediate_size=704,
                       num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"], num_attention_heads=4,
                       num_key_value_heads=2, mamba_n_heads=8, mamba_d_state=32, vocab_size=1000)
# FalconMamba's layers at 2048 wide (the width of mamba-1.4b): 8 Mamba layers of 4096 channels, state 16, dt rank
# 128, RMS-normed dt, B and C; no attention, no MLP.
FALCON_MAMBA_LITE = dict(model="falcon_mamba", hidden_size=2048, num_hidden_layers=8, state_size=16, expand=2,
                         conv_kernel=4, time_step_rank=128, vocab_size=32000)
FALCON_MAMBA_SMOKE = dict(FALCON_MAMBA_LITE, hidden_size=256, num_hidden_layers=2, time_step_rank=16,
                          vocab_size=1000)
# Encoders at base size: BERT-base (all-MiniLM's family, bge-base), all-mpnet-base-v2's MPNet, DeBERTa-v3-base.
BERT_BASE = dict(model="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=30522, max_position_embeddings=512)
MPNET_BASE = dict(BERT_BASE, model="mpnet", vocab_size=30527, max_position_embeddings=514)
DEBERTA_V3_BASE = dict(BERT_BASE, model="deberta_v2", vocab_size=128100, relative_attention=True,
                       position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
                       share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
                       layer_norm_eps=1e-7)
ENCODER_SMOKE = dict(BERT_BASE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1000)
# Encoder-decoders: t5-base's shape (T5 v1.0: ReLU MLP, a tied and scaled head, 12 + 12 layers) and bart-base's
# (post-LN, 6 + 6 layers, learned positions, final_logits_bias).
T5_BASE = dict(model="t5", d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
               vocab_size=32128, feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
BART_BASE = dict(model="bart", d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265,
                 max_position_embeddings=1024, forced_eos_token_id=None)
SEQ2SEQ_SMOKE = dict(T5_BASE, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                     vocab_size=1000)
SEQ2SEQ = ("t5", "bart")
_MODELS = {"deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
           "t5": ("T5Config", "T5ForConditionalGeneration"), "bart": ("BartConfig", "BartForConditionalGeneration"),
           "bert": ("BertConfig", "BertModel"), "mpnet": ("MPNetConfig", "MPNetModel"),
           "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM"),
           "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
           "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM"),
           "deberta_v2": ("DebertaV2Config", "DebertaV2Model")}
ENCODERS = ("bert", "mpnet", "deberta_v2")


def key(shape: dict) -> str:
    if shape.get("model") in SEQ2SEQ:
        return "-".join(f"{k}{v}" for k, v in sorted(shape.items()) if k != "model" and isinstance(v, int)) \
            .join((shape["model"] + "-", "-bf16"))
    if shape.get("model") in ENCODERS:
        return "{model}-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}-a{num_attention_heads}-v{vocab_size}" \
            "-bf16".format(**shape)
    if shape.get("model") == "granitemoehybrid":
        return ("granite_h-h{hidden_size}-i{shared_intermediate_size}-l{num_hidden_layers}-m{mamba_n_heads}"
                "-n{mamba_d_state}-v{vocab_size}-bf16").format(**shape)
    if shape.get("model") == "falcon_mamba":
        return "falcon_mamba-h{hidden_size}-l{num_hidden_layers}-n{state_size}-v{vocab_size}-bf16".format(**shape)
    if shape.get("model") == "qwen3_5":
        return ("qwen3_5-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}-a{num_attention_heads}"
                "-lv{linear_num_value_heads}-v{vocab_size}-bf16").format(**shape)
    if shape.get("model") == "deepseek_v2":
        return ("mla-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}-a{num_attention_heads}"
                "-kv{kv_lora_rank}-v{vocab_size}-bf16").format(**shape)
    return ("llama-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}-a{num_attention_heads}"
            "-kv{num_key_value_heads}-v{vocab_size}-bf16").format(**shape)


def build(shape: dict, cache: Path = CACHE, seed: int = 0, max_shard_size: str = "1GB", quiet: bool = False) -> Path:
    """The directory of a saved random LlamaForCausalLM (DeepseekV2ForCausalLM with model="deepseek_v2",
    Qwen3_5ForCausalLM with model="qwen3_5") of this shape; built on first use."""
    out = Path(cache) / key(shape)
    if (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file() or \
            (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if not quiet:
        print(f"building synthetic checkpoint {out.name} (once; cached) ...", file=sys.stderr, flush=True)
    kw = {k: v for k, v in shape.items() if k != "model"}
    config_cls, model_cls = _MODELS.get(shape.get("model"), ("LlamaConfig", "LlamaForCausalLM"))
    defaults = {} if shape.get("model") in ENCODERS + SEQ2SEQ else dict(max_position_embeddings=4096, rms_norm_eps=1e-5,
                                                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_cls)(**{**defaults, **kw})
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()         # to_empty gives each module its own tensor: tied ones must share one again
    for _, b in model.named_buffers():      # saved buffers (BART's final_logits_bias) start as transformers' do
        if b.is_floating_point():
            b.zero_()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "LayerNorm.weight", "layer_norm.weight", "layernorm_embedding.weight")):
                p.fill_(1.0)
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.bfloat16), alpha=0.1)
            else:
                torch.randn(p.shape, generator=gen, dtype=torch.bfloat16, out=p.data)
                p.mul_(0.02)
    return save_whole(out, model, {"shape": shape, "seed": seed, "dtype": "bfloat16",
                                   "max_shard_size": max_shard_size}, max_shard_size)


def save_whole(out: Path, model, meta: dict, max_shard_size: str = "1GB", beside=()) -> Path:
    """model (and each of `beside`: a feature extractor) saved as out, with meta as its synthetic.json, through a
    .partial folder renamed into place: a run stopped halfway leaves nothing to be taken for a cached checkpoint."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    for extra in beside:
        extra.save_pretrained(tmp)
    (tmp / "synthetic.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    ap.add_argument("--smoke", action="store_true", help="the tiny smoke shape instead of 1.1B")
    ap.add_argument("--cache", type=Path, default=CACHE)
    a = ap.parse_args(argv)
    shape = dict(SMOKE if a.smoke else LLAMA_1B)
    shape["num_hidden_layers"] = a.layers if not a.smoke or a.layers != LLAMA_1B["num_hidden_layers"] \
        else SMOKE["num_hidden_layers"]
    d = build(shape, a.cache)
    print(d)
    print(f"{dir_bytes(d) / 1e9:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
