"""Mamba (1) and the pure state-space models (Mamba, FalconMamba, Jamba, Mamba2) beyond the family tests (which run
mamba, falcon_mamba, jamba and mamba2 through tiny.FAMILIES): what the manifest records, how channels are sliced and
x_proj's partial sums meet, the fixed-size state a prompt continues from, the norms FalconMamba and Jamba put on dt,
B and C, Jamba's dense and mixture layers, the exact round trip back to HF names, and the one-line refusal of a tp
that would split the channels unevenly."""

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
from fmconvert.runtime.comm import ThreadGroup
from fmconvert.runtime.load import load
from tiny import rel

MAMBA1 = ["mamba", "falcon_mamba", "jamba"]


def test_the_manifest_records_mamba_and_slices_channels(model_dir, tmp_path):
    convert(model_dir("mamba"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["mamba"] == {"inner": 128, "state": 8, "dt_rank": 6, "conv_kernel": 4, "norms": None,
                           "norm_eps": 1e-5}
    assert sp["linear_layers"] == [0, 1] and sp["block_parts"] == ["mixer", "mixer"]
    t = m["ranks"][1]["tensors"]
    D, N, R = 64, 8, 6                                   # this rank's half of the 128 channels
    assert t["layers.0.mamba_in.weight"]["shape"] == [2 * D, 64] and t["layers.0.mamba_in.weight"]["dtype"] == "int8"
    assert t["layers.0.mamba_x.weight"]["shape"] == [R + 2 * N, D]        # row-parallel: this rank's channels' columns
    assert t["layers.0.mamba_x.weight"]["dtype"] == "float32"             # small, and it sets every step: kept float
    assert t["layers.0.mamba_dt.weight"]["shape"] == [D, R] and t["layers.0.mamba.a_log"]["shape"] == [D, N]
    assert t["layers.0.mamba_conv.weight"]["shape"] == [D, 4] and t["layers.0.mamba.d"]["shape"] == [D]
    assert t["layers.0.mamba_out.weight"]["shape"] == [64, D] and "layers.0.mamba_out.bias" not in t
    assert "layers.0.mamba_out.bias" in m["ranks"][0]["tensors"]
    assert not any(k.startswith(("layers.0.qkv", "layers.0.mlp_")) for k in t)
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "Mamba in 2 of 2 layers" in r.output and "no attention" in r.output and "no MLP" in r.output


def test_mamba_slices_round_trip_exactly_to_the_hf_names(model_dir, tmp_path):
    src = model_dir("mamba")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    _, got = reassemble(tmp_path / "out")
    hf = transformers.MambaForCausalLM.from_pretrained(src)
    want = hf.state_dict()
    for name in ("backbone.layers.1.mixer.in_proj.weight", "backbone.layers.1.mixer.x_proj.weight",
                 "backbone.layers.1.mixer.A_log", "backbone.layers.1.mixer.conv1d.weight",
                 "backbone.layers.1.mixer.dt_proj.weight", "backbone.layers.1.mixer.out_proj.weight"):
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("name", MAMBA1)
def test_a_prompt_continues_from_the_carried_state(model_dir, tmp_path, name):
    convert(model_dir(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 12))
    whole = m(ids)
    cache = m.new_cache(2, 16)
    mamba_layer = m.spec["linear_layers"][0]
    assert cache.state[mamba_layer].shape == (2, m.spec["mamba"]["inner"], m.spec["mamba"]["state"])
    assert cache.k[mamba_layer].shape[2] == 0                             # no keys: a fixed-size state instead
    parts = torch.cat([m(ids[:, :5], cache), m(ids[:, 5:6], cache), m(ids[:, 6:], cache)], 1)
    assert rel(parts, whole) < 1e-5
    cache.reset()
    again = m(ids[:, :5], cache)                                          # a reset cache starts a new sequence
    assert rel(again, whole[:, :5]) < 1e-6


def test_falcon_mamba_norms_dt_b_and_c_without_weights(model_dir, tmp_path):
    convert(model_dir("falcon_mamba"), tmp_path / "out", Options(), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["mamba"]["norms"] == "plain" and m["model"]["mamba"]["norm_eps"] == 1e-6
    assert not any("norm" in k and "mamba" in k for k in m["ranks"][0]["tensors"])
    fused = load(tmp_path / "out")
    ids = torch.randint(3, 100, (1, 10))
    with_norms = fused(ids)
    fused.spec["mamba"]["norms"] = None                  # the same weights without the norms: another model
    assert rel(fused(ids), with_norms) > 1e-2


def test_jamba_mixes_mamba_attention_dense_and_expert_layers(model_dir, tmp_path):
    convert(model_dir("jamba"), tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["linear_layers"] == [0, 2] and sp["dense_layers"] == [1, 3] and sp["num_experts"] == 4
    assert sp["mamba"]["norms"] == "weighted" and not sp["experts_renormalize"]
    assert sp["position"] == {"type": "none"}
    t = m["ranks"][0]["tensors"]
    assert t["layers.0.mamba_dt_norm.weight"]["shape"] == [6] and t["layers.0.mamba_b_norm.weight"]["shape"] == [8]
    assert "layers.0.router.weight" in t and "layers.1.mlp_in.weight" in t and "layers.1.router.weight" not in t
    assert "layers.1.qkv.weight" in t and "layers.1.mamba_in.weight" not in t


def test_a_tp_that_splits_the_channels_unevenly_is_refused(model_dir, tmp_path):
    with pytest.raises(FmError, match="does not divide the Mamba layers' channels"):
        convert(model_dir("mamba"), tmp_path / "out", Options(tp=3), progress=False)
    assert not (tmp_path / "out").exists()


def test_mamba2_alone_has_no_attention_and_no_mlp(model_dir, tmp_path):
    convert(model_dir("mamba2"), tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["block_parts"] == ["mixer"] * 3 and sp["linear_layers"] == [0, 1, 2] and sp["ssm"]["groups"] == 4
    assert not any(k.startswith(("layers.0.qkv", "layers.0.mlp_")) for k in m["ranks"][0]["tensors"])
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "Mamba2 in 3 of 3 layers" in r.output and "no MLP" in r.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_backend_scan_equals_the_reference_across_its_chunks(dtype):
    """The torch backend forms a chunk's decays at once: 70 tokens cross a chunk boundary, then a decode step."""
    from fmconvert.kernels.mamba1_scan import mamba_scan_reference
    from fmconvert.runtime.ops import TorchOps
    torch.manual_seed(0)
    B, T, Dc, N = 2, 70, 12, 5
    x, dt, z = (torch.randn(B, T + 1, Dc).to(dtype) for _ in range(3))
    Bm, Cm = (torch.randn(B, T + 1, N).to(dtype) for _ in range(2))
    A, D = -torch.rand(Dc, N) * 3, torch.randn(Dc)
    s_ref = torch.randn(B, Dc, N)
    s_got = s_ref.clone()
    want = [mamba_scan_reference(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], D, z[:, sl], s_ref)
            for sl in (slice(0, T), slice(T, T + 1))]
    got = [TorchOps().mamba_scan(x[:, sl], dt[:, sl], A, Bm[:, sl], Cm[:, sl], D, z[:, sl], s_got)
           for sl in (slice(0, T), slice(T, T + 1))]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(s_got, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit,match", [
    (lambda sp: sp["mamba"].update(inner=129), "multiple of parallel.tp"),
    (lambda sp: sp["mamba"].update(norms="weighted"), "no tensor .*_norm.weight"),    # the norms need weights
    (lambda sp: sp["mamba"].update(state=300), "model.mamba"),
    (lambda sp: sp.update(ssm={"heads": 8, "head_dim": 16, "groups": 1, "state": 16, "conv_kernel": 4,
                               "dt_min": 0.0, "dt_max": None}), "exclude each other"),
])
def test_a_manifest_lying_about_its_mamba_layers_is_refused_in_one_line(model_dir, tmp_path, edit, match):
    convert(model_dir("mamba"), tmp_path / "out", Options(tp=2), progress=False)
    path = tmp_path / "out" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m["model"])
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match=match) as e:
        load(tmp_path / "out", rank=0, comm=ThreadGroup(2).comm(0))
    assert "\n" not in str(e.value)
