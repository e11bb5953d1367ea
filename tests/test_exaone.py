"""EXAONE 3.x beyond the family tests (which run the tiny model as transformers saves it: architectures
LlamaForCausalLM, model_type exaone, EXAONE's own tensor names): a config.json as LG publishes it (ExaoneForCausalLM,
its own key names, Llama 3 RoPE scaling), and that the model_type still has to belong with the architecture."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.verify import verify

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}


def test_a_config_as_published_matches_transformers(model_copy, tmp_path):
    src = model_copy("exaone", rope_parameters={**ROPE, "rope_theta": 1e6})
    cfg = json.loads((src / "config.json").read_text())
    for new, old in (("num_layers", "num_hidden_layers"), ("layer_norm_epsilon", "rms_norm_eps"),
                     ("activation_function", "hidden_act")):
        cfg[new] = cfg.pop(old)
    cfg.pop("rope_parameters")
    cfg.update(architectures=["ExaoneForCausalLM"], rope_theta=1e6, rope_scaling=ROPE)
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["model"]["family"], m["model"]["architecture"]) == ("exaone", "ExaoneForCausalLM")
    assert m["model"]["position"]["rope_type"] == "llama3" and m["model"]["position"]["theta"] == 1e6
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))    # past 16: scaled RoPE
    with torch.no_grad():
        want = tiny.build("exaone", rope_parameters={**ROPE, "rope_theta": 1e6})(ids).logits
    assert max(tiny.rel(g, want) for g in tiny.on_ranks(tmp_path / "out", 2, lambda mm: mm(ids))) < 1e-5
    assert verify(src, tmp_path / "out")["passed"]


def test_the_saved_checkpoint_is_served_by_the_exaone_table(model_dir, tmp_path):
    src = model_dir("exaone")
    assert json.loads((src / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    convert(src, tmp_path / "out", Options(), progress=False)
    assert load(tmp_path / "out").spec["family"] == "exaone"


def test_another_model_type_under_that_class_is_still_refused(model_copy, tmp_path):
    src = model_copy("exaone")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError):      # the llama table reads it, and finds none of its tensor names
        convert(src, tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
