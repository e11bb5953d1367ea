"""Gemma 4 beyond the family tests (which run gemma4 and gemma4_vl through tiny.FAMILIES): what the manifest records
for the global layers' own geometry, how their fewer kv heads split over ranks, the two RoPE tables, and the
variants refused in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fmconvert.cli import cli, main
from fmconvert.pipeline import Options, convert


def _rank(out, m, r):
    got = {}
    for f in m["ranks"][r]["files"]:
        got.update(load_file(out / f["path"]))
    return got


def test_global_layers_have_their_own_heads_and_split(model_dir, tmp_path):
    """Layers 2 and 4 are global: head_dim 32 and one kv head (replicated on both ranks at tp 2), v read from k_proj;
    the windowed ones keep head_dim 16 and two kv heads (one a rank)."""
    out = tmp_path / "out"
    convert(model_dir("gemma4"), out, Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    sp, par = m["model"], m["parallel"]
    assert sp["global_attn"] == {"head_dim": 32, "num_kv_heads": 1} and sp["value_is_key"] and sp["v_norm"]
    assert sp["window_layers"] == [0, 1, 3] and sp["attn_scale"] == 1.0
    assert (par["kv_heads_per_rank"], par["kv_replication"]) == (1, 1)
    assert (par["global_kv_heads_per_rank"], par["global_kv_replication"]) == (1, 2)
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.qkv.weight"]["shape"] == [(2 + 1 + 1) * 16, 64]
    assert t["layers.2.qkv.weight"]["shape"] == [(2 + 1 + 1) * 32, 64]
    assert t["layers.2.attn_out.weight"]["shape"] == [64, 2 * 32] and t["layers.2.k_norm.weight"]["shape"] == [32]
    assert t["layers.2.layer_scale.weight"]["shape"] == [1]
    # The one global kv head's k and v rows are the same projection on both ranks (int8 values and scales alike)
    for r in range(2):
        got = _rank(out, m, r)
        q = got["layers.2.qkv.weight"]
        assert torch.equal(q[64:96], q[96:128]) and not torch.equal(q[:32], q[32:64])
        if r == 0:
            first = q
    assert torch.equal(first[64:], q[64:])
    pos = sp["position"]
    assert pos["rope_type"] == "proportional" and pos["rotary_dim"] == 32 and pos["local"]["rotary_dim"] == 16
    inv, local = got["rope.inv_freq"], got["rope_local.inv_freq"]
    assert inv.shape == (16,) and (inv[:4] > 0).all() and (inv[4:] == 0).all()   # a quarter of the pairs rotate
    assert local.shape == (8,) and (local > 0).all()
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    text = re.sub(r"[\s│]+", " ", r.output)
    assert r.exit_code == 0 and "4 heads / 1 kv, head_dim 32; v is k's projection" in text, r.output
    assert "each v head RMS-normed (no weight), the stream times a scalar after each layer" in text


def test_tp4_replicates_the_global_kv_head_on_every_rank(model_dir, tmp_path):
    out = tmp_path / "out"
    convert(model_dir("gemma4"), out, Options(tp=4), progress=False)
    par = json.loads((out / "manifest.json").read_text())["parallel"]
    assert (par["kv_heads_per_rank"], par["kv_replication"]) == (1, 2)
    assert (par["global_kv_heads_per_rank"], par["global_kv_replication"]) == (1, 4)


@pytest.mark.parametrize("override, word", [
    (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input"),     # gemma-4-E2B/E4B's per-layer inputs
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32), "enable_moe_block"),
    (dict(num_global_key_value_heads=3), "num_global_key_value_heads"),
])
def test_unsupported_variants_are_refused_in_one_line(model_dir, tmp_path, capsys, override, word):
    src = model_dir("gemma4", **override)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", "-q", "--tp", "2", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and len(err.strip().splitlines()) == 1 and word in err, err
    assert not (tmp_path / "out").exists()
