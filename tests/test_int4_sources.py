"""4-bit GPTQ and AWQ checkpoints, decoded as they are read (read.dequantize_int4). The tests pack a tiny model's
linear weights the way each format stores them (GPTQ: input rows in the 4-bit fields of an int32, zero points minus 1
in its own format, an act-order g_idx; AWQ: eight columns a word in the order 0 2 4 6 1 3 5 7), then check that the
converted model equals transformers running the dequantized weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def _words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> int32 words, field j in bits 4j.. (two's complement past 2^31)."""
    w = (fields.to(torch.int64) << SHIFTS).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def _quantize(w: torch.Tensor, group: int, g_idx, zero_min: int):
    """w [N, K] -> (q [K, N], zeros [G, N], scales fp16 [G, N], the dequantized [N, K] in fp32): asymmetric 4-bit
    per group of input rows (g_idx: each row's group)."""
    N, K = w.shape
    G = K // group
    g_idx = torch.arange(K) // group if g_idx is None else g_idx
    wt = w.t().float()
    lo = torch.stack([wt[g_idx == g].amin(0) for g in range(G)]).clamp(max=0)
    hi = torch.stack([wt[g_idx == g].amax(0) for g in range(G)]).clamp(min=0)
    scales = ((hi - lo) / (15 - zero_min)).clamp(min=1e-4).half()
    zeros = (zero_min - torch.round(lo / scales.float())).clamp(zero_min, 15)
    q = torch.round(wt / scales.float()[g_idx] + zeros[g_idx]).clamp(0, 15)
    deq = ((q - zeros[g_idx]) * scales.float()[g_idx]).t()
    return q.to(torch.int64), zeros.to(torch.int64), scales, deq


def _gptq(w, group, g_idx, v1: bool):
    q, zeros, scales, deq = _quantize(w, group, g_idx, zero_min=1 if v1 else 0)
    K, N = q.shape
    qweight = _words(q.reshape(K // 8, 8, N).transpose(1, 2))                 # row k: field k % 8 of word k // 8
    qzeros = _words((zeros - (1 if v1 else 0)).reshape(-1, N // 8, 8))        # column n: field n % 8
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}, deq


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]        # field f of a word holds column AWQ_ORDER[f]


def _awq(w, group):
    q, zeros, scales, deq = _quantize(w, group, None, zero_min=0)
    K, N = q.shape
    qweight = _words(q.reshape(K, N // 8, 8)[:, :, AWQ_ORDER])
    qzeros = _words(zeros.reshape(-1, N // 8, 8)[:, :, AWQ_ORDER])
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}, deq


def _quantized_copy(src, dst, method: str, group: int = 32, act_order: bool = False, v1: bool = True):
    """dst: src's checkpoint with every layer's linears in `method`'s 4-bit format; returns the dequantized state."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    out, deq_state = {}, dict(state)
    gen = torch.Generator().manual_seed(0)
    for name, t in state.items():
        base = name[:-len(".weight")]
        if not (name.endswith(".weight") and base.split(".")[-1] in LINEARS):
            out[name] = t
            continue
        if method == "gptq":
            K = t.shape[1]
            g_idx = torch.randperm(K, generator=gen) // group if act_order else None
            parts, deq = _gptq(t, group, g_idx, v1)
            if g_idx is not None:
                parts["g_idx"] = g_idx.to(torch.int32)
        else:
            parts, deq = _awq(t, group)
        out.update({f"{base}.{k}": v for k, v in parts.items()})
        deq_state[name] = deq.half().float()        # what the checkpoint stands for: fp16 values
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                                   "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
                                  if method == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return deq_state


@pytest.mark.parametrize("method, act_order, v1", [("gptq", False, True), ("gptq", True, True),
                                                   ("gptq", False, False), ("awq", False, True)])
def test_int4_checkpoint_converts_to_the_model_its_weights_stand_for(model_dir, tmp_path, method, act_order, v1):
    src = model_dir("llama")
    deq = _quantized_copy(src, tmp_path / "q", method, act_order=act_order, v1=v1)
    out = tmp_path / "out"
    convert(tmp_path / "q", out, Options(tp=2, dtype="fp32"), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["int4"] == {"method": method, "tensors": 7 * 2}
    from click.testing import CliRunner

    from fmconvert.cli import cli
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    assert r.exit_code == 0 and f"{method.upper()}: 14 4-bit tensors decoded to float on read" in r.output, r.output
    hf = tiny.build("llama")
    hf.load_state_dict(deq)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        want = hf(ids).logits
    for got in tiny.on_ranks(out, 2, lambda f: f(ids)):
        assert tiny.rel(got, want) < 1e-5
    if act_order:                # verify reads the source as transformers would run it, dequantized
        from fmconvert.verify import verify
        r = verify(tmp_path / "q", out)
        assert r["passed"], r
    r = CliRunner().invoke(cli, ["convert", "--dry-run", str(tmp_path / "q"), str(tmp_path / "dry")],
                           terminal_width=200)
    assert r.exit_code == 0 and "x larger)" in r.output, r.output     # fp32 from 4 bits: the output grows
    # the same weights through --int8: within the usual bound of the dequantized model
    convert(tmp_path / "q", tmp_path / "int8", Options(int8=True, group_size=32), progress=False)
    assert tiny.rel(load(tmp_path / "int8")(ids), want) < 0.03


def test_awq_read_in_gptq_order_would_be_wrong(model_dir, tmp_path):
    """The formats' column orders really differ (so the test above tells AWQ's from a plain one): AWQ's words read
    with their columns in plain order give other weights."""
    from fmconvert.read import dequantize_int4
    src = model_dir("llama")
    _quantized_copy(src, tmp_path / "q", "awq")
    t = load_file(tmp_path / "q" / "model.safetensors")
    p = "model.layers.0.mlp.gate_proj."
    awq = dequantize_int4(t[p + "qweight"], t[p + "qzeros"], t[p + "scales"], None,
                          {"method": "awq", "zero_offset": 0})
    plain = {"method": "awq_plain"}                     # any method but "gptq" unpacks columns; reorder them away
    from fmconvert import read
    saved = read._AWQ_COLUMNS
    try:
        read._AWQ_COLUMNS = list(range(8))
        wrong = dequantize_int4(t[p + "qweight"], t[p + "qzeros"], t[p + "scales"], None, plain)
    finally:
        read._AWQ_COLUMNS = saved
    assert not torch.equal(awq, wrong)


@pytest.mark.parametrize("change, words", [
    (dict(bits=8), "bits=8"),
    (dict(version="gemv"), "format 'gemv'"),
    (dict(zero_point=False), "AWQ with"),
])
def test_unsupported_int4_variants_are_refused_in_one_line(model_dir, tmp_path, change, words):
    _quantized_copy(model_dir("llama"), tmp_path / "q", "awq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match=words) as e:
        convert(tmp_path / "q", tmp_path / "out", Options(), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
