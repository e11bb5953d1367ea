"""Conversion round trips: every family converts and reassembles to its source, exactly or within the int8 bound."""

from __future__ import annotations

import hashlib
import json
import re
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import tiny
from fmconvert.errors import FmError
from fmconvert import slice as sl
from fmconvert.cli import cli
from fmconvert.pipeline import QUANT_SLOTS, Options, alibi_slopes, convert
from fmconvert.manifest import block_owners, loop_owners
from fmconvert.policy import ATTENTION_SLOTS, LINEAR_SLOTS, SHARED_BLOCK_SLOTS, ModelSpec, policy_for
from fmconvert.quantize import quantize
from fmconvert.reassemble import canonical, reassemble

ALL = tiny.FAMILIES + ["stories"]
# Quantized weights: |q * scale - w| <= scale / 2, up to the rounding of w / scale in float32.
HALF = 0.5 + 1e-5


def source_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(d / f))
    return out


def expected(d: Path, m: dict, src: dict | None = None, produced=()) -> dict[str, torch.Tensor]:
    """The source tensors a reassembly must give back: all but ignored buffers and a tied lm_head. An ignore
    pattern covers only what no slot takes (A.X K1's: a dense layer's copy of the norm its mixture layers use), so
    names in `produced` (the reassembly's) are kept."""
    src = source_tensors(d) if src is None else src
    pol, _ = policy_for([m["model"]["architecture"]], m["model"]["family"])
    ignored = pol.ignored(m["source"]["prefix"], m["model"]["num_layers"])
    dropped = tuple(m["source"].get("dropped", {}).get("prefixes", ()))
    tied = m["model"]["tied_embeddings"]
    head = pol.head_prefix(m["source"]["prefix"]) + "lm_head.weight"
    return {n: t for n, t in src.items() if (n in produced or not any(p.fullmatch(n) for p in ignored))
            and not (dropped and n.startswith(dropped)) and not (tied and n == head)}


def conv(model: Path, out: Path, **opts) -> Path:
    convert(model, out, Options(**opts), progress=False)
    return out


def rank_tensors(out: Path, m: dict, rank: int) -> dict[str, torch.Tensor]:
    got = {}
    for f in m["ranks"][rank]["files"]:
        got.update(load_file(out / f["path"]))
    return got


def spec_layout(m: dict):
    spec = ModelSpec(**m["model"])
    lay = sl.Layout(**{k: v for k, v in m["parallel"].items() if k not in ("slots", "row_parallel_bias")})
    return spec, lay


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


def assert_exact(want: dict, got: dict):
    assert set(got) == set(want), f"missing {set(want) - set(got)}, unexpected {set(got) - set(want)}"
    bad = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
    assert not bad, f"not exact: {bad}"


def assert_int8_bound(out: Path, want: dict):
    """Quantized tensors within each element's own group bound; everything else exact."""
    m, deq = reassemble(out)
    _, raw = reassemble(out, dequantize=False)
    assert set(deq) == set(want)
    assert set(raw) == set(want) | {n + "_scale" for n in want if n + "_scale" in raw}
    quantized = [n for n in want if n + "_scale" in raw]
    canon_q = set(m["quantization"]["tensors"])
    q = m["quantization"]
    slots = QUANT_SLOTS + (("embed.weight", "lm_head.weight") if q["embeddings"] else
                           ("lm_head.weight",) if q["lm_head"] else ())
    dense = set(m["model"]["dense_layers"] or ())          # a mixture's dense layers: the MLP's slots, not experts'
    linear = set(m["model"]["linear_layers"] or ())        # a hybrid's linear-attention layers: lin_, not attention's
    beside = m["model"]["ssm_beside_attention"]            # (Falcon-H1's have both)
    parts = m["model"]["block_parts"] or [None] * m["model"]["num_layers"]      # Nemotron-H: one half per layer
    half = {"mixer": ("router.", "experts_", "shared_", "mlp_"),
            "mlp": ATTENTION_SLOTS + LINEAR_SLOTS, "hybrid": ("router.", "experts_", "shared_")}
    owners = block_owners(parts, m["model"]["shared_blocks"])        # Zamba2: its blocks' weights held once
    looped = loop_owners(m["model"].get("loop"), m["model"]["num_layers"],       # HRM-Text, ALBERT: by the layer
                         m["model"].get("shared_layers", False))                 # that holds the weights only

    def has(i, s):
        return f"layers.{s}" in m["model"]["slots"] and not (
            dense and s.startswith(("router.", "experts_", "shared_") if i in dense else ("mlp_in.", "mlp_out."))
        ) and not (linear and s.startswith(() if i in linear and (beside or parts[i] == "hybrid") else
                                           ATTENTION_SLOTS if i in linear else LINEAR_SLOTS)
                   ) and not (parts[i] and s.startswith(half[parts[i]])) and not (
            owners.get(i, i) != i and s.startswith(SHARED_BLOCK_SLOTS)) and looped.get(i, i) == i
    assert canon_q == {f"layers.{i}.{s}" for i in range(m["model"]["num_layers"]) for s in QUANT_SLOTS if has(i, s)} | \
        {s for s in slots if s in m["model"]["slots"] and not s.startswith("layers.")}
    assert quantized
    for n, w in want.items():
        if n not in quantized:
            assert torch.equal(deq[n], w), n
            continue
        q, s = raw[n], raw[n + "_scale"]
        assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == w.shape, n
        assert bool((s >= 0).all()) and bool((q.abs() <= 127).all()), n
        assert torch.equal(deq[n], (q.float() * s).to(w.dtype)), n
        err = (q.float() * s - w.float()).abs()
        assert bool((err <= s * HALF).all()), f"{n}: worst excess {float((err - s * HALF).max()):.3g}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", ALL)
def test_float_roundtrip_is_exact(model_dir, tmp_path, name, tp):
    d = model_dir(name)
    out = conv(d, tmp_path / "out", tp=tp)
    m, got = reassemble(out)
    prefix = {"bert": "", "bert_cls": "bert.", "gpt2": "transformer.", "bloom": "transformer.", "gptj": "transformer.",
              "gptneox": "gpt_neox.", "gptneox_seq": "gpt_neox.", "falcon": "transformer.",
              "falcon_new": "transformer.", "falcon_seq": "transformer.", "gpt_bigcode": "transformer.",
              "gpt_bigcode_mha": "transformer.", "gemma3_vl": "language_model.model.", "llava": "language_model.model.",
              "mistral3": "language_model.model.", "llama4_vl": "language_model.model.",
              "minimax_m3_vl": "language_model.model.", "aria_vl": "language_model.model.",
              "qwen3_vl": "model.language_model.", "qwen3_vl_moe": "model.language_model.",
              "glm4v_moe": "model.language_model.", "qwen3_5_vl": "model.language_model.", "nemotron_h": "backbone.",
              "nemotron_h_dense": "backbone.", "biogpt": "biogpt.", "mamba": "backbone.", "falcon_mamba": "backbone.",
              "mamba2": "backbone.", "gpt_neo": "transformer.", "mpt": "transformer.", "dbrx": "transformer.",
              "openai_gpt": "transformer.", "gemma4_vl": "model.language_model.", "codegen": "transformer.",
              "gemma4_unified_vl": "model.language_model.", "apertus1p5_mm": "model.language_model.",
              "exaone": "transformer.", "cohere_compass_vl": "model.language_model.", "emu3_vl": "text_model.model.",
              "xlstm": "backbone."}
    assert m["source"]["prefix"] == prefix.get(name, "model.")
    assert_exact(expected(d, m, produced=got), got)


INT8_CASES = [(n, tp, g) for n in ALL for tp in (1, 2) for g in (32, 128)] + \
    [(n, 4, g) for n in ("llama", "mistral") for g in (32, 128)]


@pytest.mark.parametrize("name,tp,group", INT8_CASES)
def test_int8_within_group_bound(model_dir, tmp_path, name, tp, group):
    d = model_dir(name)
    out = conv(d, tmp_path / "out", tp=tp, int8=True, group_size=group)
    m = json.loads((out / "manifest.json").read_text())
    for r in range(tp):
        for n, info in m["ranks"][r]["tensors"].items():
            if n.endswith("_scale"):
                assert info["dtype"] == m["quantization"]["scale_dtype"]
                assert m["ranks"][r]["tensors"][n[:-6]]["dtype"] == "int8"
    assert_int8_bound(out, expected(d, m, produced=reassemble(out)[1]))


@pytest.mark.parametrize("name,head_flag,want", [("llama", True, True), ("llama", False, False),
                                                  ("gpt2", True, False)])
def test_int8_quantizes_an_untied_lm_head_unless_told_not_to(model_dir, tmp_path, name, head_flag, want):
    """The head is the largest matmul of a small model and is read whole every token; a tied one (gpt2) is the
    embedding table and follows --int8-embeddings."""
    out = tmp_path / "out"
    args = ["convert", "-q", "--int8", "--group-size", "32", str(model_dir(name)), str(out)]
    res = CliRunner().invoke(cli, args + ([] if head_flag else ["--no-int8-lm-head"]))
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["lm_head"] is want
    assert ("lm_head.weight" in m["quantization"]["tensors"]) is want
    head = m["ranks"][0]["tensors"].get("lm_head.weight")       # None when tied
    assert (head is not None and head["dtype"] == "int8") is want
    res = CliRunner().invoke(cli, ["verify", str(model_dir(name)), str(out)])
    assert res.exit_code == 0, res.output


def test_int8_embeddings_and_bf16(model_dir, tmp_path):
    d = model_dir("llama")
    out = conv(d, tmp_path / "out", tp=2, int8=True, int8_embeddings=True, group_size=32, dtype="bf16")
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["scale_dtype"] == "float16"
    assert {"embed.weight", "lm_head.weight"} <= set(m["quantization"]["tensors"])
    want = {n: t.to(torch.bfloat16) for n, t in expected(d, m).items()}
    _, raw = reassemble(out, dequantize=False)
    for n, w in want.items():
        if n + "_scale" in raw:
            err = (raw[n].float() * raw[n + "_scale"] - w.float()).abs()
            assert bool((err <= raw[n + "_scale"] * HALF).all()), n
        else:
            assert same_bytes(raw[n], w), n


def test_bf16_output_equals_cast_source(model_dir, tmp_path):
    d = model_dir("qwen2")
    out = conv(d, tmp_path / "out", tp=2, dtype="bf16")
    m, got = reassemble(out)
    assert m["dtype"] == "bfloat16"
    assert_exact({n: t.to(torch.bfloat16) for n, t in expected(d, m).items()}, got)
    for r in range(2):
        assert {t.dtype for t in rank_tensors(out, m, r).values()} == {torch.bfloat16, torch.float32}


def _layer0_canonical(d: Path, m: dict, slot: str) -> torch.Tensor:
    """Layer 0's canonical tensor for `slot`, built from the source by the policy's own names and fuse."""
    spec, _ = spec_layout(m)
    pol, _ = policy_for([spec.architecture])
    src = source_tensors(d)
    names = [n for n in next(s for s in pol.sources(spec, {}, m["source"]["prefix"], 0) if s.slot == slot).names]
    return pol.fuse(spec, slot, [src[n] for n in names])


@pytest.mark.parametrize("name,tp,group,slot", [
    ("llama", 2, 32, "attn_out.weight"),
    ("llama", 2, 16, "mlp_out.weight"),
    ("mistral", 4, 16, "attn_out.weight"),
    ("gpt2", 2, 32, "mlp_out.weight"),
    ("bloom", 4, 16, "attn_out.weight"),
])
def test_row_parallel_quantize_then_slice(model_dir, tmp_path, name, tp, group, slot):
    d = model_dir(name)
    out = conv(d, tmp_path / "out", tp=tp, int8=True, group_size=group)
    m = json.loads((out / "manifest.json").read_text())
    w = _layer0_canonical(d, m, slot)
    K = w.shape[1]
    assert K % tp == 0 and (K // tp) % group == 0, "case must not need clamping or padding"
    assert m["quantization"]["tensors"][f"layers.0.{slot}"]["group_size"] == group
    q, s = quantize(w, group, torch.float32)
    k, ng = K // tp, K // tp // group
    for r in range(tp):
        got = rank_tensors(out, m, r)
        assert same_bytes(got[f"layers.0.{slot}"], q[:, r * k:(r + 1) * k].contiguous())
        assert same_bytes(got[f"layers.0.{slot}_scale"], s[:, r * ng:(r + 1) * ng].contiguous())


@pytest.mark.parametrize("name,tp,group,slot", [
    ("llama", 2, 32, "qkv.weight"),
    ("llama", 2, 32, "mlp_in.weight"),      # gated, intermediate 48 per rank padded to 64
    ("mistral", 4, 16, "qkv.weight"),       # one kv head replicated on 4 ranks
    ("bloom", 2, 32, "qkv.weight"),         # interleaved heads
    ("gpt2", 2, 64, "mlp_in.weight"),       # Conv1D, transposed
    ("stories", 2, 32, "mlp_in.weight"),
])
def test_column_parallel_quantize_then_slice(model_dir, tmp_path, name, tp, group, slot):
    d = model_dir(name)
    out = conv(d, tmp_path / "out", tp=tp, int8=True, group_size=group)
    m = json.loads((out / "manifest.json").read_text())
    spec, lay = spec_layout(m)
    q, s = quantize(_layer0_canonical(d, m, slot), group, torch.float32)
    qs, ss = sl.shard(spec, lay, slot, q), sl.shard(spec, lay, slot, s)
    for r in range(tp):
        got = rank_tensors(out, m, r)
        assert same_bytes(got[f"layers.0.{slot}"], qs[r])
        assert same_bytes(got[f"layers.0.{slot}_scale"], ss[r])


def test_stories_tp2_int8_pads_intermediate(model_dir, tmp_path):
    """172 units over 2 ranks: 86 each, padded to 96 (groups of 32 for mlp_out) rather than to 128 (a group of 128
    or 64 would pad 42 units of 86, each a column every token reads)."""
    d = model_dir("stories")
    out = conv(d, tmp_path / "out", tp=2, int8=True)
    m = json.loads((out / "manifest.json").read_text())
    par = m["parallel"]
    assert (par["intermediate_chunk"], par["intermediate_per_rank"]) == (86, 96)
    assert m["quantization"]["tensors"]["layers.0.mlp_out.weight"]["group_size"] == 32
    for r in range(2):
        got = rank_tensors(out, m, r)
        for i in range(m["model"]["num_layers"]):
            w_in, s_in = got[f"layers.{i}.mlp_in.weight"], got[f"layers.{i}.mlp_in.weight_scale"]
            assert w_in.shape == (192, 64) and s_in.shape == (192, 1)
            for pad in (slice(86, 96), slice(96 + 86, 192)):
                assert not w_in[pad].any() and not s_in[pad].any()
                assert w_in[pad.start - 86:pad.start].any()
            w_out = got[f"layers.{i}.mlp_out.weight"]
            assert w_out.shape == (64, 96) and not w_out[:, 86:].any() and w_out[:, :86].any()
            assert got[f"layers.{i}.mlp_out.weight_scale"].shape == (64, 3)
    want = expected(d, m)
    _, deq = reassemble(out)
    assert deq["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)
    assert_int8_bound(out, want)


@pytest.mark.parametrize("int8", [False, True])
def test_uneven_intermediate_last_rank_padded(model_dir, tmp_path, int8):
    d = model_dir("llama", intermediate_size=90)
    out = conv(d, tmp_path / "out", tp=4, int8=int8, group_size=16)
    m = json.loads((out / "manifest.json").read_text())
    per = m["parallel"]["intermediate_per_rank"]
    assert m["parallel"]["intermediate_chunk"] == 23 and per == (32 if int8 else 23)
    last = rank_tensors(out, m, 3)["layers.0.mlp_out.weight"]
    assert last.shape[1] == per and not last[:, 90 - 69:].any()
    if int8:
        assert_int8_bound(out, expected(d, m))
    else:
        assert_exact(expected(d, m), reassemble(out)[1])


def test_canonical_names(model_dir, tmp_path):
    out = conv(model_dir("bloom"), tmp_path / "bloom", tp=2)
    m, c = canonical(out)
    assert {"embed.weight", "embed_norm.weight", "final_norm.bias", "layers.1.qkv.weight", "alibi.slopes"} <= set(c)
    assert c["layers.0.qkv.weight"].shape == (192, 64)
    assert torch.equal(c["alibi.slopes"], alibi_slopes(4))
    out = conv(model_dir("bert_cls"), tmp_path / "bert", tp=2)
    m, c = canonical(out)
    assert m["extras"] == ["classifier.bias", "classifier.weight"]
    assert {"extra.classifier.weight", "pooler.weight", "type_embed.weight"} <= set(c)
    assert not any(k.startswith("bert.") for k in c)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xglm_sinusoidal_table_is_transformers_own(model_dir, tmp_path, dtype):
    # XGLM stores no position table: the converter writes fairseq's, which must be the buffer transformers builds
    # (in the model's dtype), on every rank, and reassembly must leave it out again.
    out = conv(model_dir("xglm"), tmp_path / "out", tp=2, dtype=dtype)
    m, c = canonical(out)
    assert m["model"]["position"] == {"type": "sinusoidal", "offset": 2}
    hf = tiny.build("xglm").model.embed_positions.weights.to(getattr(torch, dtype))
    assert c["pos_embed.weight"].dtype == hf.dtype and torch.equal(c["pos_embed.weight"], hf)
    assert torch.equal(rank_tensors(out, m, 1)["pos_embed.weight"], hf)
    assert not any("pos" in n for n in reassemble(out)[1])


def test_axk1_normalises_the_mixture_output_only(model_copy, tmp_path):
    # A.X K1's release stores post_mlp_layernorm in every layer; its dense layers' copy is unused (transformers drops
    # it too), so the converter must neither refuse it nor apply it there, and the mixture layers keep theirs.
    from safetensors.torch import save_file

    d = model_copy("axk1")
    src = load_file(d / "model.safetensors")
    norms = {n for n in src if n.endswith("post_mlp_layernorm.weight")}
    assert norms and "model.layers.0.post_mlp_layernorm.weight" not in norms        # layer 0 is the dense one
    src["model.layers.0.post_mlp_layernorm.weight"] = torch.full((64,), 7.0)
    save_file(src, d / "model.safetensors", metadata={"format": "pt"})
    out = conv(d, tmp_path / "out", tp=2)
    m, c = canonical(out)
    assert {n for n in c if n.endswith("moe_post_norm.weight")} == {"layers.1.moe_post_norm.weight",
                                                                    "layers.2.moe_post_norm.weight"}
    assert torch.equal(c["layers.1.moe_post_norm.weight"], src[next(n for n in norms if ".1." in n)])


def test_deterministic_output(model_dir, tmp_path):
    for name, opts in (("stories", dict(tp=2, int8=True)), ("gpt2", dict(tp=2, max_shard_size="30KB"))):
        a = conv(model_dir(name), tmp_path / f"{name}-a", **opts)
        b = conv(model_dir(name), tmp_path / f"{name}-b", **opts)
        files = sorted(p.relative_to(a) for p in a.rglob("*"))
        assert files == sorted(p.relative_to(b) for p in b.rglob("*"))
        assert Path("manifest.json") in files
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_inspect(model_dir, tmp_path):
    out = conv(model_dir("stories"), tmp_path / "out", tp=2, int8=True)
    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads((out / "manifest.json").read_text())
    r = runner.invoke(cli, ["inspect", str(out)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.output and "rank 1" in r.output
    assert "window" not in r.output and "soft-capped" not in r.output


def test_inspect_names_windows_and_soft_caps(model_dir, tmp_path):
    out = conv(model_dir("gemma2", num_hidden_layers=6), tmp_path / "out")
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    assert r.exit_code == 0, r.output
    text = re.sub(r"[\s│]+", " ", r.output)           # rows wrap inside the table's cells
    assert "window 4 in layers 0, 2, 4" in text and "logits soft-capped at 2" in text
    assert "each half's output normed too" in text
    out = conv(model_dir("qwen2_moe"), tmp_path / "moe", tp=2)
    r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
    text = re.sub(r"[\s│]+", " ", r.output)
    assert "4 per layer, top 2 (not renormalised); a shared expert of width 80" in text, text


def test_inspect_names_a_logit_biased_router_and_a_normed_mixture(model_dir, tmp_path):
    for name, want in (("kolibri1", "sigmoid scores, chosen on the logits plus a bias"),
                       ("axk1", "pre-LN, the mixture's output normed too"), ("xglm", "positions / norm sinusoidal")):
        out = conv(model_dir(name), tmp_path / name)
        r = CliRunner().invoke(cli, ["inspect", str(out)], terminal_width=200)
        assert r.exit_code == 0, r.output
        assert want in re.sub(r"[\s│]+", " ", r.output), (name, r.output)


def test_cli_end_to_end(model_dir, tmp_path):
    out = tmp_path / "out"
    env_cmd = [sys.executable, "-m", "fmconvert"]
    p = subprocess.run(env_cmd + ["convert", "--tp", "2", "--int8", str(model_dir("stories")), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "converted LlamaForCausalLM" in p.stdout and "Traceback" not in p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["parallel"]["tp"] == 2 and m["quantization"]["group_size"] == 128
    p = subprocess.run(env_cmd + ["convert", "-q", str(model_dir("stories")), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "--force" in p.stderr


def _safetensors_data_bytes(path: Path) -> tuple[int, int]:
    """(tensor count, bytes of tensor data) of one safetensors file, from its header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    return len(header), sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())


def test_max_shard_size_splits_files(model_dir, tmp_path):
    d = model_dir("llama")
    out = conv(d, tmp_path / "out", tp=2, max_shard_size="20KB")
    m = json.loads((out / "manifest.json").read_text())
    for r in m["ranks"]:
        assert len(r["files"]) > 1
        for f in r["files"]:
            blob = (out / f["path"]).read_bytes()
            assert len(blob) == f["size"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
            count, data = _safetensors_data_bytes(out / f["path"])
            assert data <= 20_000 or count == 1, (f["path"], count, data)
            assert count == sum(t["file"] == f["path"] for t in r["tensors"].values())
    shards = [f["path"] for r in m["ranks"] for f in r["files"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "config.json", "generation_config.json"]
                                                           + shards)
    assert_exact(expected(d, m), reassemble(out)[1])


def test_sharded_input(tmp_path):
    d = tmp_path / "src"
    tiny.build("llama").save_pretrained(d, max_shard_size="50KB")
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    out = conv(d, tmp_path / "out", tp=2)
    m, got = reassemble(out)
    files = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(files) > 1 and sorted(m["source"]["fingerprints"]) == files
    assert_exact(expected(d, m), got)


def _header_sha256(path: Path) -> str:
    blob = path.read_bytes()
    return hashlib.sha256(blob[:8 + struct.unpack("<Q", blob[:8])[0]]).hexdigest()


def test_source_fingerprints_by_default_full_sha256_on_request(tmp_path):
    d = tmp_path / "src"
    tiny.build("llama").save_pretrained(d, max_shard_size="50KB")
    files = sorted(p.name for p in d.glob("*.safetensors"))
    m = json.loads((conv(d, tmp_path / "a", tp=2, int8=True) / "manifest.json").read_text())
    assert "files" not in m["source"]
    assert m["source"]["fingerprints"] == {f: {"size": (d / f).stat().st_size, "head_sha256": _header_sha256(d / f)}
                                           for f in files}
    full = json.loads((conv(d, tmp_path / "b", tp=2, int8=True, source_sha256=True) / "manifest.json").read_text())
    assert full["source"]["files"] == {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in files}
    assert full["source"]["fingerprints"] == m["source"]["fingerprints"]
    # the flag changes only the source record: the shards are the same bytes
    assert full["ranks"] == m["ranks"]
    assert CliRunner().invoke(cli, ["convert", "-q", "--source-sha256", str(d), str(tmp_path / "c")]).exit_code == 0
    assert set(json.loads((tmp_path / "c" / "manifest.json").read_text())["source"]["files"]) == set(files)


def _quantize_reference(w: torch.Tensor, group: int, scale_dtype: torch.dtype):
    """The whole weight at once, in the plainest torch: scales = max|w| / 127 rounded up to scale_dtype."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    s = g.abs().amax(dim=-1) / 127
    st = s.to(scale_dtype)
    st = torch.where(st.float() < s, torch.nextafter(st, torch.full_like(st, float("inf"))), st)
    safe = torch.where(st == 0, 1.0, st.float()).unsqueeze(-1)
    q = torch.round(g / safe)
    d = q * safe - g
    stats = (float(g.double().square().sum()), float(d.double().square().sum()), float(d.abs().max()))
    return q.to(torch.int8).reshape(N, K), st, stats


@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.float16),
                                               (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("N,K,group", [(1, 128, 128), (7, 96, 32), (300, 384, 128), (513, 2048, 128),
                                       (769, 1280, 256)])
def test_quantize_matches_reference(dtype, scale_dtype, N, K, group):
    from fmconvert.quantize import ErrorStats
    torch.manual_seed(N * K)
    w = torch.randn(N, K) * torch.rand(N, 1) * 3
    w[0, :group] = 0.0                                   # an all-zero group: scale 0, q 0
    if N > 4:
        w[1, :group] = -0.0                              # -0.0 too: the scale must still be +0.0
        w[2, :group] = torch.randn(group) * 1e-7         # scales below float16's normal range
        w[3, :group] = torch.randn(group) * (6e4 if dtype == torch.float16 else 1e7)   # bf16/fp32: inf fp16 scales
        w[4, group // 2] = 1e-30
    w = w.to(dtype)
    want_q, want_s, (sig, err, max_abs) = _quantize_reference(w, group, scale_dtype)
    stats = ErrorStats()
    q, s = quantize(w, group, scale_dtype, stats)
    assert torch.equal(q, want_q)
    assert torch.equal(s.view(torch.uint8), want_s.view(torch.uint8))   # bit for bit, -0.0 and inf included
    if math.isfinite(err):              # an inf scale makes NaN errors (convert refuses those weights)
        assert stats.max_abs == max_abs
        assert stats.sig == pytest.approx(sig, rel=1e-5) and stats.err == pytest.approx(err, rel=1e-5)
    # row ranges written into bigger outputs (how the pipeline's threads quantize) give the same bytes
    q2, s2 = torch.zeros(N + 3, K, dtype=torch.int8), torch.zeros(N + 3, K // group, dtype=scale_dtype)
    for lo in range(0, N, 200):
        quantize(w[lo:lo + 200], group, scale_dtype, out=(q2[lo + 2:lo + 202][:N - lo], s2[lo + 2:lo + 202][:N - lo]))
    assert torch.equal(q2[2:N + 2], want_q) and torch.equal(s2[2:N + 2].view(torch.uint8), want_s.view(torch.uint8))


def test_pickle_needs_allow_pickle(tmp_path, capsys):
    from fmconvert.cli import main
    d = tmp_path / "src"
    model = tiny.build("llama")
    model.save_pretrained(d)
    (d / "model.safetensors").unlink()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["convert", "-q", str(d), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()
    out = conv(d, tmp_path / "out", tp=2, allow_pickle=True)
    m, got = reassemble(out)
    assert_exact(expected(d, m, sd), got)


def test_sidecar_files_copied(model_dir, tmp_path):
    d = model_dir("stories")
    out = conv(d, tmp_path / "out", tp=2)
    m = json.loads((out / "manifest.json").read_text())
    want = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert sorted(m["source"]["sidecar_files"]) == want
    for f in want:
        assert (out / f).read_bytes() == (d / f).read_bytes(), f


def test_force_replaces_output(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    s = convert(model_dir("opt350"), out, Options(tp=2, force=True), progress=False)
    assert s["architecture"] == "OPTForCausalLM" and s["files"] == 2
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.fmconvert-tmp-")]
    with safe_open(out / "rank1-00001.safetensors", framework="pt") as h:
        assert h.metadata()["rank"] == "1"


def test_reassemble_refuses_tampered_output(model_dir, tmp_path):
    from fmconvert.errors import FmError
    out = conv(model_dir("llama"), tmp_path / "out", tp=2)
    path = out / "manifest.json"
    good = path.read_text()
    m = json.loads(good)
    m["ranks"][1]["files"][0]["path"] = "../outside.safetensors"
    for t in m["ranks"][1]["tensors"].values():
        t["file"] = "../outside.safetensors"
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match="escapes the output directory"):
        reassemble(out)
    m = json.loads(good)
    m["ranks"][0]["tensors"]["layers.0.qkv.weight"]["shape"] = [65, 64]
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match="layers.0.qkv.weight"):
        reassemble(out)
    m = json.loads(good)
    del m["ranks"][1]["tensors"]["final_norm.weight"]
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match="final_norm.weight is missing from rank 1"):
        reassemble(out)
    m = json.loads(good)
    del m["source"]["prefix"]
    path.write_text(json.dumps(m))
    with pytest.raises(FmError, match="prefix"):
        reassemble(out)
    path.write_text(good)
    assert reassemble(out)[1]


def test_public_python_api(model_dir, tmp_path):
    import fmconvert
    import fmconvert.pipeline  # noqa: F401  (a submodule must not shadow the public function)
    fmconvert.convert(model_dir("llama"), tmp_path / "out", tp=1, int8=True, group_size=32)
    logits = fmconvert.load(tmp_path / "out")(torch.tensor([[5, 6, 7]]))
    assert logits.shape == (1, 3, 101) and torch.isfinite(logits).all()


def test_a_head_under_its_other_name_converts_the_same(model_dir, tmp_path):
    """GPT-NeoX checkpoints name the head embed_out; a transformers 5 state dict calls it lm_head. Either converts to
    the same shards, and reassembles under the name its source used (the manifest records the spelling)."""
    import shutil

    from safetensors.torch import load_file, save_file
    d = model_dir("gptneox")
    renamed = tmp_path / "renamed"
    shutil.copytree(d, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    a, b = conv(d, tmp_path / "a", tp=2), conv(renamed, tmp_path / "b", tp=2)
    (ma, ta), (mb, tb) = reassemble(a), reassemble(b)
    assert "aliases" not in ma["source"] and mb["source"]["aliases"] == {"lm_head.weight": 0}
    assert "embed_out.weight" in ta and "lm_head.weight" in tb
    assert torch.equal(ta.pop("embed_out.weight"), tb.pop("lm_head.weight"))
    assert set(ta) == set(tb) and all(torch.equal(ta[n], tb[n]) for n in ta)


def test_falcon_layouts_are_recorded_and_reassemble_under_their_own_names(model_dir, tmp_path):
    """Falcon's q|k|v layout and norm names follow its config: the manifest records the layout picked and the
    spellings used, so the shards go back to exactly the source's tensors."""
    for name, layout, aliases in (("falcon", "separate", {}), ("falcon_seq", "interleaved",
                                  {"layers.mlp_norm.bias": 0, "layers.mlp_norm.weight": 0}),
                                  ("falcon_new", "grouped", {"layers.attn_norm.bias": 0,
                                                             "layers.attn_norm.weight": 0})):
        d = model_dir(name)
        out = conv(d, tmp_path / name, tp=2)
        m, got = reassemble(out)
        assert m["model"]["qkv_layout"] == layout and m["source"].get("aliases", {}) == aliases, name
        assert_exact(expected(d, m), got)


def test_the_default_group_shrinks_to_divide_every_width(model_dir, tmp_path):
    """Hidden 96 (as GPT-OSS's 2880) is no multiple of 128 or 64: without --group-size the groups are 32 wide, and
    the manifest says so; asking for 64 is refused, naming the width."""
    d = model_dir("llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    out = conv(d, tmp_path / "out", int8=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantization"]["group_size"] == 32
    assert {t["group_size"] for t in m["quantization"]["tensors"].values()} == {32}
    assert_int8_bound(out, expected(d, m))
    with pytest.raises(FmError, match="--group-size 64 does not divide K=96"):
        conv(d, tmp_path / "out64", int8=True, group_size=64)


@pytest.mark.parametrize("name,opts", [("stories", dict(tp=2, int8=True, max_shard_size="200KB")),
                                       ("gemma4", dict(tp=2)), ("mixtral", dict(tp=2, int8=True, group_size=16)),
                                       ("gemma3_vl", dict(tp=1, int8=True, dtype="bf16"))])
def test_dry_run_plans_exactly_the_files_a_conversion_writes(model_dir, tmp_path, name, opts):
    """--dry-run reads config.json and the headers only, writes nothing, and names every file the real run writes,
    with its size to the byte."""
    src, out = model_dir(name), tmp_path / "out"
    s = convert(src, out, Options(dry_run=True, **opts), progress=False)
    assert s["dry_run"] and not out.exists()
    real = convert(src, out, Options(**opts), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert s["planned"] == [[(f["path"], f["size"]) for f in rank["files"]] for rank in m["ranks"]]
    assert s["bytes_out"] == real["bytes_out"] and s["params"] == real["params"]


def test_dry_run_from_the_cli_and_its_errors(model_dir, tmp_path, capsys):
    from fmconvert.cli import main
    r = CliRunner().invoke(cli, ["convert", "--dry-run", "--tp", "2", "--int8", str(model_dir("llama")),
                                 str(tmp_path / "out")], terminal_width=200)
    assert r.exit_code == 0 and "nothing written" in r.output and "each rank" in r.output, r.output
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                 # the same checks as a conversion, in one line
        main(["convert", "--dry-run", "--tp", "3", str(model_dir("llama")), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and len(err.strip().splitlines()) == 1 and "tp=3" in err, err


@pytest.mark.parametrize("name", ["stories", "mistral", "gemma3", "gemma4", "deepseek_v3", "qwen3_5", "llama4",
                                  "nemotron_h"])
def test_kv_cache_bytes_match_what_the_runtime_allocates(model_dir, tmp_path, name):
    """The per-token KV bytes that --dry-run and inspect print (manifest.kv_cache_bytes) are what a loaded rank's
    cache holds: every position in plain layers, the window (or chunk) in ring layers, nothing in linear ones."""
    from fmconvert import manifest as mf
    from fmconvert.runtime.comm import ThreadGroup
    from fmconvert.runtime.load import load
    out = conv(model_dir(name), tmp_path / "out", tp=2)
    m = mf.read(out)
    full, windowed, window = mf.kv_cache_bytes(m["model"], m["parallel"], 4)
    model = load(out, rank=1, comm=ThreadGroup(2).comm(1))
    S = 64
    cache = model.new_cache(1, S)
    got_full = got_windowed = 0
    for k, v, ring in zip(cache.k, cache.v, cache.ring):
        n = k.numel() * k.element_size() + (0 if v.data_ptr() == k.data_ptr() else v.numel() * v.element_size())
        if ring:
            assert ring == window
            got_windowed += n // ring
        else:
            got_full += n // S
    # a window at least as long as the cache is no ring (Mistral's 4096 here): those layers keep every position
    assert (got_full, got_windowed) == ((full + windowed, 0) if window >= S else (full, windowed))
    assert full + windowed > 0
