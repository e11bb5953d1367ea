"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5) beyond the family tests (which run deepseek_v32 and glm_moe_dsa
through tiny.FAMILIES with an index_topk of 32, more keys than most of their prompts have): here the indexer picks 6
keys of up to 14, in a prompt, in decode steps through the cache (eager and graph-safe), with padding, at tp 1, 2
and 4; that each of its pieces is really applied; what the manifest and the cache hold; bad configs."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load

PICK = dict(index_topk=6)
FAMILIES = ["deepseek_v32", "glm_moe_dsa"]


def _converted(model_dir, tmp_path, name, tp=1, **options):
    src = model_dir(name, **PICK)
    convert(src, tmp_path / "out", Options(tp=tp, **options), progress=False)
    return src, tmp_path / "out"


def _hf(name, ids, **kw):
    with torch.no_grad():
        return tiny.build(name, **PICK)(ids, **kw).logits


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_prompt_the_indexer_thins_matches_transformers(model_dir, tmp_path, name, tp):
    src = model_dir(name, **PICK)
    assert max(tiny.errors_against_transformers(src, name, tmp_path, 14, tp=tp, **PICK)) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_steps_past_topk_match_transformers_eager_and_graph_safe(model_dir, tmp_path, name):
    """A 4-token prompt (every key chosen), then steps to 14 tokens: from the 7th on the indexer picks 6 rows of
    the latent cache, which the absorbed decode step reads gathered (eager) or best first out of the whole static
    cache (decode_step, what a CUDA graph captures)."""
    _, out = _converted(model_dir, tmp_path, name)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(1))
    want = _hf(name, ids)
    eager, graph = tiny.decode_steps(load(out), ids, 4)
    assert tiny.rel(eager, want[:, 3:]) < 1e-5 and tiny.rel(graph, want[:, 3:]) < 1e-5


def test_a_left_padded_batch_matches_transformers_on_its_tokens(model_dir, tmp_path):
    """Padding keys are never chosen nor attended to, as transformers masks them from both."""
    _, out = _converted(model_dir, tmp_path, "deepseek_v32")
    m = load(out)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    want = _hf("deepseek_v32", ids, attention_mask=mask)
    got = m(ids, attention_mask=mask)
    assert tiny.rel(got[0], want[0]) < 1e-5 and tiny.rel(got[1, 5:], want[1, 5:]) < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_each_piece_of_the_indexer_changes_the_logits(model_dir, tmp_path, name):
    """Choosing every key, the other RoPE pairing, and (GLM-5) a shared layer that picks for itself each move the
    logits past a prompt of 14 by more than 1e-3."""
    _, out = _converted(model_dir, tmp_path, name)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(3))
    want = _hf(name, ids)
    m = load(out)
    assert tiny.rel(m(ids), want) < 1e-5
    ix = m.spec["mla"]["index"]
    ix["topk"] = 100
    assert tiny.rel(m(ids), want) > 1e-3
    ix["topk"], ix["rope_style"] = 6, {"neox": "gptj", "gptj": "neox"}[ix["rope_style"]]
    assert tiny.rel(m(ids), want) > 1e-3
    if name == "glm_moe_dsa":         # layer 1 reuses layer 0's choice; choosing all keys there instead differs
        m = load(out)
        m.blocks[1]._index_choice = lambda *a, **k: None
        assert tiny.rel(m(ids), want) > 1e-3


def test_the_manifest_the_shards_and_the_cache(model_dir, tmp_path):
    """The indexer stays float and whole on every rank (int8 would flip its choices); GLM-5's shared layer has no
    indexer and caches no index keys."""
    _, out = _converted(model_dir, tmp_path, "glm_moe_dsa", tp=2, int8=True, group_size=16)
    m = json.loads((out / "manifest.json").read_text())
    ix = m["model"]["mla"]["index"]
    assert ix == {"heads": 8, "dim": 16, "topk": 6, "rope_style": "gptj", "layers": [0, 2]}
    for r in (0, 1):
        t = m["ranks"][r]["tensors"]
        assert t["layers.0.index_q.weight"]["shape"] == [128, 32] and t["layers.0.index_q.weight"]["dtype"] != "int8"
        assert t["layers.2.index_w.weight"]["shape"] == [8, 64] and t["layers.0.q_b.weight"]["dtype"] == "int8"
        assert not any(k.startswith("layers.1.index_") for k in t)
    shapes = tiny.on_ranks(out, 2, lambda model: [None if k is None else tuple(k.shape)
                                                  for k in model.new_cache(1, 8).index_k])
    assert shapes == [[(1, 8, 16), None, (1, 8, 16)]] * 2
    src = model_dir("deepseek_v32", **PICK)
    convert(src, tmp_path / "v32", Options(), progress=False)
    ix = json.loads((tmp_path / "v32" / "manifest.json").read_text())["model"]["mla"]["index"]
    assert ix["rope_style"] == "neox" and ix["layers"] == [0, 1, 2] and ix["heads"] == 8


@pytest.mark.parametrize("edit,match", [
    (dict(indexer_types=["shared", "full", "full"]), "indexer_types must name full or shared"),
    (dict(indexer_types=["full", "sparse", "full"]), "indexer_types must name full or shared"),
    (dict(index_topk=0), "index_n_heads, index_head_dim and index_topk must be positive"),
    (dict(index_head_dim=4), "index_head_dim=4 is narrower than the rotated qk_rope_head_dim=8"),
    (dict(q_lora_rank=0), "q_lora_rank is 0"),
])
def test_a_malformed_indexer_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("glm_moe_dsa"), tmp_path / "out", match, **edit)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_prompt_picked_and_attended_a_few_queries_at_a_time(model_dir, tmp_path, monkeypatch, name):
    """The indexer's scores and the attention's masks are made QUERY_CHUNK queries at a time: with chunks of 5 a
    14-token prompt takes three, left padding included, and the logits are transformers' still."""
    from fmconvert.runtime import model
    monkeypatch.setattr(model, "QUERY_CHUNK", 5)
    _, out = _converted(model_dir, tmp_path, name, tp=2)
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    want = _hf(name, ids, attention_mask=mask)
    for got in tiny.on_ranks(out, 2, lambda m: m(ids, attention_mask=mask)):
        assert tiny.rel(got[0], want[0]) < 1e-5 and tiny.rel(got[1, 5:], want[1, 5:]) < 1e-5
