"""MiniMax-M3 beyond the family tests (which run the tiny model through tiny.FAMILIES with RoPE over the whole head):
its block-sparse layers against transformers at tp 1, 2 and 4 where blocks of 4 keys leave most keys out, RoPE over
part of each head (transformers' class turns the whole head, so its reference is narrowed), decode steps eager and
graph-safe, that the block choice is applied, the manifest, and an indexer that does not match the kv heads."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.manifest import kv_cache_bytes
from fmconvert.pipeline import Options, convert
from fmconvert.verify import checkpoint_rope_width


def _hf(ids, rotary_dim=None, **kw):
    """transformers' logits; with rotary_dim, its RoPE narrowed to that many channels, as the checkpoint turns."""
    hf = tiny.build("minimax_m3", **({"rotary_dim": rotary_dim} if rotary_dim else {}), **kw)
    with torch.no_grad():
        if rotary_dim is None:
            return hf(ids).logits
        theta = hf.config.rope_parameters["rope_theta"]
        with checkpoint_rope_width(hf, rotary_dim, theta):
            return hf(ids).logits


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir("minimax_m3"), "minimax_m3", tmp_path, 18, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [dict(index_local_blocks=2, index_topk_blocks=3), dict(index_block_size=3)])
def test_other_block_choices_match_transformers(model_dir, tmp_path, override):
    src = model_dir("minimax_m3", **override)
    assert max(tiny.errors_against_transformers(src, "minimax_m3", tmp_path, 18, tp=2, **override)) < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_rope_over_part_of_each_head(model_dir, tmp_path, tp):
    """rotary_dim 8 of 16: the attention's and the indexer's q and k turn their first 8 channels."""
    convert(model_dir("minimax_m3", rotary_dim=8), tmp_path / "out", Options(tp=tp), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]
    assert m["position"]["rotary_dim"] == 8
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(0))
    want = _hf(ids, rotary_dim=8)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", tp, lambda mm: mm(ids))) < 1e-5


def test_decode_steps_match_transformers_eager_and_graph_safe(model_dir, tmp_path):
    """Steps from the 5th token to the 18th: the chosen blocks of the cache so far (eager), of the whole static
    cache (decode_step)."""
    convert(model_dir("minimax_m3"), tmp_path / "out", Options(tp=2), progress=False)
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(1))
    want = _hf(ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 4)):
        assert tiny.rel(eager, want[:, 3:]) < 1e-5 and tiny.rel(graph, want[:, 3:]) < 1e-5


def test_the_block_choice_is_applied(model_dir, tmp_path):
    """Attending to every block, or with no latest block forced in, moves the logits."""
    from fmconvert.runtime.load import load
    convert(model_dir("minimax_m3"), tmp_path / "out", Options(tp=1), progress=False)
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(2))
    want = _hf(ids)

    def moved(change) -> float:
        m = load(tmp_path / "out")
        change(m.spec["block_sparse"])
        return tiny.rel(m(ids), want)

    assert moved(lambda b: None) < 1e-5
    assert moved(lambda b: b.update(topk=100)) > 1e-3
    assert moved(lambda b: b.update(local=0)) > 1e-4


def test_the_manifest(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("minimax_m3"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["block_sparse"] == {"heads": 2, "dim": 16, "block": 4, "topk": 2, "local": 1, "layers": [1, 2]}
    assert sp["activation"] == "swiglu_oai" and sp["norm"] == "rms_plus_one" and sp["dense_layers"] == [0]
    t = m["ranks"][1]["tensors"]
    assert "layers.0.block_index_q.weight" not in t and t["layers.1.block_index_q.weight"]["shape"] == [32, 64]
    assert t["layers.2.block_index_k_norm.weight"]["dtype"] == "float32"       # replicated, float
    full, _, _ = kv_cache_bytes(sp, m["parallel"], 4)       # a rank's bytes a token: its kv head's k and v in 3
    assert full == 4 * (3 * 2 * 16 + 2 * 16)                 # layers, and the two sparse layers' block keys
    cache = tiny.on_ranks(tmp_path / "out", 2, lambda mm: [None if x is None else tuple(x.shape)
                                                          for x in mm.new_cache(1, 8).index_k])
    assert cache[0] == [None, (1, 8, 16), (1, 8, 16)]


def test_an_indexer_head_count_other_than_the_kv_heads_is_refused(model_copy, tmp_path):
    tiny.refuses(model_copy("minimax_m3"), tmp_path / "out", "one head per kv head", index_n_heads=4)


def test_the_published_checkpoint_verifies_with_rope_over_part_of_each_head(model_dir, tmp_path):
    """The vision-language checkpoint as published (MiniMax's names, through the wrapper) with rotary_dim 8 of 16:
    verify narrows the reference's RoPE (its language model's, not the vision tower's) and passes."""
    from fmconvert.verify import verify
    src = model_dir("minimax_m3_vl", text_config={**tiny.CONFIGS["minimax_m3_vl"][2]["text_config"], "rotary_dim": 8})
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    r = verify(src, tmp_path / "out", tokens=32)
    assert not r["failures"] and "first 8 dimensions" in r["end_to_end"]["reference_note"]


def test_a_prompt_scored_and_attended_a_few_queries_at_a_time(model_dir, tmp_path, monkeypatch):
    """A long prompt's scores and masks are made QUERY_CHUNK queries at a time: with chunks of 5 the 18-token prompt
    takes four, and the logits are transformers' still (through a cache too, then a decode step)."""
    from fmconvert.runtime import model
    monkeypatch.setattr(model, "QUERY_CHUNK", 5)
    src = model_dir("minimax_m3")
    assert max(tiny.errors_against_transformers(src, "minimax_m3", tmp_path, 18, tp=2)) < 1e-5
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(3))
    want = _hf(ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 12)):
        assert tiny.rel(eager, want[:, 11:]) < 1e-5 and tiny.rel(graph, want[:, 11:]) < 1e-5
