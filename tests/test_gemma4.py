"""Gemma 4 beyond the family tests (which run gemma4, gemma4_moe and gemma4_vl through tiny.FAMILIES): what the
manifest records for the global layers' own geometry, how their fewer kv heads split over ranks, the two RoPE tables,
the 26B-A4B's dense MLP beside its mixture, E2B/E4B's per-layer inputs and shared kv caches, and the variants refused
in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fmconvert.cli import cli, main
from fmconvert.pipeline import Options, convert


def _rank(out, m, r):
    got = {}
    for f in m["ranks"][r]["files"]:
        got.update(load_file(out / f["path"]))
    return got


def test_global_layers_have_their_own_heads_and_split(model_dir, tmp_path):
    """Layers 2 and 4 are global: head_dim 32 and one kv head (replicated on both ranks at tp 2), v read from k_proj;
    the windowed ones keep head_dim 16 and two kv heads (one a rank)."""
    out = tmp_path / "out"
    convert(model_dir("gemma4"), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    sp, par = m["model"], m["parallel"]
    assert sp["global_attn"] == {"head_dim": 32, "num_kv_heads": 1} and sp["value_is_key"] and sp["v_norm"]
    assert sp["window_layers"] == [0, 1, 3] and sp["attn_scale"] == 1.0
    assert (par["kv_heads_per_rank"], par["kv_replication"]) == (1, 1)
    assert (par["global_kv_heads_per_rank"], par["global_kv_replication"]) == (1, 2)
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.qkv.weight"]["shape"] == [(2 + 1 + 1) * 16, 64]
    assert t["layers.2.qkv.weight"]["shape"] == [(2 + 1 + 1) * 32, 64]
    assert t["layers.2.attn_out.weight"]["shape"] == [64, 2 * 32] and t["layers.2.k_norm.weight"]["shape"] == [32]
    assert t["layers.2.layer_scale.weight"]["shape"] == [1]
    # The one global kv head's k and v rows are the same projection on both ranks (int8 values and scales alike)
    for r in range(2):
        got = _rank(out, m, r)
        q = got["layers.2.qkv.weight"]
        assert torch.equal(q[64:96], q[96:128]) and not torch.equal(q[:32], q[32:64])
        if r == 0:
            first = q
    assert torch.equal(first[64:], q[64:])
    pos = sp["position"]
    assert pos["rope_type"] == "proportional" and pos["rotary_dim"] == 32 and pos["local"]["rotary_dim"] == 16
    inv, local = got["rope.inv_freq"], got["rope_local.inv_freq"]
    assert inv.shape == (16,) and (inv[:4] > 0).all() and (inv[4:] == 0).all()   # a quarter of the pairs rotate
    assert local.shape == (8,) and (local > 0).all()
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    text = re.sub(r"[\s│]+", " ", r.output)
    assert r.exit_code == 0 and "4 heads / 1 kv, head_dim 32; v is k's projection" in text, r.output
    assert "each v head RMS-normed (no weight), the stream times a scalar after each layer" in text


def test_tp4_replicates_the_global_kv_head_on_every_rank(model_dir, tmp_path):
    out = tmp_path / "out"
    convert(model_dir("gemma4"), out, Options(tp=4), progress=False)
    par = json.loads((out / "manifest.json").read_text())["parallel"]
    assert (par["kv_heads_per_rank"], par["kv_replication"]) == (1, 2)
    assert (par["global_kv_heads_per_rank"], par["global_kv_replication"]) == (1, 4)


@pytest.mark.parametrize("override, word", [
    (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=50), "vocab_size_per_layer_input"),
    (dict(num_kv_shared_layers=5), "num_kv_shared_layers"),                  # every layer reading another's cache
    (dict(num_global_key_value_heads=3), "num_global_key_value_heads"),
])
def test_unsupported_variants_are_refused_in_one_line(model_dir, tmp_path, capsys, override, word):
    src = model_dir("gemma4", **override)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", "-q", "--tp", "2", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and len(err.strip().splitlines()) == 1 and word in err, err
    assert not (tmp_path / "out").exists()


def test_the_mixture_runs_beside_the_dense_mlp(model_dir, tmp_path):
    """26B-A4B: the dense MLP is stored as the shared_* slots (column/row-parallel like a shared expert), the
    branch norms and the router's two scales replicated; each part changes the output."""
    out = tmp_path / "out"
    convert(model_dir("gemma4_moe"), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    sp = m["model"]
    assert sp["moe_beside_dense"] and sp["num_experts"] == 4 and sp["experts_per_token"] == 4
    assert sp["intermediate_size"] == 32 and sp["shared_intermediate_size"] == 96
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.shared_in.weight"]["shape"] == [2 * 48, 64] and t["layers.0.shared_in.weight"]["dtype"] == "int8"
    assert t["layers.0.experts_in.weight"]["shape"] == [4 * 2 * 16, 64]
    for name in ("router.scale", "experts_norm.weight", "experts_post_norm.weight", "shared_post_norm.weight"):
        assert t[f"layers.1.{name}"]["shape"] == [64]
    assert t["layers.1.router.expert_factor"]["shape"] == [4] and "layers.1.mlp_in.weight" not in t
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    assert "beside a dense MLP of width 96, each branch normed in and out" in re.sub(r"[\s│]+", " ", r.output)


@pytest.mark.parametrize("slot", ["router.scale", "router.expert_factor", "experts_norm.weight",
                                  "shared_post_norm.weight"])
def test_each_part_of_the_mixture_block_is_used(model_dir, tmp_path, slot):
    from fmconvert.runtime.load import load
    from tiny import rel
    convert(model_dir("gemma4_moe"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = m(ids)
    w = m.blocks[1].t[slot]
    w.copy_(torch.ones_like(w))
    assert rel(m(ids), ref) > 1e-3


def test_top2_routing_matches_transformers(model_dir, tmp_path):
    """The family tests route to every expert (int8 noise would flip a tiny random router's choice); here two of
    four, in fp32 against transformers, at tp 1 and over two emulated ranks."""
    import tiny
    from fmconvert.runtime.load import load
    src = model_dir("gemma4_moe", top_k_experts=2)
    convert(src, tmp_path / "tp1", Options(), progress=False)
    convert(src, tmp_path / "tp2", Options(tp=2), progress=False)
    hf = tiny.build("gemma4_moe", top_k_experts=2)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert tiny.rel(load(tmp_path / "tp1")(ids), want) < 1e-5
    assert all(tiny.rel(g, want) < 1e-5 for g in tiny.on_ranks(tmp_path / "tp2", 2, lambda m: m(ids)))


def test_rms_fp32_rounds_once_as_gemma4_does():
    """Gemma 4's RMSNorm scales by its weight in fp32 and rounds once: in bf16 the torch backend's rms_fp32 gives
    transformers' values bit for bit, where LLaMA's rms (round, then scale) does not."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from fmconvert.runtime.ops import TorchOps
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=gen) * 3).bfloat16()
    norm = Gemma4RMSNorm(256, eps=1e-6).bfloat16()          # as a bf16 checkpoint loads it
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen) * 0.5 + 1)
        want = norm(x)
    w = norm.weight.detach()
    ops = TorchOps()
    assert torch.equal(ops.add_norm(x, None, w, None, 1e-6, "rms_fp32")[0], want)
    assert not torch.equal(ops.add_norm(x, None, w, None, 1e-6, "rms")[0], want)


def test_e2b_layers_read_earlier_caches_hold_no_keys_and_generate_as_transformers(model_dir, tmp_path):
    """gemma-4-E2B's layout (tiny.CONFIGS["gemma4_e2b"]): layers 3 and 4 (windowed) attend over layer 1's keys, layer 5
    (global) over layer 2's; they hold q rows only and keep no cache of their own, and their MLP is twice as wide.
    A prompt fed in chunks through the cache equals one forward, and greedy decoding past the window equals
    transformers'."""
    import transformers

    import tiny
    from fmconvert.runtime.generate import generate
    from fmconvert.runtime.load import load
    src, out = model_dir("gemma4_e2b"), tmp_path / "out"
    convert(src, out, Options(tp=2), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    sp, par = m["model"], m["parallel"]
    assert sp["kv_source"] == [0, 1, 2, 1, 1, 2] and sp["per_layer_input"] == 8
    assert sp["wide_mlp_layers"] == [3, 4, 5] and sp["wide_intermediate_size"] == 192
    assert (par["intermediate_per_rank"], par["wide_intermediate_per_rank"]) == (48, 96)
    assert par["slots"]["ple_embed"] == "vocab"
    t = m["ranks"][1]["tensors"]
    assert t["layers.1.qkv.weight"]["shape"] == [(2 + 1 + 1) * 16, 64] and "layers.1.k_norm.weight" in t
    assert t["layers.4.qkv.weight"]["shape"] == [2 * 16, 64] and "layers.4.k_norm.weight" not in t
    assert t["layers.5.qkv.weight"]["shape"] == [2 * 32, 64] and "layers.5.k_norm.weight" not in t
    assert t["layers.4.mlp_in.weight"]["shape"] == [2 * 96, 64] and t["layers.0.mlp_out.weight"]["shape"] == [64, 48]
    assert t["ple_embed.weight"]["shape"] == [51, 6 * 8] and t["ple_proj.weight"]["shape"] == [6 * 8, 64]
    assert t["layers.3.ple_gate.weight"]["shape"] == [8, 64] and t["layers.3.ple_out.weight"]["shape"] == [64, 8]

    convert(src, tmp_path / "tp1", Options(), progress=False)
    fused = load(tmp_path / "tp1")
    cache = fused.new_cache(2, 40)
    assert [k.shape[2] for k in cache.k] == [4, 4, 40, 0, 0, 0]
    ids = torch.randint(3, 100, (2, 21))
    whole, got, at = fused(ids), [], 0
    for n in (3, 1, 6, 1, 10):           # across the ring's end, one token and several at a time
        got.append(fused(ids[:, at:at + n], cache))
        at += n
    assert tiny.rel(torch.cat(got, 1), whole) < 1e-5
    hf = transformers.Gemma4ForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        assert tiny.rel(whole, hf(ids).logits) < 1e-5
        ref = hf.generate(ids[:1, :3], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert generate(fused, ids[:1, :3], max_new_tokens=20)[0].tolist() == ref.tolist()
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    text = re.sub(r"[\s│]+", " ", r.output)
    assert r.exit_code == 0 and "per-layer inputs 8 wide" in text, r.output
    assert "layers 3-4 attend over the keys of layer 1" in text and "layer 5 attends over the keys of layer 2" in text
    assert "MLP 192 wide in layers 3-5" in text


@pytest.mark.parametrize("override", [
    dict(use_double_wide_mlp=False),
    dict(num_kv_shared_layers=0),                       # per-layer inputs alone (transformers 5.24 fails on
                                                        # shared caches without them; no release has that)
    dict(attention_k_eq_v=True, num_global_key_value_heads=1),   # the sources' v read from k_proj
])
def test_e2b_variants_match_transformers(model_dir, tmp_path, override):
    import tiny
    errs = tiny.errors_against_transformers(model_dir("gemma4_e2b", **override), "gemma4_e2b", tmp_path, 12, tp=2,
                                            **override)
    assert max(errs) < 1e-5, errs


def test_e2b_checkpoint_with_k_proj_in_shared_layers_converts(model_dir, tmp_path):
    """Released checkpoints may still carry k_proj, v_proj and k_norm in the layers that read another's cache
    (transformers skips them on load): they are ignored, and the other layers' are read as usual."""
    import shutil

    from safetensors.torch import save_file
    src = tmp_path / "src"
    shutil.copytree(model_dir("gemma4_e2b"), src)
    f = src / "model.safetensors"
    t = load_file(f)
    t.update({"model.layers.4.self_attn.k_proj.weight": torch.randn(32, 64),
              "model.layers.4.self_attn.v_proj.weight": torch.randn(32, 64),
              "model.layers.4.self_attn.k_norm.weight": torch.randn(16)})
    save_file(t, f, metadata={"format": "pt"})
    convert(src, tmp_path / "out", Options(), progress=False)
    got = load_file(tmp_path / "out" / json.loads((tmp_path / "out" / "manifest.json").read_text())
                    ["ranks"][0]["files"][0]["path"])
    assert got["layers.4.qkv.weight"].shape == (4 * 16, 64)
    assert torch.equal(got["layers.1.qkv.weight"][64:96], t["model.layers.1.self_attn.k_proj.weight"])


def test_e2b_int8_embeddings_quantize_the_per_layer_table(model_dir, tmp_path):
    """--int8-embeddings takes the per-layer table (E2B's largest tensor) to int8 with group scales: each value within
    half a step of the source's, and the runtime looks rows up from it as they dequantize."""
    from fmconvert.runtime.load import load
    from fmconvert.runtime.ops import Int8Weight
    src, out = model_dir("gemma4_e2b"), tmp_path / "out"
    convert(src, out, Options(int8=True, group_size=16, int8_embeddings=True), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    got = _rank(out, m, 0)
    q, scale = got["ple_embed.weight"], got["ple_embed.weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (101, 6 * 8 // 16)
    orig = load_file(src / "model.safetensors")["model.embed_tokens_per_layer.weight"]
    step = scale.float().repeat_interleave(16, 1)
    assert ((q.float() * step - orig).abs() <= step / 2 + 1e-6).all()
    fused = load(out)
    table = fused.g["ple_embed.weight"]
    assert isinstance(table, Int8Weight)
    ids = torch.randint(3, 100, (2, 9))
    want = fused(ids)
    fused.g["ple_embed.weight"] = table.dequantize(torch.float32)
    assert torch.equal(fused(ids), want)
