"""Encoder-decoders (T5, BART, Whisper) and Wav2Vec2 on the Triton backend (interpreter on CPU, kernels on CUDA)
against the torch backend: the encoder, cross-attention over a padded source, T5's causal bias in cached decode steps,
a waveform front end with padded frames masked, int8 and float."""

import pytest
import torch

from fmconvert.pipeline import Options, convert
from fmconvert.runtime.generate import generate
from fmconvert.runtime.load import load

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name,int8", [("flan_t5", True), ("bart", False), ("umt5", False)])
def test_triton_backend_matches_torch_backend(tmp_path, name, int8):
    from test_seq2seq import build, source
    build(name).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    convert(tmp_path / "src", out, Options(int8=int8, group_size=16), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton")
    ids, mask, target = source()
    outs = []
    for m, dev in ((ref, "cpu"), (tri, DEVICE)):
        m.attach(m.source_encoder.hidden(ids.to(dev), attention_mask=mask.to(dev)), mask.to(dev))
        outs.append(m(target.to(dev)).cpu())
    want, got = outs
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    a, _ = generate(ref, ids, 5, source_mask=mask)
    b, _ = generate(tri, ids.to(DEVICE), 5, source_mask=mask.to(DEVICE))
    assert a.tolist() == b.cpu().tolist()


@pytest.mark.parametrize("name", ["bart", "flan_t5"])
def test_triton_decode_step_of_an_encoder_decoder(tmp_path, name):
    """The graph-safe decode step (fused rope-less KV append, decode attention: T5's with its relative bias over the
    cache, cross-attention over the padded source) on the Triton backend against the torch backend's eager
    forward."""
    from test_seq2seq import build, source
    build(name).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", Options(int8=True, group_size=16), progress=False)
    ref = load(tmp_path / "out", device="cpu", backend="torch", dequantize=True)
    tri = load(tmp_path / "out", device=DEVICE, backend="triton", dequantize=False)
    ids, mask, target = source()
    ref.attach(ref.source_encoder.hidden(ids, attention_mask=mask), mask)
    want = ref(target)
    tri.attach(tri.source_encoder.hidden(ids.to(DEVICE), attention_mask=mask.to(DEVICE)), mask.to(DEVICE))
    cache = tri.new_cache(2, target.shape[1])
    got = []
    for j in range(target.shape[1]):
        got.append(tri.decode_step(target[:, j:j + 1].to(DEVICE), cache, torch.tensor([j], device=DEVICE)).cpu())
        cache.length += 1
    got = torch.stack(got, 1)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


def test_whisper_on_the_triton_backend(tmp_path):
    """Whisper, int8: the audio encoder (its convs in torch, then Triton's layers), teacher-forced logits and
    transcribe's tokens against the torch backend."""
    from test_whisper import GEN, build, features
    from fmconvert.runtime.speech import transcribe
    build().save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    convert(tmp_path / "src", out, Options(int8=True, group_size=16), progress=False)
    ref = load(out, device="cpu", backend="torch", dequantize=True)
    tri = load(out, device=DEVICE, backend="triton")
    feats = features()
    target = torch.tensor([[100, 101, 105, 107, 9, 13, 21]] * 2)
    outs = []
    for m, dev in ((ref, "cpu"), (tri, DEVICE)):
        m.attach(m.source_encoder.hidden(feats.to(dev)))
        outs.append(m(target.to(dev)).cpu())
    want, got = outs
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    a = [t.tokens for t in transcribe(ref, feats, GEN, "en", max_new_tokens=6, eos_token_id=99)[0]]
    b = [t.tokens for t in transcribe(tri, feats.to(DEVICE), GEN, "en", max_new_tokens=6, eos_token_id=99)[0]]
    assert a == b


@pytest.mark.parametrize("kind", ["wav2vec2_stable", "wavlm"])
def test_wav2vec2_on_the_triton_backend(tmp_path, kind):
    """Wav2Vec2 (stable pre-LN) and WavLM (its gated position bias), int8, a padded batch: the conv front end in
    torch, then Triton's layers with the padded frames masked; the CTC logits against the torch backend."""
    from test_wav2vec2 import build, save, waves

    from fmconvert.runtime.classify import head_logits
    src = save(tmp_path / "src", build(kind), mask=True)
    out = tmp_path / "out"
    convert(src, out, Options(int8=True, group_size=16), progress=False)
    x, mask = waves((1600, 1100))
    outs = []
    for m, dev in ((load(out, device="cpu", backend="torch", dequantize=True), "cpu"),
                   (load(out, device=DEVICE, backend="triton"), DEVICE)):
        h, pooled = m(x.to(dev), attention_mask=mask.to(dev))
        outs.append((head_logits(m, h, pooled, m.frames).cpu(), m.frames.cpu()))
    (want, real), (got, frames) = outs
    assert torch.equal(real, frames) and not real.all()
    assert ((got - want)[real].abs().max() / want.abs().max()).item() < 1e-3
