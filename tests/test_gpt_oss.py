"""GPT-OSS beyond the family tests (which run it through tiny.FAMILIES): MXFP4 checkpoints as published, decoded on
read and checked against transformers' own decoder; the sinks and the clamped SwiGLU really change the output; bad
MXFP4 and other quantized checkpoints are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_bad_input import assert_nothing_left, edit_config

from corpus import assert_one_line_error, run_main
from fmconvert.cli import cli
from fmconvert.pipeline import Options, convert
from fmconvert.read import Checkpoint, dequantize_mxfp4
from fmconvert.reassemble import reassemble
from fmconvert.runtime.load import load
from fmconvert.verify import verify

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
EXPERTS = ("gate_up_proj", "down_proj")


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An HF expert stack [E, K, N] -> MXFP4 (blocks [E, N, K/32, 16], scales [E, N, K/32]), as the published
    checkpoints store it: per 32 values one power of two that brings the largest under 6, each value the nearest
    E2M1 code."""
    w = w.transpose(1, 2).float()
    E, N, K = w.shape
    g = w.reshape(E, N, K // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = ((g / torch.exp2(exp)[..., None]).unsqueeze(-1) - E2M1).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def save_mxfp4(src, dst):
    """The tiny GPT-OSS at src re-saved the way openai/gpt-oss-* are: experts as MXFP4 pairs, a quantization_config."""
    dst.mkdir()
    state = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(EXPERTS):
            state[name + "_blocks"], state[name + "_scales"] = encode_mxfp4(t)
        else:
            state[name] = t
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture
def mxfp4_dir(model_dir, tmp_path):
    return save_mxfp4(model_dir("gpt_oss"), tmp_path / "mxfp4")


def test_mxfp4_decodes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 40, 5), dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
    assert ours.shape == theirs.shape == (3, 160, 40) and ours.dtype == torch.bfloat16
    assert torch.equal(ours.float(), theirs)                      # every MXFP4 value is exact in bf16
    w = torch.randn(2, 64, 48) * 0.05                             # and the test encoder inverts it closely
    back = dequantize_mxfp4(*encode_mxfp4(w)).float()
    assert (back - w).norm() / w.norm() < 0.15


def test_an_mxfp4_checkpoint_converts_verifies_and_reads_back_bf16(mxfp4_dir, tmp_path):
    """Converted at tp 2 and int8, then `verify` against transformers with its own MXFP4 decoder (its loader needs
    accelerate and a GPU kernel package): the decoding, the stacked layout and the runtime are all checked."""
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["convert", "--tp", "2", str(mxfp4_dir), str(out)])
    assert r.exit_code == 0, r.output
    assert "4 expert tensors decoded" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["mxfp4"] == sorted(f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in EXPERTS)
    report = verify(mxfp4_dir, out)
    assert report["passed"], report
    _, back = reassemble(out)
    with Checkpoint(mxfp4_dir, mxfp4=True) as ckpt:
        assert sorted(back) == ckpt.names()        # the decoded names, in transformers' layout
        for name in ckpt.mxfp4:
            assert torch.equal(back[name], ckpt.get(name).float())
    convert(mxfp4_dir, tmp_path / "int8", Options(int8=True, group_size=32), progress=False)
    assert verify(mxfp4_dir, tmp_path / "int8")["passed"]


def test_the_sinks_and_the_clamp_change_the_output(model_dir, tmp_path):
    """Each GPT-OSS feature moves the logits far beyond the parity the family tests hold the runtime to, so a
    runtime that dropped one would fail them."""
    src = model_dir("gpt_oss")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (1, 9))
    base = m(ids)
    hf = transformers.GptOssForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        assert (hf(ids).logits - base).abs().max() < 1e-4
    for blk in m.blocks:
        blk.sinks = torch.full_like(blk.sinks, -1e4)          # exp(-1e4) = 0: no sink
    assert (m(ids) - base).abs().max() > 1e-2
    for blk in m.blocks:
        blk.sinks = blk.t["attn_sinks.weight"]
    m.activation = ("swiglu_oai", m.activation[1], 7.0)          # the published limit: the tiny one clamps
    assert (m(ids) - base).abs().max() > 1e-2


def test_bad_mxfp4_and_other_quantized_checkpoints_are_refused(mxfp4_dir, tmp_path, capsys):
    out = tmp_path / "out"

    def refused(state, *needles):
        save_file(state, mxfp4_dir / "model.safetensors", metadata={"format": "pt"})
        code, _, err = run_main(capsys, "convert", mxfp4_dir, out)
        assert_one_line_error(code, err, 2, *needles)
        assert_nothing_left(out)

    state = load_file(mxfp4_dir / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj"
    refused({k: v for k, v in state.items() if k != name + "_scales"}, f"{name}_blocks has no {name}_scales")
    refused(dict(state, **{name + "_scales": state[name + "_scales"][:, :-1].contiguous()}),
            "must be uint8 [E, N, K/32, 16] and [E, N, K/32]")
    refused(dict(state, **{name + "_scales": torch.full_like(state[name + "_scales"], 255)}), "NaN/Inf")  # 2^128
    refused({k: v for k, v in state.items() if not k.endswith(("_blocks", "_scales"))},
            "says MXFP4", "no *_blocks")
    edit_config(mxfp4_dir, quantization_config={"quant_method": "compressed-tensors"})
    refused(state, "quantized ('compressed-tensors')", "unquantized")
    # GPTQ is read, but not without its group size
    edit_config(mxfp4_dir, quantization_config={"quant_method": "gptq", "bits": 4})
    refused(state, "GPTQ with bits=4, group_size=None", "is not supported")
