"""Vision-language wrappers (configs/wrappers/): the language model converts, the vision tower is counted and left
out, and either spelling of the wrapper's tensor names works. The family tests (round trips, int8 bound, verify,
runtime against transformers) run the tiny wrappers too, through tiny.FAMILIES; the wrappers of tiny.VISION_LANGUAGE,
around families those tests already run, are checked here against transformers on text alone."""

from __future__ import annotations

import json

import pytest
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmconvert.cli import cli
from fmconvert.pipeline import Options, convert
from fmconvert.policy import policies, wrappers
from fmconvert.reassemble import reassemble
from fmconvert.verify import verify
import tiny
from test_convert import assert_exact, expected, source_tensors

VISION = ("vision_tower.", "multi_modal_projector.", "visual.", "model.visual.")
# tensors a wrapper keeps outside any module, dropped by their whole name (LLaVA-NeXT's row separator, the SAM
# tower's mixing weight of DeepSeek-VL's hybrid)
LONE = ("image_newline", "high_res_vision_alpha")


def test_wrapper_tables_name_real_classes_and_whole_prefix_pairs():
    assert set(wrappers()) >= {"Gemma3ForConditionalGeneration", "LlavaForConditionalGeneration",
                               "Mistral3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                               "Qwen3VLForConditionalGeneration"}
    for arch, w in wrappers().items():
        assert hasattr(transformers, arch), arch
        assert arch not in policies(), arch                 # a wrapper is never also a family's own architecture
        assert w["config"] == "text_config"
        assert all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                   for p in w["prefixes"]), arch
        assert w["drop"] and all(d.endswith(".") or d.rsplit(".", 1)[-1] in LONE for d in w["drop"]), arch
        assert all(t in policies() for t in w.get("text", {}).values()), arch     # names a table's architecture
        assert set(w.get("text_defaults", {})) <= set(w.get("text", {})), arch    # for a model_type it serves


@pytest.mark.parametrize("name", list(tiny.VISION_LANGUAGE))
def test_the_language_model_given_text_alone_matches_the_whole_wrapper(model_dir, tmp_path, name):
    """The real wrapper class, saved by transformers: its language model converts (at tp 2), every other tensor is
    counted and left out, the converted logits match the whole wrapper's on text alone, as `verify` finds too
    (loading the checkpoint through transformers, with an attention mask), and reassemble gives back the language
    model's own tensors exactly."""
    src = model_dir(name)
    errors = tiny.errors_against_transformers(src, name, tmp_path, 9)
    assert max(errors) < 1e-5, errors
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    arch = tiny.CONFIGS[name][1]
    assert m["source"]["architecture"] == arch
    body = m["source"]["prefix"]
    head = dict(wrappers()[arch]["prefixes"])[body] + "lm_head.weight"
    with safe_open(src / "model.safetensors", "pt") as f:
        others = [n for n in f.keys() if not n.startswith(body) and n != head]
    assert others and m["source"]["dropped"]["tensors"] == len(others)     # none of the language model's dropped
    r = verify(src, tmp_path / "out")
    assert r["passed"], r["failures"]
    m, back = reassemble(tmp_path / "out")
    assert_exact(expected(src, m, source_tensors(src)), back)


@pytest.mark.parametrize("name", ["gemma3_vl", "llava", "qwen2_5_vl", "qwen3_vl"])
def test_the_vision_tower_is_counted_and_left_out(model_dir, tmp_path, name):
    src = model_dir(name)
    with safe_open(src / "model.safetensors", "pt") as f:
        vision = {k: f.get_slice(k) for k in f.keys() if k.startswith(VISION)}
        want_bytes = sum(f.get_tensor(k).nbytes for k in vision)
    assert vision
    r = CliRunner().invoke(cli, ["convert", "--tp", "2", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert f"{len(vision)} vision tensors" in r.output and "language model alone" in r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["dropped"]["tensors"] == len(vision)
    assert m["source"]["dropped"]["bytes"] == want_bytes
    written = [n for rank in m["ranks"] for n in rank["tensors"]]
    assert written and not [n for n in written if "vision" in n or "projector" in n]
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and f"{len(vision)} vision tensors" in r.output


def test_the_older_model_language_model_spelling_converts_and_reassembles(model_dir, tmp_path):
    """transformers 4.5x saved wrappers as model.language_model.* with lm_head.weight at the root."""
    src = tmp_path / "src"
    src.mkdir()
    for f in model_dir("llava").iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    old = {}
    for n, t in load_file(model_dir("llava") / "model.safetensors").items():
        if n.startswith("language_model.model."):
            n = "model.language_model." + n.removeprefix("language_model.model.")
        elif n == "language_model.lm_head.weight":
            n = "lm_head.weight"
        else:
            n = "model." + n
        old[n] = t
    save_file(old, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    convert(src, out, Options(tp=2), progress=False)
    m, got = reassemble(out)
    assert m["source"]["prefix"] == "model.language_model."
    want = expected(src, m, source_tensors(src))
    assert "lm_head.weight" in want and not [n for n in want if "vision" in n]
    assert_exact(want, got)
    r = verify(src, out)               # transformers loads the old spelling too: the same model end to end
    assert r["passed"], r["failures"]


def test_inject_refuses_a_wrapper_with_a_pointer_to_load(model_dir, tmp_path):
    from fmconvert.errors import FmError
    from fmconvert.runtime.inject import inject
    convert(model_dir("llava"), tmp_path / "out", Options(tp=1), progress=False)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir("llava"))
    with pytest.raises(FmError, match="inject replaces a text model's layers.*fmconvert.load"):
        inject(hf, tmp_path / "out")


def test_qwen3_vl_moe_experts_read_in_either_orientation(model_dir, tmp_path):
    """transformers 5 saves Qwen3-VL-MoE's stacked experts as [E, out, in]; the published checkpoints hold [E, in, out]
    and transformers reads both, by shape. So does the conversion: the manifest records the orientation it found and
    reassemble gives it back."""
    saved = model_dir("qwen3_vl_moe")
    hub = tmp_path / "hub"
    hub.mkdir()
    state = load_file(saved / "model.safetensors")
    stacked = [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacked) == 4
    save_file({n: t.transpose(1, 2).contiguous() if n in stacked else t for n, t in state.items()},
              hub / "model.safetensors", metadata={"format": "pt"})
    (hub / "config.json").write_text((saved / "config.json").read_text())
    for src, flipped in ((saved, ["layers.experts_in.weight", "layers.experts_out.weight"]), (hub, None)):
        out = tmp_path / f"out-{src.name}"
        convert(src, out, Options(tp=2, int8=True, group_size=8), progress=False)
        m = json.loads((out / "manifest.json").read_text())
        assert m["source"].get("flipped") == flipped
        assert verify(src, out)["passed"]
        _, back = reassemble(out)
        with safe_open(src / "model.safetensors", "pt") as f:
            assert all(list(back[n].shape) == f.get_slice(n).get_shape() for n in stacked)
