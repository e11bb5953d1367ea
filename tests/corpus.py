"""A corpus of bad inputs for every command, built at test time from the tiny models (no binary fixtures).

Each `Case` names the command it feeds, builds its input under a private directory, and says what the one-line
error must contain and which exit code (fmconvert/errors.py) it must carry. tests/test_robustness.py runs them all;
tests/test_bad_input.py holds the older convert cases, which count towards the corpus too.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

import tiny
from fmconvert.pipeline import Options, convert

EXIT_PARITY, EXIT_BAD_INPUT = 1, 2
COMMANDS = ("convert", "inspect", "verify", "generate", "load")


# -- building blocks -----------------------------------------------------------------------------------------------
def read_st(path: Path) -> tuple[dict, bytes]:
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes):
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path: Path, fn):
    header, data = read_st(path)
    out = fn(header, data)
    if out is None:
        write_st(path, header, data)
    else:
        write_st(path, *out)


def edit_json(path: Path, fn):
    """fn edits the parsed JSON in place (its return value is ignored)."""
    d = json.loads(Path(path).read_text())
    fn(d)
    Path(path).write_text(json.dumps(d))


def first_shard(out: Path, rank: int = 0) -> Path:
    return out / json.loads((out / "manifest.json").read_text())["ranks"][rank]["files"][0]["path"]


def refresh_hashes(out: Path):
    """Re-record every shard's size and sha256, so a lie inside a file gets past the hash check to the next one."""
    import hashlib

    def fix(m):
        for r in m["ranks"]:
            for f in r["files"]:
                p = out / f["path"]
                if p.is_file():
                    f["size"] = p.stat().st_size
                    f["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    edit_json(out / "manifest.json", fix)


def flip_byte(path: Path, offset_from_end: int = 5):
    b = bytearray(Path(path).read_bytes())
    b[-offset_from_end] ^= 0xFF
    Path(path).write_bytes(bytes(b))


def cfg(d: Path, **changes):
    def fn(c):
        for k, v in changes.items():
            if v is _DROP:
                c.pop(k, None)
            else:
                c[k] = v
    edit_json(d / "config.json", fn)
    return d


_DROP = object()


# -- sources -------------------------------------------------------------------------------------------------------
class Sources:
    """Tiny models and their conversions, built once per session; `Ctx` hands out private copies."""

    def __init__(self, model_dir, root: Path):
        self.model_dir, self.root = model_dir, root
        self.outs: dict[tuple, Path] = {}

    def out(self, name: str = "llama", tp: int = 1, int8: bool = False) -> Path:
        key = (name, tp, int8)
        if key not in self.outs:
            dst = self.root / f"out-{name}-tp{tp}-{'int8' if int8 else 'fp'}"
            convert(self.model_dir(name), dst, Options(tp=tp, int8=int8), progress=False)
            self.outs[key] = dst
        return self.outs[key]


@dataclass
class Ctx:
    src: Sources
    tmp: Path

    def model(self, name: str = "llama", **overrides) -> Path:
        dst = self.tmp / f"src-{name}"
        shutil.copytree(self.src.model_dir(name, **overrides), dst)
        return dst

    def out(self, name: str = "llama", tp: int = 1, int8: bool = False) -> Path:
        dst = self.tmp / f"out-{name}-{tp}"
        shutil.copytree(self.src.out(name, tp, int8), dst)
        return dst

    def orig(self, name: str = "llama") -> Path:
        return self.src.model_dir(name)


@dataclass
class Case:
    name: str
    command: str
    build: Callable[[Ctx], list]   # argv after the command name, or for "load" the kwargs-taking call's args
    needles: tuple[str, ...]
    code: int = EXIT_BAD_INPUT
    load_kwargs: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(command: str, *needles: str, code: int = EXIT_BAD_INPUT, **load_kwargs):
    def deco(fn):
        CASES.append(Case(fn.__name__.strip("_").replace("_", "-"), command, fn, needles, code, load_kwargs))
        return fn
    return deco


# -- convert: config.json ------------------------------------------------------------------------------------------
def _conv(src, out, *opts):
    return ["-q", *opts, src, out]


@case("convert", "hidden_size must be a positive integer", "'64'")
def _config_hidden_is_a_string(c: Ctx):
    return _conv(cfg(c.model(), hidden_size="64"), c.tmp / "out")


@case("convert", "hidden_size=64 is not divisible by num_attention_heads=6")
def _config_heads_do_not_divide_hidden(c: Ctx):
    return _conv(cfg(c.model(), num_attention_heads=6, num_key_value_heads=2), c.tmp / "out")


@case("convert", "missing key num_hidden_layers")
def _config_missing_num_layers(c: Ctx):
    return _conv(cfg(c.model(), num_hidden_layers=_DROP), c.tmp / "out")


@case("convert", "missing key n_head")
def _config_gpt2_missing_heads(c: Ctx):
    return _conv(cfg(c.model("gpt2"), n_head=_DROP), c.tmp / "out")


@case("convert", "architectures must be a list of strings")
def _config_architectures_is_a_string(c: Ctx):
    return _conv(cfg(c.model(), architectures="LlamaForCausalLM"), c.tmp / "out")


@case("convert", "model_type 'gpt2' does not belong with architecture LlamaForCausalLM")
def _config_model_type_mismatch(c: Ctx):
    return _conv(cfg(c.model(), model_type="gpt2"), c.tmp / "out")


@case("convert", "model_type None is missing")
def _config_no_model_type(c: Ctx):
    return _conv(cfg(c.model(), model_type=_DROP), c.tmp / "out")


@case("convert", "rope_theta must be a positive number")
def _config_rope_theta_is_a_string(c: Ctx):
    return _conv(cfg(c.model(), rope_theta="1e4"), c.tmp / "out")


@case("convert", "num_attention_heads must be a positive integer", "0")
def _config_zero_heads(c: Ctx):
    return _conv(cfg(c.model(), num_attention_heads=0), c.tmp / "out")


@case("convert", "layer kind 'linear_attention' is not supported")
def _config_unknown_layer_kind(c: Ctx):
    return _conv(cfg(c.model("gemma2"), layer_types=["sliding_attention", "linear_attention"]), c.tmp / "out")


@case("convert", "chunked_attention layers need attention_chunk_size")
def _config_chunks_without_a_size(c: Ctx):
    return _conv(cfg(c.model("gemma2"), layer_types=["sliding_attention", "chunked_attention"]), c.tmp / "out")


@case("convert", "sliding_window must be a non-negative integer", "-4")
def _config_negative_window(c: Ctx):
    return _conv(cfg(c.model("mistral"), sliding_window=-4), c.tmp / "out")


@case("convert", "attn_softcap must be a non-negative number", "-50")
def _config_negative_softcap(c: Ctx):
    return _conv(cfg(c.model("gemma2"), attn_logit_softcapping=-50.0), c.tmp / "out")


@case("convert", "max_position_embeddings=8388608 exceeds the 4194304 positions")
def _config_too_many_positions(c: Ctx):
    return _conv(cfg(c.model(), max_position_embeddings=1 << 23), c.tmp / "out")


@case("convert", "config.json", "expected a JSON object")
def _config_not_an_object(c: Ctx):
    d = c.model()
    (d / "config.json").write_text("[1, 2, 3]")
    return _conv(d, c.tmp / "out")


@case("convert", "RoPE type 'dynamic' rescales its base with every sequence length")
def _config_dynamic_rope(c: Ctx):
    return _conv(cfg(c.model(), rope_scaling={"rope_type": "dynamic", "factor": 2.0}), c.tmp / "out")


@case("convert", "longrope needs original_max_position_embeddings", "no larger than max_position_embeddings", "128")
def _config_longrope_switch_past_the_context(c: Ctx):
    return _conv(cfg(c.model("phi3", **tiny.LONGROPE), original_max_position_embeddings=128,
                     rope_scaling={**tiny.LONGROPE["rope_scaling"], "original_max_position_embeddings": 128}),
                 c.tmp / "out")


@case("convert", "no_rope_layers must list 0 or 1 for each of the 4 layers", "[1, 1]")
def _config_nope_flags_for_too_few_layers(c: Ctx):
    return _conv(cfg(c.model("smollm3"), no_rope_layers=[1, 1]), c.tmp / "out")


@case("convert", "LlavaForConditionalGeneration needs a text_config object")
def _config_wrapper_without_text_config(c: Ctx):
    return _conv(cfg(c.model("llava"), text_config=_DROP), c.tmp / "out")


@case("convert", "the language model of LlavaForConditionalGeneration (t5) is not a family fmconvert supports")
def _config_wrapper_around_an_unsupported_family(c: Ctx):
    return _conv(cfg(c.model("llava"), text_config={"model_type": "t5"}), c.tmp / "out")


@case("convert", "(text_config): hidden_size must be a positive integer", "'64'")
def _config_wrapper_text_hidden_is_a_string(c: Ctx):
    d = c.model("llava")
    edit_json(d / "config.json", lambda j: j["text_config"].update(hidden_size="64"))
    return _conv(d, c.tmp / "out")


@case("convert", "unexpected tensor image_newline", "llama policy has no slot")
def _st_wrapper_tensor_outside_the_vision_tower(c: Ctx):
    d = c.model("llava")
    t = load_file(d / "model.safetensors")
    save_file({**t, "image_newline": torch.zeros(64)}, d / "model.safetensors", metadata={"format": "pt"})
    return _conv(d, c.tmp / "out")


# -- convert: safetensors headers and weights ----------------------------------------------------------------------
def _st(c: Ctx, fn, name: str = "llama") -> list:
    d = c.model(name)
    edit_header(d / "model.safetensors", fn)
    return _conv(d, c.tmp / "out")


def _set(key, **entry):
    def fn(h, data):
        h[key].update(entry)
    return fn


@case("convert", "model.norm.weight", "the header says F16 [64] (128 bytes)", "spans 256 bytes")
def _st_dtype_lie(c: Ctx):
    return _st(c, _set("model.norm.weight", dtype="F16"))


@case("convert", "tensor evil\\n\\x1b[2J: unknown dtype")
def _st_name_with_terminal_escapes(c: Ctx):
    """Names from the file are printed escaped: no second line, no terminal control sequence."""
    def fn(h, data):
        h["evil\n\x1b[2J"] = dict(h.pop("model.norm.weight"), dtype="F4")
    return _st(c, fn)


@case("convert", "model.norm.weight", "the header says F32 [64, 64]")
def _st_shape_lie(c: Ctx):
    return _st(c, _set("model.norm.weight", shape=[64, 64]))


@case("convert", "model.norm.weight", "shape [-1, 64]")
def _st_negative_dim(c: Ctx):
    return _st(c, _set("model.norm.weight", shape=[-1, 64]))


@case("convert", "model.norm.weight", "unknown dtype 'F4'")
def _st_unknown_dtype(c: Ctx):
    return _st(c, _set("model.norm.weight", dtype="F4"))


@case("convert", "overlaps the previous tensor")
def _st_overlapping_data(c: Ctx):
    def fn(h, data):
        h.pop("__metadata__", None)
        a, b = sorted(h, key=lambda k: h[k]["data_offsets"][0])[:2]
        if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] == h[b]["data_offsets"][1] - h[b]["data_offsets"][0]:
            h[b]["data_offsets"] = list(h[a]["data_offsets"])
        else:  # make b start inside a, keeping b's length
            n = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
            h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + n]
    return _st(c, fn)


@case("convert", "the header accounts for", "truncated")
def _st_offsets_past_the_end(c: Ctx):
    def fn(h, data):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        e = h[last]
        e["shape"] = [e["shape"][0] * 1000, *e["shape"][1:]]
        n = (e["data_offsets"][1] - e["data_offsets"][0]) * 1000
        e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][0] + n]
    return _st(c, fn)


@case("convert", "trailing bytes")
def _st_trailing_garbage(c: Ctx):
    d = c.model()
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    return _conv(d, c.tmp / "out")


@case("convert", "header length", "exceeds the 100 MiB limit")
def _st_huge_header_length(c: Ctx):
    d = c.model()
    p = d / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + p.read_bytes()[8:])
    return _conv(d, c.tmp / "out")


@case("convert", "duplicate key")
def _st_duplicate_tensor(c: Ctx):
    def fn(h, data):
        text = json.dumps(h, separators=(",", ":"))
        k = "model.norm.weight"
        dup = f'"{k}":{json.dumps(h[k], separators=(",", ":"))}'
        return text[:-1] + "," + dup + "}", data
    d = c.model()
    header, data = read_st(d / "model.safetensors")
    text, data = fn(header, data)
    write_st(d / "model.safetensors", text.encode(), data)
    return _conv(d, c.tmp / "out")


@case("convert", "header is not valid JSON")
def _st_header_not_json(c: Ctx):
    d = c.model()
    p = d / "model.safetensors"
    blob = bytearray(p.read_bytes())
    blob[8:24] = b"\xff" * 16
    p.write_bytes(bytes(blob))
    return _conv(d, c.tmp / "out")


@case("convert", "too short for a header")
def _st_empty_file(c: Ctx):
    d = c.model()
    (d / "model.safetensors").write_bytes(b"")
    return _conv(d, c.tmp / "out")


@case("convert", "model.layers.0.mlp.down_proj.weight", "NaN/Inf")
def _weights_inf(c: Ctx):
    d = c.model()
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return _conv(d, c.tmp / "out")


@case("convert", "cannot be loaded with weights_only=True")
def _pickle_that_runs_code(c: Ctx):
    """--allow-pickle still never unpickles code: this pickle would create a file if it ran (the corpus runner
    checks that nothing appeared)."""
    d = c.model()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {c.tmp / 'PWNED'}",))
    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return _conv(d, c.tmp / "out", "--allow-pickle")


# -- convert: directories ------------------------------------------------------------------------------------------
@case("convert", "has no config.json")
def _empty_model_dir(c: Ctx):
    (c.tmp / "empty").mkdir()
    return _conv(c.tmp / "empty", c.tmp / "out")


@case("convert", "has no model.safetensors")
def _no_weights(c: Ctx):
    d = c.model()
    (d / "model.safetensors").unlink()
    return _conv(d, c.tmp / "out")


@case("convert", "names model-00002-of-00002.safetensors, which is missing")
def _index_names_missing_shard(c: Ctx):
    d = c.model()
    names = list(load_file(d / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
        for i, n in enumerate(names)}}))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    return _conv(d, c.tmp / "out")


@case("convert", "model.safetensors.index.json: malformed index")
def _index_not_utf8(c: Ctx):
    d = c.model()
    (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe{")
    return _conv(d, c.tmp / "out")


@case("convert", "'../evil.safetensors' must be a plain file name")
def _index_path_traversal(c: Ctx):
    d = c.model()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    shutil.copy(d / "model.safetensors", c.tmp / "evil.safetensors")
    return _conv(d, c.tmp / "out")


@case("convert", "already exists and is not empty")
def _out_is_a_file(c: Ctx):
    (c.tmp / "out").write_text("mine")
    return _conv(c.orig(), c.tmp / "out")


@case("convert", "parent directory", "does not exist")
def _out_parent_missing(c: Ctx):
    return _conv(c.orig(), c.tmp / "no" / "such" / "out")


@case("convert", "is (or contains) the model directory")
def _out_is_the_model_dir(c: Ctx):
    d = c.model()
    return ["-q", "--force", d, d]


@case("convert", "is (or contains) the model directory")
def _out_contains_the_model_dir(c: Ctx):
    d = c.tmp / "parent"
    d.mkdir()
    shutil.copytree(c.orig(), d / "model")
    return ["-q", "--force", d / "model", d]


@case("convert", "another fmconvert is writing", f"(pid {os.getpid()})")
def _out_locked_by_another_converter(c: Ctx):
    from fmconvert.write import OutputLock
    lock = OutputLock((c.tmp / "out").absolute())
    lock.acquire()
    c.keep_alive = lock  # released when the test's Ctx goes away
    return _conv(c.orig(), c.tmp / "out")


# -- inspect -------------------------------------------------------------------------------------------------------
def _manifest(c: Ctx, fn, tp: int = 1, int8: bool = False, name: str = "llama") -> Path:
    out = c.out(name, tp, int8)
    edit_json(out / "manifest.json", fn)
    return out


@case("inspect", "does not exist")
def _inspect_missing_dir(c: Ctx):
    return [c.tmp / "nope"]


@case("inspect", "has no manifest.json")
def _inspect_not_an_output(c: Ctx):
    return [c.model()]


@case("inspect", "manifest.json: not valid JSON")
def _inspect_malformed_json(c: Ctx):
    out = c.out()
    (out / "manifest.json").write_text('{"format": "fmconvert", ')
    return [out]


@case("inspect", "format_version 99 is newer", "upgrade fmconvert")
def _inspect_newer_format(c: Ctx):
    return [_manifest(c, lambda m: m.update(format_version=99))]


@case("inspect", "format is 'safetensors'")
def _inspect_wrong_format(c: Ctx):
    return [_manifest(c, lambda m: m.update(format="safetensors"))]


@case("inspect", "missing key 'ranks'")
def _inspect_missing_ranks(c: Ctx):
    return [_manifest(c, lambda m: m.pop("ranks"))]


@case("inspect", "'../outside.safetensors' escapes the output directory")
def _inspect_path_traversal(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["files"][0].update(path="../outside.safetensors"))]


@case("inspect", "'/etc/passwd' escapes the output directory")
def _inspect_absolute_path(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["files"][0].update(path="/etc/passwd"))]


@case("inspect", "model.hidden_size is missing or malformed")
def _inspect_wrong_type(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(hidden_size="64"))]


@case("inspect", "model.embed_scale must be a positive number")
def _inspect_bad_embed_scale(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(embed_scale=-8.0))]


@case("inspect", "model.attention_sinks is not a key this fmconvert understands", "upgrade fmconvert")
def _inspect_unknown_model_key(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(attention_sinks=True))]


@case("inspect", "model.window_layers must be distinct layer indices in order, with a sliding_window")
def _inspect_window_layers_without_a_window(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(window_layers=[0], sliding_window=0))]


@case("inspect", "model.window_layers must be distinct layer indices")
def _inspect_window_layer_out_of_range(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(window_layers=[7], sliding_window=4))]


@case("inspect", "expected 2 rank entries")
def _inspect_ranks_vs_tp(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"].pop(), tp=2)]


@case("inspect", "parallel.heads_per_rank * tp != model.num_heads")
def _inspect_layout_vs_model(c: Ctx):
    return [_manifest(c, lambda m: m["parallel"].update(heads_per_rank=3))]


@case("inspect", "model.kv_source must give each layer itself or an earlier layer of its kind")
def _inspect_kv_source_later_layer(c: Ctx):          # Gemma 4 E2B: layer 3 reading layer 4's cache
    return [_manifest(c, lambda m: m["model"]["kv_source"].__setitem__(3, 4), name="gemma4_e2b")]


@case("inspect", "model.kv_source must give each layer itself or an earlier layer of its kind")
def _inspect_kv_source_other_kind(c: Ctx):           # its global layer 5 reading windowed layer 1's
    return [_manifest(c, lambda m: m["model"]["kv_source"].__setitem__(5, 1), name="gemma4_e2b")]


@case("inspect", "model.head_vocab_size needs fewer rows than the vocab")
def _inspect_head_vocab_past_the_vocab(c: Ctx):      # Apertus 1.5's pruned lm_head
    return [_manifest(c, lambda m: m["model"].update(head_vocab_size=500), name="apertus1p5")]


@case("inspect", "model.layer_heads must be multiples of parallel.tp")
def _inspect_layer_heads_split_by_tp(c: Ctx):       # Laguna at tp 4: a layer of 6 heads would split one
    return [_manifest(c, lambda m: m["model"]["layer_heads"].__setitem__(1, 6), tp=4, name="laguna")]


@case("inspect", "model.layer_heads must give one multiple of num_kv_heads per layer")
def _inspect_layer_heads_one_short(c: Ctx):
    return [_manifest(c, lambda m: m["model"]["layer_heads"].pop(), name="laguna")]


@case("inspect", "model.v_head_dim must be smaller than head_dim")
def _inspect_v_head_wider_than_the_head(c: Ctx):    # MiMo-V2-Flash's narrower v heads
    return [_manifest(c, lambda m: m["model"].update(v_head_dim=40), name="mimo_v2_flash")]


@case("inspect", "model.sink_layers must be distinct layer indices in order")
def _inspect_sink_layers_out_of_order(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(sink_layers=[2, 0]), name="mimo_v2_flash")]


@case("inspect", "model.mla must be null or the latent attention's widths")
def _inspect_index_layers_without_the_first(c: Ctx):    # GLM-5's shared layers reuse an earlier layer's choice
    return [_manifest(c, lambda m: m["model"]["mla"]["index"].update(layers=[2]), name="glm_moe_dsa")]


@case("inspect", "model.mla.index.layers names a layer past the last")
def _inspect_index_layer_past_the_last(c: Ctx):
    return [_manifest(c, lambda m: m["model"]["mla"]["index"].update(layers=[0, 2, 3]), name="glm_moe_dsa")]


@case("inspect", "model.row_scales must be null or slot -> ")
def _inspect_row_scales_one_part_short(c: Ctx):        # Falcon-H1's multipliers: q|k|v has three parts
    return [_manifest(c, lambda m: m["model"]["row_scales"]["qkv"]["parts"].pop(), name="falcon_h1")]


@case("inspect", "model.ssm_beside_attention needs Mamba2 layers in every layer")
def _inspect_ssm_beside_attention_in_some_layers(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(linear_layers=[1]), name="falcon_h1")]


@case("inspect", "model.linear_attn must be null or the linear attention's widths")
def _inspect_decay_bound_without_kda(c: Ctx):          # Ling 2.5's bounded decay is KDA's, per key channel
    return [_manifest(c, lambda m: m["model"]["linear_attn"].pop("decay"), name="bailing_hybrid")]


@case("inspect", "model.shortcut_experts needs experts with a dense MLP beside them")
def _inspect_shortcut_with_the_first_layer_dense(c: Ctx):    # LongCat-Flash: the mixture in the first of each pair
    return [_manifest(c, lambda m: m["model"].update(dense_layers=[0, 2]), name="longcat_flash")]


@case("inspect", "model.row_scales names a slot this model does not have")
def _inspect_latent_scales_without_latent_attention(c: Ctx):    # LongCat-Flash's scales are the latent attention's
    return [_manifest(c, lambda m: m["model"].update(row_scales={"q_b": {"input": 1.0, "parts": [2.0]}}))]


@case("inspect", "model.residual normed and model.residual_factors go together")
def _inspect_normed_residual_without_factors(c: Ctx):    # MiniMax's residual weighs each half by its factors
    return [_manifest(c, lambda m: m["model"].update(residual_factors=None), name="minimax")]


@case("inspect", "model.residual hyper and model.hyper go together")
def _inspect_hyper_residual_without_its_weights(c: Ctx):    # HY-V4's copies of the stream need their count
    return [_manifest(c, lambda m: m["model"].update(hyper=None), name="hy_v4")]


@case("inspect", "model.experts_glu_limit needs experts with a SwiGLU activation")
def _inspect_experts_clamp_without_experts(c: Ctx):     # HY-V4's clamp is its routed experts'
    return [_manifest(c, lambda m: m["model"].update(experts_glu_limit=7.0))]


@case("inspect", "model.block_sparse needs attention layers with RoPE, no window, one indexer head per kv head")
def _inspect_block_indexer_heads_other_than_the_kv_heads(c: Ctx):   # MiniMax-M3: an indexer head a kv group
    return [_manifest(c, lambda m: m["model"]["block_sparse"].update(heads=4), name="minimax_m3")]


@case("inspect", "model.mla must be null or the latent attention's widths")
def _inspect_gated_query_without_a_bottleneck(c: Ctx):     # A.X K2's query reads the q latent twice
    return [_manifest(c, lambda m: m["model"]["mla"].update(q_rank=0), name="axk2")]


@case("inspect", "model.mla must be null or the latent attention's widths")
def _inspect_index_rope_at_the_middle(c: Ctx):          # the indexer turns its first or its last columns
    return [_manifest(c, lambda m: m["model"]["mla"]["index"].update(rope_at="middle"), name="hy_v4")]


@case("inspect", "model.mla must be null or the latent attention's widths")
def _inspect_windowed_latent_without_its_v_dim(c: Ctx):     # Dots3 Note: the windowed layers' widths, all six
    return [_manifest(c, lambda m: m["model"]["mla"]["local"].pop("v_dim"), name="dots3_note")]


@case("inspect", "model.mla must be null or the latent attention's widths")
def _inspect_latent_q_scale_without_kv_scale(c: Ctx):       # Dots3 Note's two latent scales come together
    return [_manifest(c, lambda m: m["model"]["mla"].pop("kv_scale"), name="dots3_note")]


@case("inspect", "model.mla.local needs windowed layers (window_layers), none of them indexed")
def _inspect_windowed_latent_over_an_indexed_layer(c: Ctx):     # Dots3 Note: the indexer is the other layers'
    return [_manifest(c, lambda m: m["model"].update(window_layers=[1, 2, 3]), name="dots3_note")]


@case("inspect", "model.mla.local.heads must be a multiple of parallel.tp")
def _inspect_windowed_latent_heads_split_unevenly(c: Ctx):      # whole heads on each rank, in every layer
    return [_manifest(c, lambda m: m["model"]["mla"]["local"].update(heads=3), tp=2, name="dots3_note")]


@case("inspect", "model.linear_attn, model.ssm, model.short_conv, model.mamba, model.rglru, model.mlstm and "
                 "model.lightning exclude each other")
def _inspect_lightning_beside_mamba(c: Ctx):           # one kind of linear layer per model
    return [_manifest(c, lambda m: m["model"].update(lightning=True), name="mamba")]


@case("inspect", "model.compressed needs one kv head")
def _inspect_compressed_attention_over_more_kv_heads(c: Ctx):   # DeepSeek-V4's one key-value head
    return [_manifest(c, lambda m: m["model"].update(num_kv_heads=2), name="deepseek_v4")]


@case("inspect", "model.compressed must be null or the compressed attention's widths")
def _inspect_compressed_layers_of_both_kinds(c: Ctx):     # a layer has one compressor or none
    return [_manifest(c, lambda m: m["model"]["compressed"].update(hca_layers=[1, 2]), name="deepseek_v4")]


@case("inspect", "model.hash_layers needs a mixture's layers")
def _inspect_hash_layers_past_the_last(c: Ctx):          # DeepSeek-V4's token-id routing names real layers
    return [_manifest(c, lambda m: m["model"].update(hash_layers=[0, 9]), name="deepseek_v4")]


@case("inspect", "model.residual altup and model.altup go together")
def _inspect_altup_residual_without_its_copies(c: Ctx):   # Gemma 3n's copies need their count
    return [_manifest(c, lambda m: m["model"].update(altup=None), name="gemma3n")]


@case("inspect", "model.gate_sparsity must be null or a number in [0, 1) per layer")
def _inspect_gate_sparsity_of_one(c: Ctx):                # Gemma 3n: a target below 1
    return [_manifest(c, lambda m: m["model"].update(gate_sparsity=[1.0, 0.0, 0.0, 0.0]), name="gemma3n")]


@case("inspect", "model.rglru must be null or the RG-LRU's widths")
def _inspect_rglru_heads_not_dividing_its_width(c: Ctx):  # RecurrentGemma: whole heads of channels
    return [_manifest(c, lambda m: m["model"]["rglru"].update(heads=5), name="recurrent_gemma")]


@case("inspect", "model.mlstm must be null or the mLSTM's widths")
def _inspect_mlstm_heads_not_dividing_its_widths(c: Ctx):  # xLSTM: whole heads of q/k and v
    return [_manifest(c, lambda m: m["model"]["mlstm"].update(heads=3), name="xlstm")]


@case("inspect", "model.diff_attn needs an even number of heads")
def _inspect_diff_attn_with_odd_heads(c: Ctx):           # DiffLlama pairs heads across its halves
    return [_manifest(c, lambda m: m["model"].update(num_kv_heads=1), name="diffllama")]


@case("inspect", "model.dyn_mask must be null or {keep_window")
def _inspect_dyn_mask_keeping_no_key(c: Ctx):            # Doge: a query keeps at least one key
    return [_manifest(c, lambda m: m["model"]["dyn_mask"].update(keep_window=0), name="doge")]


@case("inspect", "model.dyn_mask and the dmask slots go together")
def _inspect_dyn_mask_in_a_window(c: Ctx):               # Doge's cache of biases holds every position, no ring
    return [_manifest(c, lambda m: m["model"].update(sliding_window=4), name="doge")]


@case("inspect", "model.cca must be null or {depthwise, grouped")
def _inspect_cca_without_taps(c: Ctx):                   # ZAYA: each conv has at least one tap
    return [_manifest(c, lambda m: m["model"]["cca"].update(grouped=0), name="zaya")]


@case("inspect", "model.router_dim and the router_in slot go together")
def _inspect_router_dim_with_two_experts_a_token(c: Ctx):    # ZAYA's router picks one expert (or none)
    return [_manifest(c, lambda m: m["model"].update(experts_per_token=2), name="zaya")]


@case("inspect", "attn_residual and mlp_residual go together")
def _inspect_one_residual_weight_without_the_other(c: Ctx):   # Doge weights the stream before both halves
    return [_manifest(c, lambda m: m["model"]["slots"].remove("layers.mlp_residual"), name="doge")]


@case("inspect", "model.loop must be null or {stack_layers, h_cycles, l_cycles")
def _inspect_loop_without_low_level_runs(c: Ctx):        # HRM-Text: L runs at least once a cycle
    return [_manifest(c, lambda m: m["model"]["loop"].update(l_cycles=0), name="hrm_text")]


@case("inspect", "model.loop and the loop_init slot go together")
def _inspect_loop_over_more_runs_than_layers(c: Ctx):   # HRM-Text: one virtual layer per block run
    return [_manifest(c, lambda m: m["model"]["loop"].update(h_cycles=3), name="hrm_text")]


@case("inspect", "model.loop and the loop_init slot go together")
def _inspect_loop_init_without_a_loop(c: Ctx):          # HRM-Text: its blocks' runs are the loop's to say
    return [_manifest(c, lambda m: m["model"].update(loop=None), name="hrm_text")]


@case("inspect", "model.position.pad_id must be an int one below model.position.offset")
def _inspect_pad_id_apart_from_its_offset(c: Ctx):       # RoBERTa: positions count from pad_id + 1
    return [_manifest(c, lambda m: m["model"]["position"].update(offset=5), name="roberta")]


@case("inspect", "model.embed_proj needs an embed_dim other than hidden_size")
def _inspect_embed_proj_at_the_hidden_width(c: Ctx):     # ELECTRA: projected only where the widths differ
    return [_manifest(c, lambda m: m["model"].update(embed_dim=64), name="electra")]


@case("inspect", "model.rel_bias must be null or {buckets")
def _inspect_rel_bias_buckets_not_in_quarters(c: Ctx):   # MPNet: a half per direction, exact below a quarter
    return [_manifest(c, lambda m: m["model"]["rel_bias"].update(buckets=30), name="mpnet")]


@case("inspect", "model.disentangled must be null or {span")
def _inspect_disentangled_buckets_apart_from_its_span(c: Ctx):    # DeBERTa: 2 * span relative-embedding rows
    return [_manifest(c, lambda m: m["model"]["disentangled"].update(buckets=6), name="deberta_v3")]


@case("inspect", "model.rel_bias and model.disentangled")
def _inspect_rel_bias_beside_disentangled(c: Ctx):    # DeBERTa's own position terms: an MPNet bias would be ignored
    return [_manifest(c, lambda m: m["model"].update(rel_bias={"buckets": 8, "max_distance": 20}),
                      name="deberta_v3")]


@case("inspect", "model.causal_encoder and model.eos_pool are an encoder's")
def _inspect_eos_pool_on_a_decoder(c: Ctx):               # a decoder has no pooled output
    return [_manifest(c, lambda m: m["model"].update(eos_pool={"eos_id": 2}))]


@case("inspect", "model.shared_layers (every layer reads layer 0's weights) goes with uniform layers only")
def _inspect_shared_layers_in_a_hybrid(c: Ctx):           # Zamba2's layers differ: one set of weights cannot serve
    return [_manifest(c, lambda m: m["model"].update(shared_layers=True), name="zamba2")]


@case("inspect", "model.headless is for decoders with an untied head")
def _inspect_headless_encoder(c: Ctx):                    # an encoder has no language-model head to leave out
    return [_manifest(c, lambda m: m["model"].update(headless=True), name="bert")]


@case("inspect", "model.classifier must be null or {pool")
def _inspect_classifier_with_an_unknown_pooling(c: Ctx):    # a head reads the first token, the pooler or the mean
    return [_manifest(c, lambda m: m["model"]["classifier"].update(pool="last"), name="xlm_roberta")]


@case("inspect", "model.shared_blocks and hybrid block_parts go together")
def _inspect_shared_blocks_without_hybrid_layers(c: Ctx):   # Zamba2's blocks run in its hybrid layers
    return [_manifest(c, lambda m: m["model"].update(block_parts=["mixer"] * 6), name="zamba2")]


@case("inspect", "model.moa needs num_heads = top_k * num_kv_heads")
def _inspect_moa_heads_not_its_experts_times_kv_heads(c: Ctx):    # JetMoe: a query per kv head and expert
    return [_manifest(c, lambda m: m["model"]["moa"].update(top_k=1), name="jetmoe")]


@case("inspect", "model.ngram must be null or the n-gram embeddings' widths and hash tables")
def _inspect_ngram_with_an_even_multiplier(c: Ctx):       # Qwen4-Exp: its hash multipliers are odd
    return [_manifest(c, lambda m: m["model"]["ngram"]["tables"]["1"]["multipliers"].__setitem__(0, 8),
                      name="qwen4_exp")]


@case("inspect", "model.qsa must be null or the QSA indexer's")
def _inspect_qsa_budget_not_in_whole_blocks(c: Ctx):      # Qwen4-Exp: the budget is whole blocks
    return [_manifest(c, lambda m: m["model"]["qsa"].update(budget=5), name="qwen4_exp")]


@case("inspect", "model.residual gated_hyper and model.hyper's rank go together")
def _inspect_gated_hyper_without_its_rank(c: Ctx):        # Qwen4-Exp's mixes need their bottleneck
    return [_manifest(c, lambda m: m["model"].update(hyper={"streams": 3, "magnitude": 2.0, "eps": 1e-6}),
                      name="qwen4_exp")]


@case("inspect", "model.residual_depth_scale needs the pre-norm residual")
def _inspect_depth_scale_with_a_residual_scale(c: Ctx):    # Beam's scaled additions beside Granite's multiplier
    return [_manifest(c, lambda m: m["model"].update(residual_scale=0.5), name="beam")]


@case("inspect", "manifest: expected a JSON object")
def _inspect_manifest_is_a_list(c: Ctx):
    out = c.out()
    (out / "manifest.json").write_text("[" + (out / "manifest.json").read_text() + "]")
    return [out]


@case("inspect", "contains control characters")
def _inspect_terminal_escapes(c: Ctx):
    return [_manifest(c, lambda m: m["model"].update(architecture="Llama\x1b[2J\nForCausalLM"))]


@case("inspect", "is listed twice")
def _inspect_duplicate_file(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["files"].append(dict(m["ranks"][0]["files"][0])))]


# -- verify --------------------------------------------------------------------------------------------------------
@case("verify", "sha256 mismatch", code=EXIT_PARITY)
def _verify_tampered_shard(c: Ctx):
    out = c.out()
    flip_byte(first_shard(out))
    return [c.orig(), out, "--tokens", "16"]


@case("verify", "is missing", code=EXIT_PARITY)
def _verify_missing_shard(c: Ctx):
    out = c.out()
    first_shard(out).unlink()
    return [c.orig(), out, "--tokens", "16"]


@case("verify", "is 100 bytes, the manifest says", code=EXIT_PARITY)
def _verify_truncated_shard(c: Ctx):
    out = c.out()
    p = first_shard(out)
    p.write_bytes(p.read_bytes()[:100])
    return [c.orig(), out, "--tokens", "16"]


@case("verify", "escapes the output directory")
def _verify_path_traversal(c: Ctx):
    return [c.orig(), _manifest(c, lambda m: m["ranks"][0]["files"][0].update(path="../../x.safetensors")),
            "--tokens", "16"]


@case("verify", "upgrade fmconvert")
def _verify_newer_format(c: Ctx):
    return [c.orig(), _manifest(c, lambda m: m.update(format_version=99)), "--tokens", "16"]


@case("verify", "holds a GPT2LMHeadModel model", "LlamaForCausalLM")
def _verify_wrong_model_dir(c: Ctx):
    return [c.orig("gpt2"), c.out(), "--tokens", "16"]


# -- generate ------------------------------------------------------------------------------------------------------
def _gen(out, *opts):
    return [out, "-p", "hi", "-n", "2", *opts]


@case("generate", "sha256 does not match the manifest", "--no-verify-hashes")
def _generate_tampered_shard(c: Ctx):
    out = c.out()
    flip_byte(first_shard(out))
    return _gen(out)


@case("generate", "is missing from")
def _generate_missing_shard(c: Ctx):
    out = c.out()
    first_shard(out).unlink()
    return _gen(out)


@case("generate", "converted for tp=2", "torchrun --nproc-per-node 2")
def _generate_world_size_mismatch(c: Ctx):
    return _gen(c.out(tp=2))


@case("generate", "holds an encoder (BertModel)", "fmconvert embed")
def _generate_on_an_encoder(c: Ctx):
    return _gen(c.out("bert"))


@case("generate", "resolves outside the output directory")
def _generate_symlink_escape(c: Ctx):
    out = c.out()
    p = first_shard(out)
    outside = c.tmp / "outside.safetensors"
    p.rename(outside)
    p.symlink_to(outside)
    return _gen(out)


@case("generate", "size 100 differs from the manifest")
def _generate_truncated_shard_no_hashes(c: Ctx):
    out = c.out()
    p = first_shard(out)
    p.write_bytes(p.read_bytes()[:100])
    return _gen(out, "--no-verify-hashes")


@case("generate", "upgrade fmconvert")
def _generate_newer_format(c: Ctx):
    return _gen(_manifest(c, lambda m: m.update(format_version=99)))


@case("generate", "not a readable safetensors file", "runs past the end")
def _generate_header_lie_with_fresh_hashes(c: Ctx):
    out = c.out()
    p = first_shard(out)
    p.write_bytes(p.read_bytes()[:1000])
    refresh_hashes(out)
    return _gen(out)


@case("generate", "the tokenizer has no chat template", "drop --chat")
def _generate_chat_without_a_template(c: Ctx):
    return _gen(c.out("stories"), "--chat")


@case("generate", "--system needs --chat")
def _generate_system_without_chat(c: Ctx):
    return _gen(c.out("stories"), "--system", "be brief")


@case("generate", "generation_config.json: not a JSON object")
def _generate_generation_config_not_an_object(c: Ctx):
    out = c.out("stories")
    (out / "generation_config.json").write_text("[2]")
    return _gen(out)


# -- load (the Python API: fmconvert.load) ------------------------------------------------------------------------
@case("load", "sha256 does not match the manifest")
def _load_tampered_shard(c: Ctx):
    out = c.out()
    flip_byte(first_shard(out))
    return [out]


@case("load", "is float16 [64] in", "the manifest says float32 [64]")
def _load_header_dtype_vs_manifest(c: Ctx):
    out = c.out()
    p = first_shard(out)
    t = load_file(p)
    t["final_norm.weight"] = t["final_norm.weight"].half()
    save_file(t, p)
    refresh_hashes(out)
    return [out]


@case("load", "layers.0.qkv.weight has shape [96, 32]", "imply [128, 64]")
def _load_manifest_shape_vs_spec(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["tensors"]["layers.0.qkv.weight"].update(shape=[96, 32]))]


@case("load", "has no tensor layers.1.mlp_in.weight")
def _load_required_tensor_missing(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["tensors"].pop("layers.1.mlp_in.weight"))]


@case("load", "lists tensor layers.7.qkv.weight, which is not part of a LlamaForCausalLM")
def _load_unknown_tensor(c: Ctx):
    def fn(m):
        t = m["ranks"][0]["tensors"]
        t["layers.7.qkv.weight"] = dict(t["layers.0.qkv.weight"])
    return [_manifest(c, fn)]


@case("load", "does not fit an int8 layers.0.mlp_out.weight")
def _load_int8_scales_vs_weight(c: Ctx):
    return [_manifest(c, lambda m: m["ranks"][0]["tensors"]["layers.0.mlp_out.weight_scale"].update(shape=[64, 5]),
                      int8=True)]


@case("load", "cannot be resolved")
def _load_symlink_loop(c: Ctx):
    out = c.out()
    p = first_shard(out)
    p.unlink()
    p.symlink_to(p)
    return [out]


@case("load", "tensor extra.ghost listed in the manifest is not in")
def _load_tensor_not_in_file(c: Ctx):
    def fn(m):
        t = m["ranks"][0]["tensors"]
        t["extra.ghost"] = dict(t["final_norm.weight"])
    return [_manifest(c, fn)]


@case("load", "the classifier's classifier.ghost", "does not fit")
def _load_classifier_step_naming_no_tensor(c: Ctx):     # XLM-R's head: dense + tanh, then out_proj
    return [_manifest(c, lambda m: m["model"]["classifier"]["steps"][1].update(name="classifier.ghost"),
                      name="xlm_roberta")]


@case("load", "the classifier's classifier.out_proj", "does not fit")
def _load_classifier_step_reading_the_wrong_width(c: Ctx):   # out_proj [labels, h] twice: the second reads labels
    return [_manifest(c, lambda m: m["model"]["classifier"]["steps"].append(m["model"]["classifier"]["steps"][1]),
                      name="xlm_roberta")]


@case("load", "data_offsets", "overlaps the previous tensor")
def _load_overlapping_data_with_fresh_hashes(c: Ctx):
    out = c.out()

    def fn(h, data):
        h.pop("__metadata__", None)
        names = sorted(h, key=lambda k: h[k]["data_offsets"][0])
        size = {k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0] for k in names}
        for i, a in enumerate(names):
            b = next((b for b in names[i + 1:] if size[b] == size[a] and size[a]), None)
            if b is not None:  # the later one claims the earlier one's bytes
                h[b]["data_offsets"] = list(h[a]["data_offsets"])
                return
        raise AssertionError("no two tensors of equal size")
    edit_header(first_shard(out), fn)
    refresh_hashes(out)
    return [out]


@case("load", "converted for tp=2", "torchrun --nproc-per-node 2")
def _load_world_size_mismatch(c: Ctx):
    return [c.out(tp=2)]


@case("load", "--device: cannot use 'warp-drive'", device="warp-drive")
def _load_bad_device(c: Ctx):
    return [c.out()]


@case("load", "rank 5 is out of range")
def _load_rank_out_of_range(c: Ctx):
    from fmconvert.runtime.comm import SingleComm
    c.load_extra = {"rank": 5, "comm": SingleComm()}
    return [c.out()]


def run_main(capsys, *args) -> tuple[int, str, str]:
    from fmconvert.cli import main
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, want_code: int, *needles: str):
    assert code == want_code, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def count() -> dict[str, int]:
    n = {cmd: 0 for cmd in COMMANDS}
    for c in CASES:
        n[c.command] += 1
    return n


def medium_model(path: Path, **overrides) -> Path:
    """A llama big enough that converting it writes ~100 shard files with --max-shard-size 64KB (8 layers, ~6M
    parameters): the kill points of the crash tests are chosen among them."""
    kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=2048)
    return tiny.save("llama", path, **{**kw, **overrides})
