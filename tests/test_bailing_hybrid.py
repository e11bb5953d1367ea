"""Ling 2.5's hybrid (BailingHybridForCausalLM) beyond the family tests (which run bailing_hybrid through
tiny.FAMILIES: KDA with full-width decay and gate projections and a bounded decay, latent attention gated per head,
grouped sigmoid routing): its config's variants against transformers at tp 1, 2 and 4, decode steps through the
cache, that each of its own pieces is applied, what the manifest records, and a bad bound."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("override", [
    {},
    dict(kda_safe_gate=False),                # Kimi Linear's unbounded decay
    dict(q_lora_rank=16, kda_lower_bound=-2.0),
    dict(q_lora_rank=16, attention_bias=True),    # every projection biased, the query's down projection too
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override, tp):
    src = model_dir("bailing_hybrid", **override)
    assert max(tiny.errors_against_transformers(src, "bailing_hybrid", tmp_path, 12, tp=tp, **override)) < 1e-5


def test_decode_steps_match_transformers(model_dir, tmp_path):
    convert(model_dir("bailing_hybrid"), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny.build("bailing_hybrid")(ids).logits
    cache = m.new_cache(2, 12)
    got = torch.cat([m(ids[:, :5], cache)] + [m(ids[:, j:j + 1], cache) for j in range(5, 12)], dim=1)
    assert tiny.rel(got, want) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    """Without the attention layer's gate, or with Kimi's unbounded decay in place of the bounded one, the logits
    move by more than 1e-3."""
    convert(model_dir("bailing_hybrid"), tmp_path / "out", Options(), progress=False)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny.build("bailing_hybrid")(ids).logits
    m = load(tmp_path / "out")
    assert tiny.rel(m(ids), want) < 1e-5
    del m.spec["linear_attn"]["decay_bound"]
    assert tiny.rel(m(ids), want) > 1e-3
    m = load(tmp_path / "out")
    m.blocks[1].t = {k: v for k, v in m.blocks[1].t.items() if k != "attn_gate.weight"}
    assert tiny.rel(m(ids), want) > 1e-3


def test_the_manifest_records_the_gates_and_the_bound(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("bailing_hybrid"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["linear_attn"]["gates"] == "full" and sp["linear_attn"]["decay_bound"] == -5.0
    assert sp["linear_layers"] == [0, 2] and sp["mla"]["q_rank"] == 0 and sp["attn_gate_heads"]
    assert sp["dense_layers"] == [0] and sp["router"] == "sigmoid" and sp["router_groups"] == 4
    t = m["ranks"][1]["tensors"]
    assert t["layers.1.attn_gate.weight"]["shape"] == [2, 64]           # this rank's two heads' gate rows
    assert t["layers.0.lin_in.weight"]["shape"] == [2 * 32 + 32 + 2 + 32 + 32, 64]    # q|k|v|b|f|g, two heads
    assert "layers.0.lin_f_b.weight" not in t and "layers.1.attn_gate.weight" not in m["quantization"]["tensors"]


def test_a_positive_decay_bound_is_refused_in_one_line(model_copy, tmp_path):
    src = model_copy("bailing_hybrid")
    cfg = json.loads((src / "config.json").read_text())
    cfg["kda_lower_bound"] = 5.0
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="kda_lower_bound must be a negative number"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
