"""Output discipline: per-rank shard files written into a temporary directory, renamed into place at the end.

A reader never sees a half-written OUT_DIR: either the rename happened (and the manifest, written last, lists every
file with its sha256) or OUT_DIR does not exist. Shards are hashed from the bytes being written, not re-read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import queue
import shutil
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import torch

from .errors import EXIT_INTERRUPTED, EXIT_IO, FmError

TMP_MARK = ".fmconvert-tmp-"
LOCK_MARK = ".fmconvert-lock"
INTERRUPT_GRACE_S = 10.0   # how long Ctrl-C / SIGTERM may take to unwind before the watchdog exits
TMP_REMOVE_PATIENCE_S = 5.0   # how long removing the temp dir may keep trying while a writer finishes a file
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8",
                torch.int64: "int64"}        # int64: DeepSeek-V4's token -> expert table
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


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
    """Streams each rank's tensors into safetensors files as they arrive: nothing waits in memory for a flush.

    Every tensor is declared first (`declare`), in the order it will be added, so each file's header can be written
    before its data. A rank's tensors fill one file after another; a new file starts when the next tensor would take
    the current one past max_bytes (a single larger tensor gets a file of its own), or would start at an offset its
    dtype cannot be viewed from. `add` then writes the tensor's own bytes and feeds the same bytes to the file's
    sha256: no serialized copy, no re-read. Files go to disk with O_DIRECT where possible (see _ShardFile); where not,
    big ones are fdatasync'ed in the background as they grow. Either way the final fsync before the rename has little
    left to do.

    The files are ordinary safetensors: an 8-byte little-endian header length, a JSON header (metadata sorted,
    tensors in data order, padded with spaces to 8 bytes), then the tensors back to back.
    """

    SLICE = 4 << 20          # bytes hashed and written per step (see add's progress)

    def __init__(self, root: Path, tp: int, max_bytes: int, direct: bool = True, sync_bytes: int = 64 << 20):
        self.root, self.tp, self.max_bytes, self.sync_bytes = Path(root), tp, max_bytes, sync_bytes
        self.direct = direct
        self.files: list[list[dict]] = [[] for _ in range(tp)]      # manifest entries, as each file completes
        self.tensors: list[dict[str, dict]] = [{} for _ in range(tp)]
        self.bytes_written = 0
        self._decl: list[list[tuple]] = [[] for _ in range(tp)]      # (name, dtype, shape, nbytes)
        self._plan: list[list[_ShardFile]] | None = None
        self._flat: list[list[tuple]] = []                           # per rank: (file, entry index) in add order
        self._next = [0] * tp                                       # index of the next declared tensor, per rank
        self._open: list[_ShardFile | None] = [None] * tp
        self._syncer: _Syncer | None = None

    def declare(self, rank: int, name: str, dtype: torch.dtype, shape) -> None:
        if self._plan is not None:
            raise RuntimeError("ShardWriter.declare after the first add")
        if dtype not in _ST_DTYPES:
            raise FmError(f"tensor {name}: dtype {dtype} cannot be written")
        shape = tuple(int(d) for d in shape)
        self._decl[rank].append((name, dtype, shape, math.prod(shape) * dtype.itemsize))

    def _lay_out(self):
        self._plan = []
        for r in range(self.tp):
            files: list[_ShardFile] = []
            cur, used = None, 0
            for name, dtype, shape, nbytes in self._decl[r]:
                if cur is None or (cur.entries and (used + nbytes > self.max_bytes or used % dtype.itemsize)):
                    cur, used = _ShardFile(f"rank{r}-{len(files) + 1:05d}.safetensors"), 0
                    files.append(cur)
                cur.entries.append((name, dtype, shape, used, used + nbytes))
                used += nbytes
                self.tensors[r][name] = {"file": cur.name, "dtype": dtype_name(dtype), "shape": list(shape)}
            for f in files:
                f.make_header(r)
            self._plan.append(files)
        self._flat = [[(f, i) for f in files for i in range(len(f.entries))] for files in self._plan]

    def planned(self) -> list[list[tuple[str, int]]]:
        """Each rank's files as (name, size in bytes), from the declarations alone (a dry run writes nothing)."""
        if self._plan is None:
            self._lay_out()
        return [[(f.name, len(f.header) + (f.entries[-1][4] if f.entries else 0)) for f in files]
                for files in self._plan]

    def add(self, rank: int, name: str, t: torch.Tensor, progress=None):
        """Write rank's next declared tensor. `progress(nbytes)`, if given, is called as each slice of it has been
        hashed and handed to the file (the caller may then drop the pages under those bytes)."""
        if self._plan is None:
            self._lay_out()
        k = self._next[rank]
        if k >= len(self._flat[rank]):
            raise RuntimeError(f"ShardWriter: rank {rank} got {name}, which was never declared")
        f, i = self._flat[rank][k]
        want, dtype, shape, begin, end = f.entries[i]
        if (name, dtype, shape) != (want, t.dtype, tuple(t.shape)):
            raise RuntimeError(f"ShardWriter: rank {rank} expected {want} {dtype} {list(shape)}, "
                               f"got {name} {t.dtype} {list(t.shape)}")
        try:
            if i == 0:
                f.open(self.root, self.direct)
                self._open[rank] = f
            f.write(_data(t), end - begin, progress)
            if not f.direct and f.unsynced >= self.sync_bytes:
                self._sync(f)
            if i == len(f.entries) - 1:
                if f.synced and f.unsynced and not f.direct:
                    self._sync(f)
                self.files[rank].append(f.close())
                self._open[rank] = None
                self.bytes_written += f.size
        except OSError as e:
            raise FmError(f"cannot write {f.name}: {e.strerror or e}", EXIT_IO) from None
        self._next[rank] = k + 1

    def _sync(self, f: "_ShardFile"):
        if self._syncer is None:
            self._syncer = _Syncer()
        self._syncer.put(os.dup(f.fd))
        f.synced, f.unsynced = True, 0

    def close(self):
        """Every declared tensor must have been added; waits for the background syncs."""
        if self._plan is None:
            self._lay_out()
        for r in range(self.tp):
            if self._next[r] != len(self._flat[r]):
                missing = self._flat[r][self._next[r]]
                raise RuntimeError(f"ShardWriter: rank {r} never got {missing[0].entries[missing[1]][0]}")
        if self._syncer is not None:
            self._syncer.stop()

    def abort(self):
        """Close whatever is open (after a failure; the temp dir is removed by AtomicDir)."""
        for f in self._open:
            if f is not None:
                f.discard()
        self._open = [None] * self.tp
        if self._syncer is not None:
            self._syncer.stop()


class _ShardFile:
    """One output file. Written with O_DIRECT where the filesystem allows it: tensor bytes are copied into an
    aligned staging buffer and go to the disk without passing through the page cache, which would cost more CPU
    than the copy (and leave 1 GB of dirty pages for the final fsync). Elsewhere, plain buffered writes."""

    STAGE = ShardWriter.SLICE
    BLOCK = 4096

    def __init__(self, name: str):
        self.name = name
        self.entries: list[tuple] = []          # (name, dtype, shape, begin, end), in data order
        self.header = b""
        self.fd = -1
        self.size = 0
        self.synced, self.unsynced = False, 0
        self.sha = None
        self.direct = False
        self._stage: mmap.mmap | None = None
        self._fill = 0

    def make_header(self, rank: int):
        head: dict = {"__metadata__": {"format": "pt", "producer": "fmconvert", "rank": str(rank)}}
        for name, dtype, shape, begin, end in self.entries:
            head[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.header = struct.pack("<Q", len(text)) + text

    def open(self, root: Path, direct: bool):
        path, flags = root / self.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self._stage, self._fill, self.direct = mmap.mmap(-1, self.STAGE), 0, True
            except OSError:          # tmpfs and friends: no O_DIRECT
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.sha = hashlib.sha256()
        self.write(torch.frombuffer(bytearray(self.header), dtype=torch.uint8), len(self.header))

    def write(self, data: torch.Tensor, nbytes: int, progress=None):
        """data: the bytes, as a flat uint8 tensor. Goes in slices of STAGE bytes (`progress` after each)."""
        if data.numel() != nbytes:
            raise RuntimeError(f"{self.name}: {data.numel()} bytes where {nbytes} were declared")
        stage = None if self._stage is None else torch.frombuffer(self._stage, dtype=torch.uint8)
        pos = 0
        while pos < nbytes:
            k = min(nbytes - pos, self.STAGE - self._fill if stage is not None else self.STAGE)
            piece = data[pos:pos + k]
            with memoryview(piece.numpy()) as mv:
                self.sha.update(mv)              # hashlib, os.write and torch copies release the GIL
                if stage is None:
                    _write_all(self.fd, mv)
            if stage is not None:
                stage[self._fill:self._fill + k].copy_(piece)
                self._fill += k
                if self._fill == self.STAGE:
                    self._flush(self.STAGE)
            pos += k
            if progress is not None:
                progress(pos)
        del stage
        self.size += nbytes
        self.unsynced += nbytes

    def _flush(self, n: int):
        with memoryview(self._stage) as mv:
            if self.direct:
                try:
                    w = os.write(self.fd, mv[:n])
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # the filesystem took O_DIRECT at open but not for writing: carry on buffered
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                    self.direct = False
                    _write_all(self.fd, mv[:n])
                else:
                    if w != n:
                        raise OSError(errno.EIO, f"short write ({w} of {n} bytes)")
            else:
                _write_all(self.fd, mv[:n])
        self._fill = 0

    def close(self) -> dict:
        if self._stage is not None:
            if self._fill:
                n = self._fill
                if self.direct:           # O_DIRECT writes whole blocks: pad the tail, then cut the file back
                    pad = -n % self.BLOCK
                    self._stage[n:n + pad] = bytes(pad)
                    self._flush(n + pad)
                    os.ftruncate(self.fd, self.size)
                else:
                    self._flush(n)
            self._stage.close()
            self._stage = None
        os.close(self.fd)
        self.fd = -1
        return {"path": self.name, "size": self.size, "sha256": self.sha.hexdigest()}

    def discard(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._stage is not None:
            try:
                self._stage.close()
            except BufferError:      # a view is still alive after a failure: leave the map to the collector
                pass
            self._stage = None


def _write_all(fd: int, mv: memoryview):
    while len(mv):
        mv = mv[os.write(fd, mv):]


class _Syncer(threading.Thread):
    """fdatasync on a thread: the disk catches up while conversion goes on. Errors are left to the final fsync."""

    def __init__(self):
        super().__init__(daemon=True, name="fmconvert-sync")
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def put(self, fd: int):
        self.q.put(fd)

    def run(self):
        while (fd := self.q.get()) is not None:
            try:
                getattr(os, "fdatasync", os.fsync)(fd)
            except OSError:
                pass
            finally:
                os.close(fd)

    def stop(self):
        self.q.put(None)
        self.join()


def _data(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a CPU tensor as a flat uint8 tensor, without a copy when it is already contiguous."""
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class OutputLock:
    """An exclusive flock on `.OUT.fmconvert-lock` beside OUT: one writer per OUT_DIR at a time. The kernel drops
    the lock when its holder dies, even by SIGKILL, so a lock is never stale; the file itself is removed on release."""

    def __init__(self, final: Path):
        self.final = final
        self.path = final.parent / f".{final.name}{LOCK_MARK}"
        self.fd: int | None = None

    def acquire(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise FmError(f"cannot create the lock file {self.path}: {e.strerror or e}", EXIT_IO) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise FmError(f"another fmconvert is writing {self.final} (pid {holder}); wait for it to finish "
                              "or pick another output directory") from None
            try:  # the last holder may have unlinked the file between our open and flock: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # still locked: nobody can take a lock on a file that is about to vanish
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class AtomicDir:
    """A temp dir beside `final` that becomes `final` on commit, and vanishes on any failure (even Ctrl-C).

    Holds an OutputLock for its whole life, so a second converter into the same OUT_DIR fails at once instead of
    racing this one. Temp dirs left by a converter that was killed are removed (and reported) on the next run.
    `keep` is a directory that must survive: OUT_DIR may not be it or contain it (`--force` would delete it).
    """

    def __init__(self, final: Path, force: bool, keep: Path | None = None, warn=None):
        self.final = Path(final).absolute()
        self.force = force
        self.keep = keep
        self.warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
        self.tmp: Path | None = None
        self.lock = OutputLock(self.final)
        self._old_handlers: dict = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> Path:
        parent = self.final.parent
        if not parent.is_dir():
            raise FmError(f"parent directory {parent} does not exist")
        if self.keep is not None and self.final.exists():
            k, f = Path(self.keep).resolve(), self.final.resolve()
            if k == f or f in k.parents:
                raise FmError(f"output {self.final} is (or contains) the model directory {self.keep}; "
                              "pick another output directory")
        self.lock.acquire()
        try:
            if self.final.exists() and not self.force:
                if not self.final.is_dir() or any(self.final.iterdir()):
                    raise FmError(f"output {self.final} already exists and is not empty (pass --force to replace it)")
            self._clean_stale(parent)
            self.tmp = parent / f".{self.final.name}{TMP_MARK}{os.getpid()}"
            _remove(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            self.lock.release()
            raise FmError(f"cannot create a temp dir beside {self.final}: {e.strerror or e}", EXIT_IO) from None
        except BaseException:
            self.lock.release()
            raise
        self._old_handlers = {}
        try:  # only the main thread may set handlers
            for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(sig) in (default, None):
                    self._old_handlers[sig] = signal.signal(sig, self._interrupt)
        except ValueError:
            pass
        return self.tmp

    def _interrupt(self, signum, frame):
        """SIGTERM and Ctrl-C unwind as KeyboardInterrupt, so the temp dir goes. An exception that lands inside a
        threading primitive can leave a lock held and the unwinding stuck joining worker threads: a watchdog then
        removes the temp dir and the lock file itself and exits 130."""
        if self._watchdog is None:
            self._watchdog = threading.Timer(INTERRUPT_GRACE_S, self._hard_exit)
            self._watchdog.daemon = True
            self._watchdog.start()
        raise KeyboardInterrupt

    def _hard_exit(self):
        if self.tmp is not None:
            _remove(self.tmp, patience=TMP_REMOVE_PATIENCE_S)
        try:
            os.unlink(self.lock.path)
        except OSError:
            pass
        os.write(2, b"error: interrupted\n")
        os._exit(EXIT_INTERRUPTED)

    def _clean_stale(self, parent: Path):
        for p in sorted(parent.glob(f".{self.final.name}{TMP_MARK}*")):
            pid = _owner_pid(p)
            if pid == os.getpid():
                continue
            if pid is not None and _alive(pid):
                self.warn(f"leaving temp dir {p}: its owner, pid {pid}, is still running")
                continue
            # left by a converter that was killed before its rename: never a valid output, safe to remove
            _remove(p)
            self.warn(f"removed stale temp dir {p} (left by an interrupted fmconvert"
                      f"{f', pid {pid}' if pid is not None else ''})")

    def commit(self):
        _fsync_tree(self.tmp)  # the rename must not publish files whose bytes are still only in the page cache
        if self.final.exists() or self.final.is_symlink():
            if not self.force and (not self.final.is_dir() or any(self.final.iterdir())):
                raise FmError(f"output {self.final} appeared while converting; not replacing it without --force")
            trash = self.final.parent / f".{self.final.name}{TMP_MARK}old-{os.getpid()}"
            _remove(trash)
            os.rename(self.final, trash)
            try:
                os.rename(self.tmp, self.final)
            except OSError:
                os.rename(trash, self.final)  # put the old output back rather than leave none
                raise
            _remove(trash)
        else:
            os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        self.tmp = None

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.tmp is not None:
                _remove(self.tmp, patience=TMP_REMOVE_PATIENCE_S)
                self.tmp = None
        finally:
            self.lock.release()
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            if self._watchdog is not None:
                self._watchdog.cancel()
        if isinstance(exc, OSError):  # disk full, quota, permissions, read-only fs: exit 3, not an internal error
            path = getattr(exc, "filename2", None) or exc.filename  # shutil.copyfile: filename2 is the target
            where = f" ({path})" if path else ""
            raise FmError(f"I/O error while writing {self.final}: {exc.strerror or exc}{where}", EXIT_IO) from None
        return False


def write_text_atomic(path: Path, text: str):
    """A small text file (a transcript, subtitles) written beside its final name, then renamed over it: a reader
    sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FmError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def _owner_pid(tmp: Path) -> int | None:
    pid = tmp.name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path, patience: float = 0.0):
    """Remove a file, a symlink (never what it points to) or a directory tree; absent is fine. patience: for how
    many seconds to try again while a tree will not go (an interrupted conversion's writer thread may still be
    finishing a file in it as the tree is removed: the last rmdir then finds it not empty)."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        deadline = time.monotonic() + patience
        shutil.rmtree(p, ignore_errors=True)
        while p.is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(d: Path):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path):
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)
