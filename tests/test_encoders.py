"""Encoders beyond BERT (configs/roberta.toml, electra.toml, distilbert.toml, mpnet.toml, deberta_v2.toml):
RoBERTa, XLM-RoBERTa, CamemBERT, data2vec-text, RoBERTa-PreLayerNorm, XLM-RoBERTa-XL, ELECTRA, DistilBERT, MPNet
and DeBERTa-v2/v3 against transformers' encoder at tp 1 and 2, with padding on either side and token types;
fairseq's positions (only non-pad tokens count), MPNet's relative-position buckets and DeBERTa's disentangled terms
each shown to matter; ELECTRA's projected embeddings; verify and an exact round trip back to the source's names; bad
configs refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.reassemble import reassemble
from fmconvert.runtime.load import load

PAD = 1


def batch(typed: bool):
    """Three rows of 9: whole, padded on the right and on the left with the pad id (mask 0 there), and token types
    where the family has them."""
    ids = tiny.ids(9, 3, B=3)
    ids[1, 6:] = PAD
    ids[2, :3] = PAD
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(4)) if typed else None
    return ids, (ids != PAD).long(), types


def reference(name, ids, mask, types):
    """transformers' encoder (CLIP's projected one whole: its pooled output is text_embeds)."""
    hf = tiny.build(name)
    hf = hf if hasattr(hf, "text_projection") else hf.base_model
    with torch.no_grad():
        return hf(ids, attention_mask=mask, **({} if types is None else {"token_type_ids": types}))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(tiny.ENCODERS))
def test_hidden_states_match_transformers(model_dir, tmp_path, name, tp):
    out = tmp_path / "out"
    convert(model_dir(name), out, Options(tp=tp), progress=False)
    typed = tiny.ENCODERS[name][0] not in ("DistilBertConfig", "MPNetConfig", "ModernBertConfig", "T5Config",
                                           "MT5Config", "UMT5Config")    # no token types
    ids, mask, types = batch(typed)
    want = reference(name, ids, mask, types)
    real = mask.bool()
    pooled = getattr(want, "text_embeds", getattr(want, "pooler_output", None))
    for hidden, pool in tiny.on_ranks(out, tp, lambda m: m(ids, attention_mask=mask, token_type_ids=types)):
        assert tiny.rel(hidden[real], want.last_hidden_state[real]) < 1e-5
        assert (pool is None) == (pooled is None)
        assert pool is None or tiny.rel(pool, pooled) < 1e-5


def test_a_dry_run_counts_no_kv_cache(model_dir, tmp_path):
    """An encoder runs whole texts: --dry-run reports no KV cache for it (a decoder's it does)."""
    s = convert(model_dir("roberta"), tmp_path / "out", Options(tp=2, dry_run=True), progress=False)
    assert s["kv_cache"] is None and not (tmp_path / "out").exists()
    assert convert(model_dir("llama"), tmp_path / "dec", Options(dry_run=True), progress=False)["kv_cache"][0] > 0


def test_positions_count_only_real_tokens(model_dir, tmp_path):
    """A row padded on the left reads the same positions as unpadded (as in transformers); numbering the pad tokens
    too, as BERT does, moves it."""
    convert(model_dir("roberta"), tmp_path / "out", Options(tp=1), progress=False)
    m = load(tmp_path / "out")
    assert m.spec["position"] == {"type": "learned", "offset": PAD + 1, "pad_id": PAD}
    assert m.spec["max_positions"] == 40 - PAD - 1
    ids, mask, _ = batch(False)
    whole = m(ids[2:, 3:])[0]
    padded = m(ids[2:], attention_mask=mask[2:])[0][:, 3:]
    assert tiny.rel(padded, whole) < 1e-5
    del m.spec["position"]["pad_id"]
    assert tiny.rel(m(ids[2:], attention_mask=mask[2:])[0][:, 3:], whole) > 1e-2


def test_the_pre_ln_spellings(model_dir, tmp_path):
    """RoBERTa-PreLayerNorm and XLM-RoBERTa-XL read their norms under their own names (recorded, so the round trip
    writes them back exactly), and XL has none on its embeddings."""
    norms = {f"layers.{n}_norm.{p}" for n in ("attn", "mlp") for p in ("weight", "bias")}
    for name, embed_norm, spelling in [("roberta_prelayernorm", True, dict.fromkeys(norms, 0)),
                                       ("xlm_roberta_xl", False, {**dict.fromkeys(norms, 1), "final_norm.weight": 0,
                                                                  "final_norm.bias": 0})]:
        out = tmp_path / name
        convert(model_dir(name), out, Options(tp=2), progress=False)
        m = json.loads((out / "manifest.json").read_text())
        assert m["model"]["residual"] == "pre" and m["model"]["final_norm"]
        assert m["model"]["embed_norm"] is embed_norm
        assert m["source"]["aliases"] == spelling     # which of the table's other names each slot was read from
        _, got = reassemble(out)
        want = load_file(model_dir(name) / "model.safetensors")
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_electra_projects_its_narrower_embeddings(model_dir, tmp_path):
    """ElectraForPreTraining's embeddings are 32 wide under a 64-wide encoder: their sum is normed at 32, then
    projected (with a bias); a generator as wide as its encoder has no projection."""
    for name, proj in [("electra", True), ("electra_generator", False)]:
        m = tiny.converted_manifest(model_dir(name), tmp_path / name, tp=2)
        assert m["model"]["embed_proj"] is proj and m["model"]["embed_dim"] == (32 if proj else 64)
        t = m["ranks"][1]["tensors"]
        assert t["pos_embed.weight"]["shape"] == [40, m["model"]["embed_dim"]]
        assert ("embed_proj.bias" in t) is proj


def test_mpnet_relative_position_buckets():
    """The runtime's buckets equal transformers' for every offset up to past max_distance (exact, log-spaced and
    clamped), both ways."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    from fmconvert.runtime.model import _rel_buckets
    T = 300
    offsets = torch.arange(T).view(1, T) - torch.arange(T).view(T, 1)
    want = MPNetEncoder.relative_position_bucket(offsets, num_buckets=32, max_distance=128)
    got = _rel_buckets(T, 32, 128)
    assert torch.equal(got, want) and set(got.unique().tolist()) == set(range(32)) - {16}   # 16: offset 0 after


def test_mpnet_over_long_offsets_and_its_bias_matters(model_dir, tmp_path):
    """150 tokens (offsets in every bucket, past 128) at tp 2 against transformers; without the bias the states
    move."""
    convert(model_dir("mpnet"), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(150, 5)
    want = reference("mpnet", ids, None, None).last_hidden_state
    def unbiased(m):
        m.spec["rel_bias"] = None
        return m(ids)[0]
    for hidden, _ in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids)):
        assert tiny.rel(hidden, want) < 1e-5
    assert min(tiny.rel(h, want) for h in tiny.on_ranks(tmp_path / "out", 2, unbiased)) > 1e-3


def test_deberta_buckets_match_transformers():
    """The row of the relative embeddings for every (query, key) pair, log-bucketed (v3) and plain, as transformers
    builds it."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    from fmconvert.runtime.model import _log_buckets
    x = torch.zeros(1, 300, 1)
    for buckets, max_position in [(256, 512), (8, 40), (0, 6)]:
        want = build_relative_position(x, x, bucket_size=buckets or -1, max_position=max_position)[0]
        span = buckets or max_position
        got = _log_buckets(300, span, buckets, max_position)
        assert torch.equal(got, (want + span).clamp(0, 2 * span - 1))


def test_deberta_each_position_term_matters(model_dir, tmp_path):
    """40 tokens at tp 2 against transformers; without c2p, without p2c, or with the relative embeddings unnormed,
    the states move."""
    convert(model_dir("deberta_v3"), tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(40, 6)
    want = reference("deberta_v3", ids, None, None).last_hidden_state

    def without(change):
        def run(m):
            change(m)
            return m(ids)[0]
        return min(tiny.rel(h, want) for h in tiny.on_ranks(tmp_path / "out", 2, run))
    assert without(lambda m: None) < 1e-5
    assert without(lambda m: m.spec["disentangled"].update(c2p=False)) > 1e-3
    assert without(lambda m: m.spec["disentangled"].update(p2c=False)) > 1e-3
    assert without(lambda m: m.g.pop("rel_embed_norm.weight")) > 1e-3


@pytest.mark.parametrize("edit, match", [
    (dict(conv_kernel_size=3), "conv_kernel_size"),
    (dict(share_att_key=False), "share_att_key false"),
    (dict(position_buckets=7), "position_buckets=7"),
])
def test_deberta_variants_it_does_not_run_are_refused(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("deberta_v3"), tmp_path / "out", match, **edit)


def test_t5_encoder_over_every_bucket(model_dir, tmp_path):
    """30 tokens (offsets past the last of 12 buckets) at tp 2 against transformers; without layer 0's bias the states
    move; a checkpoint that keeps the embeddings as encoder.embed_tokens alone reads them there."""
    from safetensors.torch import save_file
    src = tmp_path / "src"
    shutil.copytree(model_dir("t5_encoder"), src)
    t = load_file(src / "model.safetensors")
    t["encoder.embed_tokens.weight"] = t.pop("shared.weight")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(30, 9)
    want = reference("t5_encoder", ids, None, None).last_hidden_state

    def unbiased(m):
        m.spec["rel_bias"] = None
        return m(ids)[0]
    assert max(tiny.rel(h, want) for h, _ in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids))) < 1e-5
    assert min(tiny.rel(h, want) for h in tiny.on_ranks(tmp_path / "out", 2, unbiased)) > 1e-3


def test_albert_layers_read_one_set_of_weights(model_dir, tmp_path):
    """Every layer reads ALBERT's one shared layer, stored once (in layer 0): the round trip gives the source's
    tensors back exactly, verify checks them, and several layer groups are refused."""
    from fmconvert.verify import verify
    convert(model_dir("albert"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    t = m["ranks"][0]["tensors"]
    assert m["model"]["shared_layers"] and "layers.0.qkv.weight" in t and not any(k.startswith("layers.1.") for k in t)
    r = verify(model_dir("albert"), tmp_path / "out", tokens=16)
    assert r["passed"] and r["end_to_end"]["classifier"]["top1"] == 1.0
    _, got = reassemble(tmp_path / "out", dequantize=False)
    want = load_file(model_dir("albert") / "model.safetensors")
    assert {n.removesuffix("_scale") for n in got} == set(want)


def test_albert_with_layer_groups_is_refused(model_copy, tmp_path):
    tiny.refuses(model_copy("albert"), tmp_path / "out", "num_hidden_groups", num_hidden_groups=3)


@pytest.mark.parametrize("eos", [100, 2])
def test_clip_pools_each_texts_eos_token(model_dir, tmp_path, eos):
    """Texts ending in eos at different places, padded after it: the pooled output (projected) is the eos token's
    state, the first eos's (or, under the old eos id 2, the largest id's); the tokens before it never see it."""
    src = model_dir("clip_text_proj", eos_token_id=eos)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    ids = tiny.ids(12, 10, B=3)
    ids[ids == 100] = 50
    for row, end in enumerate((11, 6, 3)):
        ids[row, end] = 100                                 # CLIP's eos: the vocab's last id
        ids[row, end + 1:] = 1
    mask = (torch.arange(12) <= torch.tensor([11, 6, 3]).view(3, 1)).long()
    with torch.no_grad():
        want = tiny.build("clip_text_proj", eos_token_id=eos)(ids, attention_mask=mask)
    for hidden, pooled in tiny.on_ranks(tmp_path / "out", 2, lambda m: m(ids, attention_mask=mask)):
        assert tiny.rel(pooled, want.text_embeds) < 1e-5 and pooled.shape == (3, 48)
        assert tiny.rel(hidden[mask.bool()], want.last_hidden_state[mask.bool()]) < 1e-5


def test_clip_passes_verify(model_dir, tmp_path):
    """verify reads CLIP's hidden states as transformers reports them (the last layer's before the final norm) and
    compares the projected pooled output with its text_embeds."""
    from fmconvert.verify import verify
    convert(model_dir("clip_text_proj"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    r = verify(model_dir("clip_text_proj"), tmp_path / "out", tokens=16)
    assert r["passed"] and r["end_to_end"]["cosine_what"] == "pooled output"


def test_int8_passes_verify(model_dir, tmp_path):
    from fmconvert.verify import verify
    convert(model_dir("xlm_roberta"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    r = verify(model_dir("xlm_roberta"), tmp_path / "out", tokens=16)
    assert not r["failures"] and r["tensors"]["count"] > 0


@pytest.mark.parametrize("edit, match", [
    (dict(is_decoder=True), "is_decoder"),
    (dict(pad_token_id=None), "pad_token_id"),
    (dict(pad_token_id=101), "pad_token_id in the vocabulary"),
    (dict(max_position_embeddings=2), "max_position_embeddings"),
])
def test_bad_configs_are_refused(model_copy, tmp_path, edit, match):
    tiny.refuses(model_copy("roberta"), tmp_path / "out", match, **edit)
