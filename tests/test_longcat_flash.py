"""LongCat-Flash beyond the family tests (which run the tiny model through tiny.FAMILIES): its config's variants
against transformers at tp 1, 2 and 4, that each of its own pieces is applied (the shortcut mixture's late join, the
identity experts, the latent attention's LoRA scales), what the manifest records, a checkpoint as published (no
identity experts' projections, a multi-token-prediction layer), and a bad identity expert count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.verify import verify


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("override", [
    {},
    dict(zero_expert_num=0),                        # no identity experts
    dict(attention_bias=True, router_bias=True),    # biased projections; the router's bias transformers never adds
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override, tp):
    src = model_dir("longcat_flash", **override)
    assert max(tiny.errors_against_transformers(src, "longcat_flash", tmp_path, 12, tp=tp, **override)) < 1e-5


def test_each_piece_changes_the_logits(model_dir, tmp_path):
    """Added at once instead of after the next layer, the mixture moves the logits; so does leaving out the identity
    experts' pass-through (as a rank other than 0 does) or the LoRA scales."""
    convert(model_dir("longcat_flash"), tmp_path / "out", Options(), progress=False)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny.build("longcat_flash")(ids).logits
    m = load(tmp_path / "out")
    assert tiny.rel(m(ids), want) < 1e-5
    m.spec["shortcut_experts"] = False
    assert tiny.rel(m(ids), want) > 1e-3
    m = load(tmp_path / "out")
    m.rank = 1
    assert tiny.rel(m(ids), want) > 1e-3
    mf = json.loads((tmp_path / "out" / "manifest.json").read_text())
    mf["model"]["row_scales"] = None
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(mf))
    assert tiny.rel(load(tmp_path / "out")(ids), want) > 1e-3


def test_the_manifest_records_pairs_the_shortcut_and_the_identity_experts(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("longcat_flash"), tmp_path / "out", tp=2, int8=True, group_size=16)
    sp = m["model"]
    assert sp["num_layers"] == 4 and sp["dense_layers"] == [1, 3] and sp["shortcut_experts"]
    assert sp["zero_experts"] == 4 and sp["num_experts"] == 8 and sp["router"] == "softmax"
    assert sp["row_scales"] == {"q_b": {"input": 1.0, "parts": [math.sqrt(2)]},
                                "kv_a_norm": {"input": 1.0, "parts": [math.sqrt(2)]}}
    t = m["ranks"][1]["tensors"]
    assert t["layers.2.router.weight"]["shape"] == [12, 64] and "layers.3.router.weight" not in t
    assert t["layers.2.shared_in.weight"]["shape"] == [96, 64] and t["layers.3.mlp_in.weight"]["shape"] == [96, 64]
    assert verify(model_dir("longcat_flash"), tmp_path / "out")["passed"]


def test_a_checkpoint_as_published(model_copy, tmp_path):
    """Meituan's checkpoints hold no projections for the identity experts, and a multi-token-prediction layer
    (model.mtp.*), left out and counted."""
    src = model_copy("longcat_flash")
    w = load_file(src / "model.safetensors")
    w = {k: v for k, v in w.items() if not any(f"experts.{e}." in k for e in range(8, 12))}
    w["model.mtp.layers.0.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["dropped"]["tensors"] == 1
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():      # transformers itself cannot load this checkpoint: it stacks every expert's gate|up
        want = tiny.build("longcat_flash")(ids).logits
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids))) < 1e-5


def test_a_negative_identity_expert_count_is_refused_in_one_line(model_copy, tmp_path):
    src = model_copy("longcat_flash")
    cfg = json.loads((src / "config.json").read_text())
    cfg["zero_expert_num"] = -1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="zero_expert_num must be a non-negative integer"):
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
