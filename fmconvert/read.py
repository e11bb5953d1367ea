"""Read a Hugging Face model directory lazily: config through transformers, tensors through safetensors.

Nothing is loaded until asked for, so conversion memory follows one layer, not the model. Pickled checkpoints are
refused unless the caller opts in, and then they are read with `weights_only=True`. No remote code ever runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import EXIT_IO, FmError
from .manifest import MAX_DIM, MAX_POSITIONS  # a config the converter accepts must give a manifest readers accept

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8,
                "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20
MAX_RANK = 8
# Files a serving script needs besides the weights; copied verbatim into the output.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
    "sentencepiece.bpe.model", "spm.model", "spiece.model",     # XLM-R's, DeBERTa-v3's and T5's SentencePiece models
    "source.spm", "target.spm",                                 # Marian's: one for each language
    "preprocessor_config.json",                                 # Whisper's feature extractor (its mel settings)
)
# sentence-transformers' description of the pipeline around the model (which pooling, whether normalised, the
# length it truncates to); each module's own config.json sits under the module's path.
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
MAX_SENTENCE_MODULES = 32


def sentence_modules(model_dir: Path) -> list[tuple[str, str]]:
    """sentence-transformers' modules.json as [(type's last name, path)], [] without one. Read as JSON only; a path
    must stay inside the directory, since files under it are copied and read."""
    f = Path(model_dir) / "modules.json"
    if not f.is_file():
        return []
    try:
        mods = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FmError(f"{f}: not valid JSON ({e})") from None
    ok = isinstance(mods, list) and len(mods) <= MAX_SENTENCE_MODULES and all(
        isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str) for m in mods)
    if not ok:
        raise FmError(f"{f}: expected a list of at most {MAX_SENTENCE_MODULES} modules, each with a type and a path")
    out = []
    for m in mods:
        path = m.get("path", "")
        if path.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", path) or not re.fullmatch(r"[\w./-]*", path):
            raise FmError(f"{f}: module path {path[:80]!r} leaves the model directory")
        out.append((m["type"].rsplit(".", 1)[-1], path.strip("/")))
    return out


def sentence_files(model_dir: Path) -> list[str]:
    """The sentence-transformers files a model directory holds, relative to it: SENTENCE_FILES, the config.json of
    each module that has one (its Pooling's, above all), and a Dense module's model.safetensors."""
    model_dir = Path(model_dir)
    mods = [f"{p}/{f}" for t, p in sentence_modules(model_dir) if p
            for f in ("config.json", *(("model.safetensors",) if t == "Dense" else ()))]   # a Dense's weights too
    return [f for f in (*SENTENCE_FILES, *mods) if (model_dir / f).is_file()]


_CORE = ("hidden_size", "num_layers", "num_heads", "vocab_size")   # no default is ever right for these
_CORE_WHAT = {"hidden_size": "hidden size", "num_layers": "number of layers", "num_heads": "number of attention heads",
              "vocab_size": "vocabulary size"}
_INTS = _CORE + ("num_kv_heads", "head_dim", "intermediate_size", "max_positions", "embed_dim", "type_vocab_size")


def load_config(model_dir: Path):
    """The transformers config, parsed by transformers itself; errors become one line."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FmError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FmError(f"{model_dir} has no config.json")
    try:
        text = path.read_bytes()
        raw = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FmError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise FmError(f"{path}: expected a JSON object")
    if "auto_map" in raw:
        raw.pop("auto_map")  # remote-code hooks are never honoured
    quant = raw.get("quantization_config")
    if quant is not None and quant_method(raw) not in ("mxfp4", "fp8", "gptq", "awq"):
        raise FmError(f"{path}: the weights are quantized ({_short(quant_method(raw) or quant)}); fmconvert reads "
                      f"float checkpoints, block-scaled FP8 (DeepSeek-V3, Qwen3-FP8), GPT-OSS's MXFP4 and 4-bit "
                      f"GPTQ / AWQ: convert from the unquantized checkpoint")
    fp8_block(raw, path)
    int4_format(raw, path)
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise FmError(f"{path}: architectures must be a list of strings, got {_short(archs)}")
    from .policy import policies, policy_for, saved_as_owner, wrappers

    arch = next((a for a in archs or [] if a in policies() or a in wrappers()), None)
    if arch is None:
        policy_for(archs)  # fail on unknown architectures before transformers does
    from transformers import logging as hf_logging
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING_NAMES and arch not in wrappers():
        # a release that renames a config transformers knows (Kimi K2's kimi_k2 is DeepSeek-V3's): its table says so
        model_type = raw["model_type"] = policy_for([arch])[0].table.get("model_types", {}).get(model_type, model_type)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise FmError(f"{path}: model_type {_short(model_type)} is missing or unknown to transformers")
    stem = CONFIG_MAPPING_NAMES[model_type].removesuffix("Config")
    wrapper = wrappers().get(arch)
    own = saved_as_owner(arch, model_type) if wrapper is None else None
    if own is not None:
        # transformers saves some models under a generic class (EXAONE 3.x as LlamaForCausalLM) with their own
        # model_type and tensor names: the model_type's own table says so, and serves them
        arch = own
        raw["architectures"] = [own]
    if wrapper is None:
        policy, _ = policy_for([arch])
        if not any(a.startswith(stem) for a in policy.architectures):
            raise FmError(f"{path}: model_type {model_type!r} does not belong with architecture {arch}")
        _check_sizes(raw, policy.table["config"], getattr(CONFIG_MAPPING[model_type], "attribute_map", {}), path)
    else:
        if not arch.startswith(stem) and model_type not in wrapper.get("model_types", ()):   # a class not named
            raise FmError(f"{path}: model_type {model_type!r} does not belong with architecture {arch}")  # after it
        key, flat = wrapper["config"], wrapper.get("flat_text")
        if flat and key not in raw:
            # Dots3 Note as published: the language model's keys at the top level, its model_type the table's
            # flat_text; transformers makes its text_config of them
            text_arch = _check_language_model({key: {**raw, "model_type": flat}}, key, arch, path)
        else:
            text_arch = _check_language_model(raw, key, arch, path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its config warnings would break the one-line error contract
    try:
        config = CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as e:  # transformers raises ValueError/KeyError/TypeError for malformed configs
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise FmError(f"{path}: transformers cannot parse it ({type(e).__name__}: {msg})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if wrapper is not None:
        # Only the language model is converted: hand back its config, marked with the wrapper. The wrapper's
        # tie_word_embeddings is the one transformers ties lm_head by.
        outer, config = config, getattr(config, wrapper["config"])
        config.architectures = [arch]
        config.fmconvert_text_architecture = text_arch
        config.tie_word_embeddings = bool(getattr(outer, "tie_word_embeddings",
                                                  getattr(config, "tie_word_embeddings", False)))
        # settings a text config class lacks because its model hard-codes them (GLM-4.1V: q/k/v biases, with no
        # attention_bias to say so), from the wrapper table's [text_defaults.<model_type>]
        for key, value in wrapper.get("text_defaults", {}).get(config.model_type, {}).items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
    return config, hashlib.sha256(text).hexdigest()


def quant_method(config) -> str | None:
    """The quantization a checkpoint's config declares (a parsed config or its raw dict), None if it has none."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else {}
    return q.get("quant_method") if isinstance(q, dict) else None


def fp8_block(config, where="config.json") -> tuple[int, int] | None:
    """The [rows, columns] block of a block-scaled FP8 checkpoint (quant_method "fp8": DeepSeek-V3/R1, Kimi K2,
    the Qwen3 and GLM FP8 releases), None when it is not one. Anything this reader would misread is refused."""
    if quant_method(config) != "fp8":
        return None
    q = config["quantization_config"] if isinstance(config, dict) else config.quantization_config
    q = q if isinstance(q, dict) else q.to_dict()
    block, fmt = q.get("weight_block_size"), q.get("fmt", "e4m3")
    if fmt != "e4m3" or q.get("activation_scheme", "dynamic") != "dynamic":
        raise FmError(f"{where}: FP8 with fmt={_short(fmt)} and activation_scheme="
                      f"{_short(q.get('activation_scheme'))} is not supported (e4m3 weights, dynamic activations)")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(type(b) is int and 0 < b <= 4096
                                                                          for b in block)):
        raise FmError(f"{where}: FP8 weight_block_size must be two positive integers, got {_short(block)} "
                      "(per-tensor FP8 scales are not supported)")
    return tuple(block)


def int4_format(config, where="config.json") -> dict | None:
    """A 4-bit GPTQ or AWQ checkpoint's format ({"method", "group_size", "zero_offset"}), None when it is not one.
    GPTQ's own format ("gptq") stores each zero point minus 1; "gptq_v2" stores it as it is. AWQ: the GEMM layout
    with zero points. Anything this reader would misread is refused."""
    method = quant_method(config)
    if method not in ("gptq", "awq"):
        return None
    q = config["quantization_config"] if isinstance(config, dict) else config.quantization_config
    q = q if isinstance(q, dict) else q.to_dict()
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    fmt = q.get("checkpoint_format", "gptq") if method == "gptq" else str(q.get("version", "gemm")).lower()
    if bits != 4 or type(group) is not int or not (group == -1 or 0 < group <= 1 << 16) \
            or fmt not in ("gptq", "gptq_v2", "gemm") or (method == "awq" and not q.get("zero_point", True)):
        raise FmError(f"{where}: {method.upper()} with bits={_short(bits)}, group_size={_short(group)} and format "
                      f"{_short(fmt)} is not supported (4 bits in groups; GPTQ's gptq or gptq_v2 format, AWQ's gemm "
                      f"with zero points)")
    return {"method": method, "group_size": group, "zero_offset": 1 if fmt == "gptq" else 0}


def _check_language_model(raw: dict, key: str, arch: str, path: Path) -> str:
    """A wrapper's text config: present, of a supported family, with sane sizes (transformers' defaults fill in
    the keys it omits, as gemma-3-4b's omits the head counts). Returns the architecture whose table serves it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    from .policy import policies, text_architecture

    text = raw.get(key)
    if not isinstance(text, dict):
        raise FmError(f"{path}: {arch} needs a {key} object (its language model's config)")
    ttype = text.get("model_type")
    if not isinstance(ttype, str) or ttype not in CONFIG_MAPPING_NAMES:
        raise FmError(f"{path}: {key}.model_type {_short(ttype)} is missing or unknown to transformers")
    text_arch = text_architecture(arch, ttype, CONFIG_MAPPING_NAMES[ttype])
    if text_arch is None:
        raise FmError(f"{path}: the language model of {arch} ({ttype}) is not a family fmconvert supports")
    policy = policies()[text_arch]
    cls = CONFIG_MAPPING[ttype]
    try:
        defaults = cls().to_dict()
    except Exception:  # a config class that cannot be built bare: the raw keys alone are checked
        defaults = {}
    _check_sizes({**defaults, **text}, policy.table["config"], getattr(cls, "attribute_map", {}),
                 f"{path} ({key})")
    return text_arch


def _short(x, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n - 3] + "..."


def _check_sizes(raw: dict, table: dict, attribute_map: dict, path: Path | str):
    """Types, presence and divisibility of the sizes the policy reads: caught here with a message naming the key,
    instead of a transformers default silently standing in or a validator's traceback-shaped error."""
    def lookup(name):
        for alias in (name, attribute_map.get(name), *(k for k, v in attribute_map.items() if v == name)):
            if alias and raw.get(alias) is not None:
                return alias, raw[alias]
        return None, None

    found = {}
    for key, spec in table.items():
        if not isinstance(spec, str):
            continue
        names = [n for alt in spec.split("|") for n in re.split(r"[*/]", alt) if not n.isdigit()]
        for n in names:
            listed = re.fullmatch(r"len\((\w+)\)", n)       # a list's length: the list is what must be there
            if listed:
                alias, v = lookup(listed.group(1))
                if isinstance(v, list) and 0 < len(v) < MAX_DIM:
                    found.setdefault(key, (alias, len(v)))
                continue
            alias, v = lookup(n)
            if alias is None:
                continue
            if isinstance(v, list) and key == "intermediate_size" and v and all(     # Gemma 3n: one per layer
                    type(x) is int and 0 < x < MAX_DIM for x in v):
                found.setdefault(key, (alias, v[0]))
                continue
            if key in _INTS or "/" in spec or "*" in spec:
                if type(v) is not int or not 0 < v < MAX_DIM:
                    raise FmError(f"{path}: {alias} must be a positive integer below {MAX_DIM}, got {_short(v)}")
                if key == "max_positions" and v > MAX_POSITIONS:  # the runtime builds its RoPE tables this long
                    raise FmError(f"{path}: {alias}={v} exceeds the {MAX_POSITIONS} positions fmconvert supports")
            elif key == "norm_eps" and (type(v) not in (int, float) or not 0 < v < 1):
                raise FmError(f"{path}: {alias} must be a small positive number, got {_short(v)}")
            elif key == "activation" and not isinstance(v, str):
                raise FmError(f"{path}: {alias} must be a string, got {_short(v)}")
            found.setdefault(key, (alias, v))
        if key in _CORE and key not in found:
            raise FmError(f"{path}: missing key {' or '.join(names)} (the {_CORE_WHAT[key]})")
    rope = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    for k, v in [(k, raw.get(k)) for k in ("rope_theta", "partial_rotary_factor")] + [
            ("rope_parameters.rope_theta", rope.get("rope_theta"))]:
        if v is not None and (type(v) not in (int, float) or not 0 < v < float("inf")):
            raise FmError(f"{path}: {k} must be a positive number, got {_short(v)}")
    (h, hidden), (a, heads) = found["hidden_size"], found["num_heads"]
    if hidden % heads:  # every supported family splits the hidden size into whole heads
        raise FmError(f"{path}: {h}={hidden} is not divisible by {a}={heads}")


class Checkpoint:
    """All tensors of a model directory by name, opened lazily. Use as a context manager."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False, mxfp4: bool = False,
                 fp8: tuple[int, int] | None = None, int4: dict | None = None):
        self.dir = Path(model_dir)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.mxfp4: dict[str, tuple] = {}   # name -> (its blocks, its scales, their files): see _pair_mxfp4
        self.fp8: dict[str, tuple] = {}     # name -> (its scale, the scale's file): see _pair_fp8
        self.fp4: dict[str, tuple] = {}     # name -> (its scale, the scale's file): DeepSeek-V4's packed experts
        self.fp8_block = fp8
        self.int4: dict[str, tuple] = {}    # name -> (its parts, their files): see _pair_int4
        self.int4_format = int4
        files = self._discover(allow_pickle)
        self.files = files
        for fname in files:
            if self._pickled is not None:
                break
            check_safetensors(self.dir / fname, fname)
            try:
                h = safe_open(self.dir / fname, framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise FmError(f"{fname}: not a readable safetensors file ({_first_line(e)})") from None
            self._handles[fname] = h
            for k in keys:
                if k in self._where:
                    raise FmError(f"tensor {k} appears in both {self._where[k]} and {fname}")
                self._where[k] = fname
        if mxfp4:
            if self._pickled is not None:
                raise FmError(f"{self.dir}: MXFP4 weights must be safetensors")
            self._pair_mxfp4()
        if int4:
            if self._pickled is not None:
                raise FmError(f"{self.dir}: {int4['method'].upper()} weights must be safetensors")
            self._pair_int4(int4)
        if fp8:
            if self._pickled is not None:
                raise FmError(f"{self.dir}: FP8 weights must be safetensors")
            self._pair_fp8(fp8)
        elif self._pickled is None and any(n not in self.mxfp4 and n not in self.int4
                                           and self._raw_dtype(n) == "F8_E4M3" for n in self._where):
            raise FmError(f"{self.dir} holds FP8 tensors, but config.json declares no FP8 quantization_config")

    def _pair_fp8(self, block):
        """A block-scaled FP8 checkpoint stores a weight X as float8_e4m3 [..., N, K] beside X_scale_inv (fp32 or
        bf16 [..., ceil(N / rows), ceil(K / cols)]), one multiplier per block; DeepSeek-V4 names it M.scale for
        M.weight, as fp32 or as E8M0 powers of two. Each X reads as X * scale in bf16, what transformers dequantizes
        it to; the scale tensors are consumed. DeepSeek-V4's routed experts are E2M1 instead (`_pair_fp4`)."""
        pairs = [(n, n[:-len("_scale_inv")]) for n in self._where if n.endswith("_scale_inv")] + [
            (n, n[:-len(".scale")] + ".weight") for n in self._where
            if n.endswith(".scale") and n[:-len(".scale")] + ".weight" in self._where
            and self._raw_dtype(n[:-len(".scale")] + ".weight") in ("F8_E4M3", "I8")]
        for scale, name in pairs:
            if name not in self._where or self._raw_dtype(name) not in ("F8_E4M3", "I8") or (
                    self._raw_dtype(name) == "I8" and scale.endswith("_scale_inv")):
                raise FmError(f"FP8 scale {scale} has no float8_e4m3 tensor {name} beside it")
            if self._raw_dtype(name) == "I8":
                self._pair_fp4(name, scale)
                continue
            w, sc = self._raw_shape(name), self._raw_shape(scale)
            want = [*w[:-2], -(-w[-2] // block[0]), -(-w[-1] // block[1])] if len(w) >= 2 else None
            if want is None or list(sc) != want or self._raw_dtype(scale) not in ("F32", "BF16", "F8_E8M0"):
                raise FmError(f"FP8 tensor {name} {list(w)}: its scales {list(sc)} {self._raw_dtype(scale)} must be "
                              f"fp32, bf16 or e8m0 {want} (blocks of {list(block)})")
            self.fp8[name] = (scale, self._where[scale])
        for name, (scale, _) in [*self.fp8.items(), *self.fp4.items()]:
            del self._where[scale]
        bare = next((n for n in self._where if n not in self.fp8 and self._raw_dtype(n) == "F8_E4M3"), None)
        if bare is not None:
            raise FmError(f"FP8 tensor {bare} has no {bare}_scale_inv (or .scale) beside it")
        if not self.fp8:
            raise FmError(f"config.json says FP8, but {self.dir} has no *_scale_inv (or .scale) tensors")

    def _pair_fp4(self, name: str, scale: str):
        """DeepSeek-V4's routed experts: M.weight int8 [N, K / 2], two E2M1 codes a byte (the low nibble first), and
        M.scale [N, K / 32], a power of two per 32 values (E8M0, or uint8 biased by 127). It reads as bf16 [N, K],
        each value exact."""
        w, sc = self._raw_shape(name), self._raw_shape(scale)
        if len(w) != 2 or list(sc) != [w[0], w[1] * 2 // 32] or w[1] % 16 or self._raw_dtype(scale) not in (
                "F8_E8M0", "U8"):
            raise FmError(f"FP4 tensor {name} {list(w)}: its scales {list(sc)} {self._raw_dtype(scale)} must be e8m0 "
                          f"[{w[0]}, {w[1] * 2 // 32 if len(w) == 2 else '?'}] (one per 32 values, two values a byte)")
        self.fp4[name] = (scale, self._where[scale])

    def _pair_mxfp4(self):
        """An MXFP4 checkpoint (GPT-OSS's experts) stores a weight as X_blocks (uint8 [E, N, K/32, 16], two 4-bit
        E2M1 codes a byte, the low nibble first) and X_scales (uint8 [E, N, K/32], a power-of-two exponent biased
        by 127 per 32 values). Each pair reads as the tensor X that transformers dequantizes it to: bf16
        [E, K, N], the layout of the unquantized checkpoint, so the family's table serves both."""
        for blocks in [n for n in self._where if n.endswith("_blocks")]:
            name = blocks[:-len("_blocks")]
            scales = name + "_scales"
            if scales not in self._where:
                raise FmError(f"MXFP4 tensor {blocks} has no {scales} beside it")
            if name in self._where:
                raise FmError(f"tensor {name} is stored both whole and as MXFP4 blocks")
            b, s = self._raw_shape(blocks), self._raw_shape(scales)
            if (self._raw_dtype(blocks), self._raw_dtype(scales)) != ("U8", "U8") or len(b) != 4 or b[3] != 16 \
                    or tuple(s) != tuple(b[:3]):
                raise FmError(f"MXFP4 tensor {name}: blocks {list(b)} and scales {list(s)} must be uint8 "
                              f"[E, N, K/32, 16] and [E, N, K/32]")
            self.mxfp4[name] = (blocks, scales, self._where[blocks], self._where[scales])
        for name, (blocks, scales, fb, _) in self.mxfp4.items():
            del self._where[blocks], self._where[scales]
            self._where[name] = fb
        if not self.mxfp4:
            raise FmError(f"config.json says MXFP4, but {self.dir} has no *_blocks / *_scales tensors")

    def _pair_int4(self, fmt):
        """A 4-bit GPTQ or AWQ checkpoint stores a linear's weight X.weight as X.qweight, X.qzeros and X.scales (and
        GPTQ's X.g_idx, each input row's group). GPTQ: qweight int32 [K/8, N], input row k in bits 4(k%8).. of row
        k//8; AWQ: qweight int32 [K, N/8], eight columns a word in the order 0 2 4 6 1 3 5 7. Both: qzeros int32
        [groups, N/8], eight columns a word (in that order for AWQ, in plain order for GPTQ), scales [groups, N].
        Each set reads as X.weight [N, K] = scale * (q - zero), in the scales' dtype: the layout of the unquantized
        checkpoint."""
        method = fmt["method"]
        for qw in [n for n in self._where if n.endswith(".qweight")]:
            base = qw[:-len(".qweight")]
            parts = [qw, base + ".qzeros", base + ".scales"] + ([base + ".g_idx"] if base + ".g_idx" in self._where
                                                               else [])
            missing = next((p for p in parts if p not in self._where), None)
            if missing:
                raise FmError(f"{method.upper()} tensor {qw} has no {missing} beside it")
            if base + ".weight" in self._where:
                raise FmError(f"tensor {base}.weight is stored both whole and as {method.upper()} parts")
            (a, b), (gz, nz), (gs, n) = (self._raw_shape(p) for p in parts[:3])
            K, N = (a * 8, b) if method == "gptq" else (a, b * 8)
            dtypes = [self._raw_dtype(p) for p in parts]
            if dtypes[:2] != ["I32", "I32"] or dtypes[2] not in ("F16", "BF16", "F32") or n != N or nz * 8 != N \
                    or gz != gs or not gs or K % gs or (len(parts) == 4 and (dtypes[3] != "I32"
                                                                            or self._raw_shape(parts[3]) != [K])):
                raise FmError(f"{method.upper()} tensor {base}: qweight {[a, b]}, qzeros {[gz, nz]} and scales "
                              f"{[gs, n]} do not fit 4-bit weights of one layout")
            self.int4[base + ".weight"] = (parts, [self._where[p] for p in parts])
        for name, (parts, files) in self.int4.items():
            for p in parts:
                del self._where[p]
            self._where[name] = files[0]
        if not self.int4:
            raise FmError(f"config.json says {method.upper()}, but {self.dir} has no *.qweight tensors")

    def _int4_get(self, name: str) -> torch.Tensor:
        parts, files = self.int4[name]
        try:
            t = [self._handles[f].get_tensor(p) for p, f in zip(parts, files)]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FmError(f"{files[0]}: cannot read tensor {parts[0]} ({_first_line(e)})") from None
        return dequantize_int4(*t[:3], t[3] if len(t) > 3 else None, self.int4_format)

    def _raw_shape(self, name: str, file: str | None = None) -> list[int]:
        return self._handles[file or self._where[name]].get_slice(name).get_shape()

    def _raw_dtype(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def _mxfp4_get(self, name: str) -> torch.Tensor:
        blocks, scales, fb, fs = self.mxfp4[name]
        try:
            b, s = self._handles[fb].get_tensor(blocks), self._handles[fs].get_tensor(scales)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FmError(f"{fb}: cannot read tensor {blocks} ({_first_line(e)})") from None
        return dequantize_mxfp4(b, s)

    def _discover(self, allow_pickle: bool) -> list[str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:  # incl. bad UTF-8
                raise FmError(f"{index}: malformed index ({_first_line(e)})") from None
            for f in files:
                if not isinstance(f, str) or os.path.basename(f) != f:
                    raise FmError(f"{index}: shard name {f!r} must be a plain file name in the model directory")
                if not (self.dir / f).is_file():
                    raise FmError(f"{index} names {f}, which is missing")
            return files
        if (self.dir / "model.safetensors").is_file():
            return ["model.safetensors"]
        bins = sorted(p.name for p in self.dir.glob("pytorch_model*.bin"))
        if bins:
            if not allow_pickle:
                raise FmError(f"{self.dir} holds only pickled weights ({bins[0]}); pickles can run code, so they are "
                              "refused. Re-save as safetensors, or pass --allow-pickle to load with weights_only=True")
            self._pickled = {}
            for b in bins:
                try:
                    sd = torch.load(self.dir / b, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch's message opens with advice to drop weights_only: show the cause
                    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
                    why = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0])
                    raise FmError(f"{b}: cannot be loaded with weights_only=True ({why[:200]})") from None
                if not isinstance(sd, dict):
                    raise FmError(f"{b}: expected a state dict")
                for k, v in sd.items():
                    if not isinstance(v, torch.Tensor):
                        raise FmError(f"{b}: entry {k} is not a tensor")
                    self._pickled[k] = v
                    self._where[k] = b
            return bins
        raise FmError(f"{self.dir} has no model.safetensors, {INDEX} or pytorch_model.bin")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        if name in self.mxfp4:
            E, N, G, _ = self._raw_shape(self.mxfp4[name][0], self.mxfp4[name][2])
            return (E, G * 32, N)
        if name in self.int4:
            a, b = self._raw_shape(self.int4[name][0][0], self.int4[name][1][0])
            return (b, a * 8) if self.int4_format["method"] == "gptq" else (b * 8, a)
        if name in self.fp4:
            n, k = self._raw_shape(name)
            return (n, 2 * k)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def stored_bytes(self, name: str) -> int:
        """The bytes a tensor takes in the source files: an FP8 or MXFP4 one's as stored, scales included, not the
        bf16 it reads as."""
        if self._pickled is None and name in self.int4:
            return sum(math.prod(self._raw_shape(p, f)) * _ST_ITEMSIZE[self._handles[f].get_slice(p).get_dtype()]
                       for p, f in zip(*self.int4[name]))
        if self._pickled is None and (name in self.mxfp4 or name in self.fp8 or name in self.fp4):
            pair = self.fp8.get(name) or self.fp4.get(name)
            parts = self.mxfp4[name][:2] if name in self.mxfp4 else (name, pair[0])
            files = self.mxfp4[name][2:] if name in self.mxfp4 else (self._where[name], pair[1])
            return sum(math.prod(self._raw_shape(n, f)) * _ST_ITEMSIZE[self._handles[f].get_slice(n).get_dtype()]
                       for n, f in zip(parts, files))
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        if name in self.mxfp4 or name in self.fp8 or name in self.fp4:
            return torch.bfloat16
        if name in self.int4:                  # the scales' dtype
            parts, files = self.int4[name]
            return _ST_DTYPES[self._handles[files[2]].get_slice(parts[2]).get_dtype()]
        s = self._handles[self._where[name]].get_slice(name).get_dtype()
        if s not in _ST_DTYPES:
            raise FmError(f"tensor {name} has unsupported dtype {s}")
        return _ST_DTYPES[s]

    def get(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name]
        if name in self.mxfp4:
            return self._mxfp4_get(name)
        if name in self.int4:
            return self._int4_get(name)
        if name in self.fp8 or name in self.fp4:
            scale, fs = self.fp8.get(name) or self.fp4[name]
            try:
                w, sc = self._handles[self._where[name]].get_tensor(name), self._handles[fs].get_tensor(scale)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise FmError(f"{self._where[name]}: cannot read tensor {name} ({_first_line(e)})") from None
            return dequantize_fp8(w, sc, self.fp8_block) if name in self.fp8 else dequantize_fp4(w, sc)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FmError(f"{self._where[name]}: cannot read tensor {name} ({_first_line(e)})") from None


# E2M1: the 16 values a 4-bit MXFP4 code stands for (sign bit, 2 exponent bits, 1 mantissa bit).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_PAIRS = torch.tensor([(_E2M1[b & 15], _E2M1[b >> 4]) for b in range(256)])     # byte -> (low, high)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 blocks [E, N, G, 16] and scales [E, N, G] -> bf16 [E, G * 32, N] (transformers' layout: each expert's
    weight transposed), as a transposed view of [E, N, K] memory, which is the layout the converter wants next.
    Value 2j of a group is the low nibble of byte j, value 2j + 1 the high one, each times 2^(scale - 127); every
    such value is exact in bf16. One lookup per byte (both nibbles at once), one expert at a time, so the
    temporaries stay small: 2.4x the speed of a lookup per nibble and a transposed copy."""
    E, N, G, _ = blocks.shape
    out = torch.empty(E, N, G, 32, dtype=torch.bfloat16)
    for e in range(E):
        values = _E2M1_PAIRS[blocks[e].long()].view(N, G, 32)
        torch.mul(values, torch.exp2(scales[e].float() - 127).unsqueeze(-1), out=out[e])
    return out.view(E, N, G * 32).transpose(1, 2)


def _powers(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp32 multipliers: E8M0 (and its uint8 storage, biased by 127) are powers of two."""
    return torch.exp2(scale.float() - 127) if scale.dtype == torch.uint8 else scale.float()


def dequantize_fp4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's E2M1 experts: int8 [N, K / 2] (value 2j of a row the low nibble of byte j, 2j + 1 the high one)
    times a power of two per 32 values [N, K / 32] -> bf16 [N, K], exact. A few rows at a time, so the temporaries
    stay small."""
    N, half = w.shape
    out = torch.empty(N, 2 * half, dtype=torch.bfloat16)
    step = max(1, (1 << 20) // max(half, 1))
    for r in range(0, N, step):
        values = _E2M1_PAIRS[w[r:r + step].view(torch.uint8).long()].view(-1, 2 * half // 32, 32)
        out[r:r + step] = (values * _powers(scale[r:r + step]).unsqueeze(-1)).view(-1, 2 * half)
    return out


_SHIFTS4 = torch.arange(0, 32, 4, dtype=torch.int32)      # the eight 4-bit fields of an int32, low bits first
_AWQ_COLUMNS = [0, 4, 1, 5, 2, 6, 3, 7]     # AWQ stores columns 0 2 4 6 1 3 5 7 in fields 0..7: field of column i


def _nibbles(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit fields (0..15), low bits first, as a new dim after `dim`."""
    shape = [1] * (x.dim() + 1)
    shape[dim + 1] = 8
    return (x.unsqueeze(dim + 1) >> _SHIFTS4.view(shape)) & 0xF


def dequantize_int4(qweight, qzeros, scales, g_idx, fmt) -> torch.Tensor:
    """GPTQ / AWQ 4-bit -> [N, K] in the scales' dtype: scale * (q - zero), computed in fp32 and rounded once."""
    G, N = scales.shape
    if fmt["method"] == "gptq":
        q = _nibbles(qweight, 0).reshape(-1, N)                                  # [K, N]: row k = field k % 8
        z = _nibbles(qzeros, 1).reshape(G, N) + fmt["zero_offset"]
    else:
        q = _nibbles(qweight, 1)[:, :, _AWQ_COLUMNS].reshape(qweight.shape[0], N)
        z = _nibbles(qzeros, 1)[:, :, _AWQ_COLUMNS].reshape(G, N)
    K = q.shape[0]
    if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise FmError(f"GPTQ g_idx names a group outside the {G} its scales hold")
    group = g_idx.long() if g_idx is not None else torch.arange(K) // (K // G)
    w = (q - z[group]).float() * scales[group].float()
    return w.t().contiguous().to(scales.dtype)


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """float8_e4m3 [..., N, K] times its block scales [..., ceil(N / rows), ceil(K / cols)], in fp32, rounded once to
    bf16. A block of rows at a time, so the fp32 temporaries stay one row block wide."""
    (br, bc), (N, K) = block, w.shape[-2:]
    full = K // bc * bc
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    for i, r in enumerate(range(0, N, br)):
        x, s = w[..., r:r + br, :].float(), _powers(scale[..., i, :]).unsqueeze(-2)       # (.., rows, K), (.., 1, nb)
        o = out[..., r:r + br, :]
        o[..., :full] = (x[..., :full].unflatten(-1, (K // bc, bc)) * s[..., :K // bc, None]).flatten(-2)
        if full < K:                                  # a last, narrower block of columns
            o[..., full:] = x[..., full:] * s[..., K // bc:]
    return out


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def check_safetensors(path: Path, label: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header against itself and the file size before any library trusts it.

    Returns {tensor: (dtype, shape)}. A lying header (a huge length, offsets past the end, overlapping or gappy data,
    a byte span that is not prod(shape) * itemsize) is a one-line FmError naming the file and the tensor, so nothing
    is allocated or read on its word.
    """
    path = Path(path)
    label = label or path.name

    def bad(detail: str) -> FmError:
        return FmError(f"{label}: not a readable safetensors file: {detail}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"{size} bytes, too short for a header (truncated?)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES >> 20} MiB limit")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise FmError(f"{label}: cannot read it ({e.strerror or e})", EXIT_IO) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise bad(f"header is not valid JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    out, spans = {}, []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name}: the entry must have exactly dtype, shape and data_offsets")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_ITEMSIZE:
            raise bad(f"tensor {name}: unknown dtype {_short(dt)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
            raise bad(f"tensor {name}: shape {_short(shape)} is not a list of at most {MAX_RANK} non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise bad(f"tensor {name}: data_offsets {_short(offs)} must be [begin, end] with 0 <= begin <= end")
        want = math.prod(shape) * _ST_ITEMSIZE[dt]
        if offs[1] - offs[0] != want:
            raise bad(f"tensor {name}: the header says {dt} {shape} ({want} bytes) but its data spans "
                      f"{offs[1] - offs[0]} bytes")
        out[name] = (dt, tuple(shape))
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap at byte {end}"
            raise bad(f"tensor {name}: data_offsets [{begin}, {stop}] {what}")
        end = stop
    if 8 + n + end != size:
        raise bad(f"the header accounts for {8 + n + end} bytes but the file has {size} "
                  f"({'truncated' if size < 8 + n + end else 'trailing bytes'})")
    return out


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
