"""Llama 4 beyond the family tests (which run llama4 and llama4_vl through tiny.FAMILIES): what the manifest
records, and that each of its departures from LLaMA matters to the logits, checked against transformers past the
chunk and the temperature's first span (the tiny model's are 4 positions each)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from fmconvert.cli import cli
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from tiny import rel


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("llama4")
    src = tiny.save("llama4", root / "src")
    convert(src, root / "out", Options(), progress=False)
    hf = transformers.Llama4ForCausalLM.from_pretrained(src).eval()
    return src, root / "out", hf


def test_the_manifest_records_chunks_temperature_and_input_weighting(llama4):
    _, out, _ = llama4
    sp = json.loads((out / "manifest.json").read_text())["model"]
    assert (sp["attn_chunk"], sp["chunk_layers"], sp["nope_layers"]) == (4, [0, 2], [1, 3])
    assert (sp["query_scale_beta"], sp["query_scale_from"], sp["query_scale_offset"]) == (0.5, 4, 1)
    assert sp["query_scale_nope_only"] and sp["experts_scale_input"] and sp["qk_norm"] == "l2"
    assert sp["dense_layers"] == [0, 2] and sp["dense_intermediate_size"] == 96
    assert sp["router"] == "sigmoid" and not sp["experts_renormalize"]
    assert sp["position"]["style"] == "gptj"
    assert not any("q_norm" in s for s in sp["slots"])        # the L2 norm has no weight to store
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "chunks of 4 in layers 0, 2" in r.output and "scaling the expert's input" in r.output


def test_each_departure_from_llama_matters(llama4):
    """The logits match transformers over 20 positions; undoing any one of the chunks, the q temperature, the L2
    q/k norm or the input-side expert weighting moves them."""
    _, out, hf = llama4
    m = load(out)
    ids = torch.randint(3, 100, (2, 20))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel(m(ids), want) < 1e-5
    undo = [
        lambda: [setattr(b, "chunk", 0) for b in m.blocks],
        lambda: [setattr(b, "query_scale", None) for b in m.blocks],
        lambda: [b.t.pop(n, None) for b in m.blocks for n in ("q_norm.weight", "k_norm.weight")],
        lambda: m.spec.update(experts_scale_input=False),
    ]
    for step in undo:
        m = load(out)
        step()
        assert rel(m(ids), want) > 1e-3


def test_cached_and_graph_safe_decode_cross_chunk_boundaries(llama4):
    """Decoding token by token from a 3-token prompt crosses chunk starts (4, 8, 12) and temperature steps; the
    eager cached path and the graph-safe decode step give the full forward's logits."""
    _, out, _ = llama4
    m = load(out)
    ids = torch.randint(3, 100, (2, 14))
    full = m(ids)
    eager, static = m.new_cache(2, 14), m.new_cache(2, 14)
    m(ids[:, :3], eager)
    m(ids[:, :3], static)
    for j in range(3, 14):
        a = m(ids[:, j:j + 1], eager)[:, -1]
        s = m.decode_step(ids[:, j:j + 1], static, torch.tensor([static.length]))
        static.length += 1
        assert rel(a, full[:, j]) < 1e-5 and rel(s, full[:, j]) < 1e-5


def test_int8_experts_weigh_their_inputs(llama4, tmp_path):
    """int8 experts, each token's input scaled by its routing weight before the expert, within the int8 bound of
    transformers. (The Triton backend's device-routed path, which scales one input row per (token, expert) pair,
    is compared with this one in tests/kernels/test_model_backend.py.)"""
    src, _, hf = llama4
    convert(src, tmp_path / "int8", Options(int8=True, group_size=16), progress=False)
    m = load(tmp_path / "int8", dequantize=True)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel(m(ids), want) < 0.03


def test_chunked_layers_cache_one_chunk(llama4):
    """A chunked layer keeps a ring of one chunk (4 rows here), the others the whole context; prefills that start
    mid-chunk and run past chunk edges read the right rows (against the full forward)."""
    _, out, _ = llama4
    m = load(out)
    cache = m.new_cache(2, 20)
    assert [k.shape[2] for k in cache.k] == [4, 20, 4, 20] and cache.chunked == [True, False, True, False]
    ids = torch.randint(3, 100, (2, 20))
    full = m(ids)
    got = [m(ids[:, a:b], cache) for a, b in ((0, 3), (3, 9), (9, 10), (10, 17), (17, 20))]
    assert rel(torch.cat(got, 1), full) < 1e-5
