"""OLMo Hybrid beyond the family tests (which run olmo_hybrid through tiny.FAMILIES): its config's choices against
transformers in fp32 at tp 2, and what the manifest records."""

from __future__ import annotations

import pytest

import tiny


@pytest.mark.parametrize("override", [
    {},
    dict(linear_allow_neg_eigval=False),                     # beta = sigmoid(b), not twice it
    dict(layer_types=["full_attention", "linear_attention", "linear_attention", "linear_attention"]),
    dict(rms_norm_eps=1e-3),                                 # the gated output norm keeps its own 1e-5
    # v wider than q and k (as released): transformers saves the q|k|v conv in three equal chunks, not q, k, v
    dict(linear_value_head_dim=8),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("olmo_hybrid", **override)
    assert max(tiny.errors_against_transformers(src, "olmo_hybrid", tmp_path, 10, **override)) < 1e-5


def test_the_manifest_records_each_layer_kinds_norms(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("olmo_hybrid"), tmp_path / "out")
    sp = m["model"]
    assert sp["linear_pre_norm"] and sp["linear_layers"] == [0, 2] and sp["qk_norm"] == "full"
    assert sp["linear_attn"]["beta_scale"] == 2.0 and sp["linear_attn"]["norm_eps"] == 1e-5
    names = set(m["ranks"][0]["tensors"])
    for i in (0, 2):        # linear layers: input norms
        assert {f"layers.{i}.attn_norm.weight", f"layers.{i}.mlp_norm.weight"} <= names
        assert not {f"layers.{i}.attn_post_norm.weight", f"layers.{i}.mlp_post_norm.weight"} & names
    for i in (1, 3):        # attention layers: output norms
        assert {f"layers.{i}.attn_post_norm.weight", f"layers.{i}.mlp_post_norm.weight"} <= names
        assert not {f"layers.{i}.attn_norm.weight", f"layers.{i}.mlp_norm.weight"} & names
    from click.testing import CliRunner

    from fmconvert.cli import cli
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")], terminal_width=200)
    assert "linear layers norm each half's input, attention layers each half's output" in " ".join(
        r.output.replace("│", " ").split()), r.output
