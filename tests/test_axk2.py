"""A.X K2 beyond the family tests (which run the tiny model through tiny.FAMILIES): against transformers at tp 1, 2
and 4 with its indexer picking 5 keys, with grouped routing, in decode steps (eager and graph-safe); that its gated
query and gated norms are applied; the manifest and a round trip through verify; a gated query without a q
bottleneck."""

from __future__ import annotations

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("override", [{}, dict(n_group=2, topk_group=1)])
def test_a_prompt_matches_transformers(model_dir, tmp_path, tp, override):
    src = model_dir("axk2", **override)
    assert max(tiny.errors_against_transformers(src, "axk2", tmp_path, 14, tp=tp, **override)) < 1e-5


def test_decode_steps_match_transformers_eager_and_graph_safe(model_dir, tmp_path):
    convert(model_dir("axk2"), tmp_path / "out", Options(tp=2), progress=False)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny.build("axk2")(ids).logits
    for eager, graph in tiny.on_ranks(tmp_path / "out", 2, lambda m: tiny.decode_steps(m, ids, 4)):
        assert tiny.rel(eager, want[:, 3:]) < 1e-5 and tiny.rel(graph, want[:, 3:]) < 1e-5


def test_the_gates_change_the_logits(model_dir, tmp_path):
    convert(model_dir("axk2"), tmp_path / "out", Options(tp=1), progress=False)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny.build("axk2")(ids).logits

    def moved(change) -> float:
        m = load(tmp_path / "out")
        change(m)
        return tiny.rel(m(ids), want)

    def drop(prefix):
        return lambda m: [b.t.pop(k) for b in m.blocks for k in list(b.t) if k.startswith(prefix)]

    def ungated_query(m):
        m.spec["mla"]["gated_q"] = False      # the q rows alone, read off the normed latent only
        for b in m.blocks:
            w = b.t["q_b.weight"].view(4, 12 + 16, 64)[:, :12, :32]
            b.t["q_b.weight"] = w.reshape(48, 32).contiguous()

    assert moved(lambda m: None) < 1e-5
    assert moved(drop("attn_norm_gate")) > 1e-3
    assert moved(drop("moe_norm_gate")) > 1e-3
    assert moved(ungated_query) > 1e-3


def test_the_manifest_and_verify(model_dir, tmp_path):
    from fmconvert.verify import verify
    src = model_dir("axk2")
    m = tiny.converted_manifest(src, tmp_path / "out", tp=2)
    sp = m["model"]
    assert sp["mla"]["gated_q"] and sp["norm_gate_rank"] == 6 and sp["dense_layers"] == [0]
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.q_b.weight"]["shape"] == [2 * (12 + 16), 2 * 32]        # this rank's heads: q | gate each
    assert t["layers.0.attn_norm_gate_down.weight"]["shape"] == [6, 64]
    assert "layers.0.moe_norm_gate_up.weight" not in t and t["layers.1.moe_norm_gate_up.weight"]["shape"] == [64, 6]
    r = verify(src, tmp_path / "out", tokens=32)         # reassembles every tensor: the dense norm's own name too
    assert not r["failures"] and r["tensors"]["count"] > 0


def test_a_gated_query_without_a_bottleneck_is_refused(model_copy, tmp_path):
    tiny.refuses(model_copy("axk2"), tmp_path / "out", "q_lora_rank", q_lora_rank=0)
