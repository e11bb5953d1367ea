"""DiffLlama beyond the family tests (which run the tiny model through tiny.FAMILIES): its differential attention
against transformers at tp 1, 2 and 4 and with grouped kv heads; decode steps, eager and graph-safe; left padding;
that each piece is applied (lambda, its layer-dependent init, the pair's norm, the pairing itself); the heads'
order on the ranks and back; tp that would split a pair across ranks."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.reassemble import reassemble

NAME = "diffllama"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 14, tp=tp)) < 1e-5


def test_grouped_kv_heads_decode_and_padding_match_transformers(model_dir, tmp_path):
    """4 kv heads for 8 q heads at tp 2: each rank one kv head of each half, and the two q heads of its group."""
    override = dict(num_key_value_heads=4)
    convert(model_dir(NAME, **override), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(14, 1)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, tiny.hf_logits(NAME, ids, **override), 3)
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 4, **override)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 14, 2)

    def each(attr, f):
        return lambda m: [setattr(b, attr, f(getattr(b, attr))) for b in m.blocks]

    assert moved(lambda m: None) < 1e-5
    assert moved(each("diff_lambda", lambda x: x * 0)) > 1e-3              # no difference: plain attention
    assert moved(each("diff_init", lambda x: 0.8)) > 1e-3                  # the init of every layer alike
    assert moved(each("diff_ones", lambda x: x * 2)) > 1e-3                # the pair's norm (weightless)
    assert moved(lambda m: [b.t.__setitem__("attn_out.weight", b.t["attn_out.weight"].flip(1))
                            for b in m.blocks]) > 1e-3


def test_the_heads_pair_on_each_rank_and_come_back_in_order(model_dir, tmp_path):
    """At tp 2, rank 0 holds q heads 0, 1 (first half) and 4, 5 (their partners), rank 1 heads 2, 3, 6, 7; the
    float roundtrip gives transformers' q|k|v back exactly."""
    from safetensors.torch import load_file
    src = model_dir(NAME)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    stored = load_file(str(src / "model.safetensors"))
    q = stored["model.layers.0.self_attn.q_proj.weight"].view(8, 8, 64)
    shard = load_file(str(tmp_path / "out" / "rank1-00001.safetensors"))["layers.0.qkv.weight"]
    assert torch.equal(shard[:4 * 8].view(4, 8, 64), q[[2, 3, 6, 7]])
    _, back = reassemble(tmp_path / "out")
    assert torch.equal(back["model.layers.0.self_attn.q_proj.weight"], stored["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(back["model.layers.1.self_attn.v_proj.weight"], stored["model.layers.1.self_attn.v_proj.weight"])


def test_the_cache_size_counts_the_doubled_heads(model_dir, tmp_path):
    """The KV cache inspect reports is what the runtime allocates: 3 layers x k and v x 8 heads x 2 x 8 channels."""
    from fmconvert.manifest import kv_cache_bytes
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=1)
    full, windowed, _ = kv_cache_bytes(m["model"], m["parallel"], 4)
    cache = tiny.on_ranks(tmp_path / "out", 1, lambda mm: mm.new_cache(1, 10))[0]
    assert full == 3 * 2 * 8 * 16 * 4 == sum(k[0, :, :1].numel() + v[0, :, :1].numel() for k, v in
                                             zip(cache.k, cache.v)) * 4 and windowed == 0


def test_tp_must_keep_each_pair_on_one_rank(model_dir, tmp_path):
    with pytest.raises(FmError, match="tp=4 must divide half the heads"):
        convert(model_dir(NAME, num_key_value_heads=4), tmp_path / "out", Options(tp=4), progress=False)
