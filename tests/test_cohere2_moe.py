"""Cohere 2 MoE beyond the family tests (which run cohere2_moe through tiny.FAMILIES with softmax routing, LayerNorm,
an averaged shared expert and a dense first layer that keeps RoPE): the config's other choices, each against
transformers in fp32, and what the manifest records."""

from __future__ import annotations

import pytest

import tiny


@pytest.mark.parametrize("override", [
    dict(expert_selection_fn="sigmoid"),                          # sigmoids of the top k, renormalised
    dict(expert_selection_fn="sigmoid", norm_topk_prob=False),
    dict(rms_norm_eps=1e-6),                                      # RMSNorm in place of LayerNorm
    dict(shared_expert_combination_strategy="sum"),
    dict(prefix_dense_sliding_window_pattern=2, layer_types=[     # the dense layer windowed: no forced RoPE
        "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    dict(num_shared_experts=0),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("cohere2_moe", **override)
    assert max(tiny.errors_against_transformers(src, "cohere2_moe", tmp_path, 9, **override)) < 1e-5


def test_the_manifest_records_the_averaged_shared_expert_and_the_roped_dense_layer(model_dir, tmp_path):
    sp = tiny.converted_manifest(model_dir("cohere2_moe"), tmp_path / "out")["model"]
    assert sp["routed_scale"] == sp["shared_scale"] == 0.5 and sp["router"] == "softmax"
    assert sp["dense_layers"] == [0] and sp["nope_layers"] == [4] and sp["window_layers"] == [1, 2, 3]
    assert sp["norm"] == "layer" and sp["residual"] == "parallel"
    from click.testing import CliRunner

    from fmconvert.cli import cli
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")], terminal_width=200)
    assert "a shared expert of width 32, times 0.5" in " ".join(r.output.replace("│", " ").split()), r.output
