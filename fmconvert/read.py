"""Read a Hugging Face model directory lazily: config through transformers, tensors through safetensors.

Nothing is loaded until asked for, so conversion memory follows one layer, not the model. Pickled checkpoints are
refused unless the caller opts in, and then they are read with `weights_only=True`. No remote code ever runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import FmError

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Files a serving script needs besides the weights; copied verbatim into the output.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
)


def load_config(model_dir: Path):
    """The transformers config, parsed by transformers itself; errors become one line."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FmError(f"model directory {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FmError(f"{model_dir} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise FmError(f"{path}: expected a JSON object")
    if "auto_map" in raw:
        raw.pop("auto_map")  # remote-code hooks are never honoured
    from .policy import policy_for

    policy_for(raw.get("architectures"))  # fail on unknown architectures before transformers does
    from transformers import AutoConfig
    model_type = raw.get("model_type")
    try:
        cls = AutoConfig.for_model(model_type).__class__
        config = cls.from_dict(raw)
    except Exception as e:  # transformers raises ValueError/KeyError/TypeError for malformed configs
        raise FmError(f"{path}: transformers cannot parse it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return config, hashlib.sha256(path.read_bytes()).hexdigest()


class Checkpoint:
    """All tensors of a model directory by name, opened lazily. Use as a context manager."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False):
        self.dir = Path(model_dir)
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = self._discover(allow_pickle)
        self.files = files
        for fname in files:
            if self._pickled is not None:
                break
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

    def _discover(self, allow_pickle: bool) -> list[str]:
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
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
                except Exception as e:
                    raise FmError(f"{b}: cannot be loaded with weights_only=True ({_first_line(e)})") from None
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
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        s = self._handles[self._where[name]].get_slice(name).get_dtype()
        if s not in _ST_DTYPES:
            raise FmError(f"tensor {name} has unsupported dtype {s}")
        return _ST_DTYPES[s]

    def get(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name]
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FmError(f"{self._where[name]}: cannot read tensor {name} ({_first_line(e)})") from None


def hash_files_async(paths: list[Path]) -> tuple[threading.Thread, dict[str, str]]:
    """sha256 of the source files, computed on a thread while conversion runs (hashlib releases the GIL)."""
    out: dict[str, str] = {}

    def work():
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            out[p.name] = h.hexdigest()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, out


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
