"""Kimi Linear beyond the family tests (which run kimi_linear through tiny.FAMILIES): what the manifest records for
KDA, how its heads and low-rank halves are sliced, A_log's stored shape round trip, the per-channel decay's state
carried across a prompt and decode steps, and latent attention without RoPE."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fmconvert.cli import cli
from fmconvert.pipeline import Options, convert
from fmconvert.reassemble import reassemble
from fmconvert.runtime.load import load
from fmconvert.runtime.ops import TorchOps
from tiny import rel


def test_the_manifest_records_kda_and_slices_whole_heads(model_dir, tmp_path):
    convert(model_dir("kimi_linear"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["linear_attn"] == {"k_heads": 4, "v_heads": 4, "k_dim": 16, "v_dim": 16, "conv_kernel": 4,
                                 "decay": "channel"}
    assert sp["linear_layers"] == [0, 2, 3] and sp["position"] == {"type": "none"} and sp["mla"]["q_rank"] == 0
    t = m["ranks"][1]["tensors"]
    H, d = 2, 16                                          # this rank's two heads; f_a and g_a whole on every rank
    assert t["layers.0.lin_in.weight"]["shape"] == [3 * H * d + H + 2 * d, 64]
    assert t["layers.0.lin_in.weight"]["dtype"] == "int8"
    assert t["layers.0.lin_f_b.weight"]["shape"] == [H * d, d] and t["layers.0.lin_g_b.weight"]["shape"] == [H * d, d]
    assert t["layers.0.lin_decay.dt_bias"]["shape"] == [H * d] and t["layers.0.lin_decay.a_log"]["shape"] == [H]
    assert "layers.0.q_b.weight" not in t and "layers.1.q_b.weight" in t and "layers.1.lin_in.weight" not in t
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "KDA (a decay per key channel) in 3 of 4 layers" in r.output, r.output
    assert "unrotated key" in r.output


def test_a_log_goes_back_to_its_stored_shape(model_dir, tmp_path):
    src = model_dir("kimi_linear")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    _, got = reassemble(tmp_path / "out")
    want = load_file(src / "model.safetensors")        # as saved (in memory A_log sits under forget_gate.)
    for name in ("model.layers.0.self_attn.A_log", "model.layers.0.self_attn.f_a_proj.weight",
                 "model.layers.0.self_attn.q_conv1d.weight", "model.layers.0.self_attn.dt_bias"):
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name]), name


def test_a_prompt_continues_from_the_carried_state(model_dir, tmp_path):
    convert(model_dir("kimi_linear"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 11))
    whole = m(ids)
    cache = m.new_cache(2, 16)
    assert cache.state[0].shape == (2, 4, 16, 16) and cache.state[1] is None      # layer 1 attends (latent cache)
    parts = torch.cat([m(ids[:, :4], cache), m(ids[:, 4:5], cache), m(ids[:, 5:], cache)], 1)
    assert rel(parts, whole) < 1e-5


def test_the_per_channel_decay_is_applied_per_key_row():
    """One step from a known state: every key row of the state decays by its own factor."""
    torch.manual_seed(0)
    B, H, dk, dv = 1, 2, 3, 4
    state = torch.randn(B, H, dk, dv)
    g = torch.log(torch.rand(B, 1, H, dk))
    q, k = torch.randn(B, 1, H, dk), torch.zeros(B, 1, H, dk)         # k = 0: no write, only the decay
    out = TorchOps().gated_delta(q, k, torch.randn(B, 1, H, dv), g, torch.rand(B, 1, H), state.clone(), 1.0)
    qn = q / q.norm(dim=-1, keepdim=True)
    want = torch.einsum("bhk,bhkv->bhv", qn[:, 0], state * g[:, 0].exp()[..., None])
    torch.testing.assert_close(out[:, 0], want, rtol=1e-4, atol=1e-5)
