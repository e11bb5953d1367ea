"""MiMo-V2-Flash beyond the family tests (which run its tiny model through tiny.FAMILIES: windowed layers with twice
the kv heads and a softmax sink per head, v heads narrower than q/k's and scaled, grouped sigmoid routing): the
config's other choices against transformers in fp32, what the manifest and the shards hold, and that each of its
own pieces is really applied."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load

ALL_FULL = ["full_attention"] * 4


@pytest.mark.parametrize("override", [
    dict(attention_bias=True),                            # q, k and v biases
    dict(v_head_dim=24),                                  # v as wide as q and k
    dict(layer_types=ALL_FULL),                           # no windowed layer: the config's kv heads everywhere
    dict(layer_types=["sliding_attention"] * 4),          # every layer windowed: twice them everywhere
    dict(norm_topk_prob=False, n_group=1, topk_group=1, attention_value_scale=None),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("mimo_v2_flash", **override)
    assert max(tiny.errors_against_transformers(src, "mimo_v2_flash", tmp_path, 11, **override)) < 1e-5


def test_the_manifest_and_shards_hold_the_narrow_v_heads_and_the_windowed_sinks(model_dir, tmp_path):
    out = tmp_path / "out"
    m = tiny.converted_manifest(model_dir("mimo_v2_flash"), out, tp=2)
    sp = m["model"]
    assert sp["num_kv_heads"] == 2 and sp["global_attn"] == {"head_dim": 24, "num_kv_heads": 1}
    assert sp["v_head_dim"] == 16 and sp["value_scale"] == 0.707 and sp["sink_layers"] == [0, 2]
    assert sp["window_layers"] == [0, 2] and sp["router"] == "sigmoid" and sp["routed_scale"] == 1.5
    assert sp["position"]["rotary_dim"] == 8 and "rotary_dim" not in sp["position"]["local"]   # 0.334 of 24
    with safe_open(out / m["ranks"][0]["files"][0]["path"], "pt") as f:
        names = set(f.keys())
        # rank 0: 2 q heads of 24, then one kv head's k (24) and v (16)
        assert [f.get_slice(f"layers.{i}.qkv.weight").get_shape()[0] for i in range(4)] == [88] * 4
        assert f.get_slice("layers.1.attn_out.weight").get_shape() == [64, 32]
    assert {f"layers.{i}.attn_sinks.weight" in names for i in (0, 2)} == {True}
    assert {f"layers.{i}.attn_sinks.weight" in names for i in (1, 3)} == {False}
    assert tiny.converted_manifest(model_dir("mimo_v2_flash", v_head_dim=24), tmp_path / "o2")["model"][
        "v_head_dim"] == 0


def test_the_value_scale_the_sinks_and_the_narrow_v_change_the_output(model_dir, tmp_path):
    convert(model_dir("mimo_v2_flash"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = m(ids)
    m.spec["value_scale"] = 1.0
    assert tiny.rel(m(ids), ref) > 1e-3
    m.spec["value_scale"] = 0.707
    sinks = [b.sinks for b in m.blocks]
    assert [s is not None for s in sinks] == [True, False, True, False]
    for b in m.blocks:
        b.sinks = None
    assert tiny.rel(m(ids), ref) > 1e-3
    for b, s in zip(m.blocks, sinks):
        b.sinks = s
    assert tiny.rel(m(ids), ref) == 0
