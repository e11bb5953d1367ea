"""ModernBERT, the encoder, beyond test_encoders.py (which runs tiny.ENCODERS["modernbert"] padded on either side
at tp 1 and 2): the last hidden state against transformers' in fp32 at tp 1 and 2, with and without padding; that
its local layers' two-sided window and their own RoPE base are what make it match; what the manifest records; a
published config's older keys; every task model's head kept as passthrough; the round trip; verify; the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tiny
from tiny import rel
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.runtime.ops import TorchOps
from fmconvert.verify import verify

NAME = "modernbert"
T = 12          # three times the local window's reach on either side, so windowing decides most positions


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    """tp -> the tiny MLM model converted at that tp (fp32)."""
    root, outs = tmp_path_factory.mktemp("modernbert"), {}

    def get(tp: int):
        if tp not in outs:
            outs[tp] = root / f"tp{tp}"
            convert(model_dir(NAME), outs[tp], Options(tp=tp), progress=False)
        return outs[tp]
    return get


def padded_mask():
    """The second row right-padded after 7 real tokens."""
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 7:] = 0
    return mask


def hf_hidden(hf, ids, mask=None):
    with torch.no_grad():
        return hf.model(ids, attention_mask=mask).last_hidden_state


def real(x, mask):
    """The positions a mask keeps (every one without a mask)."""
    return x.flatten(0, 1) if mask is None else x[mask.bool()]


@pytest.mark.parametrize("tp", [1, 2])
def test_the_last_hidden_state_matches_transformers(converted, tp):
    hf, ids = tiny.build(NAME), tiny.ids(T)
    for mask in (None, padded_mask()):
        want = hf_hidden(hf, ids, mask)
        for hidden, pooled in tiny.on_ranks(converted(tp), tp, lambda m: m(ids, attention_mask=mask)):
            assert pooled is None                                  # no pooler: the heads pool, as passthrough
            assert rel(real(hidden, mask), real(want, mask)) < 1e-5, (tp, mask is not None)


def test_the_two_sided_window_and_the_local_rope_are_what_match(converted):
    """Each change moves the output well past the parity bound: no window (every layer global), a window one key
    wider each side, a causal window of the same reach, and the windowed layers rotating with the global base."""
    hf, ids, mask = tiny.build(NAME), tiny.ids(T, seed=1), padded_mask()
    want = real(hf_hidden(hf, ids, mask), mask)

    def moved(change) -> float:
        m = load(converted(1))
        change(m)
        return rel(real(m(ids, attention_mask=mask)[0], mask), want)

    def blocks(attr, value):
        return lambda m: [setattr(b, attr, value(b)) for b in m.blocks]
    assert moved(lambda m: None) < 1e-5
    assert [b.window for b in load(converted(1)).blocks] == [0, 3, 3]      # |i - j| <= local_attention / 2 = 2
    assert moved(blocks("window", lambda b: 0)) > 1e-3
    assert moved(blocks("window", lambda b: b.window and b.window + 1)) > 1e-3
    assert moved(blocks("rope_table", lambda b: "global")) > 1e-3

    def causal(m):
        m.causal = True
    assert moved(causal) > 1e-3


def test_the_manifest_records_the_encoder(converted):
    m = json.loads((converted(1) / "manifest.json").read_text())
    sp = m["model"]
    assert sp["kind"] == "encoder" and sp["architecture"] == "ModernBertForMaskedLM"
    assert sp["sliding_window"] == 3 and sp["window_layers"] == [1, 2]
    assert sp["position"]["theta"] == 160000.0 and sp["position"]["local"]["theta"] == 10000.0
    assert sp["activation"] == "geglu_erf" and not sp["first_attn_norm"] and sp["final_norm"] and sp["embed_norm"]
    assert not sp["pooler"] and not sp["tied_embeddings"]
    names = set(m["ranks"][0]["tensors"])
    assert "layers.0.attn_norm.weight" not in names and "layers.1.attn_norm.bias" in names
    # the MLM head (its decoder tied to the embeddings, so only the bias is stored) kept as it is
    assert {"extra.head.dense.weight", "extra.head.dense.bias", "extra.head.norm.weight", "extra.decoder.bias"} \
        <= names


def test_a_hub_config_without_layer_types(model_copy, tmp_path):
    """The published configs (ModernBERT-base, -large) predate layer_types and rope_parameters: they give
    global_attn_every_n_layers and the two thetas on their own, which transformers still reads."""
    src = model_copy(NAME)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("layer_types", "rope_parameters"):
        del cfg[k]
    cfg.update(global_attn_every_n_layers=2, global_rope_theta=80000.0, local_rope_theta=500.0)
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "out", Options(tp=1), progress=False)
    m = load(tmp_path / "out")
    assert m.spec["window_layers"] == [1] and m.spec["position"]["theta"] == 80000.0
    assert m.spec["position"]["local"]["theta"] == 500.0
    hf = transformers.ModernBertForMaskedLM.from_pretrained(src).eval()
    ids, mask = tiny.ids(T), padded_mask()
    assert rel(real(m(ids, attention_mask=mask)[0], mask), real(hf_hidden(hf, ids, mask), mask)) < 1e-5


@pytest.mark.parametrize("arch", ["ModernBertModel", "ModernBertForSequenceClassification",
                                  "ModernBertForTokenClassification", "ModernBertForQuestionAnswering",
                                  "ModernBertForMultipleChoice"])
def test_every_task_model_keeps_its_head_and_matches(tmp_path, arch):
    """Without biases and with layer_types given outright (global, windowed, global): the base model or the encoder
    inside the task model at tp 2, its head tensors passed through unchanged."""
    kw = {**tiny.ENCODERS[NAME][2], "norm_bias": False, "attention_bias": False, "mlp_bias": False,
          "layer_types": ["full_attention", "sliding_attention", "full_attention"]}
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(transformers.ModernBertConfig(**kw)).eval()
    hf.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["window_layers"] == [1]
    heads = {n for n in hf.state_dict() if not n.startswith("model.")} if arch != "ModernBertModel" else set()
    assert {n.removeprefix("extra.") for n in m["ranks"][0]["tensors"] if n.startswith("extra.")} == heads
    base = hf if arch == "ModernBertModel" else hf.model
    ids, mask = tiny.ids(T), padded_mask()
    with torch.no_grad():
        want = real(base(ids, attention_mask=mask).last_hidden_state, mask)
    for hidden, _ in tiny.on_ranks(tmp_path / "out", 2, lambda fm: fm(ids, attention_mask=mask)):
        assert rel(real(hidden, mask), want) < 1e-5


def test_the_float_round_trip_is_exact(model_dir, converted):
    """reassemble gives every source tensor back bit for bit from tp 2's shards, the passthrough head's too."""
    from safetensors.torch import load_file

    from fmconvert.reassemble import reassemble
    src = load_file(model_dir(NAME) / "model.safetensors")
    _, got = reassemble(converted(2))
    assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)


def test_verify_passes(model_dir, converted, tmp_path):
    """verify's sequences (64 tokens) are far longer than the window: float at tp 2, and int8 at tp 1."""
    r = verify(model_dir(NAME), converted(2))
    assert r["passed"], r["failures"]
    e = r["end_to_end"]
    assert all(x["max_abs"] == 0 for x in r["tensors"]["rows"])      # float: data movement only
    assert e["first_divergent_layer"] is None and e["rel_rms"] < 1e-5 and e["cosine_min"] > 0.999
    assert [x["name"] for x in e["layers"]] == ["embeddings", "layer 0", "layer 1", "layer 2 + final norm"]
    convert(model_dir(NAME), tmp_path / "int8", Options(tp=1, int8=True), progress=False)
    r = verify(model_dir(NAME), tmp_path / "int8")
    assert r["passed"] and r["profile"] == "int8", r["failures"]
    assert 0 < r["end_to_end"]["rel_rms"] < 0.05                   # > 0: the int8 weights are really used


def test_the_encoder_window_reaches_both_ways():
    """ops.attention without causal: a query at p sees keys p - w < j < p + w, and padding keys never; the Triton
    backend hands it to the same code (its kernels' windows are causal)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False
    p = torch.arange(7)
    near = (p.view(-1, 1) - p.view(1, -1)).abs() < 3
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~(near & kpm.view(2, 1, 1, 7)), float("-inf"))
    want = scores.softmax(-1) @ v
    got = TorchOps().attention(q, k, v, 0.5, False, key_padding_mask=kpm, window=3)
    assert rel(got, want) < 1e-6
    assert rel(TorchOps().attention(q, k, v, 0.5, False, key_padding_mask=kpm), want) > 1e-2
    pytest.importorskip("triton")          # without it the torch path above is the one that runs
    from fmconvert.runtime.ops import TritonOps
    assert rel(TritonOps().attention(q, k, v, 0.5, False, key_padding_mask=kpm, window=3), want) < 1e-6


@pytest.mark.parametrize("edit,match", [
    (dict(local_attention=-4), "sliding_window=-2 must be a non-negative integer"),
    (dict(layer_types=["full_attention", "linear_attention", "full_attention"]),
     "layer kind 'linear_attention' is not supported"),
])
def test_a_bad_config_is_refused_in_one_line(model_copy, tmp_path, edit, match):
    src = model_copy(NAME)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(FmError, match=match) as e:
        convert(src, tmp_path / "out", Options(), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
