"""Zamba2 beyond the family tests (which run the tiny model through tiny.FAMILIES): against transformers at tp 1, 2
and 4 and in variants; decode steps, eager and graph-safe; a prompt in pieces; left padding; that each piece is
applied (the embeddings beside the stream, the adapters, the block's projection into the Mamba2 input only, the
gated norm's own eps, the softmax scale); that a shared block's weights are stored once; bad configs."""

from __future__ import annotations

import pytest

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "zamba2"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 14, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [
    dict(use_shared_attention_adapter=False, use_mem_rope=False, num_mem_blocks=1),
    dict(tie_word_embeddings=False),
    dict(mamba_ngroups=2, num_key_value_heads=2, use_shared_attention_adapter=False, rms_norm_eps=1e-3,
         layers_block_type=["hybrid", "linear_attention", "hybrid", "hybrid", "linear_attention", "hybrid"]),
])
def test_variants_match_transformers(model_dir, tmp_path, override):
    """No q|k|v adapters, no RoPE and one block for every hybrid layer; an untied head, with which transformers
    ties no block either (each hybrid layer runs its own copy, as stored); grouped B and C with GQA, a layer norm eps
    other than the gated norm's fixed 1e-5, and a hybrid first layer among four."""
    ids = tiny.ids(14, 3)
    want = tiny.hf_logits(NAME, ids, **override)
    convert(model_dir(NAME, **override), tmp_path / "out", Options(tp=2), progress=False)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))) < 1e-5


def test_decode_steps_pieces_and_padding_match_transformers(model_dir, tmp_path):
    convert(model_dir(NAME), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(14, 1)
    want = tiny.hf_logits(NAME, ids)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want)
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 4)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 14, 2)

    def each(slot, f):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks if slot in b.t]

    assert moved(lambda m: None) < 1e-5
    assert moved(lambda m: setattr(m, "embed", (lambda e: lambda *a: (r := e(*a), setattr(m, "embeds", r * 0))[0])(
        m.embed))) > 1e-3                                                   # the embeddings beside the stream
    assert moved(each("qkv.lora_up", lambda w: w * 0)) > 1e-4
    assert moved(each("mlp_in.lora_up", lambda w: w * 0)) > 1e-4
    assert moved(each("mem_proj.weight", lambda w: w.flip(0))) > 1e-3
    assert moved(lambda m: m.spec["ssm"].update(norm_eps=1.0)) > 1e-4      # its gated norm's own eps
    assert moved(lambda m: setattr(m, "scale", m.scale * 2 ** -0.5)) > 1e-4  # 1 / sqrt(head_dim / 2), not / 1


def test_a_shared_block_is_stored_once(model_dir, tmp_path):
    """Hybrid layers 1 and 5 run block 0, whose weights layer 1 holds; layer 3 holds block 1; each keeps its own
    adapters and projection. The shards hold every block's weights once, split over ranks like any layer's."""
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["block_parts"] == ["mixer", "hybrid"] * 3 and sp["linear_layers"] == list(range(6))
    assert sp["shared_blocks"] == {"count": 2, "rank": 4, "qkv_lora": True} and sp["attn_input"] == 128
    assert sp["head_dim"] == 32 and abs(sp["attn_scale"] - 16 ** -0.5) < 1e-12 and sp["ssm"]["norm_eps"] == 1e-5
    t = m["ranks"][0]["tensors"]
    for i in (1, 3):
        assert t[f"layers.{i}.qkv.weight"]["shape"] == [3 * 2 * 32, 128] and t[f"layers.{i}.qkv.weight"]["dtype"] == "int8"
        assert t[f"layers.{i}.mem_norm.weight"]["shape"] == [128]
    assert not any(n.startswith("layers.5.") and n.split(".", 2)[2].startswith(("qkv.weight", "attn_out.", "mlp_in.weight",
                                                                             "mem_norm.")) for n in t)
    assert t["layers.5.qkv.lora_up"]["shape"] == [3 * 2 * 32, 12] and t["layers.5.mem_proj.weight"]["shape"] == [64, 64]
    assert not any(n.startswith("layers.0.") and "qkv" in n for n in t)
    loaded = tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm.blocks[5].t["attn_out.weight"] is
                           mm.blocks[1].t["attn_out.weight"])
    assert loaded == [True, True]


def test_tp_must_keep_whole_mamba_heads(model_dir, tmp_path):
    with pytest.raises(FmError, match="does not divide"):
        convert(model_dir(NAME), tmp_path / "out", Options(tp=8), progress=False)


def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path):
    tiny.refuses(model_copy(NAME), tmp_path / "out", "num_mem_blocks", num_mem_blocks=7)
