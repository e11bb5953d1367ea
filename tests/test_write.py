"""The streaming writer and the threaded conversion pipeline: files safetensors reads back, hashes of the bytes on
disk, and output that does not depend on threads, on O_DIRECT, or on how a slot reaches the quantizer."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tiny
from fmconvert.pipeline import Options, convert
from fmconvert.errors import FmError
from fmconvert.read import check_safetensors
from fmconvert.write import ShardWriter

cv = importlib.import_module("fmconvert.pipeline")  # the module 

TENSORS = [
    (0, "rope", torch.arange(7, dtype=torch.float32)),
    (0, "a", torch.randn(5, 3).to(torch.bfloat16)),
    (0, "q", torch.randint(-127, 128, (3, 5), dtype=torch.int8)),      # 15 bytes: what follows is misaligned
    (0, "q_scale", torch.rand(3, 1).to(torch.float16)),
    (0, "big", torch.randn(300, 40)),
    (1, "b", torch.randn(2, 2)),
    (1, "empty", torch.zeros(0, 4)),
]


def _write(root: Path, max_bytes: int, direct: bool) -> ShardWriter:
    root.mkdir()
    w = ShardWriter(root, 2, max_bytes, direct=direct)
    for r, n, t in TENSORS:
        w.declare(r, n, t.dtype, t.shape)
    for r, n, t in TENSORS:
        w.add(r, n, t)
    w.close()
    return w


@pytest.mark.parametrize("max_bytes", [1 << 30, 100])
def test_writer_files_read_back(tmp_path, max_bytes):
    w = _write(tmp_path / "out", max_bytes, direct=True)
    got = {}
    for r in range(2):
        for f in w.files[r]:
            p = tmp_path / "out" / f["path"]
            blob = p.read_bytes()
            assert len(blob) == f["size"] and hashlib.sha256(blob).hexdigest() == f["sha256"]
            check_safetensors(p)            # no gaps, no overlaps, sizes as the header says
            with safe_open(p, framework="pt") as h:
                assert h.metadata() == {"format": "pt", "producer": "fmconvert", "rank": str(r)}
            got.update({(r, k): v for k, v in load_file(p).items()})
            for k in load_file(p):
                assert w.tensors[r][k]["file"] == f["path"]
    for r, n, t in TENSORS:
        assert got[(r, n)].dtype == t.dtype and torch.equal(got[(r, n)], t), n
    # the 15-byte int8 tensor is followed by a float16 one: that one must open a new, aligned file
    assert w.tensors[0]["q_scale"]["file"] != w.tensors[0]["q"]["file"]
    if max_bytes == 100:  # rope, a, q | q_scale (alignment) | big (alone: larger than the limit)
        assert len(w.files[0]) == 3 and w.tensors[0]["big"]["file"] == w.files[0][2]["path"]


def test_writer_direct_and_buffered_write_the_same_bytes(tmp_path):
    a, b = _write(tmp_path / "a", 1 << 30, True), _write(tmp_path / "b", 1 << 30, False)
    assert a.files == b.files
    for r in range(2):
        for f in a.files[r]:
            assert (tmp_path / "a" / f["path"]).read_bytes() == (tmp_path / "b" / f["path"]).read_bytes()


def test_writer_refuses_what_was_not_declared(tmp_path):
    w = ShardWriter(tmp_path, 1, 1 << 20)
    w.declare(0, "x", torch.float32, (2,))
    with pytest.raises(RuntimeError, match="expected x"):
        w.add(0, "y", torch.zeros(2))
    w = ShardWriter(tmp_path, 1, 1 << 20)
    w.declare(0, "x", torch.float32, (2,))
    with pytest.raises(RuntimeError, match="never got x"):
        w.close()


def test_writer_progress_covers_the_tensor(tmp_path):
    w = ShardWriter(tmp_path, 1, 1 << 30)
    t = torch.randn(3 * ShardWriter.SLICE // 4 + 5)
    w.declare(0, "t", t.dtype, t.shape)
    seen = []
    w.add(0, "t", t, seen.append)
    w.close()
    assert seen == sorted(seen) and seen[-1] == t.numel() * 4 and len(seen) >= 3


def _outputs(out: Path) -> tuple[dict, dict]:
    m = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: (out / f["path"]).read_bytes() for r in m["ranks"] for f in r["files"]}
    return m, files


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "stories"])
def test_output_independent_of_threads_and_path(model_dir, tmp_path, monkeypatch, name):
    """Quantizing straight from source views (the fast path) or from fused-and-sliced copies (the reference path),
    with one thread or three: the same bytes and the same manifest."""
    d = tiny.STORIES if name == "stories" else model_dir(name)
    if not (Path(d) / "config.json").is_file():
        pytest.skip("model not available")
    opts = dict(tp=2, int8=True, group_size=32)
    outs = []
    for workers, direct in ((1, True), (3, True), (2, False)):
        monkeypatch.setattr(cv, "WORKERS", workers)
        if not direct:
            monkeypatch.setattr(cv._Run, "_trace", lambda self, src: None)
        out = tmp_path / f"out-{workers}-{direct}"
        convert(d, out, Options(**opts), progress=False)
        outs.append(_outputs(out))
    for m, files in outs[1:]:
        assert files == outs[0][1]
        assert m == outs[0][0]


def test_nan_in_a_quantized_weight_names_it(model_copy, tmp_path):
    d = model_copy("llama")
    path = d / "model.safetensors"
    sd = load_file(path)
    sd["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    from safetensors.torch import save_file
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(FmError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight contains 1 NaN/Inf"):
        convert(d, tmp_path / "out", Options(tp=2, int8=True, group_size=32), progress=False)
    assert not (tmp_path / "out").exists()
