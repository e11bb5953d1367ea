"""Qwen4-Exp beyond the family tests (which run the tiny model through tiny.FAMILIES): against transformers at tp 1,
2 and 4 and in variants; decode steps, eager and graph-safe, past the QSA budget and across an eos; a prompt in
pieces; left padding; that each of its pieces is applied (the copies' gated mixes, the QSA choice, the n-gram
features and their conv, the sigmoid output gate); the hash tables against transformers' own buffers; the n-gram
table split along its width; a checkpoint whose table is stored in uneven pieces; the vision-language checkpoint;
bad configs."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert

NAME = "qwen4_exp"


def _ids(T=20, seed=0):
    ids = tiny.ids(T, seed)
    ids[0, 7] = 2               # an eos inside: the n-grams after it restart
    return ids


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME), NAME, tmp_path, 20, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [
    dict(output_gate_type="sigmoid", hc_count=2, norm_topk_prob=False),
    dict(ple_layer_ids=[1, 3], ngram_size=4, heads_per_ngram=1, ple_embed_dim=24, indexer_compress_ratio=3,
         indexer_budget=6),
    dict(ple_layer_ids=[], layer_types=["linear_attention", "full_attention", "linear_attention",
                                        "full_attention"]),
])
def test_variants_match_transformers(model_dir, tmp_path, override):
    """A sigmoid output gate with two copies and unnormalised routing; two n-gram layers of 2- to 4-grams with
    blocks of 3; no n-grams and two attention layers (the released config's spelling, full_attention). The tiny
    indexer has 8 heads: with few, two blocks often both score relu's 0, and which of a tie transformers' topk keeps
    is its own (a different choice, not an error)."""
    src = model_dir(NAME, **override)
    ids = _ids(20, 3)
    want = tiny.hf_logits(NAME, ids, **override)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))) < 1e-5


def test_decode_steps_a_prompt_in_pieces_and_padding_match_transformers(model_dir, tmp_path):
    """Steps from 3 and from 9 tokens out to 24, eager and graph-safe (the static cache's blocks scored whole);
    pieces of 5, 1 and 18 tokens; a row padded on the left by 5."""
    convert(model_dir(NAME), tmp_path / "out", Options(tp=2), progress=False)
    ids = _ids(24, 1)
    want = tiny.hf_logits(NAME, ids)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 3)
    assert tiny.decode_matches(tmp_path / "out", 2, ids, want, 9)
    assert tiny.pieces_match(tmp_path / "out", 2, ids, want)
    assert tiny.padding_matches(tmp_path / "out", 2, NAME, ids, 5)


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 20, 2)

    def each(slot, f, where=lambda b: True):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks if slot in b.t and where(b)]

    def dense(m):          # attention over every visible key: the QSA choice ignored
        for b in m.blocks:
            b._qsa_keep = lambda *a, **k: None
    assert moved(lambda m: None) < 1e-5
    assert moved(dense) > 1e-3
    assert moved(each("attn_hc.inject", lambda w: w.flip(0))) > 1e-3
    assert moved(each("mlp_hc.up", lambda w: w.flip(0))) > 1e-3
    assert moved(lambda m: m.g.__setitem__("hc_head.norm", m.g["hc_head.norm"].flip(0))) > 1e-3
    assert moved(each("ngram_embed.weight", lambda w: w.flip(0))) > 1e-3
    assert moved(each("ngram_conv.weight", lambda w: w * 0)) > 1e-3
    assert moved(lambda m: m.spec["ngram"].update(eos=5)) > 1e-4
    assert moved(each("qsa_k_norm.weight", lambda w: w.flip(0))) > 1e-4
    assert moved(lambda m: m.spec["linear_attn"].update(gate="sigmoid")) > 1e-3


def test_the_hash_tables_and_the_shards(model_dir, tmp_path):
    """The multipliers and prime table sizes fmconvert makes from the config are transformers' own buffers; each
    rank holds half of every row of the n-gram table; the indexer, the mixes and the table's readers replicated."""
    from safetensors.torch import load_file
    src = model_dir(NAME)
    m = tiny.converted_manifest(src, tmp_path / "out", tp=2, int8=True, group_size=16)
    sp, stored = m["model"], load_file(str(src / "model.safetensors"))
    prefix = "model.layers.1.ple.ple_embedding."
    tab = sp["ngram"]["tables"]["1"]
    assert tab["multipliers"] == stored[prefix + "layer_multipliers"].tolist()
    assert tab["sizes"] == stored[prefix + "ngram_heads_vocab_sizes"].tolist() == [53, 59, 61, 67]
    assert tab["offsets"] == stored[prefix + "ngram_heads_offsets"].tolist() and tab["rows"] == 240
    assert sp["residual"] == "gated_hyper" and sp["hyper"] == {"streams": 3, "rank": 16} and not sp["final_norm"]
    assert sp["qsa"] == {"heads": 8, "dim": 16, "budget": 4, "rate": 2} and sp["ngram"]["layers"] == [1]
    assert sp["linear_layers"] == [0, 1, 2] and sp["position"]["rotary_dim"] == 8
    for r in m["ranks"]:
        t = r["tensors"]
        assert t["layers.1.ngram_embed.weight"]["shape"] == [240, 4] and t["layers.1.ngram_key.weight"]["shape"] == \
            [192, 32]
        assert t["layers.3.qsa_qk.weight"]["shape"] == [144, 64] and t["layers.0.attn_hc.down"]["shape"] == [16, 192]
        assert t["hc_head.up"]["shape"] == [192, 16] and "hc_head.inject" not in t
        assert "layers.0.ngram_embed.weight" not in t and "layers.1.qsa_qk.weight" not in t
        assert t["layers.1.lin_in.weight"]["dtype"] == "int8" and t["layers.1.ngram_key.weight"]["dtype"] == "float32"
    halves = [load_file(str(tmp_path / "out" / r["tensors"]["layers.1.ngram_embed.weight"]["file"]))
              ["layers.1.ngram_embed.weight"] for r in m["ranks"]]
    whole = torch.cat([stored[prefix + f"ngram_embedding.shard_{p}.weight"] for p in range(2)])
    assert torch.equal(torch.cat(halves, 1), whole)


def test_a_table_stored_in_uneven_pieces(model_dir, tmp_path):
    """split_ngram_parts 7: transformers saves the 240 rows as torch.chunk does, six of 35 and one of 30."""
    from safetensors import safe_open
    src = model_dir(NAME, split_ngram_parts=7)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert [f.get_slice(f"model.layers.1.ple.ple_embedding.ngram_embedding.shard_{p}.weight").get_shape()[0]
                for p in range(7)] == [35] * 6 + [30]
    ids = _ids(12, 4)
    convert(src, tmp_path / "out", Options(tp=1), progress=False)
    assert tiny.rel(tiny.on_ranks(tmp_path / "out", 1, lambda m: m(ids))[0],
                    tiny.hf_logits(NAME, ids, split_ngram_parts=7)) < 1e-5


def test_the_vision_language_checkpoint_converts_its_language_model(model_dir, tmp_path):
    """Qwen4ExpForConditionalGeneration: the tower left out, the same logits as the text model for text."""
    import transformers
    cfg = transformers.Qwen4ExpConfig(text_config=dict(tiny.CONFIGS[NAME][2]), vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64), image_token_id=100,
        video_token_id=99, vision_start_token_id=98, vision_end_token_id=97)
    torch.manual_seed(0)
    hf = transformers.Qwen4ExpForConditionalGeneration(cfg).eval()
    text = tiny.build(NAME)
    hf.model.language_model.load_state_dict(text.model.state_dict())
    hf.lm_head.load_state_dict(text.lm_head.state_dict())
    hf.save_pretrained(tmp_path / "src")
    m = tiny.converted_manifest(tmp_path / "src", tmp_path / "out", tp=2)
    assert m["model"]["architecture"] == "Qwen4ExpForConditionalGeneration" and m["source"]["dropped"]["tensors"] > 0
    ids = _ids(14, 5)
    with torch.no_grad():
        want = text(ids).logits
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids))) < 1e-5


@pytest.mark.parametrize("edit,match", [
    (dict(hc_lowrank=0), "hc_lowrank must be a positive integer"),
    (dict(hc_count=40), "hc_count must be an integer from 2 to 16"),
    (dict(indexer_budget=5), "indexer_budget must be divisible by indexer_compress_ratio"),
    (dict(indexer_kv_heads=2), "requires indexer_kv_heads=1"),
    (dict(ple_layer_ids=[4]), "PLE is only supported on linear_attention layers"),
    (dict(ple_embed_dim=30), "ple_embed_dim must be divisible"),
    (dict(output_gate_type="gelu"), "output gate activation: gelu"),
])
def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    """transformers' own checks name most of these (fmconvert makes the same ones on what it reads)."""
    tiny.refuses(model_copy(NAME), tmp_path / "out", match, **edit)


def test_tp_must_divide_the_n_gram_tables_width(model_dir, tmp_path):
    with pytest.raises(FmError, match="does not divide the n-gram tables' width"):
        convert(model_dir(NAME, ple_embed_dim=24), tmp_path / "out", Options(tp=4), progress=False)


def test_int8_embeddings_quantize_the_n_gram_tables(model_dir, tmp_path):
    """--int8-embeddings takes the n-gram tables too (Qwen4-Exp's are tens of GB): each rank's slice of a row in
    groups, looked up and dequantized on the fly; the logits stay close to transformers'."""
    m = tiny.converted_manifest(model_dir(NAME), tmp_path / "out", tp=2, int8=True, group_size=16,
                                int8_embeddings=True)
    t = m["ranks"][1]["tensors"]
    assert t["layers.1.ngram_embed.weight"]["dtype"] == "int8" and t["layers.1.ngram_embed.weight"]["shape"] == [240, 4]
    assert t["layers.1.ngram_embed.weight_scale"]["shape"] == [240, 1]
    ids = _ids(16, 6)
    want = tiny.hf_logits(NAME, ids)
    for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids)):
        assert tiny.rel(g, want) < 3e-2 and (g.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_a_graph_safe_step_pools_only_its_own_block(model_dir, tmp_path):
    """After a prompt, the complete blocks' keys are in the cache's table: a graph-safe step reads them there and
    pools only its own block's raw keys, so wiping the earlier raw keys changes nothing (rereading the whole
    context every step would)."""
    convert(model_dir(NAME), tmp_path / "out", Options(tp=1), progress=False)
    from fmconvert.runtime.load import load
    m = load(tmp_path / "out")
    ids = _ids(16, 7)
    steps = []
    for wipe in (False, True):
        cache = m.new_cache(2, 20)
        m(ids[:, :12], cache)
        if wipe:
            for b in m.blocks:
                if cache.index_k[b.i] is not None:
                    cache.index_k[b.i][:, :12] = 0.0          # positions 0..11: blocks 0..5, all complete
        steps.append(m.decode_step(ids[:, 12:13], cache, torch.tensor([cache.length])))
    assert cache.qsa_blocks[3].abs().sum() > 0 and torch.equal(steps[0], steps[1])
