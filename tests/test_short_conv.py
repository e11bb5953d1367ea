"""LFM2's gated short convolution beyond the family tests (which run lfm2 and lfm3 through tiny.FAMILIES): what the
manifest records, the MLP width transformers derives from the config, channels sliced over ranks, a cache of conv
inputs only, and prompts continued from it; LFM3's gate per head and proportional RoPE, and the variants refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fmconvert.cli import cli, main
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


def test_the_manifest_records_the_short_conv_and_slices_channels(model_dir, tmp_path):
    convert(model_dir("lfm2"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["short_conv"] == {"conv_kernel": 3} and sp["linear_layers"] == [0, 2]
    assert sp["intermediate_size"] == 128                    # int(2 * 144 / 3) = 96, x 1.3 = 124, up to 32: 128
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.sconv_in.weight"]["shape"] == [3 * 32, 64] and t["layers.0.sconv_in.weight"]["dtype"] == "int8"
    assert t["layers.0.sconv_conv.weight"]["shape"] == [32, 3] and t["layers.0.sconv_out.weight"]["shape"] == [64, 32]
    assert "layers.0.sconv_out.bias" not in t and "layers.0.sconv_out.bias" in m["ranks"][0]["tensors"]
    assert "layers.1.qkv.weight" in t and "layers.0.qkv.weight" not in t


def test_a_conv_layer_caches_its_last_inputs_only(model_dir, tmp_path):
    convert(model_dir("lfm2"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    cache = m.new_cache(2, 16)
    assert cache.conv[0].shape == (2, 64, 2) and cache.state[0] is None and cache.k[0].shape[2] == 0
    ids = torch.randint(3, 100, (2, 11))
    whole = m(ids)
    parts = torch.cat([m(ids[:, :6], cache), m(ids[:, 6:8], cache), m(ids[:, 8:], cache)], 1)
    assert ((parts - whole).abs().max() / whole.abs().max()).item() < 1e-5


def test_lfm3_records_a_gate_per_head_and_proportional_rope(model_dir, tmp_path):
    """LFM3: the gate is one qkv row per head (this rank's heads'), and the global layers' RoPE rotates the whole head
    with its back frequencies zero, beside the windowed layers' plain RoPE."""
    out = tmp_path / "out"
    convert(model_dir("lfm3"), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    sp = m["model"]
    assert sp["attn_gate"] and sp["attn_gate_heads"] and sp["linear_layers"] == [0, 3]
    assert sp["window_layers"] == [1, 4] and sp["sliding_window"] == 4
    pos = sp["position"]
    assert pos["rope_type"] == "proportional" and pos["rotary_dim"] == 16 and pos["local"]["rope_type"] == "default"
    t = m["ranks"][1]["tensors"]
    assert t["layers.2.qkv.weight"]["shape"] == [(2 + 1 + 1) * 16 + 2, 64]      # q, k, v heads, then 2 gate rows
    got = {}
    for f in m["ranks"][0]["files"]:
        got.update(load_file(out / f["path"]))
    inv, local = got["rope.inv_freq"], got["rope_local.inv_freq"]
    assert inv.shape == local.shape == (8,)
    assert (inv[:4] > 0).all() and (inv[4:] == 0).all() and (local > 0).all()
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    assert r.exit_code == 0 and "sigmoid of one gate logit per head" in re.sub(r"[\s│]+", " ", r.output), r.output


@pytest.mark.parametrize("override, word", [(dict(use_attention_gate=False), "use_attention_gate"),
                                            (dict(attention_bias=True), "attention_bias")])
def test_lfm3_variants_without_the_gate_are_refused_in_one_line(model_dir, tmp_path, capsys, override, word):
    src = model_dir("lfm3", **override)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", "-q", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and len(err.strip().splitlines()) == 1 and word in err, err
    assert not (tmp_path / "out").exists()
