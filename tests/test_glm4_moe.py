"""GLM-4.5 and mixtures with dense layers, beyond the family tests (which run glm4_moe and qwen2_moe_mixed through
tiny.FAMILIES): each layer holds its own kind's slots, the sigmoid router's correction and groups change the choice,
and the multi-token-prediction layers of the published checkpoints are counted and left out."""

from __future__ import annotations

import json

import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.verify import verify


def test_each_layer_holds_its_own_kind(model_dir, tmp_path):
    convert(model_dir("qwen2_moe_mixed"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["dense_layers"] == [0, 2, 3] and m["model"]["dense_intermediate_size"] == 96
    assert (m["parallel"]["dense_intermediate_chunk"], m["parallel"]["dense_intermediate_per_rank"]) == (48, 48)
    names = set(m["ranks"][0]["tensors"])
    for i in range(4):
        dense = i != 1
        assert (f"layers.{i}.mlp_in.weight" in names) == dense
        assert (f"layers.{i}.experts_in.weight" in names) != dense
        assert (f"layers.{i}.shared_gate.weight" in names) != dense
    assert m["ranks"][0]["tensors"]["layers.0.mlp_in.weight"]["shape"] == [2 * 48, 64]
    assert m["ranks"][0]["tensors"]["layers.1.experts_in.weight"]["shape"] == [4 * 2 * 32, 64]   # 24 padded to 32


def test_the_correction_bias_and_the_groups_change_the_choice(model_dir, tmp_path):
    """The runtime follows transformers; without the correction bias, or with every group allowed, it would not."""
    src = model_dir("glm4_moe")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(3, 100, (2, 12))
    base = m(ids)
    with torch.no_grad():
        assert (hf(ids).logits - base).abs().max() < 1e-4
    blk = m.blocks[1]
    correction = blk.t.pop("router.correction_bias")
    assert (m(ids) - base).abs().max() > 1e-3
    blk.t["router.correction_bias"] = correction
    m.spec["router_topk_groups"] = m.spec["router_groups"]
    assert (m(ids) - base).abs().max() > 1e-3


def test_multi_token_prediction_layers_are_counted_and_left_out(model_dir, tmp_path):
    """GLM-4.5's checkpoints keep a multi-token-prediction layer after the last (num_nextn_predict_layers): a whole
    decoder layer plus its own projections and norms. transformers ignores it; so does the conversion, saying so."""
    src = tmp_path / "src"
    src.mkdir()
    original = model_dir("glm4_moe")
    state = load_file(original / "model.safetensors")
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in state.items() if "layers.2." in k}
    mtp.update({"model.layers.3.eh_proj.weight": torch.randn(64, 128), "model.layers.3.enorm.weight": torch.ones(64),
                "model.layers.3.hnorm.weight": torch.ones(64)})
    save_file({**state, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((original / "config.json").read_text())
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert f"{len(mtp)} multi-token-prediction tensors" in r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["dropped"]["tensors"] == len(mtp) and m["source"]["dropped"]["what"] == "mtp"
    assert m["source"]["dropped"]["bytes"] == sum(t.nbytes for t in mtp.values())
    assert verify(src, tmp_path / "out")["passed"]
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "multi-token-prediction" in r.output
    config = json.loads((src / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0                  # then layer 3 is nobody's: refused, by name
    (src / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out2")])
    assert isinstance(r.exception, FmError) and "unexpected tensor model.layers.3." in str(r.exception)


def test_hunyuan_per_layer_expert_lists_are_refused_in_one_line(model_copy, tmp_path):
    """Hunyuan's config format allows a list of expert counts or top-k per layer; transformers' model does not build
    such a mixture, and neither does fmconvert: one line, nothing written."""
    src = model_copy("hunyuan_moe")
    config = json.loads((src / "config.json").read_text())
    config["moe_topk"] = [2, 1]
    (src / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out")])
    assert isinstance(r.exception, FmError) and "must be integers (one for every layer)" in str(r.exception)
    assert not (tmp_path / "out").exists()


def test_phimoe_sparsemixer_is_not_a_softmax_top2(model_dir, tmp_path):
    """Phi-MoE's weights come from two sequential picks, each a softmax over the scores near it; read as Mixtral's
    softmax top-2 (renormalised or not) the logits move. A config asking SparseMixer for another top-k is refused."""
    src = model_dir("phimoe")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    assert m.spec["router"] == "sparsemixer" and m.spec["router_jitter"] == 0.3
    hf = transformers.PhimoeForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        want = hf(ids).logits
    assert (m(ids) - want).abs().max() < 1e-4
    for renorm in (True, False):
        m.spec.update(router="softmax", experts_renormalize=renorm)
        assert (m(ids) - want).abs().max() > 1e-3
    config = json.loads((src / "config.json").read_text())
    config["num_experts_per_tok"] = 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    r = CliRunner().invoke(cli, ["convert", str(bad), str(tmp_path / "out2")])
    assert isinstance(r.exception, FmError) and "SparseMixer routing picks exactly 2 experts" in str(r.exception)
