"""JetMoe beyond the family tests (which run the tiny model through tiny.FAMILIES): its mixture of attention heads and
biased mixture against transformers at tp 1, 2 and 4; decode steps, eager and graph-safe; left padding; that each
piece is applied (the attention router, each expert's output projection, the two biases, the layers' fixed eps); the
manifest and the shards; tp that would split a kv head; a bad config."""

from __future__ import annotations

import pytest

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "jetmoe"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 14, tp=tp)) < 1e-5


def test_top_one_and_tied_match_transformers(model_dir, tmp_path):
    override = dict(num_experts_per_tok=1, tie_word_embeddings=True)
    ids = tiny.ids(14, 3)
    want = tiny.hf_logits(NAME, ids, **override)
    convert(model_dir(NAME, **override), tmp_path / "out", Options(tp=2), progress=False)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))) < 1e-5


def test_decode_steps_and_padding_match_transformers(model_dir, tmp_path):
    convert(model_dir(NAME), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(14, 1)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, tiny.hf_logits(NAME, ids), 3)
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 4)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 14, 2)

    def each(slot, f):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks]

    assert moved(lambda m: None) < 1e-5
    assert moved(each("moa_router.weight", lambda w: w.flip(0))) > 1e-3
    assert moved(each("moa_out.weight", lambda w: type(w)(list(reversed(list(w))), None))) > 1e-3
    assert moved(each("moa_out.bias", lambda w: w * 0)) > 1e-3
    assert moved(each("experts_shared.bias", lambda w: w * 0)) > 1e-3
    assert moved(lambda m: m.spec.update(final_norm_eps=0.0)) > 1e-6      # the layers' 1e-6 for the final norm too


def test_the_manifest_and_the_shards(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["moa"] == {"experts": 4, "top_k": 2} and sp["num_heads"] == 8 and sp["num_kv_heads"] == 4
    assert sp["norm_eps"] == 1e-6 and sp["final_norm_eps"] == 1e-5 and sp["num_experts"] == 4
    for r in m["ranks"]:          # every expert's rows of this rank's two kv heads; the biases on rank 0
        t = r["tensors"]
        assert t["layers.0.moa_q.weight"]["shape"] == [4 * 2 * 16, 64] and t["layers.0.moa_q.weight"]["dtype"] == "int8"
        assert t["layers.0.moa_out.weight"]["shape"] == [4 * 64, 32] and t["layers.0.moa_kv.weight"]["shape"] == [64, 64]
        assert t["layers.1.moa_router.weight"]["shape"] == [4, 64]
        assert ("layers.0.moa_out.bias" in t) == ("layers.0.experts_shared.bias" in t) == (r["rank"] == 0)


def test_tp_must_keep_whole_kv_heads(model_dir, tmp_path):
    with pytest.raises(FmError, match="tp=8 does not divide num_key_value_heads=4"):
        convert(model_dir(NAME), tmp_path / "out", Options(tp=8), progress=False)


def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path):
    tiny.refuses(model_copy(NAME), tmp_path / "out", "num_experts_per_tok", num_experts_per_tok=9)
