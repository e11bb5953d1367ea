"""xLSTM beyond the family tests (which run the tiny model through tiny.FAMILIES): its mLSTM against transformers at
tp 1, 2 and 4, and against transformers' chunkwise form; decode steps, eager and graph-safe; a prompt in pieces; that
each piece is applied (the gates' soft cap, the heads' LayerNorm, the output gate, the logits' soft cap); q/k
narrower than v (as the released 7B has them, which transformers' own kernels cannot run) split over ranks alike;
the fused weight layout refused; tp that would split a head."""

from __future__ import annotations

import pytest

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "xlstm"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 14, tp=tp)) < 1e-5


def test_transformers_chunkwise_form_and_decode_steps(model_dir, tmp_path):
    """chunk_size 4: transformers runs three chunks in parallel form, then the rest token by token; the runtime's
    recurrence gives the same logits, eager and graph-safe, and a prompt in pieces equals it whole."""
    override = dict(chunk_size=4)
    convert(model_dir(NAME, **override), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(14, 1)
    want = tiny.hf_logits(NAME, ids, **override)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 14, 2)

    def each(slot, f):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks]

    # the normalizer divides by |q . n|, which moves with the order of sums: 1.3e-5 on an Intel Xeon's kernels
    assert moved(lambda m: None) < 4e-5
    assert moved(lambda m: m.spec["mlstm"].update(gate_cap=0.5)) > 1e-4
    assert moved(each("mlstm_norm.weight", lambda w: w.flip(0))) > 1e-3
    assert moved(each("mlstm_gates.bias", lambda w: w + 2.0)) > 1e-3
    assert moved(lambda m: m.spec.update(logit_softcap=80.0)) > 1e-3


def test_narrow_q_and_k_split_over_ranks_alike(model_dir, tmp_path):
    """qk_dim_factor 0.5 (q/k heads 8 wide, v 16): tp 2 and tp 4 give tp 1's logits; the shards hold each rank's
    heads of q, k, v and o."""
    src = model_dir(NAME, qk_dim_factor=0.5)
    ids = tiny.ids(10, 2)
    outs = {}
    for tp in (1, 2, 4):
        convert(src, tmp_path / f"tp{tp}", Options(tp=tp), progress=False)
        outs[tp] = tiny.on_ranks(tmp_path / f"tp{tp}", tp, lambda m: m(ids))[0]
    # (the normalizer divides by |q . n|, which rounding in another order of sums moves a little more than usual)
    assert tiny.rel(outs[2], outs[1]) < 1e-4 and tiny.rel(outs[4], outs[1]) < 1e-4
    m = tiny.converted_manifest(src, tmp_path / "man", tp=2, int8=True, group_size=16)
    assert m["model"]["mlstm"] == {"heads": 4, "qk_dim": 32, "v_dim": 64, "gate_cap": 5.0, "eps": 1e-6}
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.mlstm_in.weight"]["shape"] == [2 * 16 + 2 * 32, 64]
    assert t["layers.0.mlstm_in.weight"]["dtype"] == "int8" and t["layers.0.mlstm_gates.weight"]["shape"] == [4, 64]
    assert t["layers.1.mlstm_norm.weight"]["shape"] == [32] and t["layers.1.mlstm_out.weight"]["shape"] == [64, 32]


def test_the_fused_layout_is_refused_in_one_line(model_copy, tmp_path):
    tiny.refuses(model_copy(NAME), tmp_path / "out", "weight_mode == 'fused'", weight_mode="fused")


def test_tp_must_keep_whole_heads(model_dir, tmp_path):
    with pytest.raises(FmError, match="does not divide"):
        convert(model_dir(NAME), tmp_path / "out", Options(tp=8), progress=False)
