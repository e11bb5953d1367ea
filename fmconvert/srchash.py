"""What a conversion records of its source weight files: a cheap fingerprint always, the full sha256 on request.

The fingerprint (size, and sha256 of the safetensors header) costs a few small reads and catches a file that was
replaced or re-saved; `verify` compares every tensor with the source anyway, so it is enough for the note that a
file changed. The full sha256 (`convert --source-sha256`) reads the whole source once more: pure I/O plus hashlib,
which releases the GIL, on threads. This module imports nothing heavy, so the CLI can `start` that before torch and
transformers are even imported; `convert` then `take`s the running hasher (or starts one). Files are read through
a map (no copies into Python bytes) and the pages behind the hash are dropped, so it adds nothing to peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path

from .errors import EXIT_IO, FmError

INDEX = "model.safetensors.index.json"
CHUNK = 8 << 20
HEAD_BYTES = 1 << 20         # the fingerprint's share of a file that is not safetensors (a pickled checkpoint)
_PAGE = mmap.PAGESIZE
_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")
_started: dict[tuple[str, tuple[str, ...]], "SourceHasher"] = {}
_lock = threading.Lock()


def drop_pages(mm: mmap.mmap, begin: int, end: int):
    """Unmap pages of a read-only file mapping from this process. The data stays in the page cache and comes back
    on the next touch, so this only lowers resident memory, never changes what is read."""
    if _MADVISE and end > begin:
        start = begin - begin % _PAGE
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def guess_files(model_dir: Path) -> list[str] | None:
    """The safetensors files Checkpoint will pick, guessed without raising (None when unsure). Only a guess to
    start early on: the Checkpoint's own list is what counts."""
    try:
        model_dir = Path(model_dir)
        index = model_dir / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        ok = files and all(isinstance(f, str) and os.path.basename(f) == f and (model_dir / f).is_file()
                           for f in files)
        return files if ok else None
    except Exception:
        return None


def fingerprint(path: Path) -> dict:
    """{"size", "head_sha256"}: the sha256 of a safetensors file's header (its 8-byte length and the JSON: every
    name, dtype, shape and offset), of the first HEAD_BYTES of any other file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = HEAD_BYTES
        if str(path).endswith(".safetensors") and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            head = 8 + n
            f.seek(0)
        return {"size": size, "head_sha256": hashlib.sha256(f.read(min(head, size))).hexdigest()}


class SourceHasher:
    """sha256 of each file on up to `threads` threads, biggest file first. `join` returns {name: hex} or raises
    the first read failure as an FmError; `cancel` stops it taking new files."""

    def __init__(self, model_dir: Path, files: list[str], threads: int = 2):
        self.dir, self.files = Path(model_dir), list(files)
        self.stamp = _stamp(self.dir, self.files)
        self.out: dict[str, str] = {}
        self.error: FmError | None = None
        self._stop = False
        paths = sorted((self.dir / f for f in self.files), key=_size)
        self._todo = paths          # popped from the end: biggest first
        self._mutex = threading.Lock()
        self._threads = [threading.Thread(target=self._work, daemon=True, name="fmconvert-hash")
                         for _ in range(max(1, min(threads, len(paths))))]
        for t in self._threads:
            t.start()

    def _work(self):
        while True:
            with self._mutex:
                if not self._todo or self.error is not None or self._stop:
                    return
                p = self._todo.pop()
            try:
                digest = _sha256(p, lambda: self._stop)
            except (OSError, ValueError) as e:
                with self._mutex:
                    if self.error is None:
                        why = getattr(e, "strerror", None) or e
                        self.error = FmError(f"{p.name}: cannot read it while hashing ({why})", EXIT_IO)
                return
            if digest is not None:
                self.out[p.name] = digest

    def cancel(self):
        self._stop = True

    def join(self) -> dict[str, str]:
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error
        return dict(self.out)


def _sha256(p: Path, stopped) -> str | None:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as mv:
                for off in range(0, size, CHUNK):
                    if stopped():
                        return None
                    with mv[off:off + CHUNK] as chunk:
                        h.update(chunk)                      # releases the GIL
                    drop_pages(mm, off, min(off + CHUNK, size))
    return h.hexdigest()


def _stamp(d: Path, files) -> tuple:
    """What says a file is still the one being hashed: size, mtime and inode."""
    out = []
    for f in files:
        try:
            st = (d / f).stat()
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _key(model_dir, files) -> tuple[str, tuple[str, ...]]:
    return (os.path.realpath(model_dir), tuple(files))


def start(model_dir) -> None:
    """Begin hashing MODEL_DIR's weight files now, if they can be told already (never raises)."""
    files = guess_files(Path(model_dir))
    if files is None:
        return
    with _lock:
        k = _key(model_dir, files)
        if k not in _started:
            _started[k] = SourceHasher(Path(model_dir), files)


def take(model_dir, files: list[str]) -> SourceHasher:
    """The hasher for exactly these files: one started earlier (handed over once, if no file changed since), else
    a new one."""
    with _lock:
        for k in [k for k in _started if k[0] == os.path.realpath(model_dir)]:
            h = _started.pop(k)
            if k == _key(model_dir, files) and h.error is None and h.stamp == _stamp(h.dir, h.files):
                return h
            h.cancel()
    return SourceHasher(Path(model_dir), files)


def discard(model_dir) -> None:
    """Forget (and stop) any hasher started early for MODEL_DIR: the conversion it was for failed."""
    with _lock:
        for k in [k for k in _started if k[0] == os.path.realpath(model_dir)]:
            _started.pop(k).cancel()
