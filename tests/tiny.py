"""Tiny random HF models built with transformers, saved to a directory. Shared by every test module."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"

_VISION = {k: dict(model_type=k if k == "pixtral" else f"{k}_vision_model", hidden_size=32, intermediate_size=48,
                   num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
           for k in ("siglip", "clip", "pixtral")}

# Qwen3-VL's tiny language model and the rest of its wrapper, shared by its dense and MoE variants.
_QWEN3_VL_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                       "mrope_interleaved": True, "rope_theta": 1e4})
_QWEN3_VL = dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                                    deepstack_visual_indexes=[0]),
                 image_token_id=100, video_token_id=99, vision_start_token_id=98)

# Qwen3.5's tiny hybrid: layers 0-2 Gated DeltaNet, layer 3 gated attention (RoPE over a quarter of the head).
_QWEN3_5_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
                     linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
                     linear_value_head_dim=8, linear_conv_kernel_dim=4, tie_word_embeddings=False)
_QWEN3_5_MOE = dict(_QWEN3_5_TEXT, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                    shared_expert_intermediate_size=40)
# Qwen4-Exp's tiny model: Qwen3.5-MoE's widths, three copies of the stream, hashed 2- and 3-grams (two heads each)
# before layer 1, and a QSA indexer over blocks of 2 that keeps 2 of them (so a 9-token context is already sparse)
_QWEN4_EXP_TEXT = dict(_QWEN3_5_MOE, hc_count=3, hc_lowrank=16, ple_layer_ids=[2], ple_embed_dim=32, ngram_size=3,
                       heads_per_ngram=2, ngram_vocab_size_base=50, make_ngram_vocab_size_divisible_by=8,
                       split_ngram_parts=2, indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16,
                       indexer_budget=4, indexer_compress_ratio=2, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                        "mrope_section": [2, 1, 1], "mrope_interleaved": True})

# One small config per family, sized so tp=2 and tp=4 divide heads and int8 groups fit.
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, vocab_size=101, max_position_embeddings=64,
                tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2,
            num_attention_heads=4, vocab_size=101, max_position_embeddings=64, word_embed_proj_dim=64)),
    "opt350": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=101, max_position_embeddings=64, word_embed_proj_dim=32,
               do_layer_norm_before=False)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=101)),
    "gptneox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=101, max_position_embeddings=64)),
    "gptneox_seq": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, vocab_size=101, max_position_embeddings=64,
                    use_parallel_residual=False, tie_word_embeddings=True)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_inner=96, n_layer=2, n_head=4, vocab_size=101,
             n_positions=64, rotary_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
             pad_token_id=0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                 max_position_embeddings=64, use_qkv_bias=True)),
    "stablelm_par": ("StableLmConfig", "StableLmForCausalLM", dict(hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
                     max_position_embeddings=64, use_parallel_residual=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=101,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=101,
               max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=24,
               attn_logit_softcapping=0.2, final_logit_softcapping=2.0, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=101,
               max_position_embeddings=64, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=101,
              max_position_embeddings=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=101, max_position_embeddings=64)),                    # 7B-style: multi-query, one norm
    "falcon_new": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_kv_heads=2, vocab_size=101, max_position_embeddings=64,
                   new_decoder_architecture=True, bias=True, tie_word_embeddings=False)),   # 40B-style: grouped
    "falcon_seq": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=101, max_position_embeddings=64, multi_query=False,
                   parallel_attn=False)),                                       # interleaved q|k|v, two norms
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, vocab_size=101, max_position_embeddings=64, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=48, shared_expert_intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                  num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                   max_position_embeddings=64, sliding_window=6, bos_token_id=1, eos_token_id=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=64, n_inner=96, n_layer=2, n_head=4,
                    vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=2)),       # multi-query
    "gpt_bigcode_mha": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=64, n_inner=96, n_layer=2,
                        n_head=4, vocab_size=101, n_positions=64, multi_query=False, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)),                      # [q|k|v] per head
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
               logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.3, logits_scaling=4.0,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere_qk": ("CohereConfig", "CohereForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                  max_position_embeddings=64, use_qk_norm=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)),                                       # Command R+: per-head q/k LayerNorms
    "glm": ("GlmConfig", "GlmForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)),                 # half-width interleaved RoPE
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)),                # and sandwich norms
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),   # layer 3: NoPE
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                max_position_embeddings=64, sliding_window=4, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)),            # layers 0-2 windowed with RoPE, layer 3 global without
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              sliding_window=4, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
              bos_token_id=1, eos_token_id=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Sinks, alternating windowed layers, YaRN, stacked experts with biases, and a clamp tight enough to bite.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                swiglu_limit=0.1, swiglu_alpha=1.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 16,
                                 "rope_theta": 150000.0})),
    "qwen2_moe_mixed": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                        moe_intermediate_size=48, shared_expert_intermediate_size=80, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3])),
    # layers 0, 2 (decoder_sparse_step) and 3 (mlp_only_layers) dense; layer 1 a mixture with a shared expert
    # A dense first layer, then mixtures: sigmoid routing in groups with a correction bias, a shared expert.
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=101, max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=3,
                 n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                 use_qk_norm=True, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Multi-head latent attention: a q bottleneck, one latent per token, YaRN whose mscale sharpens the softmax; the
    # mixture as GLM-4.5's
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=101,
                    max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                    n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32,
                    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                                     "rope_theta": 10000.0})),
    # V2-Lite's latent attention without a q bottleneck; softmax routing within the best groups, scaled
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                    moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                    max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy", n_group=4, topk_group=1,
                    routed_scaling_factor=1.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=101,
              max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=4,
              topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.0,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(hidden_size=64, intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                   max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, rotary_dim=8,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),      # q/k normed across heads; half RoPE
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                 max_position_embeddings=64, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                 max_position_embeddings=64, use_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "granitemoe": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(hidden_size=64, intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                   max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=80,
                   embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.3, logits_scaling=4.0,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),     # stacked experts, an ungated shared one
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)),            # ungated MLP, ReLU squared
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                     moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=101, max_position_embeddings=64, num_experts=8, num_experts_per_tok=2,
                     moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, use_bias=False,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)),   # layers 1-2 mixtures, 0 and 3 dense
    "hunyuan": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})),
    # q/k normed after RoPE; NTK-alpha RoPE
    # RoPE layers chunked (every 4 positions), q/k L2-normed after interleaved RoPE; NoPE layers with a q temperature
    # from position 3 on; mixtures in layers 1 and 3 whose routing weight scales the expert's input
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(hidden_size=64, intermediate_size=32,
               intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, vocab_size=101, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=1,
               interleave_moe_layer_step=2, attention_chunk_size=4, floor_scale=4, attn_scale=0.5,
               no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LayerNorm with biases, biased attention and lm_head, SparseMixer's two sequential picks
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
               num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
               router_jitter_noise=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # EXAONE 4's attention (windowed RoPE layers, NoPE global ones) in a pre-norm block over DeepSeek-V3's mixture
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=101, max_position_embeddings=64, num_experts=8, num_experts_per_tok=2,
                   num_shared_experts=1, sliding_window=4, sliding_window_pattern=2, n_group=4, topk_group=2,
                   mlp_layer_types=["dense", "sparse", "dense", "sparse"], pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)),
    # Laguna: q heads per layer, softplus gate per head, two RoPEs (the full layers rotate half the head), a capped
    # sigmoid router beside a shared expert, the first layer dense
    "laguna": ("LagunaConfig", "LagunaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_attention_heads_per_layer=[4, 8, 4, 8],
               vocab_size=101, max_position_embeddings=64, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=32, shared_expert_intermediate_size=48, sliding_window=4,
               moe_routed_scaling_factor=2.5, moe_router_logit_softcapping=0.25,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # MiMo-V2-Flash: windowed layers with twice the kv heads and a sink per head, v heads narrower than q/k's and
    # scaled, RoPE over a third of the head, grouped sigmoid routing, the first layer dense
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=24, v_head_dim=16, vocab_size=101, max_position_embeddings=64, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.5, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Beam: depth-scaled residual adds around sandwich norms, RoPE in the windowed layers only and a q temperature in
    # the others, a sigmoid gate with a bias per head, grouped sigmoid routing, soft-capped logits
    "beam": ("BeamConfig", "BeamForCausalLM", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
             max_position_embeddings=64, num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             sliding_window=4, final_logit_softcapping=3.0,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
             mlp_layer_types=["dense", "sparse", "sparse", "sparse"], pad_token_id=0, bos_token_id=1,
             eos_token_id=2)),
    # OLMo 2's output-only norms and all-head q/k norms around OLMoE's mixture
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(hidden_size=64, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                  max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)),
    "hunyuan_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(hidden_size=64, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                    max_position_embeddings=64, num_experts=4, moe_topk=2, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)),       # every layer a mixture beside a shared MLP as wide as an expert
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                  max_position_embeddings=64, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                    "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.5})),
    # q scaled from position 4 on (every 4 positions a step)
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LayerNorm1P, half-width RoPE, ReLU squared
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "llama3", "rope_theta": 1.2e7, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),   # xIELU
    # Vision-language wrappers: only the language model converts; the vision tower is left out.
    "gemma3_vl": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=101,
                         max_position_embeddings=64, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=_VISION["siglip"], mm_tokens_per_image=1, boi_token_index=98, eoi_token_index=99,
        image_token_index=100)),
    "llama4_vl": ("Llama4Config", "Llama4ForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                         max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=1,
                         attention_chunk_size=4, floor_scale=4, attn_scale=0.5, no_rope_layer_interval=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                           projector_output_dim=32),
        image_token_index=100, boi_token_index=98, eoi_token_index=99)),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", dict(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64),
        vision_config=_VISION["clip"], image_token_index=100, tie_word_embeddings=False)),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", dict(   # tied by the wrapper's flag
        text_config=dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=101, max_position_embeddings=64,
                         tie_word_embeddings=False),
        vision_config=_VISION["pixtral"], image_token_index=100)),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        image_token_id=100, video_token_id=99, vision_start_token_id=98)),
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                         max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         n_group=1, topk_group=1, first_k_dense_replace=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4,
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           image_size=28, patch_size=14),
        image_token_id=100, video_token_id=99, image_start_token_id=98, image_end_token_id=97,
        video_start_token_id=96, video_end_token_id=95)),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", dict(text_config=_QWEN3_VL_TEXT, **_QWEN3_VL)),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", dict(
        text_config=dict(_QWEN3_VL_TEXT, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        **_QWEN3_VL)),                                                      # stacked experts [E, out, in]
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _QWEN3_5_TEXT),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", _QWEN3_5_MOE),
    "qwen4_exp": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", _QWEN4_EXP_TEXT),
    # JetMoe: 4 attention experts and 4 MLP experts, top 2 of each: 4 kv heads, so 8 q heads a token
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
               num_key_value_heads=4, kv_channels=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=101,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2)),
    # Zamba2: Mamba2 layers, every second one hybrid: three hybrid layers over two shared blocks (the third runs
    # block 0 again), adapters on q|k|v and the MLP, RoPE in the blocks
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6,
               layers_block_type=["linear_attention", "hybrid"] * 3, num_attention_heads=4, num_key_value_heads=4,
               n_mamba_heads=4, mamba_ngroups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, num_mem_blocks=2,
               use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True, vocab_size=101,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # DiffLlama: 8 heads over 8 kv heads (4 of each half), so tp 4 holds one head of each half
    # Doge: 4 heads over 2 kv heads of 16 (tp 4 splits each kv head's value channels for dt_proj between two ranks),
    # a keep window of 8 keys: prompts past 8 tokens lose keys to it (a smaller one makes int8's verify flip too many
    # of its choices over 64 tokens)
    "doge": ("DogeConfig", "DogeForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
             keep_window_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # HRM-Text: two stacks of 2 blocks, L run twice then H once, twice over: 12 virtual layers, each its own cache
    "hrm_text": ("HrmTextConfig", "HrmTextForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, head_dim=16, H_cycles=2, L_cycles=2, vocab_size=101,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # ZAYA: CCA over 8 q heads and 4 kv heads of 8 (convs of 2 and 3 taps; tp 4 holds one kv head a rank), 4 experts and a skip expert behind
    # a router 16 wide, 3 layers (two carry the router's state on), the head untied with a bias
    "zaya": ("ZayaConfig", "ZayaForCausalLM", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=4, head_dim=8, moe_intermediate_size=32, num_experts=4, router_hidden_size=16,
             cca_time0=2, cca_time1=3, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False,
             lm_head_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, vocab_size=101,
                  max_position_embeddings=64, lambda_std_dev=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # xLSTM: 4 heads of 16; q/k as wide as v (qk_dim_factor 1): transformers' own mLSTM (without the xlstm package)
    # fails on narrower q/k, the released 7B's 0.5 included
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=101,
              qk_dim_factor=1.0, ffn_round_up_to_multiple_of=16, autocast_kernel_dtype="float32", gate_soft_cap=5.0,
              output_logit_soft_cap=8.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "emu3": ("Emu3TextConfig", "Emu3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "emu3_vl": ("Emu3Config", "Emu3ForConditionalGeneration", dict(   # its VQ-VAE image tokenizer left out
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vq_config=dict(embed_dim=4, base_channels=32, channel_multiplier=[1], num_res_blocks=1, codebook_size=8,
                       latent_channels=4, attn_resolutions=[]), vocabulary_map={})),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(                # layer 1 dense: mlp_only_layers
        _QWEN3_5_MOE, mlp_only_layers=[1], norm_topk_prob=False, layer_types=[
            "linear_attention", "full_attention", "linear_attention", "full_attention"])),
    "qwen3_5_vl": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(
        text_config=dict(_QWEN3_5_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0],
                                                         "mrope_interleaved": True, "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.25}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64),
        image_token_id=100, video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)),
    "granite_hybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(          # Granite 4.0-H
        hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=96, layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=8,
        mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, embedding_multiplier=2.0,
        attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0, position_embedding_type=None,
        time_step_limit=(0.0, 100.0))),   # transformers 5.24 cannot read back the infinity it saves by default
    "granite_hybrid_dense": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(   # -H-Micro, RoPE
        hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_local_experts=0, shared_intermediate_size=96,
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=4,
        mamba_d_state=8, mamba_d_conv=3, mamba_proj_bias=True, position_embedding_type="rope",
        tie_word_embeddings=True, time_step_limit=(0.001, 0.5))),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
              mamba_expand=2, time_step_limit=(0.0, 100.0))),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(       # Nemotron 3 Nano: one part per layer
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=101, max_position_embeddings=64, layers_block_type=[
            "linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"], mamba_num_heads=8,
        mamba_head_dim=16, n_groups=4, ssm_state_size=16, expand=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, time_step_limit=(0.0, 100.0))),
    "nemotron_h_dense": ("NemotronHConfig", "NemotronHForCausalLM", dict(   # Nemotron-H 8B, Nano 2: no mixture
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=101, max_position_embeddings=64, layers_block_type=[
            "linear_attention", "mlp", "full_attention", "mlp"], mamba_num_heads=8, mamba_head_dim=16, n_groups=1,
        ssm_state_size=16, expand=2, time_step_limit=(0.0, 100.0))),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(hidden_size=64, intermediate_size=144, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
             layer_types=["conv", "full_attention", "conv"], block_multiple_of=32, block_ffn_dim_multiplier=1.3,
             conv_bias=True)),                    # the MLP: 2/3 of 144, times 1.3, rounded up to 32: 128
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=101, max_position_embeddings=64, layer_types=["conv", "full_attention", "conv"],
                 num_dense_layers=1, num_experts=4, num_experts_per_tok=2, routed_scaling_factor=1.5)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                sliding_window=4, logit_scale=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)),   # 0-2 windowed
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "cwm": ("CwmConfig", "CwmForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
            sliding_window=4, bos_token_id=1, eos_token_id=2, pad_token_id=0,       # layers 1-3 windowed
            rope_parameters={"rope_type": "llama3", "rope_theta": 1e6, "factor": 4.0, "high_freq_factor": 4.0,
                             "low_freq_factor": 1.0, "original_max_position_embeddings": 16})),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                   vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                   max_position_embeddings=64, query_pre_attn_scalar=16, sliding_window=4, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=101, max_position_embeddings=64, type_vocab_size=2)),
    "bert_cls": ("BertConfig", "BertForSequenceClassification", dict(hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, vocab_size=101, max_position_embeddings=64,
                 num_labels=3)),
    # fairseq-style: embeddings scaled by sqrt(hidden), positions at p + 2, biases everywhere, an untied head
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # LayerNorms with biases, biased attention and an ungated ReLU-squared MLP
    "jais2": ("Jais2Config", "Jais2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Granite's multipliers with output norms (Peri-LN) and the logits multiplied
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                    max_position_embeddings=64, embedding_multiplier=6.0, attention_multiplier=0.05,
                    residual_multiplier=0.3, logits_scaling=0.25, attention_bias=True, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2)),
    # DeepSeek-V3's latent attention (a q bottleneck, interleaved RoPE) over dense MLPs
    "youtu": ("YoutuConfig", "YoutuForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, vocab_size=101, max_position_embeddings=64,
              q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # layer 0 windowed with its own RoPE base and a dense MLP; layer 1 global over the mixture
    "mellum": ("MellumConfig", "MellumForCausalLM", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
               max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=64, state_size=8, expand=2, conv_kernel=4,  # no
              num_hidden_layers=2, vocab_size=101, use_bias=True, time_step_rank=6)),      # attention, no MLP
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", dict(hidden_size=64, state_size=8, expand=2,
                     conv_kernel=3, num_hidden_layers=2, vocab_size=101, tie_word_embeddings=False)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(        # Mamba and attention; experts and dense MLPs alternate
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
        attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=6, mamba_proj_bias=True)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(     # Mamba2 alone: Codestral Mamba
        hidden_size=64, num_heads=8, head_dim=16, n_groups=4, state_size=16, expand=2, conv_kernel=4,
        num_hidden_layers=3, vocab_size=101, time_step_limit=(0.0, 100.0))),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(hidden_size=64, num_layers=2, num_heads=4,  # global, local
                attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64,
                vocab_size=101, bos_token_id=1, eos_token_id=2)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
             clip_qkv=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=64,
            attn_config=dict(clip_qkv=0.5))),
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(   # KDA and latent attention without RoPE
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=101, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_local_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4, max_position_embeddings=64,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(     # latent attention with muP-style scales
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=101, max_position_embeddings=64, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, scale_emb=3.0, scale_depth=1.4, dim_model_base=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, vocab_size=101, max_position_embeddings=64,
                  qk_layernorm=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),   # q/k norms with biases
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=101,
             attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000),       # experts in three flat tensors
             ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", dict(    # windows, sinks, a RoPE base per layer
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        layer_rope_theta=[0, 10000.0, 10000.0, 500.0], embedding_multiplier=2.0, attention_multiplier=0.2,
        residual_multiplier=0.5, logits_scaling=4.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(   # and a mixture, stacked experts
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=48, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], layer_rope_theta=[1e4, 0, 1e4],
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", dict(   # windows with RoPE, a global layer without, muP, a mixture
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_dense_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
        num_experts=4, num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, global_attn_every_n_layers=2,
        sliding_window=4, mup_enabled=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(d_model=64, ffn_dim=96, num_layers=2, attention_heads=4,
             vocab_size=101, max_position_embeddings=64, scale_embedding=True)),   # sinusoidal positions
    "flint": ("FlintConfig", "FlintForCausalLM", dict(   # sinks, RoPE in windowed layers, sigmoid routing, a dense layer
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, max_position_embeddings=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2, sliding_window=8, mlp_only_layers=[0],
        eos_token_id=2, bos_token_id=1)),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM", dict(   # sigmoid routing with an expert bias, a routed scale
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, max_position_embeddings=64, moe_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, eos_token_id=2, bos_token_id=1)),
    "lara_mini": ("LaraMiniConfig", "LaraMiniForCausalLM", dict(   # Gated DeltaNet + attention, mixtures everywhere
        hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
        max_position_embeddings=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_experts_per_tok=2, sliding_window=8, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=16, linear_value_head_dim=8, eos_token_id=2)),
    "axk1": ("AXK1Config", "AXK1ForCausalLM", dict(   # DeepSeek-V3 with the mixture's output normed; layer 0 dense
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=101, max_position_embeddings=64, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, bos_token_id=1, eos_token_id=2)),
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM", dict(   # sigmoid routing, the bias on the logits
        hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
        max_position_embeddings=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8,
        num_experts_per_tok=2, sliding_window=8, norm_topk_prob=True, eos_token_id=2, bos_token_id=1)),
    "openai_gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101,
                   n_positions=64)),   # post-LN, no final norm
    "lfm3": ("Lfm3Config", "Lfm3ForCausalLM", dict(   # short convs, windowed and global attention, a gate per head
        hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, max_position_embeddings=64, sliding_window=4, conv_L_cache=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
        layer_types=["conv", "sliding_attention", "full_attention", "conv", "sliding_attention"])),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(   # global layers: wider heads, fewer kv heads, v = k
        hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=101,
        max_position_embeddings=64, sliding_window=4, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "gemma4_moe": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(   # 26B-A4B: a dense MLP beside the mixture
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, vocab_size=101,
        max_position_embeddings=64, sliding_window=4, hidden_size_per_layer_input=0, enable_moe_block=True,
        num_experts=4, top_k_experts=4, moe_intermediate_size=32,   # every expert: no choice for int8 noise to flip
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1,
        bos_token_id=2)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(   # a dense global first layer with RoPE
        hidden_size=64, intermediate_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, max_position_embeddings=64, sliding_window=4, num_experts=4,
        num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, prefix_dense_intermediate_size=96,
        logit_scale=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma4_vl": ("Gemma4Config", "Gemma4ForConditionalGeneration", dict(   # gemma-4-31B's layout: a vision tower
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                         attention_k_eq_v=True, vocab_size=101, max_position_embeddings=64, sliding_window=4,
                         hidden_size_per_layer_input=0, layer_types=["sliding_attention", "full_attention"],
                         pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16), audio_config=None)),
    "gemma4_e2b": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(   # per-layer inputs; the last three layers read
        hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,   # earlier caches and
        num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=101,   # have twice the MLP
        max_position_embeddings=64, sliding_window=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=101,
        num_kv_shared_layers=3, use_double_wide_mlp=True, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "gemma4_unified": ("Gemma4UnifiedTextConfig", "Gemma4UnifiedForCausalLM", dict(   # gemma-4-12B's layout: no
        hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,   # per-layer inputs; the
        num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=101,   # last two layers read earlier caches
        max_position_embeddings=64, sliding_window=4, num_kv_shared_layers=2, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "gemma4_unified_vl": ("Gemma4UnifiedConfig", "Gemma4UnifiedForConditionalGeneration", dict(   # gemma-4-12B as
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,   # released:
                         num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=101,   # a patch embedder
                         max_position_embeddings=64, sliding_window=4, num_kv_shared_layers=1,   # beside the text model
                         layer_types=["sliding_attention", "full_attention", "full_attention"], pad_token_id=0,
                         eos_token_id=1, bos_token_id=2),
        vision_config=dict(hidden_size=32, mm_embed_dim=32, output_proj_dims=32, mm_posemb_size=8, patch_size=4),
        audio_config=None)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(   # qkv_proj in 4 blocks of q|v|k, 2 heads a block
        n_embd=64, n_inner=96, n_layer=2, n_head=8, rotary_dim=4, vocab_size=101, n_positions=64,
        tie_word_embeddings=False)),
    "apertus1p5": ("Apertus1p5TextConfig", "Apertus1p5TextForCausalLM", dict(   # lm_head: the first 61 tokens
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, output_vocab_size=61, tie_word_embeddings=False, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "apertus1p5_mm": ("Apertus1p5Config", "Apertus1p5ForConditionalGeneration", dict(   # as released: image and
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,   # audio
                         num_key_value_heads=2, head_dim=16, vocab_size=101, output_vocab_size=50,   # tokenizers whose
                         tie_word_embeddings=False, max_position_embeddings=64, pad_token_id=0,   # codes sit in the
                         bos_token_id=1, eos_token_id=2,   # vocab past the pruned head
                         rope_parameters={"rope_type": "llama3", "rope_theta": 1.2e7, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
        vision_config=dict(codebook_size=20, embed_dim=8, latent_channels=32, base_channels=32,
                           channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], resolution=16,
                           spatial_scale_factor=2),
        audio_config=dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2], num_lstm_layers=1,
                          hidden_size=8, codebook_size=20, codebook_dim=8, decoder_hidden_size=8,
                          decoder_intermediate_size=8, decoder_num_layers=1, decoder_attention_num_groups=1),
        image_token_offset=50, audio_token_offset=70, image_token_id=3, audio_token_id=4)),
    "bitnet": ("BitNetConfig", "BitNetForCausalLM", dict(   # norms inside each half, gated ReLU squared, tied
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    "modernbert_decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", dict(   # Ettin decoders
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=3, norm_bias=True,
        attention_bias=True, mlp_bias=True, classifier_bias=True, classifier_activation="gelu",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "olmo_hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", dict(   # Gated DeltaNet beside OLMo 3 attention
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, linear_num_key_heads=4, linear_num_value_heads=8,
        # q, k and v 32 channels each: transformers saves the conv as three equal chunks, the checkpoints as q|k|v
        linear_key_head_dim=8, linear_value_head_dim=4, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(   # DeepSeek-V3's block, a softmax router, q scaled
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32,
        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, vocab_size=101,
        max_position_embeddings=64, first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.5})),
    # DeepSeek-V3.2: DeepSeek-V3's block with a sparse attention indexer in every layer, which past 32 tokens picks
    # the 32 keys each query attends to (RoPE over rotate-half pairs there, interleaved in the main attention);
    # test_deepseek_v32.py makes it pick 6 of a dozen
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=101, max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=3,
        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, index_topk=32,
        index_head_dim=16, index_n_heads=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                         "rope_theta": 10000.0})),
    # GLM-5: the same with interleaved RoPE in the indexer, which the middle layer does not have: it reuses layer
    # 0's choice
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=101, max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=32, index_topk=32, index_head_dim=16, index_n_heads=8,
        indexer_types=["full", "shared", "full"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)),
    # Falcon-H1: attention and Mamba2 side by side in every layer (the output gated, then group-normed), and muP
    # multipliers on the embeddings, the logits, both mixers' inputs and outputs, the keys, the Mamba2 input's five
    # parts and the MLP's gate and down projections
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
        mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_rms_norm=True, mamba_norm_before_gate=False,
        mamba_chunk_size=8, key_multiplier=0.4, lm_head_multiplier=0.5, embedding_multiplier=2.0,
        mlp_multipliers=[0.8, 0.6], ssm_multipliers=[1.1, 0.9, 0.8, 1.2, 0.7], attention_in_multiplier=0.9,
        attention_out_multiplier=0.7, ssm_in_multiplier=1.3, ssm_out_multiplier=0.6, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, time_step_limit=(0.0, 100.0))),
    # Ling 2.5's hybrid: KDA layers with full-width decay and gate projections and a bounded decay, a latent-attention
    # layer gated per head, DeepSeek-V3's routing over expert groups beside a shared expert
    "bailing_hybrid": ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=101, max_position_embeddings=64, num_local_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, head_dim=16, routed_scaling_factor=2.5,
        layer_types=["linear_attention", "full_attention", "linear_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    # EXAONE 3.x: LLaMA's block, which transformers builds as a LlamaForCausalLM and saves under EXAONE's own names
    "exaone": ("ExaoneConfig", "AutoModelForCausalLM", dict(hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
               max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)),
    # Sarvam-30B: GLM-4.5's mixture under one fused q|k|v projection and Bailing-style names (saved as a
    # Glm4MoeForCausalLM with model_type sarvam_moe)
    "sarvam_moe": ("SarvamMoEConfig", "AutoModelForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=101, max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                   attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Sarvam-105B: DeepSeek-V3 (saved as a DeepseekV3ForCausalLM with model_type sarvam_mla)
    "sarvam_mla": ("SarvamMLAConfig", "AutoModelForCausalLM", dict(hidden_size=64, intermediate_size=96,
                   moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=101,
                   max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                   n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2)),
    # LongCat-Flash: two latent-attention blocks per layer, a shortcut mixture with identity experts beside the
    # first block's MLP, its output added after the second's
    "longcat_flash": ("LongcatFlashConfig", "LongcatFlashForCausalLM", dict(hidden_size=64, num_layers=2,
                      num_attention_heads=4, vocab_size=101, max_position_embeddings=64, ffn_hidden_size=96,
                      expert_ffn_hidden_size=32, n_routed_experts=8, zero_expert_num=4, moe_topk=3, q_lora_rank=32,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                      routed_scaling_factor=2.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # MiniMax-Text-01 / M1: lightning attention (a decayed linear state per head) beside GQA attention, Mixtral's
    # mixture, and a residual that restarts from each norm's output, weighted (blocks of 4: several per prompt)
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, block_size=4,
                layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                full_attn_alpha_factor=1.5, full_attn_beta_factor=0.9, linear_attn_alpha_factor=2.0,
                linear_attn_beta_factor=1.1, mlp_alpha_factor=1.7, mlp_beta_factor=0.8, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)),
    # HY-V4: hyper-connections over 3 copies, sinks, a gate per output channel, clamped experts; 8 indexer heads, so
    # that two keys rarely tie at a score of 0 (relu over every head) and a decode step picks what the prompt did
    "hy_v4": ("HYV4Config", "HYV4ForCausalLM", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
              max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=32,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=16, index_topk=5,
              index_head_dim=8, index_n_heads=8, indexer_types=["full", "shared", "full", "shared"],
              mlp_layer_types=["dense", "sparse", "sparse", "sparse"], hc_mult=3, swiglu_limit=0.3,
              initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # A.X K2: a gated query (q|gate from [normed | raw] latent), gated norms of rank 6; 8 indexer heads against ties
    "axk2": ("AXK2Config", "AXK2ForCausalLM", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
             max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=16, index_topk=5, index_head_dim=8,
             index_n_heads=8, mlp_layer_types=["dense", "sparse", "sparse"], gated_norm_rank=6,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # MiniMax-M3: block-sparse attention (blocks of 4 keys, the 2 best, the latest always) in layers 1 and 2, a
    # dense first layer, clamped SwiGLU everywhere; RoPE over the whole head here (test_minimax_m3: over part)
    "minimax_m3": ("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", dict(hidden_size=64, intermediate_size=32,
                   dense_intermediate_size=96, shared_intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=101,
                   max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, rotary_dim=16,
                   index_n_heads=2, index_head_dim=16, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                   mlp_layer_types=["dense", "sparse", "sparse"],
                   layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"], swiglu_limit=0.6,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # MiniMax-M3 as published: the vision-language checkpoint, MiniMax's own names (minimax_m3.toml's variant)
    "minimax_m3_vl": ("MiniMaxM3VLConfig", "MiniMaxM3SparseForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=32, dense_intermediate_size=96,
                         shared_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
                         num_local_experts=4, num_experts_per_tok=2, rotary_dim=16, index_n_heads=2,
                         index_head_dim=16, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                         mlp_layer_types=["dense", "sparse", "sparse"],
                         layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"], swiglu_limit=0.6,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        image_token_index=100, video_token_index=99, projector_hidden_size=64)),
    # Aria's language model: a mixture in every layer, stacked transposed experts, two shared experts as one MLP
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM", dict(hidden_size=64, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                  max_position_embeddings=64, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "aria_vl": ("AriaConfig", "AriaForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, moe_num_experts=4,
                         moe_topk=2, moe_num_shared_experts=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), projector_patch_to_query_dict={4: 2}, image_token_id=100)),
    # DeepSeek-V4: a purely sliding layer (and hash routing), a compressed sparse layer (windows of 4, top 3 of its
    # indexer), a heavily compressed one (windows of 8), another sparse one; a window of 8, hyper-connections over 3
    # copies, a grouped output projection, RoPE over the last 8 columns of 32, SwiGLU clamped where it binds
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", dict(
        hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, q_lora_rank=32, vocab_size=101, max_position_embeddings=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, sliding_window=8, o_groups=4, o_lora_rank=16, index_n_heads=8,
        index_head_dim=16, index_topk=3, swiglu_limit=0.1, hc_mult=3, partial_rotary_factor=0.25,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Cohere Compass (North): Cohere 2's block with rotate-half RoPE in its windowed layers (the multimodal RoPE's
    # sections, all reading the text position), none in the full ones
    "cohere_compass": ("CohereCompassTextConfig", "CohereCompassForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, sliding_window=4, logit_scale=0.5,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0,
                                               "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         "full_attention": None},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere_compass_vl": ("CohereCompassConfig", "CohereCompassForConditionalGeneration", dict(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, sliding_window=4,
                         logit_scale=0.5, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0,
                                                                "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                                          "full_attention": None}, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=16),
        image_token_id=100, video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)),
    # RecurrentGemma: two RG-LRU layers (4 heads of 16 channels) and a windowed multi-query attention layer
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=101, lru_width=64, attention_window_size=4, conv1d_width=4,
        block_types=["recurrent", "recurrent", "attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # Gemma 3n: AltUp over 4 copies, LAuReL, per-layer inputs over the first 90 ids of 101, the last two layers
    # reading the caches of the first two, the first layer's MLP gate thinned to its top 5%
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=101, vocab_size_per_layer_input=90, hidden_size_per_layer_input=8,
        max_position_embeddings=64, sliding_window=4, num_kv_shared_layers=2, laurel_rank=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # Dots3 Note's language model: indexed layers 0 and 2 (8 heads, latent ranks 16, RoPE over 8 of 24 columns)
    # and windowed layers 1 and 3 (4 keys; 4 heads, ranks 32, RoPE over 16 of 32), each with its latents scaled by
    # sqrt(hidden / rank), the key's rope part normed, a sigmoid gate per head; an index_topk of 32 (every key of
    # the family tests' prompts; test_dots3_note.py makes it pick 6) and 8 indexer heads, so that two keys rarely tie
    # at a score of 0 at the cut (which of a tie torch.topk keeps differs with the row's length)
    "dots3_note": ("Dots3NoteTextConfig", "Dots3NoteForCausalLM", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_experts_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=101,
        max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8, head_dim=32, index_topk=32, index_head_dim=16,
        index_n_heads=8, sliding_window=4,
        layer_types=["indexed_attention", "sliding_attention", "indexed_attention", "sliding_attention"],
        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=32,
        swa_head_dim=32, swa_qk_nope_head_dim=16, swa_v_head_dim=16, swa_rope_theta=5000.0, rope_theta=80000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
FAMILIES = list(CONFIGS)


# More vision-language wrappers around families above, tested in test_vision_language.py (text-only logits against
# the whole wrapper, verify, reassemble): each reuses a family's tiny text config, so the family tests need not run
# them again. Added to CONFIGS after FAMILIES is taken, so build() finds them and the family tests leave them out.
def _text(family: str, **kw) -> dict:
    return dict(copy.deepcopy(CONFIGS[family][2]), **kw)


_GLM4V_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                    "rope_theta": 1e4, "partial_rotary_factor": 0.5})
_GLM4V = dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                                 image_size=28, patch_size=14),
              image_token_id=100, video_token_id=99, image_start_token_id=98, image_end_token_id=97,
              video_start_token_id=96, video_end_token_id=95)
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)
_OMNI_AUDIO = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                   output_dim=64, max_source_positions=20, n_window=4)
_SIGLIP_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                    patch_size=14)
_SAM_LIKE = dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=16, mlp_dim=48, global_attn_indexes=[0], window_size=2)
_MINICPM_VISION = dict(_SIGLIP_LIKE, num_hidden_layers=2)
VISION_LANGUAGE = {
    # LLaVA-NeXT's descendants (wrappers/llava_next.toml): image_newline beside the tower and projector
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_VISION["clip"], image_token_index=100)),
    "llava_next_video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration", dict(
        text_config=_text("mistral", model_type="mistral"), vision_config=_VISION["clip"], image_token_index=100,
        video_token_index=99)),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration", dict(
        text_config=_text("qwen2", model_type="qwen2"), vision_config=_VISION["siglip"], image_token_index=100,
        video_token_index=99)),
    "granite4_vision": ("Granite4VisionConfig", "Granite4VisionForConditionalGeneration", dict(   # Q-Former heads of
        text_config=_text("granite"), vision_config=dict(_VISION["clip"], hidden_size=64, num_attention_heads=4,
                                                         num_hidden_layers=2),                    # 64 channels
        image_token_index=100, deepstack_layer_map=[[0, 0], [1, 1]], downsample_rate="1/2",
        spatial_target_layers=[0, 1, 0, 1], qformer_config=dict(intermediate_size=48))),
    # wrappers/vision_language.toml
    "vipllava": ("VipLlavaConfig", "VipLlavaForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_VISION["clip"], image_token_index=100,
        vision_feature_layers=[-1])),
    "video_llava": ("VideoLlavaConfig", "VideoLlavaForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_VISION["clip"], image_token_index=100,
        video_token_index=99)),
    "internvl": ("InternVLConfig", "InternVLForConditionalGeneration", dict(
        text_config=_text("qwen2", model_type="qwen2"), image_token_id=100, downsample_ratio=1.0,
        vision_config=dict(_SIGLIP_LIKE, image_size=[28, 28], patch_size=[14, 14]))),
    "got_ocr2": ("GotOcr2Config", "GotOcr2ForConditionalGeneration", dict(
        text_config=_text("qwen2", model_type="qwen2"), vision_config=_SAM_LIKE, image_token_index=100)),
    "lighton_ocr": ("LightOnOcrConfig", "LightOnOcrForConditionalGeneration", dict(
        text_config=_text("qwen3", model_type="qwen3"), vision_config=dict(_VISION["pixtral"], head_dim=16),
        image_token_id=100)),
    "ovis2": ("Ovis2Config", "Ovis2ForConditionalGeneration", dict(   # its lm_head sized by the outer config
        text_config=_text("qwen2", model_type="qwen2"), vision_config=dict(_SIGLIP_LIKE, vocab_size=16),
        image_token_id=100, hidden_size=64, vocab_size=101)),
    "deepseek_vl": ("DeepseekVLConfig", "DeepseekVLForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_VISION["siglip"], image_token_id=100)),
    "deepseek_vl_hybrid": ("DeepseekVLHybridConfig", "DeepseekVLHybridForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_VISION["siglip"],
        high_res_vision_config=_SAM_LIKE, image_token_id=100)),
    "janus": ("JanusConfig", "JanusForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=dict(_SIGLIP_LIKE, projection_dim=64),
        vq_config=dict(embed_dim=4, base_channels=32, channel_multiplier=[1], num_res_blocks=1, num_embeddings=8,
                       latent_channels=4, attn_resolutions=[], projection_dim=64, image_token_embed_dim=64,
                       num_patches=4), image_token_id=100)),
    "lfm2_vl": ("Lfm2VlConfig", "Lfm2VlForConditionalGeneration", dict(
        text_config=_text("lfm2", model_type="lfm2"), image_token_id=100, downsample_factor=1,
        projector_hidden_size=32, vision_config=dict(model_type="siglip2_vision_model", hidden_size=32,
                                                     intermediate_size=48, num_hidden_layers=1,
                                                     num_attention_heads=2, num_patches=16, patch_size=4))),
    "lfm3_vl": ("Lfm3VlConfig", "Lfm3VlForConditionalGeneration", dict(
        text_config=_text("lfm3", model_type="lfm3"), projector_hidden_size=32, image_token_id=100,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, patch_size=4),
        video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)),
    # FastVLM and PerceptionLM with a CLIP tower in place of their timm ones (timm is not installed; text never
    # reaches the tower); PerceptionLM's projector reads the tower's width from model_args, as timm's config has it
    "fast_vlm": ("FastVlmConfig", "FastVlmForConditionalGeneration", dict(
        text_config=_text("qwen2", model_type="qwen2"), vision_config=_VISION["clip"], image_token_index=100)),
    "perception_lm": ("PerceptionLMConfig", "PerceptionLMForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), image_token_id=100, video_token_id=99,
        vision_config=dict(_VISION["clip"], model_args={"embed_dim": 32}))),
    "exaone4_5": ("Exaone4_5_Config", "Exaone4_5_ForConditionalGeneration", dict(
        text_config=_text("exaone4", model_type="exaone4"), image_token_id=100, video_token_id=99,
        vision_config=dict(_QWEN_VISION, num_key_value_heads=1, fullatt_block_indexes=[0]))),
    "hyperclovax_vl": ("HyperCLOVAXVisionV2Config", "HyperCLOVAXVisionV2ForConditionalGeneration", dict(
        text_config=_text("hyperclovax", model_type="hyperclovax"), image_token_id=100, video_token_id=99,
        vision_config=dict(_QWEN_VISION, model_type="qwen2_5_vl_vision", fullatt_block_indexes=[0]))),
    "video_llama_3": ("VideoLlama3Config", "VideoLlama3ForConditionalGeneration", dict(
        text_config=_text("qwen2", model_type="qwen2"), image_token_id=100, video_token_id=99,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=14))),
    "minicpmv4_6": ("MiniCPMV4_6Config", "MiniCPMV4_6ForConditionalGeneration", dict(
        text_config=dict(_QWEN3_5_TEXT, model_type="qwen3_5_text"), image_token_id=100, video_token_id=99,
        vision_config=dict(_MINICPM_VISION, insert_layer_id=0), insert_layer_id=0)),
    "minicpmv4_7": ("MiniCPMV4_7Config", "MiniCPMV4_7ForConditionalGeneration", dict(   # Qwen3.5's multimodal RoPE
        text_config=dict(CONFIGS["qwen3_5_vl"][2]["text_config"], model_type="qwen3_5_text"),
        vision_config=_MINICPM_VISION, image_token_id=100, video_token_id=99)),
    "minicpm_ocr": ("MiniCPMOcrConfig", "MiniCPMOcrForConditionalGeneration", dict(
        text_config=dict(_QWEN3_5_TEXT, model_type="qwen3_5_text"), vision_config=_MINICPM_VISION,
        image_token_id=100, video_token_id=99)),
    "fuyu": ("FuyuConfig", "FuyuForCausalLM", dict(
        text_config=_text("persimmon", model_type="persimmon"), patch_size=4, image_token_id=100)),
    # wrappers/idefics.toml: the language model at model.text_model.
    "idefics2": ("Idefics2Config", "Idefics2ForConditionalGeneration", dict(
        text_config=_text("mistral", model_type="mistral"), vision_config=_SIGLIP_LIKE, image_token_id=100,
        perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=16, num_key_value_heads=1))),
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_SIGLIP_LIKE, image_token_id=100,
        scale_factor=1)),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", dict(
        text_config=_text("llama", model_type="llama"), vision_config=_SIGLIP_LIKE, image_token_id=100,
        scale_factor=1)),
    "granite_docling": ("GraniteDoclingConfig", "GraniteDoclingForConditionalGeneration", dict(
        text_config=_text("granite"), image_token_id=100,
        vision_config=dict(_SIGLIP_LIKE, image_size=56, out_hidden_size=64, scale_factor=2))),
    # wrappers/qwen_vl.toml: the language model at model., its multimodal RoPE plain RoPE for text
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerConfig", "Qwen2_5OmniThinkerForConditionalGeneration", dict(
        text_config=_text("qwen2", rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                    "rope_theta": 1e4}),
        vision_config=dict(_QWEN_VISION, fullatt_block_indexes=[0]), audio_config=_OMNI_AUDIO,
        audio_token_index=100, image_token_index=99, video_token_index=98, vision_start_token_id=97)),   # as released
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeThinkerForConditionalGeneration", dict(
        text_config=_text("qwen3_moe", rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                        "mrope_interleaved": True, "rope_theta": 1e4}),
        vision_config=dict(_QWEN_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
        audio_config=dict(_OMNI_AUDIO, downsample_hidden_size=8), audio_token_id=100, image_token_id=99,
        video_token_id=98, vision_start_token_id=97)),      # as released configs have it: their RoPE index reads it
    "paddleocr_vl": ("PaddleOCRVLConfig", "PaddleOCRVLForConditionalGeneration", dict(   # as released: no biases
        text_config=_text("ernie4_5", use_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                       "mrope_section": [2, 3, 3]}),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=14), image_token_id=100)),
    "hunyuan_vl": ("HunYuanVLConfig", "HunYuanVLForConditionalGeneration", dict(   # HunyuanOCR: NTK-alpha RoPE
        text_config=_text("hunyuan", rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                      "rope_theta": 1e4, "mrope_section": [2, 2, 2, 2]}),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           out_hidden_size=64, text_hidden_size=64, patch_size=14), image_token_id=100)),
    # wrappers/glm_vl.toml: GLM-4-0414's block, q/k/v biases in GLM-4.1V's and none in GLM-OCR's
    "glm4v": ("Glm4vConfig", "Glm4vForConditionalGeneration", dict(text_config=_GLM4V_TEXT, **_GLM4V)),
    "glm46v": ("Glm46VConfig", "Glm46VForConditionalGeneration", dict(
        text_config=dict(_GLM4V_TEXT, model_type="glm4v_text"),
        **dict(_GLM4V, vision_config=dict(_GLM4V["vision_config"], model_type="glm4v_vision")))),
    "glm_ocr": ("GlmOcrConfig", "GlmOcrForConditionalGeneration", dict(text_config=_GLM4V_TEXT, **_GLM4V)),
    # wrappers/nemotron_vl.toml: Nemotron-H at language_model.backbone., a RADIO vision tower
    "nemotron_h_omni": ("NemotronH_Omni_Reasoning_V3_Config", "NemotronH_Omni_Reasoning_V3", dict(
        text_config=_text("nemotron_h", model_type="nemotron_h"), vision_hidden_size=32, projector_hidden_size=64,
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=28,
                           max_img_size=56, video_temporal_patch_size=2), audio_config=None)),
    # wrappers/dots3_note.toml: the language model at model., beside a vision encoder with experts of its own and
    # an audio encoder
    "dots3_note_vl": ("Dots3NoteConfig", "Dots3NoteForConditionalGeneration", dict(
        text_config=_text("dots3_note"), image_token_id=100, video_token_id=99, audio_token_id=98,
        vision_config=dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=14, adapter_in_dim=32, adapter_out_dim=64,
                           mlp_layer_types=["dense", "sparse"], num_local_experts=4, num_experts_per_tok=2),
        audio_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                          adapter_input_size=32, adapter_out_dim=64, downsample_hidden_size=8))),
}
CONFIGS.update(VISION_LANGUAGE)

# Encoders beyond BERT, tested in test_encoders.py (the generic family tests compare decoders' logits): a pad id of 1
# as RoBERTa's, a window of positions short enough that the table's offset rows matter.
_ENC = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
            max_position_embeddings=40, type_vocab_size=2, pad_token_id=1)
_DISTIL = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=101, max_position_embeddings=40, pad_token_id=1)
ENCODERS = {
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", _ENC),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", _ENC),
    "camembert": ("CamembertConfig", "CamembertModel", _ENC),
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextForTokenClassification", _ENC),
    "roberta_prelayernorm": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormModel", _ENC),
    "xlm_roberta_xl": ("XLMRobertaXLConfig", "XLMRobertaXLForMaskedLM", _ENC),
    "electra": ("ElectraConfig", "ElectraForPreTraining", dict(_ENC, embedding_size=32, pad_token_id=0)),
    "electra_generator": ("ElectraConfig", "ElectraForMaskedLM", dict(_ENC, embedding_size=64, pad_token_id=0)),
    "mpnet": ("MPNetConfig", "MPNetModel", dict(_ENC, max_position_embeddings=160)),    # offsets past 8 buckets
    "mpnet_mlm": ("MPNetConfig", "MPNetForMaskedLM", _ENC),
    # DeBERTa-v3's layout: log buckets (8: offsets past 4 log-spaced), c2p and p2c, shared keys; weights 10x wider
    # than its init's, so attention is peaked enough for each term to show
    "deberta_v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification", dict(
        _ENC, type_vocab_size=0, relative_attention=True, position_buckets=8, max_relative_positions=40,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        pad_token_id=0, initializer_range=0.2)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", dict(    # absolute positions and token types too,
        _ENC, relative_attention=True, max_relative_positions=6, pos_att_type="c2p", share_att_key=True,   # no
        position_biased_input=True, pad_token_id=0)),                 # buckets: offsets clamped at 6, c2p alone
    # ALBERT: one layer's weights for all three, 32-wide embeddings projected to 64
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(_ENC, num_hidden_layers=3, embedding_size=32,
                                                                       num_labels=3, pad_token_id=0)),
    # extractive QA (test_classify.py): a start and an end logit per token
    "roberta_qa": ("RobertaConfig", "RobertaForQuestionAnswering", _ENC),
    "modernbert_qa": ("ModernBertConfig", "ModernBertForQuestionAnswering", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, pad_token_id=1,
        bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)),
    # CLIP's text encoder, transformers 5's layout (no text_model.) and SDXL's projected one; eos at the top of the
    # tiny vocab, as CLIP's is
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                         num_attention_heads=4, vocab_size=101,
                                                         max_position_embeddings=20, bos_token_id=99,
                                                         eos_token_id=100, pad_token_id=1)),
    "clip_text_proj": ("CLIPTextConfig", "CLIPTextModelWithProjection", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=20, projection_dim=48, bos_token_id=99, eos_token_id=100, pad_token_id=1)),
    # token classifiers (test_classify.py): a linear layer over each token, ModernBERT's prediction head before it
    "roberta_tokens": ("RobertaConfig", "RobertaForTokenClassification", dict(_ENC, num_labels=5)),
    "bert_tokens": ("BertConfig", "BertForTokenClassification", dict(_ENC, num_labels=5)),
    "deberta_tokens": ("DebertaV2Config", "DebertaV2ForTokenClassification", dict(
        _ENC, type_vocab_size=0, relative_attention=True, position_buckets=8, max_relative_positions=40,
        pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        pad_token_id=0, num_labels=5)),
    "modernbert_tokens": ("ModernBertConfig", "ModernBertForTokenClassification", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, pad_token_id=1,
        bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, num_labels=5)),
    # sequence classifiers, each family's own head (test_classify.py)
    "distilbert_cls": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(_DISTIL, num_labels=3)),
    "electra_cls": ("ElectraConfig", "ElectraForSequenceClassification", dict(_ENC, embedding_size=32, num_labels=3)),
    "mpnet_cls": ("MPNetConfig", "MPNetForSequenceClassification", dict(_ENC, num_labels=3)),
    "eurobert_late": ("EuroBertConfig", "EuroBertForSequenceClassification", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=40, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        classifier_pooling="late", num_labels=3)),
    "eurobert_bos": ("EuroBertConfig", "EuroBertForSequenceClassification", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=40, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        classifier_pooling="bos", num_labels=3)),
    "jina_cls": ("JinaEmbeddingsV3Config", "JinaEmbeddingsV3ForSequenceClassification", dict(_ENC, num_labels=3)),
    "modernbert_cls": ("ModernBertConfig", "ModernBertForSequenceClassification", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, classifier_pooling="mean",
        pad_token_id=1, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, num_labels=3)),
    # the T5 encoder: v1.1's gated GELU (Flux's and SD3's text encoder), v1.0's relu; 12 buckets up to 20 positions,
    # so 9 tokens reach the log-spaced ones (offsets past 3) and 30 the last one
    "t5_encoder": ("T5Config", "T5EncoderModel", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                     vocab_size=101, feed_forward_proj="gated-gelu",
                                                     relative_attention_num_buckets=12,
                                                     relative_attention_max_distance=20, pad_token_id=1)),
    "t5_encoder_relu": ("T5Config", "T5EncoderModel", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                          vocab_size=101, feed_forward_proj="relu", pad_token_id=1)),
    "umt5_encoder": ("UMT5Config", "UMT5EncoderModel", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                          vocab_size=101, relative_attention_num_buckets=12,
                                                          relative_attention_max_distance=20, pad_token_id=1)),
    "mt5_encoder": ("MT5Config", "MT5EncoderModel", dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                        vocab_size=101, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", _DISTIL),
    "distilbert_sinusoidal": ("DistilBertConfig", "DistilBertModel", dict(_DISTIL, sinusoidal_pos_embds=True,
                                                                          activation="relu")),
    # ModernBERT (test_modernbert.py): layer 0 global, 1 and 2 windowed (|i - j| <= 2), every bias on, an MLM head
    # (tied decoder, biased); weights drawn 10x wider than its init's, so attention is peaked enough for RoPE's
    # base to show
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=101,
        max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=3, norm_bias=True,
        attention_bias=True, mlp_bias=True, classifier_bias=True, initializer_range=0.2, pad_token_id=1,
        bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)),
    # Rotary encoders (test_rope_encoders.py), each at its family's own RoPE base, weights drawn 10x wider than
    # their inits' so attention is peaked enough for the base and the GLU's order to show. Nomic's classifier and
    # the bare Jina model carry the tanh pooler; EuroBERT has grouped kv heads and every bias on; the second GTE
    # has no token types (gte-base-en-v1.5)
    "nomic_bert": ("NomicBertConfig", "NomicBertForSequenceClassification", dict(_ENC, initializer_range=0.2)),
    "gte": ("GteConfig", "GteForMaskedLM", dict(_ENC, initializer_range=0.2)),
    "gte_untyped": ("GteConfig", "GteForSequenceClassification", dict(_ENC, type_vocab_size=0,
                                                                      initializer_range=0.2)),
    "eurobert": ("EuroBertConfig", "EuroBertForMaskedLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=40, attention_bias=True, mlp_bias=True, initializer_range=0.2,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, mask_token_id=4)),
    "jina_embeddings_v3": ("JinaEmbeddingsV3Config", "JinaEmbeddingsV3Model", dict(_ENC, initializer_range=0.2)),
}

# A decoder's body alone, untied, as embedding models save it (Qwen3-Embedding-4B/8B): no lm_head to read
# (test_embed.py; kept out of FAMILIES, whose tests compare logits)
CONFIGS["qwen3_body"] = ("Qwen3Config", "Qwen3Model", dict(CONFIGS["qwen3"][2], tie_word_embeddings=False,
                                                           pad_token_id=1))

# Phi-3.5 / Phi-4-mini style LongRoPE for the tiny Phi-3 (head_dim 16: 8 factors each), switching at position 16.
LONGROPE = dict(original_max_position_embeddings=16, rope_scaling={
    "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.5 * i for i in range(8)]})


def build(name: str, seed: int = 0, **overrides):
    """The HF model itself (eval mode, fp32), with random weights that are not trivially small."""
    import transformers
    cfg_cls, model_cls, kw = CONFIGS[name] if name in CONFIGS else ENCODERS[name]
    if not hasattr(transformers, cfg_cls):   # the GPU image's transformers is older than the one setup installs
        import pytest
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_cls}")
    config = getattr(transformers, cfg_cls)(**copy.deepcopy({**kw, **overrides}))   # configs may edit their dicts
    torch.manual_seed(seed)
    cls = getattr(transformers, model_cls)
    model = (cls.from_config(config) if model_cls.startswith("Auto") else cls(config)).eval()   # EXAONE: a LLaMA
    with torch.no_grad():  # norms default to ones/zeros: randomize so a wrong norm shows
        for n, p in model.named_parameters():
            if "norm" in n.lower() or "ln_" in n or n.endswith("_layer_norm.weight") or "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith(("igate_preact.bias", "fgate_preact.bias")):   # xLSTM: keep its gates' init (input
                p.add_(torch.randn_like(p) * 0.1)                          # -10, forget 3..6: a long memory)
            elif n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.02)
            elif n.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):   # Apertus: each layer's own xIELU
                p.add_(torch.randn_like(p) * 0.3)
            elif n.endswith(("sinks", "attention_sink_bias")):    # GPT-OSS, MiMo: a sink logit per head, large
                # enough to matter
                p.copy_(torch.randn_like(p))
            elif n.endswith(("linear_attn.dt_bias", "linear_attn.A_log", ".dt_bias", ".A_log", "mamba.D", "mixer.D")):
                p.copy_(torch.randn_like(p) * 0.5)     # Gated DeltaNet, Mamba2: decays and skips that differ
            elif n.endswith("relative_attention_bias.weight"):    # MPNet: a score bias per head and offset, which
                p.copy_(torch.randn_like(p))                          # its init leaves too small to show
            elif n.endswith("ple.conv1d.weight"):       # Qwen4-Exp's n-gram conv: zeros by default
                p.copy_(torch.randn_like(p) * 0.3)
            elif n.endswith(("igate_preact.weight", "fgate_preact.weight")):   # xLSTM: gates that vary per token,
                p.copy_(torch.randn_like(p) * 0.5)                                  # enough for their cap to bite
            elif "adapter_list" in n:                  # Zamba2's adapters: their up halves start at zero
                p.copy_(torch.randn_like(p) * 0.1)
            elif n.endswith(("self_attn.A", "self_attn.dt_proj.weight")):   # Doge: A zeros by default (every
                p.copy_(torch.randn_like(p) * 0.5)                  # key's bias 1), dt_proj too small to vary it
            elif n.endswith(("input_residual", "post_attention_residual")):    # Doge: ones by default
                p.copy_(torch.rand_like(p) + 0.5)
            elif n.endswith("z_L_init"):       # HRM-Text: the low-level state's start, zeros by default
                p.copy_(torch.randn_like(p))
            elif n.endswith(("block_inject_weight.weight", "input_mix_weight_up.weight")):   # and its mixes: shares
                p.copy_(torch.randn_like(p) * 0.3)                                  # that differ between copies
        for n, b in [*model.named_buffers(), *model.named_parameters()]:   # GLM-4.5, ERNIE 4.5: a correction
            if n.endswith(("e_score_correction_bias", "expert_bias")):       # that changes the experts chosen
                b.copy_(torch.randn_like(b) * 0.2)
            elif n.endswith("gate_bias"):       # Beam: a gate bias per head, zeros by default
                b.copy_(torch.randn_like(b))
            elif n.endswith(("layer_scalar", "router.scale", "per_expert_scale")):   # Gemma 4: ones by default
                b.copy_(torch.rand_like(b) + 0.5)
            elif n.endswith(("norm.mlp.fc1.weight", "norm.mlp.fc2.weight")):   # A.X K2's norm gates: not ~0.5
                b.copy_(torch.randn_like(b) * 0.3)
            elif n.endswith(("hc.fn", "hc_fn")):       # HY-V4's hyper-connections: weights that vary per token
                b.copy_(torch.randn_like(b) * 0.1)
            elif n.endswith(("hc.scale", "hc_scale")):
                b.copy_(torch.rand_like(b) + 0.5)
            elif n.endswith(("hc.base", "hc_base")):
                b.copy_(torch.randn_like(b) * 0.5)
            elif n.endswith(("rg_lru.recurrent_param", "gate_bias")) and "rg_lru" in n:   # RecurrentGemma: gates
                b.copy_(torch.randn_like(b) * 0.5)                                            # that differ
            elif n.endswith(("correct_output_scale", "correction_coefs.weight", "prediction_coefs.weight")):   # Gemma 3n
                b.copy_(torch.randn_like(b) * 0.5)
            elif n.endswith("position_bias"):      # DeepSeek-V4's compressors: zeros by default
                b.copy_(torch.randn_like(b))
            elif n.endswith("tid2eid"):             # DeepSeek-V4's hash routing: zeros (expert 0) by default
                g = torch.Generator().manual_seed(seed)
                b.copy_(torch.stack([torch.randperm(model.config.n_routed_experts, generator=g)[:b.shape[1]]
                                     for _ in range(b.shape[0])]))
        if name.startswith("zaya"):     # ZAYA: its key scales zero (every key 0), its residual scales and router
            for n, p in [*model.named_parameters(), *model.named_buffers()]:      # state scales ones; balancing
                if n.endswith(("qk_norm.temp", "_scale")):                        # biases zero but the skip
                    p.copy_(torch.rand_like(p) + 0.5)                             # expert's -1, which from_pretrained
                elif n.endswith("balancing_biases"):                              # sets again whatever was saved
                    p.copy_(torch.cat([torch.randn_like(p[:-1]) * 0.3, p[-1:].new_full((1,), -1.0)]))
                elif ".mlp.gate." in n and n.endswith("weight") and "norm" not in n:   # its router MLP: logits
                    p.mul_(25.0)                                                       # far from uniform
        if name.startswith("gemma4"):   # softmax scale 1: trained q norms carry 1/sqrt(head_dim), or scores saturate
            for n, p in model.named_parameters():
                if n.endswith("q_norm.weight"):
                    p.mul_(p.shape[0] ** -0.5)
                elif n.endswith("embed_tokens.weight"):  # and the tied head peaked enough that top-1 means something
                    p.mul_(5.0)
    return model


def save(name: str, path: Path, seed: int = 0, **overrides) -> Path:
    model = build(name, seed, **overrides)
    model.save_pretrained(path)
    return Path(path)


def on_ranks(out_dir, tp: int, fn) -> list:
    """fn(model) on every rank of a converted out_dir, each rank a thread of this process (exact tp emulation)."""
    import threading

    from fmconvert.runtime.comm import ThreadGroup
    from fmconvert.runtime.load import load
    group, res = ThreadGroup(tp), [None] * tp

    def run(r):
        res[r] = fn(load(out_dir, comm=group.comm(r)))
    ts = [threading.Thread(target=run, args=(r,)) for r in range(tp)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return res


def errors_against_transformers(src, name: str, work: Path, tokens: int, tp: int = 2, **overrides) -> list:
    """src (tiny model `name` saved with these overrides) converted at tp into work / "out"; then tiny.rel of each
    rank's logits against transformers' own, on two fixed random sequences of `tokens` ids."""
    from fmconvert.pipeline import Options, convert
    convert(src, work / "out", Options(tp=tp), progress=False)
    ids = torch.randint(3, 100, (2, tokens), generator=torch.Generator().manual_seed(0))
    hf = build(name, **overrides)
    with torch.no_grad():
        want = hf(ids).logits
    return [rel(g, want) for g in on_ranks(work / "out", tp, lambda m: m(ids))]


def converted_manifest(src, out: Path, **options) -> dict:
    """The manifest of src converted into out with these Options."""
    import json

    from fmconvert.pipeline import Options, convert
    convert(src, out, Options(**options), progress=False)
    return json.loads((out / "manifest.json").read_text())


def decode_steps(m, ids, prompt: int):
    """The logits of positions prompt - 1 on, [B, T - prompt + 1, vocab], twice: after a prompt of `prompt` tokens,
    one token a step through an eager cache, and through decode_step over a static cache (what a CUDA graph
    replays)."""
    B, T = ids.shape
    eager, static = m.new_cache(B, T + 2), m.new_cache(B, T + 2)
    steps = [m(ids[:, :prompt], eager)[:, -1]]
    m(ids[:, :prompt], static)
    graph = [steps[0]]
    for j in range(prompt, T):
        steps.append(m(ids[:, j:j + 1], eager)[:, -1])
        graph.append(m.decode_step(ids[:, j:j + 1], static, torch.tensor([static.length])))
        static.length += 1
    return torch.stack(steps, 1), torch.stack(graph, 1)


def decode_matches(out, tp: int, ids, want, prompt: int) -> bool:
    """decode_steps from `prompt` tokens on every rank of the converted out: eager and graph-safe both within 1e-5 of
    want's rows (transformers' logits of the whole sequence)."""
    return all(rel(eager, want[:, prompt - 1:]) < 1e-5 and rel(graph, want[:, prompt - 1:]) < 1e-5
               for eager, graph in on_ranks(out, tp, lambda m: decode_steps(m, ids, prompt)))


def pieces_match(out, tp: int, ids, want, cuts=(5, 6)) -> bool:
    """ids fed through one cache in pieces (cut before each of `cuts`) on every rank: within 1e-5 of want."""
    bounds = [0, *cuts, ids.shape[1]]

    def run(m):
        cache = m.new_cache(ids.shape[0], ids.shape[1])
        return torch.cat([m(ids[:, a:b], cache) for a, b in zip(bounds, bounds[1:])], 1)
    return max(rel(g, want) for g in on_ranks(out, tp, run)) < 1e-5


def padding_matches(out, tp: int, name: str, ids, pad: int, **overrides) -> bool:
    """The second row padded on the left by `pad`: every rank's logits within 1e-5 of transformers' with that
    attention mask, on the first row whole and the second's real positions."""
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        want = build(name, **overrides)(ids, attention_mask=mask).logits
    return all(rel(g[:1], want[:1]) < 1e-5 and rel(g[1:, pad:], want[1:, pad:]) < 1e-5
               for g in on_ranks(out, tp, lambda m: m(ids, attention_mask=mask)))


def refuses(src: Path, out: Path, match: str, **edit):
    """src's config.json updated with edit must be refused with an FmError matching `match`, leaving no out."""
    import json

    import pytest

    from fmconvert.errors import FmError
    from fmconvert.pipeline import Options, convert
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match=match):
        convert(src, out, Options(), progress=False)
    assert not out.exists()


def config_refused(tmp_path: Path, config, architecture: str, match: str, **edit):
    """A checkpoint of transformers' config (an object) with edit on top, and a placeholder tensor, must be refused in
    one line matching `match` before any tensor is read."""
    import json

    import pytest
    from safetensors.torch import save_file

    from fmconvert.errors import FmError
    from fmconvert.pipeline import Options, convert
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": [architecture], **edit}))
    save_file({"x": torch.zeros(1)}, src / "model.safetensors")
    with pytest.raises(FmError, match=match) as err:
        convert(src, tmp_path / "out", Options(), progress=False)
    assert "\n" not in str(err.value)


def ids(T: int, seed: int = 0, B: int = 2):
    """B fixed random sequences of T token ids in [3, 100), the same for every call with this seed."""
    return torch.randint(3, 100, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(name: str, token_ids, **overrides):
    """transformers' own logits of the tiny model `name` (with these config overrides) for token_ids."""
    with torch.no_grad():
        return build(name, **overrides)(token_ids).logits


def moved_by(name: str, src, out: Path, T: int, seed: int):
    """src converted at tp 1 into out, and a function change -> tiny.rel of the logits of a fresh load after
    change(model) against transformers', on tiny.ids(T, seed): how far one change moves the converted model (0 for
    no change: each piece of a family's own must be shown to matter)."""
    from fmconvert.pipeline import Options, convert
    from fmconvert.runtime.load import load
    convert(src, out, Options(tp=1), progress=False)
    token_ids = ids(T, seed)
    want = hf_logits(name, token_ids)

    def moved(change) -> float:
        m = load(out)
        change(m)
        return rel(m(token_ids), want)
    return moved


def retouched(out_dir: Path, rank: int, name: str, factor: float) -> Path:
    """A conversion with one rank's copy of tensor `name` multiplied by factor, the rest of its shard as it was, and
    the manifest's size and sha256 of that shard fixed, so that integrity still passes (verify must find it by its
    values) -> out_dir."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file
    mpath = Path(out_dir) / "manifest.json"
    m = json.loads(mpath.read_text())
    (f,) = m["ranks"][rank]["files"]
    path = mpath.parent / f["path"]
    tensors = load_file(path)
    tensors[name] = tensors[name] * factor
    save_file(tensors, path, metadata={"format": "pt"})
    blob = path.read_bytes()
    f.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    mpath.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def gives_back(src: Path, out_dir: Path) -> list:
    """Every tensor of src's model.safetensors (masked_spec_embed aside, which the speech tables ignore) back from
    out_dir's shards by reassemble, bit for bit and in its dtype -> their names."""
    from safetensors.torch import load_file

    from fmconvert.reassemble import reassemble
    got, want = reassemble(out_dir)[1], load_file(Path(src) / "model.safetensors")
    want = {k: v for k, v in want.items() if not k.endswith("masked_spec_embed")}
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    return list(want)


def ctc_close(out_dir, tp: int, hf, x, mask, limit: float, agree: float):
    """A speech encoder's CTC logits on every rank of a conversion against transformers' (hf's) on the same input:
    within `limit` (relative), the likeliest character the same on more than `agree` of the frames."""
    from fmconvert.runtime.classify import head_logits
    with torch.no_grad():
        want = hf(x, attention_mask=mask).logits
    for logits in on_ranks(out_dir, tp, lambda m: head_logits(m, *m(x, attention_mask=mask), m.frames)):
        assert rel(logits, want) < limit
        assert (logits.argmax(-1) == want.argmax(-1)).float().mean() > agree


def rel(a, b) -> float:
    """The largest difference relative to the largest magnitude of b: the family tests' error measure."""
    return ((a - b).abs().max() / b.abs().max()).item()
