"""Beam beyond the family tests (which run its tiny model through tiny.FAMILIES: depth-scaled residual additions
around sandwich norms, RoPE in the windowed layers only, a gate with a bias per head, grouped sigmoid routing,
soft-capped logits): the query temperature of its global layers, which only shows far into a sequence, the
manifest, and that each of its own pieces is really applied."""

from __future__ import annotations

import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


def test_the_global_layers_query_temperature_matches_transformers_far_into_a_sequence(model_dir, tmp_path):
    """exp(0.1 * log1p((p + 1) / 2048)) is 1.07 at p = 2047: a prompt that long, and decode steps after it."""
    import transformers
    src = model_dir("beam", max_position_embeddings=4096)
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (1, 2300), generator=torch.Generator().manual_seed(0))
    hf = transformers.BeamForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        want = hf(ids).logits
    cache = m.new_cache(1, 2300)
    got = torch.cat([m(ids[:, :2296], cache)] + [m(ids[:, j:j + 1], cache) for j in range(2296, 2300)], dim=1)
    assert tiny.rel(got, want) < 1e-5
    assert tiny.rel(m(ids)[:, -4:], want[:, -4:]) < 1e-5
    m.spec["query_scale_beta"] = 0.0      # no temperature: the far positions' logits move
    assert tiny.rel(m(ids)[:, -4:], want[:, -4:]) > 1e-3


def test_the_manifest_records_the_depth_scale_the_temperature_and_the_gate_bias(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("beam"), tmp_path / "out", tp=2)
    sp = m["model"]
    assert sp["residual_depth_scale"] and sp["norm"] == "rms_fp32" and sp["logit_softcap"] == 3.0
    assert (sp["query_scale_kind"], sp["query_scale_beta"], sp["query_scale_from"], sp["query_scale_offset"],
            sp["query_scale_nope_only"]) == ("power", 0.1, 2048, 1, True)
    assert sp["nope_layers"] == [1, 3] and "local" not in sp["position"] and sp["position"]["theta"] == 1e4
    assert "layers.attn_gate.bias" in sp["slots"] and sp["attn_gate"] and not sp["attn_gate_heads"]
    assert sp["dense_layers"] == [0] and sp["router"] == "sigmoid" and sp["routed_scale"] == 2.5


def test_the_stream_matches_transformers_layer_by_layer_and_the_gate_bias_matters(model_dir, tmp_path):
    """The depth scaling only rescales the stream (the k-th sum is the plain one over sqrt(k)), which every norm
    undoes: the logits cannot show it, the stream after each layer (what verify compares) does."""
    import transformers
    src = model_dir("beam")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers.BeamForCausalLM.from_pretrained(src).eval()(ids, output_hidden_states=True)
    final, states = m.hidden(ids, output_hidden_states=True)
    assert len(states) == 5 and max(tiny.rel(a, b) for a, b in zip(states[:4], want.hidden_states[:4])) < 1e-5
    ref = m.logits(final)
    assert tiny.rel(ref, want.logits) < 1e-5
    for b in m.blocks:
        b.attn_add, b.mlp_add = (1.0, None), (1.0, None)      # plain additions: the same logits, another stream
    final, states = m.hidden(ids, output_hidden_states=True)
    assert tiny.rel(m.logits(final), ref) < 1e-5 and tiny.rel(states[3], want.hidden_states[3]) > 0.5
    m = load(tmp_path / "out")
    for b in m.blocks:
        b.t = {k: v for k, v in b.t.items() if k != "attn_gate.bias"}
    assert tiny.rel(m(ids), ref) > 1e-3
