"""LFM2's gated short convolution beyond the family tests (which run lfm2 through tiny.FAMILIES): what the manifest
records, the MLP width transformers derives from the config, channels sliced over ranks, a cache of conv inputs
only, and prompts continued from it."""

from __future__ import annotations

import json

import torch

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
