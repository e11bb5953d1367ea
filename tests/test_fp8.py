"""Block-scaled FP8 checkpoints as DeepSeek-V3/R1, Kimi K2 and the Qwen3/GLM FP8 releases publish them: each weight
float8_e4m3 beside its `_scale_inv` blocks, decoded to bf16 on read, checked against transformers' own routine."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.read import Checkpoint, dequantize_fp8
from fmconvert.runtime.load import load
from fmconvert.verify import verify


def encode_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (float8_e4m3 [..., N, K], fp32 scales [..., ceil(N / rows), ceil(K / cols)]), each block's
    largest magnitude mapped to e4m3's 448."""
    br, bc = block
    *lead, N, K = w.shape
    nb, kb = -(-N // br), -(-K // bc)
    pad = w.new_zeros(*lead, nb * br, kb * bc)
    pad[..., :N, :K] = w
    scale = pad.unflatten(-1, (kb, bc)).unflatten(-3, (nb, br)).abs().amax((-3, -1)).clamp(min=1e-8) / 448.0
    q = pad / scale.repeat_interleave(br, -2).repeat_interleave(bc, -1)
    return q[..., :N, :K].to(torch.float8_e4m3fn).contiguous(), scale.float()


def save_fp8(src, dst, block=(16, 16)):
    """A float checkpoint re-saved the way the FP8 releases are: every linear weight of the layers (not the norms,
    the router or the embeddings) in FP8 with its block scales."""
    dst.mkdir()
    state, out = load_file(src / "model.safetensors"), {}
    for k, v in state.items():
        if "layers." in k and k.endswith(".weight") and v.dim() == 2 and "norm" not in k and ".gate.weight" not in k:
            out[k], out[k + "_scale_inv"] = encode_fp8(v, block)
        else:
            out[k] = v
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("shape,block", [((40, 64), (16, 16)), ((37, 50), (16, 16)), ((3, 33, 20), (8, 16)),
                                         ((128, 128), (128, 128)), ((5, 7), (128, 128))])
def test_decoding_equals_transformers_routine_bit_for_bit(shape, block):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = encode_fp8(w, block)
    got = dequantize_fp8(q, s, block)
    want = _dequantize_fp8_weight(q, s, list(block), torch.float32).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert (got.float() - w).abs().max() <= w.abs().max() / 16         # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3", "deepseek_v32"])     # V3.2: its indexer's too
def test_an_fp8_checkpoint_converts_and_verifies(model_dir, tmp_path, name):
    src = save_fp8(model_dir(name), tmp_path / "fp8")
    r = CliRunner().invoke(cli, ["convert", "--tp", "2", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "block-scaled tensors decoded on read" in r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    n = sum(1 for k in load_file(src / "model.safetensors") if k.endswith("_scale_inv"))
    assert m["source"]["fp8"] == {"block": [16, 16], "tensors": n}
    assert m["dtype"] == "float32"           # the config's dtype, as for any source (the FP8 releases say bf16)
    assert verify(src, tmp_path / "out")["passed"]
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "16x16 block scales" in r.output


def test_fp8_to_int8_follows_the_decoded_weights(model_dir, tmp_path):
    """--int8 quantizes what the FP8 decodes to, and the model runs within the int8 bound of that."""
    src = save_fp8(model_dir("deepseek_v3"), tmp_path / "fp8")
    convert(src, tmp_path / "bf16", Options(), progress=False)
    convert(src, tmp_path / "int8", Options(int8=True, group_size=16), progress=False)
    assert verify(src, tmp_path / "int8")["passed"]
    ids = torch.randint(3, 100, (2, 8))
    ref, got = load(tmp_path / "bf16")(ids).float(), load(tmp_path / "int8")(ids).float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    with Checkpoint(src, fp8=(16, 16)) as ckpt:
        name = "model.layers.0.self_attn.kv_b_proj.weight"
        assert ckpt.dtype(name) == torch.bfloat16 and ckpt.shape(name) == (4 * 32, 32)
        assert name + "_scale_inv" not in ckpt
        assert ckpt.stored_bytes(name) == 4 * 32 * 32 + 8 * 2 * 4       # e4m3 bytes and fp32 scales, as on disk
    # the summary's bytes in are the files' (FP8 and its scales), not the bf16 they decode to
    r = convert(src, tmp_path / "again", Options(), progress=False)
    assert r["bytes_in"] == (src / "model.safetensors").stat().st_size - _header_bytes(src / "model.safetensors")


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _rewrite(src, edit_state=None, edit_config=None):
    state = load_file(src / "model.safetensors")
    if edit_state:
        edit_state(state)
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((src / "config.json").read_text())
        edit_config(cfg)
        (src / "config.json").write_text(json.dumps(cfg))


KV_B = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("edit_state,edit_config,match", [
    (lambda s: s.pop(KV_B + "_scale_inv"), None, f"FP8 tensor {KV_B} has no {KV_B}_scale_inv"),
    (lambda s: s.__setitem__(KV_B + "_scale_inv", torch.ones(3, 3)), None, "must be fp32, bf16 or e8m0 \\[8, 2\\]"),
    (lambda s: s.__setitem__("model.norm.weight_scale_inv", torch.ones(1, 1)), None,
     "has no float8_e4m3 tensor model.norm.weight"),
    (None, lambda c: c.pop("quantization_config"), "holds FP8 tensors, but config.json declares no FP8"),
    (None, lambda c: c["quantization_config"].update(weight_block_size=None), "per-tensor FP8 scales"),
    (None, lambda c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme='static'"),
    (None, lambda c: c["quantization_config"].update(quant_method="compressed-tensors"),
     "the weights are quantized \\('compressed-tensors'\\)"),
])
def test_malformed_fp8_is_refused_in_one_line(model_dir, tmp_path, edit_state, edit_config, match):
    src = save_fp8(model_dir("deepseek_v3"), tmp_path / "fp8")
    _rewrite(src, edit_state, edit_config)
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code != 0 and isinstance(r.exception, (FmError, SystemExit))
    assert "Traceback" not in r.output
    with pytest.raises(FmError, match=match):
        convert(src, tmp_path / "out2", Options(), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
