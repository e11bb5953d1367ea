"""`fmconvert verify`: clean conversions pass, planted defects fail and are named, bad input exits 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.cli import main as cli_main
from fmconvert.pipeline import Options, convert
from fmconvert.errors import FmError
from fmconvert.verify import DEFAULTS, verify

ROOT = Path(__file__).resolve().parents[1]


def conv(model: Path, out: Path, **opts) -> Path:
    convert(model, out, Options(**opts), progress=False)
    return out


def run_cli(*args) -> int:
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def edit_rank(out: Path, rank: int, fn):
    """Apply fn(tensors) to one rank's shards, rewrite them, and fix the manifest so integrity still passes:
    the deeper stages must find the defect on their own."""
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    entry = m["ranks"][rank]
    tensors = {}
    for f in entry["files"]:
        tensors.update(load_file(out / f["path"]))
    fn(tensors)
    first = entry["files"][0]["path"]
    for f in entry["files"][1:]:
        (out / f["path"]).unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / first, metadata={"format": "pt"})
    blob = (out / first).read_bytes()
    entry["files"] = [{"path": first, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}]
    entry["tensors"] = {k: {"file": first, "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                        for k, v in sorted(tensors.items())}
    mpath.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return m


def failures(report: dict, stage: str | None = None) -> str:
    if stage is None:
        return "\n".join(report["failures"])
    return "\n".join(report.get(stage, {}).get("failures", []))


# -- clean conversions pass ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("tp,int8", [(1, True), (2, False), (2, True)])
def test_clean_tiny_families_pass(model_dir, tmp_path, family, tp, int8):
    out = conv(model_dir(family), tmp_path / "out", tp=tp, int8=int8)
    r = verify(model_dir(family), out)
    assert r["passed"], r["failures"]
    assert r["profile"] == ("int8" if int8 else "float32")
    assert r["tensors"]["count"] > 0 and r["integrity"]["passed"]
    e = r["end_to_end"]
    assert e["first_divergent_layer"] is None
    if r["kind"] == "encoder":
        assert e["cosine_min"] > 0.999
    else:
        assert e["top1"] >= 0.95
    if not int8:  # float conversions are data movement: bit-exact tensors, fp32-rounding-level outputs
        assert all(x["max_abs"] == 0 for x in r["tensors"]["rows"])
        assert e["rel_rms"] < 1e-5


def test_clean_tiny_float_tp1_pass(model_dir, tmp_path):
    for family in tiny.FAMILIES:
        out = conv(model_dir(family), tmp_path / family, tp=1)
        r = verify(model_dir(family), out)
        assert r["passed"], (family, r["failures"])


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("int8", [False, True])
def test_stories_passes(model_dir, tmp_path, tp, int8):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=tp, int8=int8)
    r = verify(stories, out)
    assert r["passed"], r["failures"]
    e = r["end_to_end"]
    assert e["token_source"].startswith("tokenizer") and e["tokens"] == 256
    assert e["top1"] >= (0.95 if int8 else 1.0)
    assert abs(e["ppl_converted"] / e["ppl_ref"] - 1) < (0.02 if int8 else 1e-5)


def test_stories_half_precision_passes(model_dir, tmp_path):
    stories = model_dir("stories")
    r = verify(stories, conv(stories, tmp_path / "out", tp=2, dtype="bf16"))
    assert r["passed"] and r["profile"] == "half", r["failures"]
    # bf16 tensors are compared with the source cast to bf16 (exact), and their cast error is still reported
    assert max(x["max_abs"] for x in r["tensors"]["rows"]) > 0


def test_cli_report_and_json(model_dir, tmp_path, capsys):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2, int8=True)
    text = tmp_path / "t.txt"
    text.write_text("Lily went to the park. She saw a big dog and a small cat. They played all day long.\n" * 4)
    assert run_cli("verify", stories, out, "--json", tmp_path / "r.json", "--text", text, "--tokens", 64) == 0
    printed = capsys.readouterr().out
    assert "PASSED" in printed and "worst tensors" in printed and "top-1 agreement" in printed
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["tp"] == 2 and rep["int8"] and rep["thresholds"] == vars(DEFAULTS["int8"])
    assert rep["end_to_end"]["tokens"] <= 64 and len(rep["end_to_end"]["layers"]) == 6
    # a threshold tighter than int8 can meet is a parity failure
    assert run_cli("verify", stories, out, "--max-kl", "1e-9", "--json", tmp_path / "r2.json") == 1
    rep = json.loads((tmp_path / "r2.json").read_text())
    assert not rep["passed"] and "KL divergence" in failures(rep, "end_to_end")
    assert rep["tensors"]["passed"] and rep["integrity"]["passed"]


# -- planted defects fail and are named ----------------------------------------------------------------------------
def test_altered_layer_weights(model_dir, tmp_path):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2)

    def alter(t):  # a slight change: 0.1% noise on one rank's slice of one layer
        w = t["layers.3.mlp_in.weight"]
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        t["layers.3.mlp_in.weight"] = w + 1e-3 * w.std() * noise

    edit_rank(out, 1, alter)
    r = verify(stories, out)
    assert not r["passed"] and r["integrity"]["passed"]
    f = failures(r, "tensors")
    assert "layers.3.mlp_in.weight" in f and "rank 1 (rank1-00001.safetensors)" in f
    assert "model.layers.3.mlp.gate_proj.weight" in f  # the HF name of the gate half
    assert "layers.3.mlp_in.weight" in r["tensors"]["worst"][:1]


def test_altered_sinusoidal_table(model_dir, tmp_path):
    src = model_dir("xglm")
    out = conv(src, tmp_path / "out", tp=2)

    def alter(t):      # one position one step off: XGLM's table is the converter's, recomputed by verify
        t["pos_embed.weight"][5] = t["pos_embed.weight"][6]

    edit_rank(out, 1, alter)
    r = verify(src, out)
    assert not r["passed"] and r["integrity"]["passed"]
    assert "pos_embed.weight" in failures(r, "tensors") and "rank 1" in failures(r, "tensors")


def test_altered_int8_layer(model_dir, tmp_path):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2, int8=True)

    def alter(t):
        q = t["layers.1.attn_out.weight"].to(torch.int16)
        q[5] = (q[5] + 3).clamp(-127, 127)
        t["layers.1.attn_out.weight"] = q.to(torch.int8)

    edit_rank(out, 0, alter)
    r = verify(stories, out)
    f = failures(r, "tensors")
    assert not r["passed"] and "layers.1.attn_out.weight" in f and "rank 0" in f
    assert "scales are right, values not" in f


def test_swapped_q_slices(model_dir, tmp_path):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2)
    m = json.loads((out / "manifest.json").read_text())
    hq = m["parallel"]["heads_per_rank"] * m["model"]["head_dim"]
    w0 = load_file(out / "rank0-00001.safetensors")["layers.0.qkv.weight"]
    w1 = load_file(out / "rank1-00001.safetensors")["layers.0.qkv.weight"]
    edit_rank(out, 0, lambda t: t["layers.0.qkv.weight"].__setitem__(slice(0, hq), w1[:hq]))
    edit_rank(out, 1, lambda t: t["layers.0.qkv.weight"].__setitem__(slice(0, hq), w0[:hq]))
    r = verify(stories, out)
    f = failures(r, "tensors")
    assert not r["passed"]
    assert "rank 0 (rank0-00001.safetensors) q rows [model.layers.0.self_attn.q_proj.weight] hold rank 1's q" in f
    assert "rank 1 (rank1-00001.safetensors) q rows" in f and "hold rank 0's q" in f
    e = r["end_to_end"]
    assert not e["passed"] and e["first_divergent_layer"] == "layer 0"


def test_wrong_int8_scales(model_dir, tmp_path):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2, int8=True)
    # A classic bug: the scales written for another row (here: rolled by one row).
    edit_rank(out, 1, lambda t: t.__setitem__("layers.0.mlp_in.weight_scale",
                                              t["layers.0.mlp_in.weight_scale"].roll(1, 0)))
    r = verify(stories, out)
    f = failures(r, "tensors")
    assert not r["passed"] and "layers.0.mlp_in.weight" in f and "rank 1" in f
    assert "int8 scales differ from absmax/127" in f and "above the scale/2 bound" in f
    row = next(x for x in r["tensors"]["rows"] if x["name"] == "layers.0.mlp_in.weight")
    assert row["bound_ratio"] > 1
    e = r["end_to_end"]  # and it shows end to end, from the first layer on
    assert not e["passed"] and e["first_divergent_layer"] == "layer 0"


def test_kv_replication_error(model_dir, tmp_path):
    mistral = model_dir("mistral")  # 1 kv head: at tp=2 both ranks hold a copy of it
    out = conv(mistral, tmp_path / "out", tp=2)
    m = json.loads((out / "manifest.json").read_text())
    assert m["parallel"]["kv_replication"] == 2
    hq, hd = m["parallel"]["heads_per_rank"] * m["model"]["head_dim"], m["model"]["head_dim"]

    def alter(t):
        w = t["layers.1.qkv.weight"]
        w[hq:hq + hd] = w[hq:hq + hd].flip(0)

    edit_rank(out, 1, alter)
    r = verify(mistral, out)
    f = failures(r, "tensors")
    assert not r["passed"]
    assert "layers.1.qkv.weight" in f and "replicated kv head 0 differs between ranks" in f
    assert "rank 1 (rank1-00001.safetensors) k rows [model.layers.1.self_attn.k_proj.weight]" in f
    assert "replicated copy of kv head 0" in f
    assert not r["end_to_end"]["passed"]


@pytest.mark.parametrize("key,value", [("window_layers", None), ("attn_softcap", 0.0), ("logit_softcap", 0.0)])
def test_a_wrong_window_or_soft_cap_fails_end_to_end(model_dir, tmp_path, key, value):
    """Gemma 2 with its windowed layers, its attention cap or its logit cap misrecorded: every tensor is right, the
    network is not, and verify says so."""
    gemma2 = model_dir("gemma2")
    out = conv(gemma2, tmp_path / "out", tp=1)
    assert verify(gemma2, out)["passed"]
    m = json.loads((out / "manifest.json").read_text())
    m["model"][key] = value
    (out / "manifest.json").write_text(json.dumps(m))
    r = verify(gemma2, out)
    assert r["tensors"]["passed"] and not r["end_to_end"]["passed"] and not r["passed"]


def test_missing_row_parallel_bias(model_dir, tmp_path):
    gpt2 = model_dir("gpt2")
    out = conv(gpt2, tmp_path / "out", tp=2)
    edit_rank(out, 0, lambda t: t.pop("layers.0.attn_out.bias"))
    r = verify(gpt2, out)
    f = failures(r, "tensors")
    assert not r["passed"] and r["integrity"]["passed"]
    assert "layers.0.attn_out.bias (transformer.h.0.attn.c_proj.bias): missing from rank 0 (row-parallel bias" in f
    assert not r["end_to_end"]["passed"]


def test_transposed_gpt2_weight(model_dir, tmp_path):
    gpt2 = model_dir("gpt2")
    out = conv(gpt2, tmp_path / "out", tp=1)
    edit_rank(out, 0, lambda t: t.__setitem__("layers.0.attn_out.weight", t["layers.0.attn_out.weight"].t()))
    r = verify(gpt2, out)
    f = failures(r, "tensors")
    assert not r["passed"]
    assert "layers.0.attn_out.weight (transformer.h.0.attn.c_proj.weight)" in f and "transposed" in f
    assert r["end_to_end"]["first_divergent_layer"] == "layer 0"


def test_corrupt_file_fails_integrity_and_names_it(model_dir, tmp_path):
    gpt2 = model_dir("gpt2")
    out = conv(gpt2, tmp_path / "out", tp=2)
    p = out / "rank1-00001.safetensors"
    blob = bytearray(p.read_bytes())
    blob[-3] ^= 0x40  # a flipped bit in the last tensor's data: same size, different hash
    p.write_bytes(bytes(blob))
    r = verify(gpt2, out)
    assert "integrity: rank1-00001.safetensors (rank 1) sha256 mismatch" in failures(r, "integrity")
    assert not r["tensors"]["passed"]  # and the tensor stage says which tensor changed
    assert run_cli("verify", gpt2, out) == 1


def test_cli_defect_exit_1_names_cause(model_dir, tmp_path, capsys):
    gpt2 = model_dir("gpt2")
    out = conv(gpt2, tmp_path / "out", tp=2, int8=True)
    edit_rank(out, 0, lambda t: t.pop("layers.1.mlp_out.bias"))
    assert run_cli("verify", gpt2, out, "--json", tmp_path / "r.json") == 1
    cap = capsys.readouterr()
    assert "FAILED" in cap.out and "layers.1.mlp_out.bias" in cap.out
    assert "error: verify found" in cap.err and "missing from rank 0" in cap.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not rep["passed"] and any("layers.1.mlp_out.bias" in x for x in rep["failures"])


# -- bad input exits 2 ---------------------------------------------------------------------------------------------
def test_bad_input_exit_2(model_dir, tmp_path, capsys):
    gpt2, llama = model_dir("gpt2"), model_dir("llama")
    out = conv(gpt2, tmp_path / "out", tp=1)
    assert run_cli("verify", gpt2, tmp_path / "missing") == 2
    assert run_cli("verify", tmp_path / "nomodel", out) == 2
    assert run_cli("verify", llama, out) == 2  # a different architecture
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    stories = model_dir("stories")
    assert run_cli("verify", stories, conv(llama, tmp_path / "l", tp=1)) == 2  # same architecture, other sizes
    assert "does not match the manifest" in capsys.readouterr().err
    assert run_cli("verify", gpt2, out, "--text", tmp_path / "none.txt") == 2
    assert run_cli("verify", gpt2, out, "--tp-mode", "distributed") == 0  # tp=1: nothing to distribute
    out2 = conv(gpt2, tmp_path / "out2", tp=2)
    assert run_cli("verify", gpt2, out2, "--tp-mode", "distributed") == 2  # not under torchrun
    assert "torchrun" in capsys.readouterr().err
    with pytest.raises(FmError):
        verify(gpt2, out, tokens=1)


def test_distributed_mode_two_processes(model_dir, tmp_path):
    stories = model_dir("stories")
    out = conv(stories, tmp_path / "out", tp=2, int8=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fmconvert", "verify", str(stories), str(out), "--tp-mode", "distributed", "--device", "cpu",
           "--json", str(tmp_path / "r.json"), "--tokens", "128"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] and rep["tp_mode"] == "distributed"
    # the same numbers as emulate mode: both combine the ranks' partial sums in rank order
    emu = verify(stories, out, tokens=128)
    assert rep["end_to_end"]["kl_mean"] == pytest.approx(emu["end_to_end"]["kl_mean"], rel=1e-3)


def test_source_record_notes(model_copy, tmp_path):
    """verify compares MODEL_DIR with the fingerprints convert records, or with full sha256s (--source-sha256, and
    manifests older than fingerprints); a difference is a warning, the tensors decide pass or fail."""
    from fmconvert import manifest as mf
    src = model_copy("llama")
    out = conv(src, tmp_path / "out", tp=2, int8=True)
    mpath, f = out / "manifest.json", src / "model.safetensors"
    changed = lambda r: [w for w in r["warnings"] if "changed since the conversion" in w]  # noqa: E731
    assert not changed(verify(src, out, tokens=16))
    save_file(load_file(f), f, metadata={"format": "pt", "saved": "again"})    # same tensors, another header
    r = verify(src, out, tokens=16)
    assert r["passed"] and changed(r) == ["model.safetensors changed since the conversion (size or header differs "
                                          "from the manifest's source record)"]
    m = json.loads(mpath.read_text())               # as written before fingerprints: full sha256s only
    del m["source"]["fingerprints"]
    m["source"]["files"] = {"model.safetensors": hashlib.sha256(f.read_bytes()).hexdigest()}
    mpath.write_text(json.dumps(m))
    assert not changed(verify(src, out, tokens=16))
    m["source"]["files"]["model.safetensors"] = "0" * 64
    mpath.write_text(json.dumps(m))
    assert "sha256 differs" in changed(verify(src, out, tokens=16))[0]
    for bad in ({"model.safetensors": {"size": -1, "head_sha256": "0" * 64}}, {"model.safetensors": "0" * 64},
                {"model.safetensors": {"size": 1, "head_sha256": "xyz"}}):
        m["source"]["fingerprints"] = bad
        with pytest.raises(FmError, match="source.fingerprints malformed"):
            mf.validate(m)
