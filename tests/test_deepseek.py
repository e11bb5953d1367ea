"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash) beyond the family tests (which run deepseek_v3 and
deepseek_v2 through tiny.FAMILIES): what the manifest records, the one-head latent cache, the absorbed decode step
against the expanded one, the softmax scale YaRN sharpens, and DeepSeek-V2's grouped softmax routing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from click.testing import CliRunner

from fmconvert.cli import cli
from fmconvert.errors import FmError
from fmconvert.pipeline import Options, convert
from fmconvert.runtime.load import load
from fmconvert.verify import verify
from tiny import rel


def test_the_manifest_records_the_latent_widths_and_slices_whole_heads(model_dir, tmp_path):
    convert(model_dir("deepseek_v3"), tmp_path / "out", Options(tp=2, int8=True, group_size=16), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sp = m["model"]
    assert sp["mla"] == {"q_rank": 32, "kv_rank": 32, "nope_dim": 16, "rope_dim": 8, "v_dim": 16, "norm_eps": 1e-6}
    assert (sp["head_dim"], sp["num_kv_heads"], sp["position"]["rotary_dim"]) == (24, 1, 8)
    assert sp["position"]["style"] == "gptj"                # rope_interleave: pairs rotate together
    t = m["ranks"][1]["tensors"]
    assert t["layers.0.q_a.weight"]["shape"] == [32, 64]                   # the latents: replicated
    assert t["layers.0.kv_a.weight"]["shape"] == [32 + 8, 64]
    assert t["layers.0.q_b.weight"]["shape"] == [2 * 24, 32]               # two of the four heads
    assert t["layers.0.kv_b.weight"]["shape"] == [2 * (16 + 16), 32]
    assert t["layers.0.attn_out.weight"]["shape"] == [64, 2 * 16]
    assert all(t[f"layers.0.{s}.weight"]["dtype"] == "int8" for s in ("q_a", "q_b", "kv_a", "kv_b", "attn_out"))
    assert "layers.0.qkv.weight" not in t
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "rank-32 bottleneck" in r.output and "cached: 40" in r.output


def test_yarn_sharpens_the_softmax_scale_as_deepseek_does(model_dir, tmp_path):
    """The scale is 1/sqrt(nope + rope) times YaRN's mscale(factor, mscale_all_dim) squared; without that factor the
    logits would differ from transformers'."""
    src = model_dir("deepseek_v3")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    mscale = 0.1 * 0.8 * math.log(4.0) + 1.0
    assert m.scale == pytest.approx(mscale ** 2 / math.sqrt(24))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel(m(ids), want) < 1e-5
    m.scale = 1 / math.sqrt(24)
    assert rel(m(ids), want) > 1e-3


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_the_cache_keeps_one_latent_row_per_position(model_dir, tmp_path, name):
    """[B, 1, S, kv_rank + rope] per layer, the values a view of its first kv_rank columns: at DeepSeek-V3's
    widths 576 numbers a token and layer where expanded heads would need 128 * (192 + 128)."""
    convert(model_dir(name), tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    cache = m.new_cache(3, 20)
    assert [tuple(k.shape) for k in cache.k] == [(3, 1, 20, 32 + 8)] * len(m.blocks)
    for k, v in zip(cache.k, cache.v):
        assert v.shape[-1] == 32 and v.data_ptr() == k.data_ptr()


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_absorbed_decode_equals_the_expanded_form(model_dir, tmp_path, name):
    """A decode step takes kv_b into the query and the output; with a padding mask the same step goes the expanded
    way (kv_b applied to every cached latent). Both, and the graph-safe step, give the same logits as a full
    forward, int8 included."""
    convert(model_dir(name), tmp_path / "out", Options(int8=True, group_size=16), progress=False)
    m = load(tmp_path / "out")
    ids = torch.randint(3, 100, (2, 9))
    full = m(ids)
    absorbed, expanded, step = m.new_cache(2, 9), m.new_cache(2, 9), m.new_cache(2, 9)
    for c in (absorbed, expanded, step):
        m(ids[:, :6], c)
    for j in range(6, 9):
        a = m(ids[:, j:j + 1], absorbed)[:, -1]
        e = m(ids[:, j:j + 1], expanded, attention_mask=torch.ones(2, j + 1, dtype=torch.long))[:, -1]
        s = m.decode_step(ids[:, j:j + 1], step, torch.tensor([step.length]))
        step.length += 1
        for got in (a, e, s):
            assert rel(got, full[:, j]) < 1e-4


def test_glm_4_7_flash_is_served_by_the_deepseek_v3_table(tmp_path):
    """GLM-4.7-Flash (Glm4MoeLite) has DeepSeek-V3's attention and mixture under another name."""
    src = tmp_path / "src"
    cfg = transformers.Glm4MoeLiteConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                                         max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2,
                                         n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    hf = transformers.Glm4MoeLiteForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(src)
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["model"]["family"] == "deepseek_v3" and m["model"]["norm_eps"] == 1e-5
    assert m["model"]["mla"]["norm_eps"] == 1e-6      # the latent norms' eps is transformers' constant
    assert verify(src, tmp_path / "out")["passed"]


def test_deepseek_v2_routes_within_its_best_groups_and_scales(model_dir, tmp_path):
    """group_limited_greedy: only the topk_group groups whose best expert scores highest are eligible (here one
    group of two, where greedy would often pick from two groups), and the weights are scaled by
    routed_scaling_factor (not renormalised). Dropping either changes the logits."""
    src = model_dir("deepseek_v2")
    convert(src, tmp_path / "out", Options(), progress=False)
    m = load(tmp_path / "out")
    assert (m.spec["router"], m.spec["router_groups"], m.spec["router_topk_groups"]) == ("softmax", 4, 1)
    assert m.spec["routed_scale"] == 1.5 and not m.spec["experts_renormalize"]
    ids = torch.randint(3, 100, (2, 12))
    base = m(ids)
    m.spec["router_topk_groups"] = 4
    assert rel(m(ids), base) > 1e-3
    m.spec["router_topk_groups"], m.spec["routed_scale"] = 1, 1.0
    assert rel(m(ids), base) > 1e-3


def test_greedy_deepseek_v2_ignores_its_groups(model_copy, tmp_path):
    """topk_method greedy picks over every expert even where the config also sets n_group (as V2-Lite's does)."""
    src = model_copy("deepseek_v2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["topk_method"] = "greedy"
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "out", Options(), progress=False)
    assert load(tmp_path / "out").spec["router_groups"] == 1
    assert verify(src, tmp_path / "out")["passed"]


def test_heads_that_do_not_split_are_refused(model_dir, tmp_path):
    with pytest.raises(FmError, match="tp=8 does not divide num_attention_heads=4"):
        convert(model_dir("deepseek_v3"), tmp_path / "out", Options(tp=8), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_latent_width_of_zero_is_refused(model_copy, tmp_path):
    src = model_copy("deepseek_v3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["kv_lora_rank"] = 0
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="latent attention's widths"):
        convert(src, tmp_path / "out", Options(), progress=False)


def test_kimi_k2_reads_as_deepseek_v3_and_its_remote_code_is_never_run(model_copy, tmp_path):
    """Kimi K2's config.json names a model_type transformers does not know (kimi_k2) and remote code for it; the
    table reads it as DeepSeek-V3's config, and the code file is never imported."""
    src = model_copy("deepseek_v3")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                               "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "configuration_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    (src / "modeling_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    convert(src, tmp_path / "out", Options(tp=2), progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["family"] == "deepseek_v3"
    assert verify(src, tmp_path / "out")["passed"]
    cfg["model_type"] = "kimi_k3"                       # a name no table vouches for is still refused
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FmError, match="model_type 'kimi_k3' is missing or unknown to transformers"):
        convert(src, tmp_path / "out2", Options(), progress=False)


def test_deepseek_v3_multi_token_prediction_layer_is_left_out(model_copy, tmp_path):
    """DeepSeek-V3's published checkpoints hold one multi-token-prediction layer after the last
    (num_nextn_predict_layers = 1, as the tiny config has by default): counted and left out, not refused."""
    from safetensors.torch import load_file, save_file
    src = model_copy("deepseek_v3")
    state = load_file(src / "model.safetensors")
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in state.items() if "layers.2." in k}
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    save_file({**state, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    convert(src, tmp_path / "out", Options(), progress=False)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"]["dropped"]["tensors"] == len(mtp) and m["source"]["dropped"]["what"] == "mtp"
    assert verify(src, tmp_path / "out")["passed"]
