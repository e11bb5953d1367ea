"""Thinking Machines' Inkling is refused by name, in one line, before anything is written: its attention adds a
relative-position bias that each token's hidden state mixes per head (r_proj through rel_logits_proj), which
fmconvert's attention paths do not take. Both the language model (InklingForCausalLM) and the vision-language
wrapper (InklingForConditionalGeneration, whose text path is that same model) are covered."""

from __future__ import annotations

import json

import pytest

from corpus import assert_one_line_error, run_main


def _tiny_inkling(path):
    """A two-layer InklingForCausalLM (one windowed layer, one global; a mixture with a shared expert), saved."""
    from transformers import InklingForCausalLM, InklingTextConfig
    cfg = InklingTextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=8,
        d_rel=4, rel_extent=12, local_layer_ids=[0], intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=256,
        architectures=["InklingForCausalLM"])
    InklingForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inkling(tmp_path_factory):
    return _tiny_inkling(tmp_path_factory.mktemp("inkling") / "src")


def test_the_language_model_is_refused_by_name(inkling, tmp_path, capsys):
    code, _, err = run_main(capsys, "convert", "-q", inkling, tmp_path / "out")
    assert_one_line_error(code, err, 2, "InklingForCausalLM:", "Inkling is not supported", "r_proj")
    assert "LlamaForCausalLM" not in err    # the reason, not the list of every known architecture
    assert not (tmp_path / "out").exists()


def test_the_vision_language_wrapper_is_refused_by_name(inkling, tmp_path, capsys):
    src = tmp_path / "mm"
    src.mkdir()
    (src / "model.safetensors").write_bytes((inkling / "model.safetensors").read_bytes())
    text = json.loads((inkling / "config.json").read_text())
    text = {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "dtype")}
    (src / "config.json").write_text(json.dumps({
        "architectures": ["InklingForConditionalGeneration"], "model_type": "inkling_mm_model", "text_config": text,
        "vision_config": {"text_hidden_size": 64, "hidden_size": 32, "n_layers": 1, "num_attention_heads": 2},
        "audio_config": {"text_hidden_size": 64}}))
    code, _, err = run_main(capsys, "convert", "-q", src, tmp_path / "out")
    assert_one_line_error(code, err, 2, "InklingForConditionalGeneration:", "Inkling is not supported")
    assert not (tmp_path / "out").exists()
