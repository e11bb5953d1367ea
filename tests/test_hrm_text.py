"""HRM-Text beyond the family tests (which run the tiny model through tiny.FAMILIES): its two stacks run in turn as
12 virtual layers (2 blocks a stack, L twice then H, twice over) against transformers at tp 1 and 2, with biases;
decode steps (eager and graph-safe), a prompt in pieces and left padding; that each block's weights are stored once
and read by every run of it, with a KV cache per run; that each piece is applied (z_L_init, the embedding scale, the
norm that ends each run and the state it sets, the output gate); and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert

NAME = "hrm_text"


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 20, tp=tp)) < 1e-5


def test_decode_pieces_and_padding_match_transformers(model_dir, tmp_path):
    """20 tokens at tp 2: decode steps from 3 on (eager and graph-safe: every run's own cache), the prompt in three
    pieces, and the second row padded by 4 on the left."""
    convert(model_dir(NAME), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(20, 1)
    want = tiny.hf_logits(NAME, ids)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want, cuts=(6, 13))
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 4)


def test_biases_match_transformers(model_dir, tmp_path):
    """attention_bias and mlp_bias: stored under the unfused modules' names beside the fused weights."""
    override = dict(attention_bias=True, mlp_bias=True)
    assert max(tiny.errors_against_transformers(model_dir(NAME, **override), NAME, tmp_path, 16, **override)) < 1e-5


def test_each_block_is_stored_once_and_each_run_keeps_its_own_cache(model_dir, tmp_path):
    """L's blocks in layers 0 and 1, H's in 4 and 5 (after L's two runs); the other virtual layers read the same
    tensors; the cache holds 12 layers' keys and values, as inspect counts them."""
    from fmconvert.manifest import kv_cache_bytes
    from fmconvert.runtime.load import load
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=1)
    assert m["model"]["loop"] == {"stack_layers": 2, "h_cycles": 2, "l_cycles": 2} and m["model"]["num_layers"] == 12
    held = {int(n.split(".")[1]) for n in m["ranks"][0]["tensors"] if n.startswith("layers.")}
    assert held == {0, 1, 4, 5}
    fm = load(tmp_path / "out")
    owner = [0, 1, 0, 1, 4, 5, 0, 1, 0, 1, 4, 5]
    assert all(b.t["qkv.weight"] is fm.blocks[o].t["qkv.weight"] for b, o in zip(fm.blocks, owner))
    assert [b.loop_from for b in fm.blocks] == [None, None, "L", None, "L", None, "H", None, "L", None, "L", None]
    full, windowed, _ = kv_cache_bytes(m["model"], m["parallel"], 4)
    cache = fm.new_cache(1, 10)
    assert len(cache.k) == 12 and full == sum(t[0, :, :1].numel() for t in cache.k + cache.v) * 4 == 12 * 2 * 64 * 4
    assert windowed == 0


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 16, 2)

    def gate_zero(m):      # every head's gate rows (the last of qkv) zero: sigmoid 1/2 for every channel
        for b in m.blocks[:2] + m.blocks[4:6]:
            b.t["qkv.weight"][-64:] = 0

    def swap_turns(m):
        for b in m.blocks:
            if b.loop_from:
                b.loop_from = {"L": "H", "H": "L"}[b.loop_from]

    assert moved(lambda m: None) < 1e-5
    assert moved(lambda m: m.g.__setitem__("loop_init", torch.zeros_like(m.g["loop_init"]))) > 1e-3
    assert moved(lambda m: setattr(m, "embed_scale", None)) > 1e-3
    assert moved(lambda m: [setattr(b, "loop_from", None) for b in m.blocks]) > 1e-3    # no run ever ends
    assert moved(swap_turns) > 1e-3                  # each run's end sets the other stack's state
    assert moved(gate_zero) > 1e-3


def test_inconsistent_cycle_counts_are_refused(model_copy, tmp_path):
    src = model_copy(NAME)
    tiny.refuses(src, tmp_path / "a", r"num_hidden_layers=12 must be num_layers_per_stack \* H_cycles \* "
                 r"\(L_cycles \+ 1\) = 18", H_cycles=3)
    tiny.refuses(src, tmp_path / "b", "H_cycles and L_cycles must be positive integers, got 2, 0 and 2", H_cycles=0)


def test_inject_refuses_the_prefix_lm_block(model_dir, tmp_path):
    """token_type_ids make transformers attend bidirectionally within the marked prefix; the fused body says it does
    not, rather than run it causally."""
    import transformers

    from fmconvert.errors import FmError
    from fmconvert.runtime.inject import inject
    src = model_dir(NAME)
    convert(src, tmp_path / "out", Options(tp=1), progress=False)
    live = transformers.HrmTextForCausalLM.from_pretrained(src).eval()
    inject(live, tmp_path / "out")
    ids = tiny.ids(6, 0, B=1)
    with pytest.raises(FmError, match="prefix-LM"):
        live(ids, token_type_ids=torch.ones_like(ids))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["family"] == NAME
