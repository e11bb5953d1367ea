"""OLMo's, MPT's and DBRX's clamped q, k and v, OLMo's weightless LayerNorms, the MPT and DBRX variants refused,
Persimmon's biased q/k norms, nanochat's weightless RMSNorms and reversed RoPE, beyond the family tests (which run
olmo, mpt, dbrx, persimmon, gpt_neo and nanochat through tiny.FAMILIES, and GPT-Neo's local layers through the
sliding-window test)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from tiny import rel


@pytest.mark.parametrize("name,clip", [("olmo", dict(clip_qkv=0.1)), ("mpt", dict(attn_config=dict(clip_qkv=0.1)))])
def test_the_clamp_is_recorded_and_changes_the_output(model_dir, tmp_path, name, clip):
    convert(model_dir(name, **clip), tmp_path / "out", Options(), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["qkv_clip"] == 0.1
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    clipped = m(ids)
    m.spec["qkv_clip"] = 0.0
    assert rel(m(ids), clipped) > 1e-3        # the tiny models' q, k, v reach past 0.1: the clamp is applied


def test_olmo_stores_no_norm_and_norms_without_a_weight(model_dir, tmp_path):
    convert(model_dir("olmo"), tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["norm_affine"] is False and m["model"]["norm"] == "layer"
    assert not any("norm" in name for r in m["ranks"] for name in r["tensors"])
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "clamped to +-0.5" in r.output and "norms without weight or bias" in r.output


def test_a_manifest_that_drops_the_norms_of_an_affine_model_is_refused(model_dir, tmp_path):
    convert(model_dir("llama"), tmp_path / "out", Options(), progress=False)
    path = tmp_path / "out" / "manifest.json"
    m = json.loads(path.read_text())
    m["model"]["norm_affine"] = "no"
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match="norm_affine"):
        load(tmp_path / "out")


@pytest.mark.parametrize("attn", [dict(qk_ln=True), dict(softmax_scale=0.3), dict(alibi=False)])
def test_mpt_variants_transformers_ignores_are_refused(model_dir, tmp_path, attn):
    src = model_dir("mpt", attn_config=dict(clip_qkv=0.5, **attn))
    with pytest.raises(FmError, match="does not support"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()


def test_persimmon_q_and_k_norms_take_their_biases(model_dir, tmp_path):
    convert(model_dir("persimmon"), tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.q_norm.bias"]["shape"] == [16] and t["layers.0.k_norm.bias"]["shape"] == [16]   # replicated
    single = tmp_path / "tp1"
    convert(model_dir("persimmon"), single, Options(), progress=False)
    model = load(single)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with_bias = model(ids)
    for blk in model.blocks:
        blk.t = {**blk.t, "q_norm.bias": torch.zeros_like(blk.t["q_norm.bias"])}
    assert rel(model(ids), with_bias) > 1e-3


@pytest.mark.parametrize("ffn", [dict(moe_normalize_expert_weights=2.0), dict(moe_jitter_eps=0.01)])
def test_dbrx_routing_the_runtime_does_not_implement_is_refused(model_dir, tmp_path, ffn):
    src = model_dir("dbrx", ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, **ffn))
    with pytest.raises(FmError, match="does not support"):
        convert(src, tmp_path / "out", Options(), progress=False)


def test_nanochat_rope_turns_the_other_way_and_no_norm_is_stored(model_dir, tmp_path):
    """nanochat: every RMSNorm weightless (the embeddings' too), and RoPE by -angle, recorded in the manifest and in
    the negated frequencies; the same model with them turned back the usual way no longer matches."""
    convert(model_dir("nanochat"), tmp_path / "out", Options(), progress=False)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["model"]["position"]["reversed"] is True and man["model"]["embed_norm"] is True
    assert not any("norm" in name for r in man["ranks"] for name in r["tensors"])
    m = load(tmp_path / "out")
    assert (m.rope < 0).all()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    want = m(ids)
    for tab in m._tables.values():            # cos is even in the angle, sin odd: the usual direction is -sin
        tab[3] = -tab[3]
    assert rel(m(ids), want) > 1e-3
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "rotates the other way" in r.output
    man["model"]["position"]["reversed"] = "yes"
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FmError, match="position.reversed must be true or false"):
        load(tmp_path / "out")
