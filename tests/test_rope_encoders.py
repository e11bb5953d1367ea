"""Rotary encoders: NomicBERT, GTE v1.5, EuroBERT and Jina Embeddings v3, beyond test_encoders.py (which runs each of
their tiny.ENCODERS entries against transformers padded on either side at tp 1 and 2): what the manifest records;
that each one's RoPE base, its GLU's order and the two-sided mask are what make it match, and that padding on the
left is harmless; every task class's encoder at tp 2 with its head passed through; the exact round trip; verify;
and the configs and checkpoints refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny
from tiny import rel
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.reassemble import reassemble
from fmconvert.runtime.load import load
from fmconvert.runtime.model import rope_tables
from fmconvert.verify import verify

NAMES = ["nomic_bert", "gte", "gte_untyped", "eurobert", "jina_embeddings_v3"]
PAD = 1
# name -> (activation, residual, norm, kv heads, token types, embed norm, final norm)
FACTS = {
    "nomic_bert": ("swiglu", "post", "layer", 4, 2, True, False),
    "gte": ("geglu_erf", "post", "layer", 4, 2, True, False),
    "gte_untyped": ("geglu_erf", "post", "layer", 4, 0, True, False),
    "eurobert": ("swiglu", "pre", "rms", 2, 0, False, True),
    "jina_embeddings_v3": ("gelu", "post", "layer", 4, 2, True, False),
}
THETA = {"nomic_bert": 1000.0, "gte": 160000.0, "gte_untyped": 160000.0, "eurobert": 10000.0,
         "jina_embeddings_v3": 20000.0}


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    """(name, tp) -> the tiny model converted at that tp (fp32), once per module."""
    root, outs = tmp_path_factory.mktemp("rope_encoders"), {}

    def get(name: str, tp: int):
        if (name, tp) not in outs:
            outs[name, tp] = root / f"{name}-tp{tp}"
            convert(model_dir(name), outs[name, tp], Options(tp=tp), progress=False)
        return outs[name, tp]
    return get


def batch():
    """Three rows of 12: whole, padded on the right, and padded on the left (mask 0 there), with token types."""
    ids = tiny.ids(12, 5, B=3)
    ids[1, 8:] = PAD
    ids[2, :4] = PAD
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(6))
    return ids, (ids != PAD).long(), types


def hf_base(name, ids, mask, types):
    hf = tiny.build(name).base_model
    with torch.no_grad():
        return hf(ids, attention_mask=mask, token_type_ids=types)


@pytest.mark.parametrize("name", NAMES)
def test_the_manifest_records_each_family(converted, name):
    act, residual, norm, kv, types, embed_norm, final_norm = FACTS[name]
    hf = tiny.build(name)
    sp = json.loads((converted(name, 1) / "manifest.json").read_text())["model"]
    assert sp["kind"] == "encoder" and sp["family"] == name.removesuffix("_untyped")
    assert (sp["activation"], sp["residual"], sp["norm"], sp["num_kv_heads"]) == (act, residual, norm, kv)
    assert sp["gated_mlp"] is (act != "gelu") and sp["type_vocab_size"] == types
    assert (sp["embed_norm"], sp["final_norm"]) == (embed_norm, final_norm)
    # each family's own RoPE base (its config class's default, none of them the usual 10000 but EuroBERT's), over
    # the whole head, rotate-half
    pos = sp["position"]
    assert pos["type"] == "rope" and pos["style"] == "neox" and pos["rope_type"] == "default"
    assert pos["theta"] == hf.config.rope_parameters["rope_theta"] == THETA[name]
    assert pos["rotary_dim"] == sp["head_dim"] == 16
    assert sp["pooler"] is (getattr(hf.base_model, "pooler", None) is not None)


@pytest.mark.parametrize("name", NAMES)
def test_what_makes_each_one_match(converted, name):
    """Every change moves the output well past the parity bound: the RoPE base ten times larger or smaller, gate and
    up swapped, a causal mask. A row padded on the left reads as the unpadded row: transformers numbers positions
    from the first column, pads included, but rotary scores see only offsets, so no pad-aware numbering (RoBERTa's)
    is needed."""
    ids, mask, types = batch()
    real = mask.bool()
    want = hf_base(name, ids, mask, types).last_hidden_state

    def moved(change) -> float:
        m = load(converted(name, 1))
        change(m)
        return rel(m(ids, attention_mask=mask, token_type_ids=types)[0][real], want[real])

    def base(factor):
        def change(m):
            d, theta = m.spec["position"]["rotary_dim"], m.spec["position"]["theta"] * factor
            inv = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
            m._tables["global"] = [inv, 1.0, *rope_tables(inv, 64, 1.0)]
        return change

    def swap_glu(m):
        for b in m.blocks:
            b.t.update({k: torch.cat(b.t[k].chunk(2)[::-1]) for k in ("mlp_in.weight", "mlp_in.bias") if k in b.t})

    def causal(m):
        m.causal = True
    assert moved(lambda m: None) < 1e-5
    assert moved(base(10.0)) > 1e-2 and moved(base(0.1)) > 1e-2
    assert moved(causal) > 1e-2
    if FACTS[name][0] != "gelu":
        assert moved(swap_glu) > 1e-2
    m = load(converted(name, 1))
    whole = m(ids[2:, 4:], token_type_ids=types[2:, 4:])[0]
    padded = m(ids[2:], attention_mask=mask[2:], token_type_ids=types[2:])[0][:, 4:]
    assert rel(padded, want[2:, 4:]) < 1e-5 and rel(whole, want[2:, 4:]) < 1e-5


@pytest.mark.parametrize("name, base", [("nomic_bert", "nomic_bert"), ("gte", "gte"), ("eurobert", "model")])
def test_gate_comes_first_whatever_the_source_order(converted, name, base):
    """The canonical mlp_in is [gate; up] of transformers' own modules, though Nomic stores up as fc11 before the
    gate's fc12 and GTE one up_gate_proj with up's rows first."""
    hf = getattr(tiny.build(name), base)
    m = load(converted(name, 1))
    for b, layer in zip(m.blocks, hf.layers):
        want = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
        assert torch.equal(b.t["mlp_in.weight"], want)
        assert not torch.equal(want[:want.shape[0] // 2], layer.mlp.up_proj.weight)


TASKS = [("nomic_bert", "NomicBertModel"), ("nomic_bert", "NomicBertForMaskedLM"),
         ("nomic_bert", "NomicBertForTokenClassification"), ("gte", "GteModel"),
         ("gte", "GteForTokenClassification"), ("eurobert", "EuroBertModel"),
         ("eurobert", "EuroBertForSequenceClassification"), ("eurobert", "EuroBertForTokenClassification"),
         ("jina_embeddings_v3", "JinaEmbeddingsV3ForMaskedLM"),
         ("jina_embeddings_v3", "JinaEmbeddingsV3ForSequenceClassification"),
         ("jina_embeddings_v3", "JinaEmbeddingsV3ForTokenClassification"),
         ("jina_embeddings_v3", "JinaEmbeddingsV3ForQuestionAnswering")]


@pytest.mark.parametrize("name, arch", TASKS)
def test_every_task_model_keeps_its_head_and_matches(tmp_path, name, arch):
    """The encoder inside each task model (or the bare one) at tp 2, its head tensors passed through unchanged and
    the pooler there exactly when transformers builds one."""
    cfg_cls, _, kw = tiny.ENCODERS[name]
    torch.manual_seed(1)
    hf = getattr(transformers, arch)(getattr(transformers, cfg_cls)(**kw)).eval()
    hf.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    base = hf.base_model
    prefix = "" if base is hf else hf.base_model_prefix + "."
    heads = {n for n in load_file(tmp_path / "src" / "model.safetensors") if prefix and not n.startswith(prefix)}
    assert {n.removeprefix("extra.") for n in m["ranks"][0]["tensors"] if n.startswith("extra.")} == heads
    ids, mask, types = batch()
    with torch.no_grad():
        want = base(ids, attention_mask=mask, token_type_ids=types)
    pooled = getattr(want, "pooler_output", None)
    for hidden, pool in tiny.on_ranks(tmp_path / "out", 2, lambda fm: fm(ids, attention_mask=mask,
                                                                         token_type_ids=types)):
        assert rel(hidden[mask.bool()], want.last_hidden_state[mask.bool()]) < 1e-5
        assert (pool is None) == (pooled is None) and (pool is None or rel(pool, pooled) < 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_the_float_round_trip_is_exact(model_dir, converted, name):
    """reassemble gives every source tensor back bit for bit from tp 2's shards under the source's own names
    (GTE's up_gate_proj with up first again), the passthrough heads' too."""
    src = load_file(model_dir(name) / "model.safetensors")
    _, got = reassemble(converted(name, 2))
    assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)


@pytest.mark.parametrize("name", ["gte", "eurobert"])
def test_verify_passes(model_dir, converted, name):
    r = verify(model_dir(name), converted(name, 2), tokens=16)
    assert r["passed"], r["failures"]
    assert r["tensors"]["count"] > 0 and all(x["max_abs"] == 0 for x in r["tensors"]["rows"])
    assert r["end_to_end"]["rel_rms"] < 1e-5


def test_transformers_rotates_the_whole_head_whatever_partial_rotary_factor_says():
    """Why a partial factor is refused below: transformers' default RoPE for these models ignores it (the whole head
    turns), so a checkpoint asking for it computes something else than it was trained for, on either side."""
    ids = tiny.ids(10, 2)
    params = {"rope_type": "default", "rope_theta": 160000.0}
    whole, partial = (tiny.build("gte", rope_parameters={**params, **extra})(ids).logits
                      for extra in ({}, {"partial_rotary_factor": 0.5}))
    assert torch.equal(whole, partial)


@pytest.mark.parametrize("name, edit, match", [
    ("nomic_bert", dict(prenorm=True), r"not support \(prenorm\)$"),
    ("nomic_bert", dict(rotary_emb_interleaved=True), r"\(rotary_emb_interleaved\)$"),
    ("nomic_bert", dict(rotary_emb_fraction=0.5), r"\(partial_rope\)$"),       # Nomic's own key, or
    ("nomic_bert", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e3, "partial_rotary_factor": 0.5}),
     r"\(partial_rope\)$"),                                                        # transformers' spelling
    ("gte", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("gte", dict(rope_parameters={"rope_type": "ntk", "factor": 2.0, "rope_theta": 1e4}), "RoPE type 'ntk'"),
    ("gte", dict(hidden_act="relu"), "gated MLP with 'relu' is not supported"),
    ("eurobert", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "'dynamic'"),
    ("eurobert", dict(num_key_value_heads=3), "not a multiple"),
    ("jina_embeddings_v3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.25}), "partial_rotary_factor"),
])
def test_a_config_the_runtime_cannot_express_is_refused_in_one_line(model_copy, tmp_path, name, edit, match):
    src = model_copy(name)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(FmError, match=match) as e:
        convert(src, tmp_path / "out", Options(), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_jina_task_adapters_are_refused(model_copy, tmp_path):
    """The remote-code release keeps its task LoRA adapters as parametrizations beside each weight; transformers'
    class has none, and a checkpoint with them is refused rather than converted without them."""
    src = model_copy("jina_embeddings_v3")
    t = load_file(src / "model.safetensors")
    t["encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_A"] = torch.zeros(5, 4, 64)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FmError, match=r"unexpected tensor encoder\.layers\.0\.mixer\.Wqkv\.parametrizations") as e:
        convert(src, tmp_path / "out", Options(), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
