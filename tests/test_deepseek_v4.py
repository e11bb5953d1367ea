"""DeepSeek-V4 beyond the family tests (which run the tiny model through tiny.FAMILIES): prompts across several
windows and compressed entries against transformers at tp 1, 2 and 4, and in variants of its config; decode steps,
eager and graph-safe, and a prompt continued in pieces; that each of its own pieces is applied; the checkpoint as
DeepSeek publishes it; the manifest; bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    """20 tokens: past the window of 8, five windows of the sparse layers (the indexer keeps 3) and two of the
    heavily compressed one."""
    assert max(tiny.errors_against_transformers(model_dir("deepseek_v4"), "deepseek_v4", tmp_path, 20, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [
    dict(scoring_func="sigmoid", mlp_layer_types=["moe"] * 4, hc_mult=2, hc_sinkhorn_iters=3),
    dict(compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
         index_topk=5, sliding_window=3),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "beta_fast": 32.0, "beta_slow": 1.0}, o_groups=2, mlp_layer_types=["hash_moe"] * 4),
])
def test_variants_match_transformers(model_dir, tmp_path, override):
    """Sigmoid scores without hash layers and 2 copies mixed by 3 Sinkhorn steps; shorter windows of entries, top 5
    and a sliding window of 3; YaRN in the compressed layers, 2 output groups and hashing everywhere."""
    src = model_dir("deepseek_v4", **override)
    assert max(tiny.errors_against_transformers(src, "deepseek_v4", tmp_path, 20, tp=2, **override)) < 1e-5


@pytest.mark.parametrize("prompt", [3, 9])
def test_decode_steps_match_transformers_eager_and_graph_safe(model_dir, tmp_path, prompt):
    """Steps to 26 tokens: the ring of the window wraps, entries close between steps (the graph-safe step recomputes
    its own window's every step), the indexer's choice narrows to 3 of up to 6."""
    convert(model_dir("deepseek_v4"), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(26, 1)
    want = tiny.hf_logits("deepseek_v4", ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, prompt)):
        assert tiny.rel(eager, want[:, prompt - 1:]) < 1e-5 and tiny.rel(graph, want[:, prompt - 1:]) < 1e-5


def test_a_prompt_in_pieces_equals_it_whole(model_dir, tmp_path):
    """Pieces of 5, 2 and 11 tokens through one cache: each continues the windows (and the overlap) the last one left
    in the compressors' rings."""
    convert(model_dir("deepseek_v4"), tmp_path / "out", Options(tp=1), progress=False)
    m = load(tmp_path / "out")
    ids = tiny.ids(18, 2)
    want = m(ids)
    cache = m.new_cache(2, 18)
    got = torch.cat([m(ids[:, a:b], cache) for a, b in ((0, 5), (5, 7), (7, 18))], 1)
    assert tiny.rel(got, want) < 1e-5


def test_left_padding_matches_transformers(model_dir, tmp_path):
    """A shorter row padded on the left: its padding is left out of the sliding keys (the compressors pool it, as
    transformers' do)."""
    convert(model_dir("deepseek_v4"), tmp_path / "out", Options(tp=1), progress=False)
    ids = tiny.ids(14, 3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = tiny.build("deepseek_v4")(ids, attention_mask=mask).logits
    got = load(tmp_path / "out")(ids, attention_mask=mask)
    assert tiny.rel(got[0], want[0]) < 1e-5 and tiny.rel(got[1, 4:], want[1, 4:]) < 1e-5


def test_a_config_in_the_released_spelling_converts_the_same(model_copy, tmp_path):
    """The released config.json names the layers by compress_ratios (0, 4, 128), the hash layers by count, the
    rotated width by qk_rope_head_dim; transformers derives layer_types, mlp_layer_types, compress_rates and the
    RoPE tables from them, and so does the conversion."""
    src = model_copy("deepseek_v4")
    cfg = json.loads((src / "config.json").read_text())
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters"):
        cfg.pop(k, None)
    cfg.update(compress_ratios=[0, 4, 128, 4], compress_rate_csa=4, compress_rate_hca=8, num_hash_layers=1,
               qk_rope_head_dim=8)
    (src / "config.json").write_text(json.dumps(cfg))
    m = tiny.converted_manifest(src, tmp_path / "out", tp=2)
    cp = m["model"]["compressed"]
    assert cp["rates"] == {"csa": 4, "hca": 8} and cp["csa_layers"] == [1, 3] and m["model"]["hash_layers"] == [0]
    ids = tiny.ids(20)
    want = tiny.hf_logits("deepseek_v4", ids)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids))) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by("deepseek_v4", model_dir("deepseek_v4"), tmp_path / "out", 20, 4)

    b = lambda i: (lambda f: lambda m: f(m.blocks[i]))      # noqa: E731  a change to block i
    assert moved(lambda m: None) < 1e-5
    assert moved(lambda m: m.spec["hyper"].update(sinkhorn=1)) > 1e-4               # the Sinkhorn steps
    assert moved(lambda m: m.spec["hyper"].update(post_eps=True, eps=1e-2)) > 1e-4
    assert moved(b(0)(lambda blk: blk.t.__setitem__("router.token_experts",
                                                    blk.t["router.token_experts"].flip(1).roll(1, 0)))) > 1e-4
    assert moved(lambda m: [setattr(blk, "sinks", None) for blk in m.blocks]) > 1e-3
    assert moved(b(2)(lambda blk: blk.t.__setitem__("comp_bias", blk.t["comp_bias"] * 0))) > 1e-4   # hca
    assert moved(b(1)(lambda blk: blk.t.__setitem__("index_bias", blk.t["index_bias"] * 0))) > 1e-4  # its choice
    assert moved(lambda m: m.spec["compressed"]["index"].update(topk=6)) > 1e-4
    assert moved(lambda m: setattr(m, "activation", "swiglu")) > 1e-4                # the clamp
    assert moved(lambda m: [setattr(blk, "compress", None) for blk in m.blocks]) > 1e-3


def _published(src):
    """src's tensors under DeepSeek's own names, as the released checkpoints hold them: no "model." prefix, the
    embedding "embed" and the head's hyper-connection weights hc_head_*."""
    t = load_file(str(src / "model.safetensors"))
    out = {}
    for name, v in t.items():
        name = name.removeprefix("model.").replace("embed_tokens.", "embed.").replace(".attn.norm.", ".attn.kv_norm.")
        out[name.replace("hc_head.hc_", "hc_head_")] = v
    out["mtp.0.eh_proj.weight"] = torch.zeros(64, 128)          # the multi-token-prediction module: left out
    save_file(out, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_the_published_checkpoint_converts_the_same(model_dir, model_copy, tmp_path):
    src = model_copy("deepseek_v4")
    _published(src)
    m = tiny.converted_manifest(src, tmp_path / "pub", tp=2)
    assert m["source"]["dropped"]["tensors"] == 1
    convert(model_dir("deepseek_v4"), tmp_path / "hf", Options(tp=2), progress=False)
    ids = tiny.ids(12, 5)
    a = tiny.on_ranks(tmp_path / "pub", 2, lambda mm: mm(ids))
    b = tiny.on_ranks(tmp_path / "hf", 2, lambda mm: mm(ids))
    assert torch.equal(a[0], b[0])


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_FP8 = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b", "shared_experts.w1",
        "shared_experts.w2", "shared_experts.w3")


def _pow2(x):
    """The power of two at or above x, as E8M0 stores it."""
    return torch.exp2(torch.ceil(torch.log2(x.clamp(min=2.0 ** -100))))


def _fp8(w, block):
    """float8_e4m3 blocks with an E8M0 power-of-two scale each (ue8m0, as V4-Flash's), and what they stand for."""
    N, K = w.shape
    s = _pow2(w.reshape(N // block, block, K // block, block).abs().amax((1, 3)) / 448)
    q = (w / s.repeat_interleave(block, 0).repeat_interleave(block, 1)).to(torch.float8_e4m3fn)
    return q, s.to(torch.float8_e8m0fnu), q.float() * s.repeat_interleave(block, 0).repeat_interleave(block, 1)


def _fp4(w):
    """E2M1 codes two a byte (the low nibble first) with a power-of-two scale per 32 values, and their values."""
    N, K = w.shape
    s = _pow2(w.reshape(N, K // 32, 32).abs().amax(-1) / 6)
    x = (w.reshape(N, K // 32, 32) / s.unsqueeze(-1)).reshape(N, K)
    codes = (x.unsqueeze(-1) - _E2M1).abs().argmin(-1)            # the nearest code (+0 before -0)
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return q, s.to(torch.float8_e8m0fnu), (_E2M1[codes].reshape(N, K // 32, 32) * s.unsqueeze(-1)).reshape(N, K)


def test_the_published_fp8_and_fp4_checkpoint_reads_as_its_values(model_copy, tmp_path):
    """V4-Flash as released: FP8 attention and shared experts in blocks with E8M0 scales named M.scale, routed experts
    in E2M1 two a byte with a scale per 32 values, DeepSeek's names. It converts to exactly what a bf16 checkpoint of
    the values those codes stand for converts to."""
    src, ref = model_copy("deepseek_v4"), tmp_path / "ref"
    _published(src)
    ref.mkdir()
    for f in ("config.json", "generation_config.json"):
        if (src / f).exists():
            (ref / f).write_bytes((src / f).read_bytes())
    t = load_file(str(src / "model.safetensors"))
    quant, plain = {}, {}
    for name, w in t.items():
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module.endswith(_FP8):
            q, sc, v = _fp8(w.float(), 16)
        elif name.endswith(".weight") and ".ffn.experts." in name:
            q, sc, v = _fp4(w.float())
        else:
            quant[name] = plain[name] = w if w.dtype == torch.int64 else w.to(torch.bfloat16)
            continue
        quant[name], quant[module + ".scale"], plain[name] = q, sc, v.to(torch.bfloat16)
    save_file(quant, str(src / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "scale_fmt": "ue8m0", "weight_block_size": [16, 16]}, expert_dtype="fp4")
    (src / "config.json").write_text(json.dumps(cfg))
    a = tiny.converted_manifest(src, tmp_path / "a", tp=2, dtype="bf16")
    tiny.converted_manifest(ref, tmp_path / "b", tp=2, dtype="bf16")
    assert a["source"]["fp8"] == {"block": [16, 16], "tensors": 4 * 8 + 2, "fp4_tensors": 4 * 8 * 3}
    for r in range(2):
        x, y = (load_file(str(tmp_path / d / f"rank{r}-00001.safetensors")) for d in ("a", "b"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    from fmconvert.verify import verify          # against transformers' own decoding of the same codes
    assert not verify(src, tmp_path / "a", tokens=32)["failures"]


def test_the_manifest_and_the_shards(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("deepseek_v4"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["compressed"] == {"q_rank": 32, "rope_dim": 8, "o_groups": 4, "o_rank": 16,
                                "rates": {"csa": 4, "hca": 8}, "csa_layers": [1, 3], "hca_layers": [2],
                                "index": {"heads": 8, "dim": 16, "topk": 3}}
    assert sp["hash_layers"] == [0] and sp["router"] == "sqrtsoftplus" and sp["activation"] == "swiglu_limit"
    assert sp["glu_limit"] == 0.1 and sp["sliding_window"] == 8 and sp["window_layers"] is None
    assert sp["hyper"] == {"streams": 3, "magnitude": 2.0, "eps": 1e-6, "sinkhorn": 20, "post_eps": False}
    assert sp["position"]["theta"] == 160000.0 and sp["position"]["local"]["theta"] == 10000.0
    for r in m["ranks"]:
        t = r["tensors"]
        assert t["layers.0.router.token_experts"] == {**t["layers.0.router.token_experts"], "dtype": "int64",
                                                      "shape": [101, 2]}
        assert "layers.0.router.correction_bias" not in t and "layers.1.router.token_experts" not in t
        assert "layers.0.comp_kv.weight" not in t and "layers.2.index_q.weight" not in t
        assert t["layers.1.comp_kv.weight"]["shape"] == [64, 64] and t["layers.2.comp_kv.weight"]["shape"] == [32, 64]
        assert t["layers.1.comp_bias"]["shape"] == [4, 64] and t["layers.1.index_bias"]["shape"] == [4, 32]
        assert t["layers.1.attn_out_a.weight"]["shape"] == [2 * 16, 32]          # 2 of the 4 groups
        assert t["layers.1.attn_out_a.weight"]["dtype"] == "int8" and t["layers.1.attn_out_a.weight_scale"]["shape"] \
            == [32, 2]                                                           # groups of 16 along 32
        assert t["layers.1.attn_out.weight"]["dtype"] == "int8" and t["layers.1.q_b.weight"]["shape"] == [64, 32]
        assert t["layers.1.attn_hc.fn"]["shape"] == [15, 192] and t["layers.1.attn_hc.scale"]["shape"] == [3]
        assert t["layers.1.attn_sinks.weight"]["shape"] == [2]


def test_int8_output_groups_run_as_blocks(model_dir, tmp_path, monkeypatch):
    """attn_out_a int8: a block per output group, kept int8 (and packed for the CPU GEMV where that kernel builds),
    gives what the batched float product of the weight dequantized at load gives."""
    import fmconvert.runtime.load as ld
    from fmconvert.kernels import int8_gemv_cpu
    convert(model_dir("deepseek_v4"), tmp_path / "out", Options(tp=1, int8=True, group_size=16), progress=False)
    ids = tiny.ids(12, 6)
    ref = load(tmp_path / "out", dequantize=True)
    assert isinstance(ref.blocks[1].out_a, torch.Tensor)
    want = ref(ids)
    assert tiny.rel(want, tiny.hf_logits("deepseek_v4", ids)) < 0.05
    kept = load(tmp_path / "out", dequantize=False)
    assert len(kept.blocks[1].out_a) == 4 and kept.blocks[1].out_a[0].q.shape == (16, 32)
    assert tiny.rel(kept(ids), want) < 1e-5
    if int8_gemv_cpu.available():
        monkeypatch.setattr(ld, "CPU_INT8_MIN_ELEMS", 0)          # pack even the tiny weights
        packed = load(tmp_path / "out")
        assert all(b.packed is not None for b in packed.blocks[1].out_a)
        assert tiny.rel(packed(ids), want) < 1e-4


def test_a_bf16_output_keeps_the_tables_and_the_biases_as_they_must_be(model_dir, tmp_path):
    from fmconvert.verify import verify
    src = model_dir("deepseek_v4")
    m = tiny.converted_manifest(src, tmp_path / "out", tp=1, dtype="bf16")
    t = m["ranks"][0]["tensors"]
    assert t["layers.1.comp_bias"]["dtype"] == "float32" and t["layers.1.index_bias"]["dtype"] == "float32"
    assert t["layers.0.router.token_experts"]["dtype"] == "int64" and t["layers.1.q_b.weight"]["dtype"] == "bfloat16"
    shard = load_file(str(tmp_path / "out" / t["layers.0.router.token_experts"]["file"]))
    source = load_file(str(src / "model.safetensors"))
    assert torch.equal(shard["layers.0.router.token_experts"], source["model.layers.0.ffn.gate.tid2eid"])
    assert not verify(src, tmp_path / "out", tokens=32)["failures"]


@pytest.mark.parametrize("edit,match", [
    (dict(num_key_value_heads=2, num_attention_heads=4), "compressed attention has one kv head"),
    (dict(compress_rates={"compressed_sparse_attention": 0, "heavily_compressed_attention": 8}),
     "compress_rates must give"),
    (dict(o_groups=3), "o_groups dividing"),
    (dict(index_head_dim=4), "index_head_dim=4 is narrower"),
    (dict(swiglu_limit=0.0), "swiglu_limit must be a positive number"),
    (dict(layer_types=["sliding_attention"] * 3 + ["full_attention"]), "transformers cannot parse it"),
    (dict(hc_sinkhorn_iters=0), "hc_sinkhorn_iters must be an integer"),
])
def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("deepseek_v4"), tmp_path / "out", match, **edit)


def test_tp_must_split_whole_output_groups(model_dir, tmp_path):
    from fmconvert.errors import FmError
    with pytest.raises(FmError, match="does not divide o_groups=2"):
        convert(model_dir("deepseek_v4", o_groups=2), tmp_path / "out", Options(tp=4), progress=False)


def test_a_float_token_table_is_refused(model_copy, tmp_path):
    from fmconvert.errors import FmError
    src = model_copy("deepseek_v4")
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.ffn.gate.tid2eid"] = t["model.layers.0.ffn.gate.tid2eid"].float()
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FmError, match="tid2eid has dtype torch.float32, expected an integer dtype"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
    json.loads((src / "config.json").read_text())        # the source is left as it was
