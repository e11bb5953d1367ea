"""Laguna beyond the family tests (which run its tiny model through tiny.FAMILIES: 4 and 8 q heads in alternate
layers, a softplus gate per head, two RoPEs of different widths, a capped sigmoid router beside a shared expert):
the config's other choices against transformers in fp32, what the manifest and the shards hold, and what is
refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load

YARN = {"full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 16,
                           "beta_slow": 1.0, "beta_fast": 32.0, "attention_factor": 1.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}}


@pytest.mark.parametrize("override", [
    dict(gating="per-element"),                           # a gate per channel: g_proj as wide as q
    dict(rope_parameters=YARN),                           # the released configs' RoPE: YaRN over half the head
    dict(moe_router_logit_softcapping=0.0, moe_routed_scaling_factor=1.0),
    dict(num_attention_heads_per_layer=[8, 4, 2, 4], mlp_layer_types=["sparse", "dense", "sparse", "dense"]),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("laguna", **override)
    assert max(tiny.errors_against_transformers(src, "laguna", tmp_path, 11, **override)) < 1e-5


def test_the_manifest_and_shards_hold_each_layers_own_heads(model_dir, tmp_path):
    out = tmp_path / "out"
    m = tiny.converted_manifest(model_dir("laguna"), out, tp=2)
    sp = m["model"]
    assert sp["layer_heads"] == [4, 8, 4, 8] and sp["num_heads"] == 4 and m["parallel"]["heads_per_rank"] == 2
    assert sp["attn_gate_fn"] == "softplus" and sp["attn_gate_heads"] and sp["router_softcap"] == 0.25
    assert sp["routed_scale"] == 2.5 and sp["dense_layers"] == [0] and sp["window_layers"] == [0, 2]
    pos = sp["position"]       # the full layers rotate half of each head, the windowed ones all of it
    assert pos["rotary_dim"] == 8 and pos["local"]["rotary_dim"] == 16
    with safe_open(out / m["ranks"][1]["files"][0]["path"], "pt") as f:
        # rank 1's q|k|v|gate rows: its q heads (2 or 4) of 16, one kv head's k and v, a gate row per q head
        assert [f.get_slice(f"layers.{i}.qkv.weight").get_shape()[0] for i in range(4)] == [66, 100, 66, 100]
        assert [f.get_slice(f"layers.{i}.attn_out.weight").get_shape()[1] for i in range(4)] == [32, 64, 32, 64]


def test_uniform_heads_need_no_per_layer_list(model_dir, tmp_path):
    sp = tiny.converted_manifest(model_dir("laguna", num_attention_heads_per_layer=[4] * 4), tmp_path / "o")["model"]
    assert sp["layer_heads"] is None


def test_the_gate_function_and_the_router_cap_change_the_output(model_dir, tmp_path):
    """Each of the two is really applied: the other choice moves the logits."""
    convert(model_dir("laguna"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = m(ids)
    for key, other in (("attn_gate_fn", "sigmoid"), ("router_softcap", 0.0)):
        keep = m.spec[key]
        m.spec[key] = other
        assert tiny.rel(m(ids), ref) > 1e-3, key
        m.spec[key] = keep
    assert tiny.rel(m(ids), ref) == 0


def test_a_tp_that_splits_some_layers_heads_is_refused_in_one_line(model_dir, tmp_path):
    src = model_dir("laguna", num_attention_heads_per_layer=[4, 6, 4, 6])
    assert max(tiny.errors_against_transformers(src, "laguna", tmp_path, 7, tp=2,
                                                num_attention_heads_per_layer=[4, 6, 4, 6])) < 1e-5
    with pytest.raises(FmError, match=r"^tp=4 does not divide the 6 heads of some layers") as e:
        convert(src, tmp_path / "tp4", Options(tp=4), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "tp4").exists()


def test_a_head_list_that_does_not_fit_the_kv_heads_is_refused(model_copy, tmp_path):
    src = model_copy("laguna")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_attention_heads_per_layer"] = [4, 5, 4, 8]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="num_attention_heads_per_layer|num_key_value_heads"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
