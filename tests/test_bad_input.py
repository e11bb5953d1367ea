"""Bad input: one `error:` line naming the problem, exit 2, no traceback, and no OUT_DIR or temp dir left behind."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corpus import run_main




def assert_one_line_error(code: int, err: str, *needles: str):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def assert_nothing_left(out: Path, existed: bool = False):
    assert out.exists() == existed
    assert not list(out.parent.glob(f".{out.name}.fmconvert-tmp-*"))


def edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _missing_dir(copy, tmp):
    return tmp / "no-such-model"


def _no_config(copy, tmp):
    d = copy("llama")
    (d / "config.json").unlink()
    return d


def _unknown_arch(copy, tmp):
    d = copy("llama")
    edit_config(d, architectures=["FooForCausalLM"])
    return d


def _truncated(copy, tmp):
    d = copy("llama")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    return d


def _corrupt_header(copy, tmp):
    d = copy("llama")
    (d / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    return d


def _missing_tensor(copy, tmp):
    d = copy("llama")
    edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return d


def _extra_tensor(copy, tmp):
    d = copy("llama")
    edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.foo.weight": torch.zeros(4)}))
    return d


def _with_config(family, **changes):
    """A case: a copy of the family's tiny model whose config.json says something else."""
    def setup(copy, tmp):
        d = copy(family)
        edit_config(d, **changes)
        return d
    return setup


def _int_dtype(copy, tmp):
    d = copy("llama")
    edit_tensors(d, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    return d


def _nan(copy, tmp):
    d = copy("llama")

    def poison(t):
        t["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    edit_tensors(d, poison)
    return d


def _tied_head_differs(copy, tmp):
    d = copy("mistral")
    edit_tensors(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    return d


def _pickle_only(copy, tmp):
    d = copy("llama")
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def _bad_json(copy, tmp):
    d = copy("llama")
    (d / "config.json").write_text("{not json")
    return d


def _llama(copy, tmp):
    return copy("llama")


def _llama96(copy, tmp):
    return copy("llama", hidden_size=96)


def _llama_kv3(copy, tmp):
    return copy("llama", hidden_size=96, num_attention_heads=12, num_key_value_heads=3)


def _falcon_mixed_norm_names(copy, tmp):
    d = copy("falcon_new")

    def rename(t):
        for p in ("weight", "bias"):
            t[f"transformer.h.1.input_layernorm.{p}"] = t.pop(f"transformer.h.1.ln_attn.{p}")
    edit_tensors(d, rename)
    return d


def _neox_no_head(copy, tmp):
    d = copy("gptneox")
    edit_tensors(d, lambda t: t.pop("embed_out.weight"))
    return d


CASES = {
    "missing-dir": (_missing_dir, [], ["no-such-model", "does not exist"]),
    "missing-config": (_no_config, [], ["has no config.json"]),
    "bad-config-json": (_bad_json, [], ["config.json", "not valid JSON"]),
    "unknown-architecture": (_unknown_arch, [], ["unknown architecture FooForCausalLM", "supported:",
                                                 "LlamaForCausalLM", "GPT2LMHeadModel", "BertModel"]),
    "truncated-safetensors": (_truncated, [], ["model.safetensors", "not a readable safetensors file"]),
    "corrupt-header": (_corrupt_header, [], ["model.safetensors", "not a readable safetensors file"]),
    "missing-tensor": (_missing_tensor, [], ["missing tensor model.layers.1.mlp.up_proj.weight"]),
    "unexpected-tensor": (_extra_tensor, [], ["unexpected tensor model.layers.0.self_attn.foo.weight"]),
    "shape-vs-config": (_with_config("llama", intermediate_size=100), [], ["model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[100, 64]"]),
    "int-dtype": (_int_dtype, [], ["model.norm.weight", "float dtype"]),
    "tp-vs-heads": (_llama, ["--tp", "3"], ["tp=3", "num_attention_heads=4"]),
    "tp-vs-kv-heads": (_llama_kv3, ["--tp", "2"], ["tp=2", "num_key_value_heads=3"]),
    "tp-zero": (_llama, ["--tp", "0"], ["--tp must be at least 1"]),
    "group-not-dividing": (_llama96, ["--int8", "--group-size", "64"], ["--group-size 64", "K=96"]),
    "group-not-pow2": (_llama, ["--int8", "--group-size", "48"], ["--group-size", "power of two", "48"]),
    "pickle": (_pickle_only, [], ["pytorch_model.bin", "--allow-pickle"]),
    "nan": (_nan, [], ["model.layers.1.self_attn.o_proj.weight", "NaN"]),
    "tied-head-differs": (_tied_head_differs, [], ["lm_head.weight differs"]),
    "max-shard-size": (_llama, ["--max-shard-size", "lots"], ["--max-shard-size", "'lots'"]),
    "max-shard-size-zero": (_llama, ["--max-shard-size", "0MB"], ["--max-shard-size"]),
    "max-shard-size-inf": (_llama, ["--max-shard-size", "infGB"], ["--max-shard-size"]),
    "unsupported-variant": (_with_config("phi", qk_layernorm=True), [], ["PhiForCausalLM", "does not support", "qk_layernorm"]),
    "odd-rotary-width": (_with_config("gptj", rotary_dim=7), [], ["rotary width", "head_dim=16", "7"]),
    "missing-head": (_neox_no_head, [], ["missing tensor embed_out.weight"]),
    "unsupported-alibi": (_with_config("falcon", alibi=True), [], ["FalconForCausalLM", "does not support", "alibi"]),
    "moe-dense-layer-out-of-range": (_with_config("qwen3_moe", mlp_only_layers=[5]), [],
                                     ["dense layers of this mixture are malformed", "mlp_only_layers=[5]"]),
    "moe-all-layers-dense": (_with_config("qwen3_moe", mlp_only_layers=[0, 1]), [],
                             ["every layer of this mixture of experts is dense"]),
    "mixed-spellings": (_falcon_mixed_norm_names, [], ["spell layers.attn_norm", "different ways"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(model_copy, tmp_path, capsys, case):
    setup, args, needles = CASES[case]
    src = setup(model_copy, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, "convert", "-q", *args, src, out)
    assert_one_line_error(code, err, *needles)
    assert stdout == ""
    assert_nothing_left(out)


def test_existing_output_needs_force(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_main(capsys, "convert", "-q", model_dir("llama"), out)
    assert_one_line_error(code, err, str(out), "already exists", "--force")
    assert_nothing_left(out, existed=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run_main(capsys, "convert", "-q", "--force", model_dir("llama"), out)
    assert code == 0 and err == ""
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()
    assert_nothing_left(out, existed=True)


def test_empty_existing_output_is_fine(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_main(capsys, "convert", "-q", model_dir("llama"), out)
    assert code == 0 and err == ""
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("case", ["corrupt-header", "nan"])
def test_real_entry_point(model_copy, tmp_path, case):
    """Through `python -m fmconvert`: a failure before writing, and one after writing has started."""
    setup, args, needles = CASES[case]
    src = setup(model_copy, tmp_path)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "fmconvert", "convert", *args, str(src), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, *needles)
    assert_nothing_left(out)


def test_a_name_with_control_characters_still_gives_one_line(tmp_path):
    """Messages quote names from the input; a tensor name holding a newline is escaped, not printed as a line break
    (found by test_fuzz)."""
    import struct

    from fmconvert.errors import FmError
    from fmconvert.read import check_safetensors
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b\n: x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(FmError) as e:
        check_safetensors(p)
    assert "overlaps the previous tensor" in str(e.value) and "b\\n: x" in str(e.value)
    assert "\n" not in str(e.value)
