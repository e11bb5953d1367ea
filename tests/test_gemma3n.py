"""Gemma 3n beyond the family tests (which run the tiny model through tiny.FAMILIES): against transformers at tp 1, 2
and 4 and in variants of its config; decode steps, eager and graph-safe, through the shared caches; that each of its
own pieces is applied (AltUp's prediction, correction and scale, LAuReL, the gate's sparsity, the per-layer table's
cut-off); the multimodal checkpoint; the manifest; bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.pipeline import Options, convert


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    """Ids past the per-layer table's 90 included; the window of 4 passed; the first layer's gate thinned."""
    assert max(tiny.errors_against_transformers(model_dir("gemma3n"), "gemma3n", tmp_path, 14, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [
    dict(altup_correct_scale=False, activation_sparsity_pattern=[0.5, 0.8, 0.0, 0.3], tie_word_embeddings=False),
    dict(num_kv_shared_layers=0, intermediate_size=[96] * 4, laurel_rank=4),
])
def test_variants_match_transformers(model_dir, tmp_path, override):
    """No scale on the corrected copy, sparsity in three layers at tp 2 (means and deviations over both ranks'
    units), an untied head; no shared caches, the width given per layer, another LAuReL rank."""
    src = model_dir("gemma3n", **override)
    assert max(tiny.errors_against_transformers(src, "gemma3n", tmp_path, 14, tp=2, **override)) < 1e-5


def test_decode_steps_match_transformers_eager_and_graph_safe(model_dir, tmp_path):
    """The last two layers read the caches of the first two (the windowed one's ring wraps), the copies ride through
    each step."""
    convert(model_dir("gemma3n"), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(16, 1)
    want = tiny.hf_logits("gemma3n", ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 5)):
        assert tiny.rel(eager, want[:, 4:]) < 1e-5 and tiny.rel(graph, want[:, 4:]) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    moved = tiny.moved_by("gemma3n", model_dir("gemma3n"), tmp_path / "out", 14, 2)

    def each(slot, f):
        return lambda m: [b.t.__setitem__(slot, f(b.t[slot])) for b in m.blocks]

    assert moved(lambda m: None) < 1e-5
    assert moved(each("altup_predict.weight", lambda w: w * 0)) > 1e-3
    assert moved(each("altup_correct.weight", lambda w: w * 0)) > 1e-3
    assert moved(lambda m: m.spec["altup"].update(correct_scale=False)) > 1e-3
    assert moved(each("laurel_right.weight", lambda w: w * 0)) > 1e-3
    assert moved(lambda m: setattr(m.blocks[0], "sparsity", 0.0)) > 1e-3
    assert moved(lambda m: m.g.__setitem__("altup_unembed.weight", m.g["altup_unembed.weight"].flip(0))) > 1e-3


def test_ids_past_the_per_layer_table_read_its_first_row(model_dir, tmp_path):
    """With row 0 not the padding's zeros (pad id 5), ids from 90 on read it, as transformers' do; the padding rows
    the vocab split adds would give zeros."""
    convert(model_dir("gemma3n", pad_token_id=5), tmp_path / "out", Options(tp=2), progress=False)
    ids = torch.randint(85, 101, (2, 14), generator=torch.Generator().manual_seed(3))
    want = tiny.hf_logits("gemma3n", ids, pad_token_id=5)
    got = tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))
    assert max(tiny.rel(g, want) for g in got) < 1e-5

    def cut_off_ignored(m):
        m.spec["per_layer_vocab"] = 0
        return m(ids)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, cut_off_ignored)) > 1e-4


def test_the_multimodal_checkpoint_converts_its_language_model(model_copy, tmp_path):
    """Gemma3nForConditionalGeneration as saved: the language model under model.language_model., vision and audio
    towers and their embedders beside it, left out and counted."""
    import transformers
    src = model_copy("gemma3n")
    convert(src, tmp_path / "text", Options(tp=2), progress=False)
    text_cfg = json.loads((src / "config.json").read_text())
    t = load_file(str(src / "model.safetensors"))
    t = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
    t.update({"model.vision_tower.timm_model.conv_stem.weight": torch.zeros(8, 3, 3, 3),
              "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": torch.zeros(8, 16),
              "model.embed_vision.embedding.weight": torch.zeros(4, 64),
              "model.embed_audio.embedding_projection.weight": torch.zeros(64, 16)})
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = transformers.Gemma3nConfig(text_config={k: v for k, v in text_cfg.items()
                                                  if k not in ("architectures", "transformers_version")}).to_dict()
    cfg["architectures"] = ["Gemma3nForConditionalGeneration"]
    (src / "config.json").write_text(json.dumps(cfg))
    m = tiny.converted_manifest(src, tmp_path / "vl", tp=2)
    assert m["source"]["dropped"]["tensors"] == 4 and m["model"]["family"] == "gemma3n"
    ids = tiny.ids(10, 3)
    a = tiny.on_ranks(tmp_path / "vl", 2, lambda mm: mm(ids))
    b = tiny.on_ranks(tmp_path / "text", 2, lambda mm: mm(ids))
    assert torch.equal(a[0], b[0])


def test_the_manifest_and_the_shards(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("gemma3n"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["residual"] == "altup" and sp["altup"] == {"streams": 4, "correct_scale": True, "laurel_rank": 8}
    assert sp["gate_sparsity"] == [0.95, 0.0, 0.0, 0.0] and sp["per_layer_vocab"] == 90
    assert sp["per_layer_input"] == 8 and sp["kv_source"] == [0, 1, 0, 1] and sp["logit_softcap"] == 30.0
    for r in m["ranks"]:        # the copies' weights replicated and float; the per-layer table split by vocab
        t = r["tensors"]
        assert t["altup_proj.weight"]["shape"] == [3 * 64, 64] and t["altup_proj.weight"]["dtype"] == "float32"
        assert t["layers.1.altup_predict.weight"]["shape"] == [16, 4] and t["layers.3.laurel_left.weight"]["shape"] \
            == [8, 64]
        assert t["ple_embed.weight"]["shape"] == [51, 4 * 8]
        assert "layers.3.k_norm.weight" not in t


def test_a_roundtrip_gives_back_the_per_layer_table(model_dir, tmp_path):
    from fmconvert.reassemble import reassemble
    src = model_dir("gemma3n")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    _, back = reassemble(tmp_path / "out")
    source = load_file(str(src / "model.safetensors"))
    assert torch.equal(back["model.embed_tokens_per_layer.weight"], source["model.embed_tokens_per_layer.weight"])


@pytest.mark.parametrize("edit,match", [
    (dict(altup_num_inputs=3), "a variant fmconvert does not support"),
    (dict(intermediate_size=[96, 96, 128, 96]), "one width for every layer"),
    (dict(vocab_size_per_layer_input=500), "vocab_size_per_layer_input a positive one up to the vocab size"),
])
def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("gemma3n"), tmp_path / "out", match, **edit)
