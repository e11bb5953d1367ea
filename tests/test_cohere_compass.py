"""Cohere Compass (North) beyond the family tests (which run its tiny text model and its tiny vision-language wrapper
through tiny.FAMILIES): rotate-half RoPE, not Cohere's interleaved one, in the windowed layers; decode steps past the
window, eager and graph-safe; the wrapper's language model through Cohere 2's table, its vision tower left out."""

from __future__ import annotations

import tiny
from fmconvert.pipeline import Options, convert


def test_rotate_half_rope_and_decode_steps_match_transformers(model_dir, tmp_path):
    convert(model_dir("cohere_compass"), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(12)
    want = tiny.hf_logits("cohere_compass", ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 3)):
        assert tiny.rel(eager, want[:, 2:]) < 1e-5 and tiny.rel(graph, want[:, 2:]) < 1e-5
    interleaved = tiny.on_ranks(tmp_path / "out", 2, lambda m: (setattr(m, "rope_style", "gptj"), m(ids))[1])
    assert tiny.rel(interleaved[0], want) > 1e-3              # Cohere's own style would not match


def test_the_wrapper_reads_its_language_model_through_cohere2s_table(model_dir, tmp_path):
    a = tiny.converted_manifest(model_dir("cohere_compass_vl"), tmp_path / "vl", tp=2)
    assert a["model"]["family"] == "cohere2" and a["model"]["position"]["style"] == "neox"
    assert a["model"]["window_layers"] == [0, 1, 2] and a["model"]["nope_layers"] == [3]
    assert a["source"]["dropped"]["tensors"] > 0
