"""Output discipline: per-rank shard files written into a temporary directory, renamed into place at the end.

A reader never sees a half-written OUT_DIR: either the rename happened (and the manifest, written last, lists every
file with its sha256) or OUT_DIR does not exist. Shards are hashed from the bytes being written, not re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from .errors import EXIT_IO, FmError

TMP_MARK = ".fmconvert-tmp-"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB', '123' -> bytes."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, m in units.items():
        if s.endswith(u):
            try:
                n = float(s[: -len(u)])
            except ValueError:
                break
            if 1 <= n * m < float("inf"):
                return int(n * m)
            break
    else:
        if s.isdigit() and int(s) > 0:
            return int(s)
    raise FmError(f"--max-shard-size: cannot read {text!r} (use e.g. 2GB, 500MB, 1GiB)")


class ShardWriter:
    """Buffers each rank's tensors and writes a safetensors file whenever the buffer reaches max_bytes."""

    def __init__(self, root: Path, tp: int, max_bytes: int):
        self.root, self.tp, self.max_bytes = root, tp, max_bytes
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        self.pending_bytes = [0] * tp
        self.files: list[list[dict]] = [[] for _ in range(tp)]
        self.tensors: list[dict[str, dict]] = [{} for _ in range(tp)]
        self.bytes_written = 0

    def add(self, rank: int, name: str, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if self.pending[rank] and self.pending_bytes[rank] + nbytes > self.max_bytes:
            self.flush(rank)
        self.pending[rank][name] = t.contiguous()
        self.pending_bytes[rank] += nbytes

    def flush(self, rank: int):
        if not self.pending[rank]:
            return
        fname = f"rank{rank}-{len(self.files[rank]) + 1:05d}.safetensors"
        blob = _sort_metadata(st_save(self.pending[rank], metadata={"format": "pt", "producer": "fmconvert",
                                                                    "rank": str(rank)}))
        try:
            with open(self.root / fname, "wb") as f:
                f.write(blob)
        except OSError as e:
            raise FmError(f"cannot write {fname}: {e.strerror or e}", EXIT_IO) from None
        self.files[rank].append({"path": fname, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        for name, t in self.pending[rank].items():
            self.tensors[rank][name] = {"file": fname, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        self.bytes_written += len(blob)
        self.pending[rank], self.pending_bytes[rank] = {}, 0

    def close(self):
        for r in range(self.tp):
            self.flush(r)


class AtomicDir:
    """A temp dir beside `final` that becomes `final` on commit, and vanishes on any failure (even Ctrl-C)."""

    def __init__(self, final: Path, force: bool):
        self.final = Path(final).absolute()
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.final.exists() and not self.force:
            if not self.final.is_dir() or any(self.final.iterdir()):
                raise FmError(f"output {self.final} already exists and is not empty (pass --force to replace it)")
        parent = self.final.parent
        if not parent.is_dir():
            raise FmError(f"parent directory {parent} does not exist")
        stale = sorted(p.name for p in parent.glob(f".{self.final.name}{TMP_MARK}*") if not _owner_alive(p))
        for name in stale:  # left by a converter that was killed: never a valid output, safe to remove
            shutil.rmtree(parent / name, ignore_errors=True)
        self.stale_removed = stale
        self.tmp = parent / f".{self.final.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise FmError(f"cannot create {self.tmp}: {e.strerror or e}", EXIT_IO) from None
        self._old_int = signal.getsignal(signal.SIGTERM)
        if self._old_int in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        return self.tmp

    def commit(self):
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}{TMP_MARK}old-{os.getpid()}"
            os.rename(self.final, trash)
            os.rename(self.tmp, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
        self.tmp = None

    def __exit__(self, *exc):
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            signal.signal(signal.SIGTERM, self._old_int)
        except (TypeError, ValueError):
            pass
        return False


def _sort_metadata(blob: bytes) -> bytes:
    """safetensors writes __metadata__ from a hash map, in an order that changes between runs: sort it, so equal
    inputs give byte-identical files. Data offsets are relative to the end of the header, so its length may change."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _owner_alive(tmp: Path) -> bool:
    pid = tmp.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
