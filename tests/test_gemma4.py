"""Gemma 4 beyond the family tests (which run gemma4, gemma4_moe and gemma4_vl through tiny.FAMILIES): what the
manifest records for the global layers' own geometry, how their fewer kv heads split over ranks, the two RoPE tables,
the 26B-A4B's dense MLP beside its mixture, and the variants refused in one line."""

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
    (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input"),     # gemma-4-E2B/E4B's per-layer inputs
    (dict(num_kv_shared_layers=2), "num_kv_shared_layers"),                  # their shared kv caches
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
