"""Mamba2 hybrids (Granite 4.0-H, Bamba, Nemotron-H) beyond the family tests (which run granite_hybrid,
granite_hybrid_dense, bamba, nemotron_h and nemotron_h_dense through tiny.FAMILIES): what the manifest records, B and
C replicated when one group serves every head and split with the heads otherwise, the fixed-size state, Granite's
dense variant, Nemotron-H's one-part layers and ungated experts, and the one-line refusal of a tp that would split a
group."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.reassemble import reassemble
from fmconvert.runtime.load import load
from tiny import rel


def test_the_manifest_records_mamba2_and_replicates_a_single_group(model_dir, tmp_path):
    convert(model_dir("granite_hybrid"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["ssm"] == {"heads": 8, "head_dim": 16, "groups": 1, "state": 16, "conv_kernel": 4, "dt_min": 0.0,
                         "dt_max": 100.0}
    assert sp["linear_layers"] == [0, 1, 3] and sp["position"] == {"type": "none"}
    t = m["ranks"][1]["tensors"]
    I, BC, H = 4 * 16, 16, 4                            # this rank's four heads; the one group's B and C whole
    assert t["layers.0.ssm_in.weight"]["shape"] == [2 * I + 2 * BC + H, 64]
    assert t["layers.0.ssm_conv.weight"]["shape"] == [I + 2 * BC, 4]
    assert t["layers.0.ssm_conv.bias"]["shape"] == [I + 2 * BC]
    assert t["layers.0.ssm.d"]["shape"] == [H] and t["layers.0.ssm_norm.weight"]["shape"] == [I]
    assert t["layers.0.ssm_out.weight"]["shape"] == [64, I]
    assert t["layers.0.ssm_in.weight"]["dtype"] == "int8" and "layers.0.qkv.weight" not in t
    assert "layers.2.qkv.weight" in t and "layers.2.ssm_in.weight" not in t
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "Mamba2 in 3 of 4 layers" in r.output and "none" in r.output


def test_b_and_c_split_with_the_heads_when_there_is_a_group_per_rank(model_dir, tmp_path):
    src = model_dir("granite_hybrid_dense")
    convert(src, tmp_path / "out", Options(tp=4), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    t = m["ranks"][3]["tensors"]
    assert t["layers.0.ssm_in.weight"]["shape"] == [2 * 32 + 2 * 8 + 2, 64]     # 2 heads, 1 of the 4 groups
    assert "layers.0.mlp_in.weight" in t and "layers.0.router.weight" not in t   # the shared MLP, read as dense
    _, got = reassemble(tmp_path / "out")
    hf = transformers.GraniteMoeHybridForCausalLM.from_pretrained(src)
    assert torch.equal(got["model.layers.0.mamba.in_proj.weight"], hf.model.layers[0].mamba.in_proj.weight)


@pytest.mark.parametrize("name", ["granite_hybrid", "granite_hybrid_dense"])
def test_a_prompt_continues_from_the_carried_state(model_dir, tmp_path, name):
    convert(model_dir(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 11))
    whole = m(ids)
    cache = m.new_cache(2, 16)
    assert cache.state[0].shape == (2, 8, 16, 16 if name == "granite_hybrid" else 8)
    parts = torch.cat([m(ids[:, :6], cache), m(ids[:, 6:], cache)], 1)
    assert rel(parts, whole) < 1e-5
    cache.reset()
    assert all(s.abs().sum() == 0 for s in cache.state if s is not None)


def test_tp_must_not_split_a_group(model_dir, tmp_path):
    src = model_dir("granite_hybrid", mamba_n_groups=2)
    with pytest.raises(FmError, match="mamba_n_groups=2"):
        convert(src, tmp_path / "out", Options(tp=4), progress=False)
    assert not (tmp_path / "out").exists()


def test_nemotron_h_layers_hold_one_part_and_its_experts_are_ungated(model_dir, tmp_path):
    convert(model_dir("nemotron_h"), tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["block_parts"] == ["mixer", "mlp", "mixer", "mlp", "mixer", "mlp"] and not sp["gated_mlp"]
    assert sp["dense_layers"] == [3] and sp["activation"] == "relu2" and sp["router"] == "sigmoid"
    t = m["ranks"][0]["tensors"]
    assert t["layers.1.experts_in.weight"]["shape"] == [4 * 16, 64]        # 4 experts x half of 32 units, no gate
    assert t["layers.1.shared_in.weight"]["shape"] == [24, 64]
    assert t["layers.3.mlp_in.weight"]["shape"] == [48, 64] and "layers.3.attn_norm.weight" not in t
    assert "layers.0.mlp_norm.weight" not in t and "layers.2.qkv.weight" in t and "layers.2.mlp_in.weight" not in t
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "token mixer in layers 0, 2, 4; MLP in layers 1, 3, 5" in r.output


def test_nemotron_h_mlp_layers_keep_no_cache(model_dir, tmp_path):
    convert(model_dir("nemotron_h_dense"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    cache = m.new_cache(1, 32)
    assert [k.shape[2] for k in cache.k] == [0, 0, 32, 0]          # only the attention layer keeps keys
    assert cache.state[0] is not None and cache.state[1] is None


@pytest.mark.parametrize("edit,needle", [
    (lambda sp: sp["ssm"].update(groups=3), "model.ssm"),
    (lambda sp: sp["ssm"].update(state=32), "has shape"),
    (lambda sp: sp.update(block_parts=["mixer"] * 3), "block_parts"),
    (lambda sp: sp.update(linear_layers=None), "linear_layers"),
    (lambda sp: sp.update(linear_attn={"k_heads": 2, "v_heads": 8, "k_dim": 16, "v_dim": 16, "conv_kernel": 4}),
     "exclude each other"),
])
def test_a_manifest_that_lies_about_the_hybrid_is_refused(model_dir, tmp_path, edit, needle):
    out = tmp_path / "out"
    convert(model_dir("nemotron_h"), out, Options(), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    edit(m["model"])
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FmError, match=needle) as e:
        load(out)
    assert "\n" not in str(e.value)
