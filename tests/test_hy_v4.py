"""HY-V4 beyond the family tests (which run the tiny model through tiny.FAMILIES): its prompt and decode steps past
the indexer's top-k against transformers at tp 1, 2 and 4, eager and graph-safe; that each of its own pieces is
applied (the hyper-connections' weights, the sinks, the per-channel gate, the experts' clamp, the indexer's RoPE on
its last columns); the manifest; bad configs."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


def _hf(ids, **kw):
    with torch.no_grad():
        return tiny.build("hy_v4", **kw)(ids).logits


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp):
    assert max(tiny.errors_against_transformers(model_dir("hy_v4"), "hy_v4", tmp_path, 14, tp=tp)) < 1e-5


@pytest.mark.parametrize("override", [dict(hc_mult=2, hc_magnitude=1.5),
                                      dict(indexer_types=None, n_group=2, topk_group=1)])
def test_variants_match_transformers(model_dir, tmp_path, override):
    """Two copies with another ceiling; an indexer in every layer with grouped routing."""
    src = model_dir("hy_v4", **override)
    assert max(tiny.errors_against_transformers(src, "hy_v4", tmp_path, 14, tp=2, **override)) < 1e-5


def test_a_limit_at_or_below_zero_clamps_nothing(model_dir, tmp_path):
    """HYV4Config documents swiglu_limit <= 0 as no clamp, while transformers' experts clamp by it regardless (at
    -1: every gate at -1, every up at -1); the table follows the config's meaning, which equals a limit too large to
    bind."""
    convert(model_dir("hy_v4", swiglu_limit=-1.0), tmp_path / "out", Options(tp=2), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["experts_glu_limit"] == 0.0
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(0))
    want = _hf(ids, swiglu_limit=1e9)
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))) < 1e-5


def test_decode_steps_past_topk_match_transformers_eager_and_graph_safe(model_dir, tmp_path):
    """A 4-token prompt, then steps to 14 tokens: the sinks and the copies ride through the absorbed decode step
    over the indexer's rows (eager) and over the whole static cache (decode_step)."""
    convert(model_dir("hy_v4"), tmp_path / "out", Options(tp=2), progress=False)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(1))
    want = _hf(ids)
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 4)):
        assert tiny.rel(eager, want[:, 3:]) < 1e-5 and tiny.rel(graph, want[:, 3:]) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    convert(model_dir("hy_v4"), tmp_path / "out", Options(tp=1), progress=False)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(2))
    want = _hf(ids)

    def moved(change) -> float:
        m = load(tmp_path / "out")
        change(m)
        return tiny.rel(m(ids), want)

    assert moved(lambda m: None) < 1e-5
    assert moved(lambda m: m.spec["hyper"].update(magnitude=1.0)) > 1e-3
    assert moved(lambda m: [b.t.__setitem__("attn_hc.fn", b.t["attn_hc.fn"] * 0) for b in m.blocks]) > 1e-3
    assert moved(lambda m: m.g.__setitem__("hc_head.base", m.g["hc_head.base"].flip(0))) > 1e-3
    assert moved(lambda m: [setattr(b, "sinks", None) for b in m.blocks]) > 1e-3
    assert moved(lambda m: [b.t.pop("attn_gate.weight") for b in m.blocks]) > 1e-3
    assert moved(lambda m: setattr(m, "experts_activation", None)) > 1e-4       # the MLP's own: unclamped
    assert moved(lambda m: m.spec["mla"]["index"].update(rope_at="first")) > 1e-4


def test_the_manifest_and_the_shards(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("hy_v4"), tmp_path / "out", tp=2, int8=True, group_size=8)
    sp = m["model"]
    assert sp["residual"] == "hyper" and sp["hyper"] == {"streams": 3, "magnitude": 2.0, "eps": 1e-6}
    assert sp["experts_glu_limit"] == 0.3 and sp["attn_gate"] and not sp["attn_gate_heads"]
    assert sp["mla"]["index"]["rope_at"] == "last" and sp["mla"]["index"]["norm_eps"] == 1e-5
    assert sp["mla"]["index"]["layers"] == [0, 2] and sp["dense_layers"] == [0]
    for r in m["ranks"]:       # the connections replicated and float; the gate and the sinks this rank's heads
        t = r["tensors"]
        assert t["layers.1.attn_hc.fn"]["shape"] == [6, 3 * 64] and t["layers.1.attn_hc.fn"]["dtype"] == "float32"
        assert t["hc_head.fn"]["shape"] == [3, 3 * 64] and t["layers.3.mlp_hc.scale"]["shape"] == [2]
        assert t["layers.0.attn_gate.weight"]["shape"] == [2 * 16, 64]
        assert t["layers.0.attn_sinks.weight"]["shape"] == [2]
        assert "layers.1.index_q.weight" not in t and t["layers.2.index_q.weight"]["shape"] == [64, 32]


@pytest.mark.parametrize("edit,match", [
    (dict(hc_mult=1), "hc_mult must be an integer from 2 to 16"),
    (dict(hc_mult=40), "hc_mult must be an integer from 2 to 16"),
])
def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("hy_v4"), tmp_path / "out", match, **edit)


def test_a_bf16_output_keeps_the_fp32_tensors_fp32(model_dir, tmp_path):
    """The correction bias and the hyper-connection weights stay float32 in a bf16 output, bit for bit the
    source's, and the runtime keeps them so (transformers loads them in fp32 too); verify passes."""
    from safetensors.torch import load_file

    from fmconvert.verify import verify
    src = model_dir("hy_v4")
    m = tiny.converted_manifest(src, tmp_path / "out", tp=2, dtype="bf16")
    t = m["ranks"][0]["tensors"]
    assert m["dtype"] == "bfloat16" and t["layers.1.attn_norm.weight"]["dtype"] == "bfloat16"
    for name in ("layers.1.router.correction_bias", "layers.1.attn_hc.fn", "layers.3.mlp_hc.scale", "hc_head.base"):
        assert t[name]["dtype"] == "float32", name
    source = load_file(str(src / "model.safetensors"))
    shard = load_file(str(tmp_path / "out" / t["layers.1.router.correction_bias"]["file"]))
    assert torch.equal(shard["layers.1.router.correction_bias"], source["model.layers.1.mlp.gate.e_score_correction_bias"])
    blk = tiny.on_ranks(tmp_path / "out", 2, lambda mm: (mm.blocks[1].t["router.correction_bias"].dtype,
                                                          mm.blocks[1].t["attn_hc.fn"].dtype, mm.g["hc_head.fn"].dtype,
                                                          mm.blocks[1].t["attn_norm.weight"].dtype))
    assert blk[0] == (torch.float32, torch.float32, torch.float32, torch.bfloat16)
    assert not verify(src, tmp_path / "out", tokens=32)["failures"]


def test_the_multi_token_prediction_layers_are_left_out(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file
    src = model_copy("hy_v4")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.mtp_layers.0.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    m = tiny.converted_manifest(src, tmp_path / "out", tp=1)
    assert m["source"]["dropped"]["tensors"] == 1 and m["source"]["dropped"]["bytes"] == 64 * 128 * 4
