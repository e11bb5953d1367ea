"""Dots3 Note's language model beyond the family tests (which run the tiny model through tiny.FAMILIES with an
index_topk of 32): here the indexer picks 6 keys, against transformers at tp 1, 2 and 4; decode steps past the window
and past the choice, eager and graph-safe; a prompt in pieces longer than the window; left padding; the variants
without windows and without the indexer; that each of its own pieces is applied; what the manifest holds; bad
configs; the vision-language wrapper's config as published."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.runtime.ops import rope_tables

NAME = "dots3_note"
PICK = dict(index_topk=6)


def _converted(model_dir, tmp_path, tp=1, **override):
    src = model_dir(NAME, **override)
    convert(src, tmp_path / "out", Options(tp=tp), progress=False)
    return src, tmp_path / "out"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_the_indexer_thins_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir(NAME, **PICK), NAME, tmp_path, 14, tp=tp, **PICK)) < 1e-5


def test_decode_steps_pieces_and_padding_match_transformers(model_dir, tmp_path):
    """Steps from 3 tokens out to 14, eager and graph-safe: the windowed layers' latent rings (4 rows) wrap, and
    from the 7th key on the indexed layers attend to 6; pieces of 5, 1 and 8 tokens (more than the window); a row
    padded on the left by 5."""
    _, out = _converted(model_dir, tmp_path, tp=2, **PICK)
    ids = tiny.ids(14, 1)
    want = tiny.hf_logits(NAME, ids, **PICK)
    assert tiny.decode_matches(out, 2, ids, want, 3)
    assert tiny.pieces_match(out, 2, ids, want)
    assert tiny.padding_matches(out, 2, NAME, ids, 5, **PICK)


@pytest.mark.parametrize("override,index,local", [
    (dict(use_dsa=False), False, True), (dict(use_sliding_window=False, layer_types=None), True, False),
    (dict(num_hidden_layers=6, layer_types=None), True, True),
    (dict(attention_bias=True, norm_topk_prob=False), True, True)])
def test_variants_match_transformers(model_dir, tmp_path, override, index, local):
    """use_dsa false: full attention without an indexer outside the window; no windows: every layer indexed, one
    geometry (no per_layer_config); the released layout of layer kinds (indexed 0, 1 and 5 of 6); biased
    projections and unnormalised routing."""
    src = model_dir(NAME, **PICK, **override)
    assert max(tiny.errors_against_transformers(src, NAME, tmp_path, 14, tp=2, **PICK, **override)) < 1e-5
    mla = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["mla"]
    assert ("index" in mla, "local" in mla) == (index, local)


def test_the_wrapper_as_published_with_its_text_config_at_the_top_level(model_copy, tmp_path):
    """Dots3NoteForConditionalGeneration's published config.json has no text_config: the language model's keys
    sit beside the wrapper's own, and transformers makes its text_config of them."""
    src = model_copy("dots3_note_vl")
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    text.pop("model_type")
    (src / "config.json").write_text(json.dumps({**cfg, **text}))
    assert max(tiny.errors_against_transformers(src, "dots3_note_vl", tmp_path, 9, tp=1)) < 1e-5


def test_the_manifest_and_the_cache(model_dir, tmp_path):
    _, out = _converted(model_dir, tmp_path, tp=2)
    model = json.loads((out / "manifest.json").read_text())["model"]
    mla, pos = model["mla"], model["position"]
    assert mla["local"] == {"heads": 4, "q_rank": 32, "kv_rank": 32, "nope_dim": 16, "rope_dim": 16, "v_dim": 16,
                            "q_scale": 2 ** 0.5, "kv_scale": 2 ** 0.5}
    assert (mla["q_scale"], mla["kv_scale"], mla["norm_eps"], mla["index"]["layers"]) == (2.0, 2.0, 1e-5, [0, 2])
    assert (pos["rotary_dim"], pos["theta"], pos["local"]["rotary_dim"], pos["local"]["theta"]) == (8, 8e4, 16, 5e3)
    assert model["window_layers"] == [1, 3] and "layers.kv_a_rope_norm.weight" in model["slots"]

    def held(m):      # each rank: the windowed layers' 2 heads, their 48-wide latent rows in a ring of 4
        cache = m.new_cache(2, 20)
        return ([b.heads for b in m.blocks], [tuple(k.shape) for k in cache.k], [v.shape[-1] for v in cache.v])
    assert tiny.on_ranks(out, 2, held) == [([4, 2, 4, 2], [(2, 1, 20, 24), (2, 1, 4, 48), (2, 1, 20, 24),
                                                          (2, 1, 4, 48)], [16, 32, 16, 32])] * 2


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    """The window, the windowed layers' RoPE base, both latent scales, the rope part's norm and the gate each move
    the logits of 14 tokens (every key chosen by the indexer)."""
    moved = tiny.moved_by(NAME, model_dir(NAME), tmp_path / "out", 14, 2)

    def each(f):
        return lambda m: [f(b) for b in m.blocks]

    def unscale(which):
        def f(b):
            b.t[f"{which}_a_norm.weight"] = b.t[f"{which}_a_norm.weight"] / b.mla[f"{which}_scale"]
        return each(f)

    def local_base(m):
        tab = m._tables["local"]
        tab[0] = tab[0] * 0.5
        tab[2:] = rope_tables(tab[0], 64, tab[1])
    assert moved(lambda m: None) < 1e-5
    assert moved(each(lambda b: setattr(b, "window", 0))) > 1e-3
    assert moved(local_base) > 1e-3
    assert moved(unscale("q")) > 1e-3 and moved(unscale("kv")) > 1e-3
    assert moved(each(lambda b: b.t.pop("kv_a_rope_norm.weight"))) > 1e-3
    assert moved(each(lambda b: b.t.pop("attn_gate.weight"))) > 1e-3


def test_the_indexer_choice_and_its_rope_pairing_are_applied(model_dir, tmp_path):
    _, out = _converted(model_dir, tmp_path, **PICK)
    ids = tiny.ids(14, 3)
    want = tiny.hf_logits(NAME, ids, **PICK)
    m = load(out)
    assert tiny.rel(m(ids), want) < 1e-5
    ix = m.spec["mla"]["index"]
    ix["topk"] = 100
    assert tiny.rel(m(ids), want) > 1e-3
    ix["topk"], ix["rope_style"] = 6, "neox"
    assert tiny.rel(m(ids), want) > 1e-3


@pytest.mark.parametrize("edit,match", [
    (dict(rope_parameters={"indexed_attention": {"rope_type": "default", "rope_theta": 8e4,
                                                 "partial_rotary_factor": 0.25},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e3,
                                                 "partial_rotary_factor": 0.5}}),
     r"^config.json: rope_parameters.sliding_attention must be default RoPE"),
    (dict(layer_types=["indexed_attention", "sliding_attention", "full_attention", "sliding_attention"],
          rope_parameters={k: {"rope_type": "default", "rope_theta": 8e4, "partial_rotary_factor": f}
                           for k, f in (("indexed_attention", 0.25), ("full_attention", 0.25),
                                        ("sliding_attention", 0.5))}),
     r"^config.json: layer_types must hold indexed_attention or full_attention layers, not both"),
    (dict(layer_types=["sliding_attention", "indexed_attention", "indexed_attention", "sliding_attention"],
          per_layer_config={"0": {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
                                  "kv_lora_rank": 32, "qk_rope_head_dim": 16},
                            "3": {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
                                  "kv_lora_rank": 32, "qk_rope_head_dim": 16}}),
     r"^config.json: the first layer must be an indexed_attention one"),
    (dict(per_layer_config={**{str(i): {"num_attention_heads": 4, "num_key_value_heads": 4} for i in (0, 2)},
                            **{str(i): {"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
                                        "kv_lora_rank": 32, "qk_rope_head_dim": 16} for i in (1, 3)}}),
     r"^config.json: per_layer_config must give the sliding_attention layers one latent geometry"),
])
def test_bad_configs_are_refused_in_one_line(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy(NAME), tmp_path / "out", match, **edit)


def test_a_tp_that_splits_the_windowed_layers_heads_is_refused(model_dir, tmp_path):
    with pytest.raises(FmError, match=r"^tp=8 does not divide the sliding_attention layers' 4 heads"):
        convert(model_dir(NAME), tmp_path / "out", Options(tp=8), progress=False)
