"""ZAYA1 beyond the family tests (which run the tiny model through tiny.FAMILIES): CCA, the fp32 stream with its
residual scales and the router MLP against transformers at tp 1, 2 and 4, with biases and windowed layers; decode
steps (eager and graph-safe), a prompt in pieces and left padding, which carry the convs' inputs and the delayed
v across calls; that each piece is applied; and what is refused."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "zaya"
WINDOWED = dict(layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], sliding_window=5)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 16, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [{}, dict(attention_bias=True), WINDOWED], ids=["plain", "bias", "windowed"])
def test_decode_pieces_and_padding_match_transformers(model_dir, tmp_path, override):
    """16 tokens at tp 2: decode steps from 3 on, the prompt in three pieces (the conv reaches 3 inputs back, across
    the cuts), the second row padded by 4 on the left (padding zeroed before the projections, as transformers
    does: with biases it enters the conv as the biases). Windowed: every other layer sees 5 keys, with its own
    RoPE base."""
    src = model_dir(NAME, **override)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(16, 1)
    want = tiny.hf_logits(NAME, ids, **override)
    assert tiny.rel(tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))[1], want) < 1e-5
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want, cuts=(5, 6))
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 4, **override)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 12, 2)

    def each(f):
        return lambda m: [f(b) for b in m.blocks]

    def put(slot, f):
        return each(lambda b: slot in b.t and b.t.__setitem__(slot, f(b.t[slot])))

    def skip_all(b):        # the skip expert always picked: no expert runs
        b.t["router.balance"] = torch.tensor([0.0] * 4 + [9.0])

    assert moved(lambda m: None) < 1e-5
    assert moved(put("cca_conv0.weight", lambda w: -w)) > 1e-3
    assert moved(put("cca_conv1.weight", lambda w: -w)) > 1e-3
    assert moved(put("cca_temp", torch.ones_like)) > 1e-3
    assert moved(each(lambda b: setattr(b, "cca_delayed", ~b.cca_delayed))) > 1e-3    # which half of v waits
    assert moved(put("router_eda", torch.zeros_like)) > 1e-3                          # the state carried on
    assert moved(put("router.balance", torch.zeros_like)) > 1e-3
    assert moved(each(skip_all)) > 1e-3
    for half in ("attn_res", "mlp_res"):
        for k, f in (("out_gain", torch.ones_like), ("out_shift", torch.zeros_like), ("gain", torch.ones_like),
                     ("shift", torch.zeros_like)):
            assert moved(put(f"{half}.{k}", f)) > 1e-4, (half, k)
    assert moved(lambda m: m.g.__setitem__("input_gain", torch.ones_like(m.g["input_gain"]))) > 1e-3
    assert moved(lambda m: m.g.__setitem__("input_shift", torch.zeros_like(m.g["input_shift"]))) > 1e-3


def test_the_cache_keeps_the_conv_inputs_and_the_last_v(model_dir, tmp_path):
    """Per layer, a rank keeps its q|k channels' last (2 - 1) + (3 - 1) inputs and its v channels' last value."""
    convert(model_dir(NAME), tmp_path / "out", Options(tp=2), progress=False)
    cache = tiny.on_ranks(tmp_path / "out", 2, lambda m: m.new_cache(1, 10))[1]
    assert all(c.shape == (1, (4 + 2) * 8, 3) for c in cache.conv)
    assert all(s.shape == (1, 2 * 8) for s in cache.state)


def test_bad_configs_and_splits_are_refused(model_copy, model_dir, tmp_path):
    src = model_copy(NAME)
    tiny.refuses(src, tmp_path / "a", "cca_time0 and cca_time1 must be integers from 1 to 64", cca_time0=0)
    tiny.refuses(src, tmp_path / "b", "positive router_hidden_size", cca_time0=2, router_hidden_size=0)
    with pytest.raises(FmError, match="does not divide num_key_value_heads=4; ZAYA's CCA"):
        convert(model_dir(NAME), tmp_path / "c", Options(tp=8), progress=False)
