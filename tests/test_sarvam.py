"""Sarvam-30B and Sarvam-105B beyond the family tests (which run both tiny models as transformers saves them:
Sarvam-30B as a Glm4MoeForCausalLM with model_type sarvam_moe and its own tensor names, Sarvam-105B as a
DeepseekV3ForCausalLM with model_type sarvam_mla): configs as Sarvam publishes them, tp 4, and that each saved
architecture is taken over by the Sarvam table only under Sarvam's model_type."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.verify import verify


def _edit(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["sarvam_moe", "sarvam_mla"])
@pytest.mark.parametrize("tp", [1, 4])
def test_saved_checkpoints_match_transformers(model_dir, tmp_path, name, tp):
    assert max(tiny.errors_against_transformers(model_dir(name), name, tmp_path, 12, tp=tp)) < 1e-5


def test_sarvam_30b_as_published(model_copy, tmp_path):
    """architectures SarvamMoEForCausalLM, and the config's own key names (num_experts, use_qkv_bias)."""
    src = model_copy("sarvam_moe")
    cfg = json.loads((src / "config.json").read_text())
    _edit(src, architectures=["SarvamMoEForCausalLM"], num_experts=cfg["n_routed_experts"], n_routed_experts=None,
          use_qkv_bias=cfg["attention_bias"], attention_bias=None)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]
    assert (m["family"], m["architecture"]) == ("sarvam_moe", "SarvamMoEForCausalLM")
    assert m["num_experts"] == 8 and m["router"] == "sigmoid" and m["router_groups"] == 4
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny.build("sarvam_moe")(ids).logits
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids))) < 1e-5
    assert verify(src, tmp_path / "out")["passed"]


def test_sarvam_105b_is_deepseek_v3(model_copy, tmp_path):
    src = model_copy("sarvam_mla")
    _edit(src, architectures=["SarvamMLAForCausalLM"])
    convert(src, tmp_path / "out", Options(), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]
    assert (m["family"], m["architecture"]) == ("deepseek_v3", "SarvamMLAForCausalLM")
    assert verify(src, tmp_path / "out")["passed"]


@pytest.mark.parametrize("name, family, arch", [("glm4_moe", "glm4_moe", "Glm4MoeForCausalLM"),
                                                ("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM")])
def test_the_classes_own_checkpoints_stay_with_their_tables(model_dir, tmp_path, name, family, arch):
    m = tiny.converted_manifest(model_dir(name), tmp_path / "out")["model"]
    assert (m["family"], m["architecture"]) == (family, arch)


def test_a_sarvam_30b_checkpoint_under_glm_s_model_type_is_refused(model_copy, tmp_path):
    src = model_copy("sarvam_moe")
    _edit(src, model_type="glm4_moe")
    with pytest.raises(FmError, match="missing tensor"):    # GLM's table finds none of Sarvam's attention names
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
