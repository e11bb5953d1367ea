"""Mistral 4 beyond the family tests (which run mistral4 through tiny.FAMILIES): its config's choices against
transformers in fp32 at tp 2, on prompts past original_max_position_embeddings so that Llama 4's query factor grows
(dropping it fails these), and the refusal of group-limited routing."""

from __future__ import annotations

import pytest

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert


@pytest.mark.parametrize("override", [
    {},
    dict(norm_topk_prob=False, routed_scaling_factor=2.5),
    dict(q_lora_rank=None, first_k_dense_replace=0),          # q straight from the hidden state; no dense layer
    dict(rope_interleave=False),
])
def test_each_variant_matches_transformers(model_dir, tmp_path, override):
    src = model_dir("mistral4", **override)
    assert max(tiny.errors_against_transformers(src, "mistral4", tmp_path, 40, **override)) < 1e-5


def test_the_manifest_records_the_softmax_router_and_the_query_factor(model_dir, tmp_path):
    sp = tiny.converted_manifest(model_dir("mistral4"), tmp_path / "out")["model"]
    assert sp["router"] == "softmax" and sp["query_scale_beta"] == 0.5 and sp["query_scale_from"] == 16
    assert sp["mla"]["q_rank"] == 32 and sp["dense_layers"] == [0] and sp["num_experts"] == 4


def test_group_limited_routing_is_refused_in_one_line(model_dir, tmp_path):
    with pytest.raises(FmError, match="n_group"):
        convert(model_dir("mistral4", n_group=2, topk_group=1), tmp_path / "out", Options(), progress=False)
    assert not (tmp_path / "out").exists()
