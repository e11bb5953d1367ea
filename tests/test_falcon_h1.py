"""Falcon-H1 beyond the family tests (which run falcon_h1 through tiny.FAMILIES: attention and Mamba2 side by side in
every layer, the output gated then group-normed, every muP multiplier set): its config's variants against
transformers at tp 1, 2 and 4, decode steps through a cache that holds both keys and SSM state, that each multiplier
is folded in where it belongs, and what the manifest records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("override", [
    {},
    dict(mamba_rms_norm=False),                              # gated, not normed
    dict(mamba_norm_before_gate=True),                       # normed, then gated
    dict(mamba_n_groups=2, tie_word_embeddings=True),        # B and C in two groups; the head is the embedding
    dict(attention_bias=True, mlp_bias=True, mamba_proj_bias=True, projectors_bias=True),    # biases scaled too
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override, tp):
    if tp == 4 and override.get("mamba_n_groups") == 2:
        pytest.skip("two groups do not split over four ranks: the replicated-group case runs above")
    src = model_dir("falcon_h1", **override)
    assert max(tiny.errors_against_transformers(src, "falcon_h1", tmp_path, 12, tp=tp, **override)) < 1e-5


def test_decode_steps_match_transformers(model_dir, tmp_path):
    """A prompt, then one token at a time: every layer appends to its KV cache and carries its conv and SSM state."""
    src = model_dir("falcon_h1")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny.build("falcon_h1")(ids).logits
    cache = m.new_cache(2, 12)
    assert all(k.shape[2] == 12 for k in cache.k) and all(s is not None for s in cache.state)
    got = torch.cat([m(ids[:, :5], cache)] + [m(ids[:, j:j + 1], cache) for j in range(5, 12)], dim=1)
    assert tiny.rel(got, want) < 1e-5


@pytest.mark.parametrize("slot", ["qkv", "attn_out", "mlp_in", "mlp_out", "ssm_in", "ssm_out"])
def test_each_multiplier_is_folded_in(model_dir, tmp_path, slot):
    """The same checkpoint with one slot's factors set to 1 in its manifest moves the logits by more than 1e-3."""
    src = model_dir("falcon_h1")
    convert(src, tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))[0]
    with torch.no_grad():
        assert tiny.rel(ref, tiny.build("falcon_h1")(ids).logits) < 0.05      # int8, scales folded
    shutil.copytree(tmp_path / "out", tmp_path / "edited")
    path = tmp_path / "edited" / "manifest.json"
    m = json.loads(path.read_text())
    f = m["model"]["row_scales"][slot]
    f["input"], f["parts"] = 1.0, [1.0] * len(f["parts"])
    path.write_text(json.dumps(m))
    assert tiny.rel(tiny.on_ranks(tmp_path / "edited", 2, lambda m: m(ids))[0], ref) > 1e-3


def test_the_manifest_records_both_mixers_and_the_multipliers(model_dir, tmp_path):
    sp = tiny.converted_manifest(model_dir("falcon_h1"), tmp_path / "out", tp=2)["model"]
    assert sp["ssm_beside_attention"] and sp["linear_layers"] == [0, 1] and "layers.qkv.weight" in sp["slots"]
    assert sp["ssm"]["heads"] == 4 and "gate" not in sp["ssm"]             # gated, then normed: Mamba2's default
    assert sp["row_scales"] == {
        "qkv": {"input": 0.9, "parts": [1.0, 0.4, 1.0]}, "attn_out": {"input": 1.0, "parts": [0.7]},
        "mlp_in": {"input": 1.0, "parts": [0.8, 1.0]}, "mlp_out": {"input": 1.0, "parts": [0.6]},
        "ssm_in": {"input": 1.3, "parts": [1.1, 0.9, 0.8, 1.2, 0.7]}, "ssm_out": {"input": 1.0, "parts": [0.6]}}
    assert sp["embed_scale"] == 2.0 and sp["logit_scale"] == 0.5
    sp = tiny.converted_manifest(model_dir("falcon_h1", mamba_rms_norm=False), tmp_path / "plain")["model"]
    assert sp["ssm"]["gate"] == "none" and "layers.ssm_norm.weight" not in sp["slots"]
