"""Property-based fuzzing: mutated manifests and safetensors headers against the validators, the loader, inspect and
convert. Whatever the input, the only way to fail is an FmError (one `error:` line, exit 2 or 3), never another
exception. Bounded: 60-300 examples per property, well under 30 s in all; FMCONVERT_FUZZ_SCALE=20 runs 20x more.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import corpus
from corpus import Sources, read_st, refresh_hashes, write_st
from fmconvert import manifest as mf
from fmconvert.cli import main
from fmconvert.errors import FmError
from fmconvert.read import check_safetensors
from fmconvert.runtime.comm import ThreadGroup
from fmconvert.runtime.load import load

SCALE = int(os.environ.get("FMCONVERT_FUZZ_SCALE", "1"))  # e.g. 20 for a deep run; 1 keeps the suite fast


def examples(n: int) -> settings:
    return settings(max_examples=n * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2**66, 2**66), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([0, -1, 1, 2, 3, 64, 1 << 31, 1 << 63, "", "../x.safetensors", "/etc/passwd", "int8", "float16",
                     "rope", "alibi", "learned", "decoder", "encoder", "rank0-00001.safetensors", "\x1b[31m", 1e-300,
                     [], {}, [64], [0, 64], [-1]]),
)
VALUE = st.recursive(LEAF, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=8), ch, max_size=3),
                     max_leaves=6)


def paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """`base` with one to three edits: a value replaced, a key or item deleted, or a key added, anywhere in it."""
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        every = list(paths(m))
        shallow = [p for p in every if len(p) <= 3]
        p = draw(st.sampled_from(shallow) | st.sampled_from(every))
        if not p:
            m = draw(VALUE)
            continue
        parent = m
        for k in p[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[p[-1]] = draw(VALUE)
        elif action == "delete":
            del parent[p[-1]]
        elif isinstance(parent[p[-1]], dict):
            parent[p[-1]][draw(st.text(max_size=12))] = draw(VALUE)
        if not isinstance(m, (dict, list)):
            break
    return m


@pytest.fixture(scope="module")
def outs(model_dir, tmp_path_factory):
    src = Sources(model_dir, tmp_path_factory.mktemp("fuzz-outs"))
    return {"fp": src.out("llama"), "int8": src.out("llama", tp=2, int8=True),
            # the hybrids' keys (linear_attn, ssm, linear_layers, block_parts, attn_gate) and their slots
            "delta": src.out("qwen3_5", tp=2, int8=True), "ssm": src.out("nemotron_h", tp=2),
            "mamba": src.out("jamba", tp=2, int8=True)}      # Mamba (1)'s widths, its slots, the weighted norms


def _base(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@contextlib.contextmanager
def _copy(out: Path):
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "out"
        shutil.copytree(out, dst)
        yield dst


def _cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def _assert_clean_cli(code: int, err: str):
    assert code in (0, 2, 3), (code, err)
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err


def _load(out: Path, check_hashes: bool, tp: int):
    comm = ThreadGroup(tp).comm(0) if tp > 1 else None
    try:
        load(out, rank=0 if comm else None, comm=comm, check_hashes=check_hashes)
    except FmError as e:
        assert "\n" not in str(e)


# -- manifests -----------------------------------------------------------------------------------------------------
@given(data=st.data(), kind=st.sampled_from(["int8", "int8", "delta", "ssm", "mamba"]))
@examples(300)
def test_manifest_validate(outs, data, kind):
    m = data.draw(mutated(_base(outs[kind])))
    try:
        mf.validate(m)
    except FmError:
        pass


def test_a_hybrid_without_linear_layers_is_refused(outs):
    # Found by test_manifest_validate: an empty list of linear layers beside linear_attn raised IndexError.
    m = _base(outs["delta"])
    m["model"]["linear_layers"] = []
    with pytest.raises(FmError, match="model.linear_layers must be distinct layer indices"):
        mf.validate(m)


@given(data=st.data(), kind=st.sampled_from(["fp", "int8", "delta", "ssm", "mamba"]), check_hashes=st.booleans())
@examples(120)
def test_manifest_against_inspect_and_load(outs, data, kind, check_hashes):
    m = data.draw(mutated(_base(outs[kind])))
    with _copy(outs[kind]) as out:
        (out / "manifest.json").write_text(json.dumps(m))  # NaN and Infinity included: json accepts them
        _assert_clean_cli(*_cli("inspect", out))
        _assert_clean_cli(*_cli("inspect", "--json", out))
        _load(out, check_hashes, 1 if kind == "fp" else 2)


# -- safetensors headers -------------------------------------------------------------------------------------------
ST_DTYPE = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "F8_E4M3", "U16", "F4", "", "f32"])
DIM = st.one_of(st.integers(0, 70), st.integers(-3, 1 << 50), st.sampled_from([64, 128, 1 << 47]))
ENTRY_EDIT = st.one_of(
    st.tuples(st.just("dtype"), ST_DTYPE | LEAF),
    st.tuples(st.just("shape"), st.lists(DIM, max_size=9) | LEAF),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 1 << 20) | st.integers(0, 1 << 64), min_size=0,
                                                max_size=3) | LEAF),
    st.tuples(st.just("extra"), LEAF),
)


@st.composite
def shard_bytes(draw, blob: bytes) -> bytes:
    """A real shard with its header edited, its length prefix lying, or its bytes cut or extended."""
    header, data = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]]), blob[8 + struct.unpack("<Q", blob[:8])[0]:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["entry", "entry", "entry", "drop", "dup", "meta"]))
        name = draw(st.sampled_from(names))
        if what == "entry" and isinstance(header.get(name), dict):
            field, value = draw(ENTRY_EDIT)
            header[name][field] = value
        elif what == "drop":
            header.pop(name, None)
        elif what == "dup":
            header[name + draw(st.text(max_size=3))] = copy.deepcopy(header.get(name))
        else:
            header["__metadata__"] = draw(VALUE)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    if draw(st.booleans()):
        text = draw(st.sampled_from([text, text[:-1], b"", b"[]", b"{", b"\xff" * 8, b"null"]) | st.binary(max_size=64))
    n = draw(st.sampled_from([len(text)]) | st.integers(0, (1 << 64) - 1) | st.sampled_from([len(text) + 1, 1 << 40]))
    out = struct.pack("<Q", n) + text + data
    cut = draw(st.sampled_from([None, None, 0, 4, 8, len(out) - 1]) | st.integers(0, len(out)))
    out = out[:cut] if cut is not None else out
    if draw(st.integers(0, 9)) == 0:
        out += draw(st.binary(min_size=1, max_size=16))
    return out


@pytest.fixture(scope="module")
def shard(outs):
    return corpus.first_shard(outs["fp"]).read_bytes()


@given(data=st.data())
@examples(200)
def test_header_validator_agrees_with_safetensors(shard, data):
    """What check_safetensors accepts, safetensors must read without error; everything else is an FmError."""
    blob = data.draw(shard_bytes(shard))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        p.write_bytes(blob)
        try:
            tensors = check_safetensors(p)
        except FmError as e:
            assert "\n" not in str(e)
            return
        with safe_open(p, framework="pt") as h:
            for name, (dt, shape) in tensors.items():
                assert tuple(h.get_slice(name).get_shape()) == shape
                if dt in ("F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "I32", "I16"):
                    assert math.prod(h.get_tensor(name).shape) == math.prod(shape)


@given(data=st.data(), check_hashes=st.booleans())
@examples(100)
def test_shard_header_against_load_and_inspect(outs, shard, data, check_hashes):
    blob = data.draw(shard_bytes(shard))
    with _copy(outs["fp"]) as out:
        corpus.first_shard(out).write_bytes(blob)
        if data.draw(st.booleans()):
            refresh_hashes(out)  # past the sha256 check, on to the header checks
        _load(out, check_hashes, 1)
        _assert_clean_cli(*_cli("inspect", out))


@given(data=st.data())
@examples(60)
def test_source_header_against_convert(model_dir, data):
    src = model_dir("llama")
    blob = data.draw(shard_bytes((src / "model.safetensors").read_bytes()))
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "model"
        shutil.copytree(src, m)
        (m / "model.safetensors").write_bytes(blob)
        code, err = _cli("convert", "-q", m, Path(d) / "out")
        _assert_clean_cli(code, err)
        assert code == 0 or not (Path(d) / "out").exists()
        assert not list(Path(d).glob(".out.fmconvert-*"))


def test_write_st_roundtrip(tmp_path):
    """The corpus helpers write what safetensors itself would read."""
    p = tmp_path / "x.safetensors"
    write_st(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert check_safetensors(p) == {"a": ("F32", (2,))}
    assert read_st(p)[0]["a"]["shape"] == [2]
