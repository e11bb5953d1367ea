"""RecurrentGemma beyond the family tests (which run the tiny model through tiny.FAMILIES): against transformers at
tp 1, 2 and 4; decode steps past the attention's window, eager and graph-safe; a prompt in pieces; that each piece
of the RG-LRU is applied (both gates, the sqrt(1 - a^2) scale and its exception at position 0, the conv); the
embedding's bf16 normalizer; the manifest; tp that would split a head."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


def _ids(T=14, seed=0):
    return tiny.ids(T, seed)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir("recurrent_gemma"), "recurrent_gemma", tmp_path, 14,
                                                tp=tp)) < 1e-5


def test_decode_steps_and_a_prompt_in_pieces_match_transformers(model_dir, tmp_path):
    convert(model_dir("recurrent_gemma"), tmp_path / "out", Options(tp=2), progress=False)
    ids = _ids(14, 1)
    want = tiny.hf_logits("recurrent_gemma", ids)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by("recurrent_gemma", model_dir("recurrent_gemma"), tmp_path / "out", 14, 2)

    def each(slot, f):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks if b.linear]

    assert moved(lambda m: None) < 1e-5
    assert moved(each("rg_gate_x.bias", lambda w: w + 1.0)) > 1e-3
    assert moved(each("rg_gate_a.bias", lambda w: w + 1.0)) > 1e-3
    assert moved(each("rg_a", lambda w: w * 2)) > 1e-3
    assert moved(each("rg_conv.weight", lambda w: w.flip(-1))) > 1e-3
    ids = _ids(14, 2)
    m = load(tmp_path / "out")               # the first position: x enters whole, not scaled by sqrt(1 - a^2)
    cache = m.new_cache(2, 14)
    m(ids[:, :1], cache)
    cache.length = 1                          # the same token as if it came second: scaled
    assert tiny.rel(m(ids[:, :1], m.new_cache(2, 14)), m(ids[:, :1], cache)) > 1e-4


def test_the_embedding_scale_is_rounded_to_bf16_and_the_manifest(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("recurrent_gemma"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["embed_scale"] == 8.0 and sp["rglru"] == {"width": 64, "heads": 4, "conv_kernel": 4,
                                                        "activation": "gelu_tanh"}
    assert sp["linear_layers"] == [0, 1] and sp["sliding_window"] == 4 and sp["position"]["rotary_dim"] == 8
    assert sp["intermediate_size"] == 96 and sp["logit_softcap"] == 30.0
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.rg_in.weight"]["shape"] == [64, 64] and t["layers.0.rg_in.weight"]["dtype"] == "int8"
    assert t["layers.0.rg_gate_x.weight"]["shape"] == [2, 16, 16] and t["layers.0.rg_a"]["shape"] == [32]
    assert t["layers.0.rg_out.weight"]["shape"] == [64, 32] and "layers.0.rg_out.bias" not in t
    m2 = tiny.converted_manifest(model_dir("recurrent_gemma", hidden_size=80, lru_width=80), tmp_path / "o2")
    assert m2["model"]["embed_scale"] == float(torch.tensor(80 ** 0.5, dtype=torch.bfloat16)) != 80 ** 0.5


def test_tp_must_keep_whole_rg_lru_heads(model_dir, tmp_path):
    with pytest.raises(FmError, match="does not divide num_attention_heads=4"):
        convert(model_dir("recurrent_gemma"), tmp_path / "out", Options(tp=8), progress=False)
