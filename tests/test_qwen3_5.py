"""Hybrid linear attention (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) beyond the family tests (which run qwen3_5,
qwen3_5_moe, qwen3_next and qwen3_5_vl through tiny.FAMILIES): what the manifest records and how whole heads are
sliced, the fixed-size state a DeltaNet layer caches instead of keys, prompts continued from that state, greedy
generation against transformers', the multi-token-prediction head left out, a model of DeltaNet layers only, and
the one-line refusal of a tp that splits a head."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load
from tiny import rel


def test_the_manifest_records_the_hybrid_and_slices_whole_heads(model_dir, tmp_path):
    convert(model_dir("qwen3_5"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["linear_attn"] == {"k_heads": 4, "v_heads": 8, "k_dim": 16, "v_dim": 8, "conv_kernel": 4}
    assert sp["linear_layers"] == [0, 1, 2] and sp["attn_gate"] and sp["norm"] == "rms_plus_one"
    t = m["ranks"][1]["tensors"]
    Kd, Vd, Hv = 2 * 16, 4 * 8, 4                                      # this rank's two k heads, four v heads
    assert t["layers.0.lin_in.weight"]["shape"] == [2 * Kd + 2 * Vd + 2 * Hv, 64]
    assert t["layers.0.lin_conv.weight"]["shape"] == [2 * Kd + Vd, 4]
    assert t["layers.0.lin_decay.a_log"]["shape"] == [Hv] and t["layers.0.lin_norm.weight"]["shape"] == [8]
    assert t["layers.0.lin_out.weight"]["shape"] == [64, Vd]
    assert t["layers.3.qkv.weight"]["shape"] == [(2 + 1 + 1 + 2) * 16, 64]   # q, k, v, then the q heads' gates
    assert "layers.0.qkv.weight" not in t and "layers.3.lin_in.weight" not in t
    assert all(t[f"layers.0.{s}.weight"]["dtype"] == "int8" for s in ("lin_in", "lin_out"))
    assert t["layers.0.lin_conv.weight"]["dtype"] == "float32"
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "Gated DeltaNet in 3 of 4 layers" in r.output and "sigmoid of a gate" in r.output


def test_a_deltanet_layer_caches_a_fixed_size_state_not_keys(model_dir, tmp_path):
    convert(model_dir("qwen3_5"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    small, large = m.new_cache(2, 16), m.new_cache(2, 4096)
    for cache in (small, large):
        assert cache.k[0].shape[2] == 0 and cache.conv[0].shape == (2, 2 * 64 + 64, 3)
        assert cache.state[0].shape == (2, 8, 16, 8) and cache.state[0].dtype == torch.float32
        assert cache.state[3] is None and cache.k[3].shape[2] == cache.max_len        # the attention layer
    ids = torch.randint(3, 100, (2, 9))
    want = m(ids, small)
    assert small.state[0].abs().sum() > 0
    small.reset()                                   # a fresh sequence must not see the last one's state
    assert all(s.abs().sum() == 0 for s in small.state if s is not None)
    assert rel(m(ids, small), want) < 1e-6


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next"])
def test_a_prompt_continues_from_the_carried_state(model_dir, tmp_path, name):
    """Two prompts in a row (the second starts from the first's conv inputs and recurrent state, chunked) and the
    whole sequence at once give the same logits."""
    convert(model_dir(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 11))
    whole = m(ids)
    cache = m.new_cache(2, 16)
    parts = torch.cat([m(ids[:, :6], cache), m(ids[:, 6:], cache)], 1)
    assert rel(parts, whole) < 1e-5


def test_greedy_generation_equals_transformers(model_dir, tmp_path):
    src = model_dir("qwen3_5")
    convert(src, tmp_path / "out", Options(), progress=False)
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got, _ = generate(load(tmp_path / "out"), ids, max_new_tokens=12)
    assert got.tolist() == want.tolist()


def test_the_multi_token_prediction_head_is_left_out_and_counted(model_dir, model_copy, tmp_path):
    src = model_copy("qwen3_5")
    tensors = load_file(src / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    tensors["mtp.layers.0.mlp.gate_proj.weight"] = torch.randn(96, 64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "out", Options(), progress=False)
    dropped = json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["dropped"]
    assert dropped["tensors"] == 2 and dropped["bytes"] == (64 * 128 + 96 * 64) * 4
    m = load(tmp_path / "out")
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(model_dir("qwen3_5")).eval()
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        assert rel(m(ids), hf(ids).logits) < 1e-5


def test_tp_must_split_the_linear_heads_whole(model_dir, tmp_path):
    src = model_dir("qwen3_5", linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16)
    with pytest.raises(FmError, match="linear_num_key_heads=2"):
        convert(src, tmp_path / "out", Options(tp=4), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_of_deltanet_layers_only_runs(model_dir, tmp_path):
    src = model_dir("qwen3_5", layer_types=["linear_attention"] * 4)
    convert(src, tmp_path / "out", Options(), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["linear_layers"] == [0, 1, 2, 3]
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(3, 100, (1, 7))
    with torch.no_grad():
        assert rel(load(tmp_path / "out")(ids), hf(ids, use_cache=False).logits) < 1e-5   # HF: no attention, no cache
