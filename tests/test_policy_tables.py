"""The architecture tables (fmconvert/configs/*.toml) and the small language they are written in."""

from types import SimpleNamespace

import pytest

from fmconvert.errors import FmError
from fmconvert.policy import GLOBAL_SLOTS, LAYER_SLOTS, _config_value, _eval_flag, _pick, policies

LAYOUT_KEYS = {"zero_parts", "ple_first_ids", "attention", "rope_tables", "hc_post_eps", "hc_magnitude", "norm", "gated_mlp",
               "position", "position_ids", "position_pad_id", "embed_proj", "disentangled", "rel_bias_per_layer",
               "causal", "pool", "shared_layers",
               "rope_style", "residual",
               "qkv", "embed_norm", "final_norm",
               "transposed", "position_offset", "embed_scale", "experts_renormalize", "qk_norm",
               "nope_unwindowed", "experts", "gate_up", "router", "as_row", "qk_norm_after_rope", "experts_weigh",
               "query_scale", "attn_gate", "linear_in", "block_parts", "shared_blocks", "diff_attention", "mamba_norms",
               "norm_weights", "window_kind", "linear_decay", "stored_shape", "rope_reversed", "global_attn",
               "value_is_key", "v_norm", "moe_beside_dense", "rope_dense", "first_attn_norm", "head_transform",
               "linear_pre_norm", "per_layer_input", "kv_sharing", "double_wide_mlp", "attn_gate_fn",
               "sinks", "query_scale_kind", "depth_scaled_residual", "index_rope_style",
               "ssm_beside_attention", "ssm_gate", "linear_gates", "sublayers", "shortcut_experts",
               "lightning", "index_rope_at", "q_gate", "windowed_latent", "latent_scale",
               "layer_kinds", "loop", "tied"}


def test_flags_and_binds_tighter_than_or_and_may_use_earlier_flags():
    cfg = SimpleNamespace(a=True, b=False, c=True, n=2, m=2, k=3)
    assert _eval_flag(cfg, "a and b or c") is True            # (a and b) or c
    assert _eval_flag(cfg, "b or a and !c") is False           # b or (a and not c)
    assert _eval_flag(cfg, "n == 2 and n != 3 and n == m and k != m") is True
    assert _eval_flag(cfg, "missing") is False and _eval_flag(cfg, "!missing") is True
    assert _eval_flag(cfg, "!two or a", {"two": True}) is True and _eval_flag(cfg, "!two", {"two": True}) is False
    assert _eval_flag(cfg, True) is True


def test_picks_nest_and_name_defined_flags_only():
    flags = {"new": False, "mqa": True}
    assert _pick(["new", "grouped", ["mqa", "separate", "interleaved"]], flags, "t") == "separate"
    assert _pick("plain", flags, "t") == "plain"
    cfg = SimpleNamespace(num_kv_heads=8, num_attention_heads=32)
    assert _config_value(cfg, ["new", "num_kv_heads", ["mqa", {"value": 1}, "num_attention_heads"]], "kv", flags) == 1
    assert _config_value(cfg, ["new", "num_kv_heads", "num_attention_heads"], "kv", {"new": True}) == 8
    cfg = SimpleNamespace(cap=None, window=4)       # a number as the last alternative: the value when unset
    assert _config_value(cfg, "cap|0", "c") == 0 and _config_value(cfg, "window|0", "w") == 4
    assert _config_value(cfg, "cap|2.5", "c") == 2.5
    with pytest.raises(FmError, match="'nope'"):
        _pick(["nope", 1, 2], flags, "layout.qkv")


def test_every_table_names_known_slots_layout_keys_and_flags():
    """A typo in a table (a slot, a layout key, a flag a `when` names) fails here, not on some user's checkpoint."""
    seen = set()
    for arch, pol in policies().items():
        if id(pol) in seen:
            continue
        seen.add(id(pol))
        t, name = pol.table, pol.path.name
        assert t["kind"] in ("decoder", "encoder"), name
        assert set(pol.layout) <= LAYOUT_KEYS, (name, set(pol.layout) - LAYOUT_KEYS)
        flags = set(t.get("flags", {})) | {k for over in pol.architectures.values() for k in over}
        tensors = t["tensors"]
        sections = [({k: v for k, v in tensors.items() if k not in ("layer", "head")}, GLOBAL_SLOTS),
                    (tensors.get("head", {}), GLOBAL_SLOTS), (tensors["layer"], LAYER_SLOTS)]
        for section, allowed in sections:
            for slot, entry in section.items():
                assert slot in allowed, (name, slot)
                if isinstance(entry, dict):
                    assert set(entry) <= {"name", "when", "optional", "aliases", "dense_name", "hybrid_name"}, (name, slot, entry)
                    assert entry.get("when") is None or entry["when"] in flags, (name, slot, entry["when"])
        s2s = t.get("seq2seq")          # an encoder-decoder's decoder: each architecture's encoder, a known encoder
        if s2s is not None:
            assert t["kind"] == "decoder" and set(s2s) == {"encoders", "encoder_prefixes", "decoder_prefixes"}, name
            assert set(s2s["encoders"]) == set(pol.architectures), name
            for enc in s2s["encoders"].values():
                assert enc in policies() and policies()[enc].kind == "encoder", (name, enc)
        for key, v in pol.layout.items():                       # every flag a layout pick names exists
            while isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and key not in ("transposed", "as_row",
                                                                                                 "stored_shape"):
                assert v[0] in flags, (name, key, v[0])
                v = v[2]


def test_the_tables_readme_lists_every_table():
    from fmconvert.policy import CONFIG_DIR
    readme = (CONFIG_DIR / "README.md").read_text()
    missing = [p.name for p in CONFIG_DIR.glob("*.toml") if f"`{p.name}`" not in readme]
    assert not missing, missing


def test_a_layer_slot_cannot_be_optional():
    # A layer without the tensor would leave its fused slot nothing to fuse; flags and the layout decide which
    # layers hold which slots, so a table (a user's own, through FMCONVERT_CONFIGS) saying otherwise is refused.
    import copy
    from pathlib import Path

    from fmconvert.policy import Policy
    table = copy.deepcopy(policies()["LlamaForCausalLM"].table)
    table["tensors"]["layer"]["q_norm.weight"] = {"name": "layers.{i}.self_attn.q_norm.weight", "optional": True}
    with pytest.raises(FmError, match=r"^mine.toml: tensors.layer.q_norm.weight is optional, which only global"):
        Policy(table, Path("mine.toml"))
    table["tensors"]["layer"]["q_norm.weight"]["optional"] = False
    Policy(table, Path("mine.toml"))


def test_norm_and_router_may_be_picked_by_a_flag():
    # Cohere 2 MoE's configs choose RMSNorm or LayerNorm, and a softmax or sigmoid router: a table says so with
    # [flag, if_true, if_false], as for the other layout keys.
    import copy
    from pathlib import Path

    from transformers import MixtralConfig

    from fmconvert.policy import Policy
    table = copy.deepcopy(policies()["MixtralForCausalLM"].table)
    table["flags"] = {**table.get("flags", {}), "rms": "use_rms", "sig": "use_sigmoid"}
    table["layout"].update(norm=["rms", "rms", "layer"], router=["sig", "sigmoid", "softmax"])
    pol = Policy(table, Path("mine.toml"))
    for rms, sig in ((True, False), (False, True)):
        cfg = MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=101)
        cfg.use_rms, cfg.use_sigmoid = rms, sig
        spec = pol.spec(cfg, "MixtralForCausalLM")
        assert (spec.norm, spec.router) == ("rms" if rms else "layer", "sigmoid" if sig else "softmax")


def test_no_slot_name_reads_as_an_int8_weight_s_scales():
    """Readers take `<name>_scale` beside an int8 `<name>` for its group scales (manifest, load, reassemble), so a slot
    whose tensor name ends in `_scale` would be refused or misread ("router.expert_scale" was, once)."""
    names = list(GLOBAL_SLOTS + LAYER_SLOTS)
    assert not [n for n in names if n.endswith("_scale")], names
    assert len(set(names)) == len(names), "a slot is listed twice"


def test_a_layout_default_is_never_read_as_a_flag():
    """Cohere 2 MoE defines a flag called `sigmoid`: a key its table leaves out keeps its default value, which
    happens to be that name, instead of the flag's True."""
    pol = policies()["Cohere2MoeForCausalLM"]
    assert "sigmoid" in pol.table["flags"] and "attn_gate_fn" not in pol.layout
    assert pol._layout("attn_gate_fn", {"sigmoid": True}, "sigmoid") == "sigmoid"
    # a value the table gives is still picked by its flag
    assert pol._layout("router", {"sigmoid": True}) == "sigmoid"
    assert pol._layout("router", {"sigmoid": False}) == "softmax"
