"""ModernBERT's decoder beyond the family tests (which run modernbert_decoder through tiny.FAMILIES with every bias
on): each of the config's choices against transformers in fp32 at tp 2, what the manifest records (the exact GELU's
gate among them: in these tiny models the tanh GELU moves the logits by less than 1e-5, so the kernel test
test_geglu_erf_is_the_exact_gelu and the manifest check are what tell the two apart), inspect's row, and the
refusals."""

from __future__ import annotations

import pytest

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert


@pytest.mark.parametrize("override", [
    {},
    dict(norm_bias=False, attention_bias=False, mlp_bias=False, classifier_bias=False, decoder_bias=False),
    dict(tie_word_embeddings=False),
    dict(classifier_activation="silu", hidden_activation="gelu_pytorch_tanh"),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("modernbert_decoder", **override)
    assert max(tiny.errors_against_transformers(src, "modernbert_decoder", tmp_path, 11, **override)) < 1e-5


def test_the_manifest_records_the_head_and_the_unnormed_first_layer(model_dir, tmp_path):
    m = tiny.converted_manifest(model_dir("modernbert_decoder"), tmp_path / "out", int8=True, group_size=16)
    sp = m["model"]
    assert sp["head_activation"] == "gelu" and sp["activation"] == "geglu_erf" and not sp["first_attn_norm"]
    assert {"head_dense.weight", "head_dense.bias", "head_norm.weight", "head_norm.bias", "lm_head.bias"} <= set(
        sp["slots"])
    names = set(m["ranks"][0]["tensors"])
    assert "layers.0.attn_norm.weight" not in names and "layers.1.attn_norm.weight" in names
    assert "head_dense.weight_scale" not in names          # the head's transform stays in the model's dtype
    from click.testing import CliRunner

    from fmconvert.cli import cli
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")], terminal_width=200)
    text = " ".join(r.output.replace("│", " ").split())
    assert "layer 0 reads the normed embeddings" in text and "norm(gelu(dense(final norm)))" in text, r.output


def test_an_unsupported_head_activation_is_refused_in_one_line(model_dir, tmp_path):
    with pytest.raises(FmError, match="head's activation 'tanh' is not supported"):
        convert(model_dir("modernbert_decoder", classifier_activation="tanh"), tmp_path / "out", Options(),
                progress=False)
    assert not (tmp_path / "out").exists()
