"""Untrusted input, crashes, disk full, concurrency and determinism (docs/robustness.md).

The bad-input corpus lives in tests/corpus.py; every case must end in one `error:` line with its documented exit
code, no traceback, and an unchanged directory tree. The crash tests kill real converter processes with SIGKILL:
most are forked from this (already warm) process so a dozen kill points cost seconds, two go through
`python -m fmconvert` end to end.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

import pytest

import corpus
import test_bad_input
from corpus import CASES, Ctx, Sources, assert_one_line_error, run_main
from fmconvert import manifest as mf
from fmconvert.cli import cli
from fmconvert.pipeline import Options
from fmconvert.errors import EXIT_INTERRUPTED, EXIT_IO, FmError
from fmconvert.runtime.load import read_rank

CONVERT_OPTS = ("--tp", "2", "--int8", "--max-shard-size", "64KB")


@pytest.fixture(scope="session")
def sources(model_dir, tmp_path_factory):
    return Sources(model_dir, tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="session")
def medium(tmp_path_factory):
    return corpus.medium_model(tmp_path_factory.mktemp("medium") / "model")


@pytest.fixture(scope="session")
def reference(medium, tmp_path_factory):
    """The medium model converted once with CONVERT_OPTS: every later output must be byte-identical to it."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code = _cli_in_process("convert", "-q", *CONVERT_OPTS, medium, out)
    assert code == 0
    return out


def _cli_in_process(*args) -> int:
    from fmconvert.cli import main
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def tree(root: Path) -> dict[str, str]:
    """Every entry under root (symlinks not followed) with what it is: the 'nothing left behind' check."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.fmconvert-*"))


def same_bytes(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def assert_valid(out: Path):
    m = mf.read(out)
    for r in range(m["parallel"]["tp"]):
        read_rank(out, m, r, check_hashes=True)


# -- 1. the corpus -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.command}:{c.name}")
def test_corpus(case, sources, tmp_path, capsys):
    if case.command == "verify" and "verify" not in cli.commands:
        pytest.skip("`fmconvert verify` is not in the CLI yet")
    ctx = Ctx(sources, tmp_path)
    args = case.build(ctx)
    before = tree(tmp_path)
    try:
        if case.command == "load":
            from fmconvert.runtime.load import load
            with pytest.raises(FmError) as info:
                load(*args, **case.load_kwargs, **getattr(ctx, "load_extra", {}))
            code, stdout, err = info.value.exit_code, "", f"error: {info.value}\n"
        else:
            code, stdout, err = run_main(capsys, case.command, *args)
        after = tree(tmp_path)
    finally:
        if getattr(ctx, "keep_alive", None):
            ctx.keep_alive.release()
    assert_one_line_error(code, err, case.code, *case.needles)
    assert "\x1b" not in err
    if case.code == corpus.EXIT_BAD_INPUT:
        assert stdout == ""
    assert after == before, "the command changed files under its directory"


def test_corpus_covers_every_command():
    n = corpus.count()
    total = sum(n.values()) + len(test_bad_input.CASES)
    assert total >= 40, n
    assert all(n[c] >= 5 for c in corpus.COMMANDS), n


def test_real_entry_point(sources, tmp_path):
    """`python -m fmconvert generate` on a tp=2 output without torchrun, and inspect on a traversal manifest."""
    ctx = Ctx(sources, tmp_path)
    out = ctx.out(tp=2)
    p = subprocess.run([sys.executable, "-m", "fmconvert", "generate", str(out), "-p", "hi"], capture_output=True,
                       text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, 2, "converted for tp=2", "torchrun --nproc-per-node 2")
    assert p.stdout == ""


def test_remote_code_is_never_run(model_copy, tmp_path, capsys):
    """auto_map hooks are dropped: the model's own Python file is never imported."""
    src = model_copy("llama")
    marker = tmp_path / "RAN"
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    corpus.cfg(src, auto_map={"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model"})
    code, _, err = run_main(capsys, "convert", "-q", src, tmp_path / "out")
    assert code == 0, err
    assert not marker.exists()


# -- 3. crash safety -----------------------------------------------------------------------------------------------
def fork_call(fn, log: Path) -> int:
    """fn() in a child process forked from this warm process (no import cost); its exit code is fn's."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        f = open(log, "w")
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = fn() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 71
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def fork_cli(args, log: Path, fsize_limit: int | None = None) -> int:
    """The CLI in a forked child."""
    def run():
        if fsize_limit is not None:
            _fsize_limit(fsize_limit)()
        from fmconvert.cli import main
        main([str(a) for a in args])
    return fork_call(run, log)


def wait_exit(pid: int, timeout: float = 120) -> int | None:
    """The child's exit code (negative: the signal that killed it), or None if it hung (it is killed then)."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)


def tmp_of(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.fmconvert-tmp-{pid}"


def lock_of(out: Path) -> Path:
    return out.parent / f".{out.name}.fmconvert-lock"


def files_in(d: Path) -> int:
    try:
        return len(os.listdir(d))
    except FileNotFoundError:
        return -1


def stop_when(pid: int, cond, timeout: float = 120) -> bool:
    """SIGSTOP the child as soon as cond() holds (polled every ~0.5 ms); False if it exited first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            os.kill(pid, signal.SIGSTOP)
            return True
        if os.waitpid(pid, os.WNOHANG | os.WUNTRACED)[0]:
            return False
        time.sleep(0.0005)
    raise AssertionError("the condition never held")


def check_after_kill(out: Path, reference: Path) -> str:
    """After a kill: no OUT_DIR, or a complete one that verifies. Returns what was found."""
    if out.exists():
        assert_valid(out)
        same_bytes(out, reference)
        return "complete"
    return "absent"


def rerun(capsys, medium: Path, out: Path, reference: Path):
    stale = [p for p in leftovers(out) if ".fmconvert-tmp-" in p]
    code, _, err = run_main(capsys, "convert", "-q", *CONVERT_OPTS, *(["--force"] if out.exists() else []),
                            medium, out)
    assert code == 0, err
    for name in stale:
        assert f"removed stale temp dir {out.parent / name}" in err, err
    assert leftovers(out) == []
    assert_valid(out)
    same_bytes(out, reference)


def test_sigkill_at_many_points(medium, reference, tmp_path, capsys):
    """SIGKILL a converter at 13 points: holding only the lock, with an empty temp dir, after a random number of
    shard files in each tenth of the output, with the manifest written but not yet renamed, and just after the
    rename. The converter is stopped at the point, so the kill lands there however loaded the machine is; after
    each kill OUT_DIR is absent or complete, and a rerun reports the stale temp dir and writes identical output."""
    rng = random.Random(int(os.environ.get("FMCONVERT_TEST_SEED", "0")) or None)
    out = tmp_path / "out"
    n = len(list(reference.iterdir()))
    points = [("lock", None), ("files", 0)] + [("files", rng.randint(1 + i * (n - 2) // 9, (i + 1) * (n - 2) // 9))
                                               for i in range(9)] + [("manifest", None), ("renamed", None)]
    states = []
    for k, (what, arg) in enumerate(points):
        fresh = k % 2 == 0 or what in ("manifest", "renamed")
        if fresh and out.exists():
            import shutil
            shutil.rmtree(out)
        pid = fork_cli(["convert", "-q", *CONVERT_OPTS, *([] if fresh else ["--force"]), medium, out],
                       tmp_path / f"kill{k}.log")
        tmp = tmp_of(out, pid)
        cond = {"lock": lambda: lock_of(out).exists(),
                "files": lambda: files_in(tmp) >= arg,
                "manifest": lambda: (tmp / mf.MANIFEST).exists(),
                "renamed": lambda: out.exists()}[what]
        stopped = stop_when(pid, cond)
        seen = files_in(tmp)
        os.kill(pid, signal.SIGKILL)
        code = wait_exit(pid)
        states.append((what, arg, seen, code if stopped else "finished", check_after_kill(out, reference)))
        rerun(capsys, medium, out, reference)
    found = {s[0]: s[4] for s in states if s[3] == -signal.SIGKILL}
    assert found.get("manifest", "absent") == "absent"  # complete in the temp dir, but not published
    assert found.get("renamed", "complete") == "complete"
    killed = [s for s in states if s[3] == -signal.SIGKILL]
    assert len(killed) >= 10, states
    assert len({s[2] for s in killed}) >= 8, f"kills did not land at distinct points: {states}"


def test_sigkill_real_process(medium, reference, tmp_path, capsys):
    """Two kills of `python -m fmconvert convert`: one while it writes, one at a random moment from its start."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fmconvert", "convert", "-q", *CONVERT_OPTS, str(medium), str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    k = random.randint(1, 50)
    assert stop_when(p.pid, lambda: files_in(tmp_of(out, p.pid)) >= k)
    p.kill()
    p.wait(timeout=60)
    check_after_kill(out, reference)
    assert tmp_of(out, p.pid).exists()
    rerun(capsys, medium, out, reference)

    import shutil
    shutil.rmtree(out)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.uniform(0.2, 3.0))
    p.kill()
    p.wait(timeout=60)
    check_after_kill(out, reference)
    rerun(capsys, medium, out, reference)


def test_sigterm_is_an_interruption(medium, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "term.log"
    pid = fork_cli(["convert", "-q", *CONVERT_OPTS, medium, out], log)
    assert stop_when(pid, lambda: files_in(tmp_of(out, pid)) >= 3)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert wait_exit(pid) == EXIT_INTERRUPTED, log.read_text()
    assert log.read_text().strip() == "error: interrupted"
    assert not out.exists() and leftovers(out) == []


def test_interrupt_that_cannot_unwind_hits_the_watchdog(tmp_path, monkeypatch):
    """If KeyboardInterrupt cannot unwind (here: swallowed; in life: a lock left held by a thread primitive it
    interrupted), the watchdog removes the temp dir and the lock file and exits 130 on its own."""
    from fmconvert import write
    monkeypatch.setattr(write, "INTERRUPT_GRACE_S", 0.3)
    out = tmp_path / "out"

    def stuck():
        with write.AtomicDir(out, force=False) as tmp:
            part = tmp / "rank0-00001.safetensors"
            while True:
                try:    # the write too: the file shows before write_bytes returns, and the signal may land there
                    if not part.exists():
                        part.write_bytes(b"partial")
                    time.sleep(1)
                except KeyboardInterrupt:
                    pass
    log = tmp_path / "log"
    pid = fork_call(stuck, log)
    assert stop_when(pid, lambda: files_in(tmp_of(out, pid)) >= 1)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert wait_exit(pid, timeout=30) == EXIT_INTERRUPTED, log.read_text()
    assert log.read_text() == "error: interrupted\n"
    assert not out.exists() and leftovers(out) == []


def test_stale_temp_dirs_are_reported_and_removed(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".out.fmconvert-tmp-{dead.pid}", tmp_path / f".out.fmconvert-tmp-old-{dead.pid}"]
    for d in stale:
        d.mkdir()
        (d / "rank0-00001.safetensors").write_bytes(b"half written")
    (tmp_path / ".out.fmconvert-lock").write_text(f"{dead.pid}\n")  # a lock file left by a killed run
    code, _, err = run_main(capsys, "convert", "-q", model_dir("llama"), out)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert sorted(lines) == sorted(f"warning: removed stale temp dir {d} (left by an interrupted fmconvert, "
                                   f"pid {dead.pid})" for d in stale)
    assert leftovers(out) == []
    assert_valid(out)


# -- 4. disk full --------------------------------------------------------------------------------------------------
def _fsize_limit(nbytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_disk_full_in_a_shard(medium, tmp_path):
    """`python -m fmconvert` under RLIMIT_FSIZE: the first shard cannot be written."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "fmconvert", "convert", "-q", "--tp", "2", "--int8",
                        "--max-shard-size", "1MB", str(medium), str(out)], capture_output=True, text=True,
                       timeout=120, preexec_fn=_fsize_limit(200_000))
    assert_one_line_error(p.returncode, p.stderr, EXIT_IO, "rank0-00001.safetensors", "File too large")
    assert not out.exists() and leftovers(out) == []


def test_disk_full_in_a_sidecar(medium, tmp_path):
    """The shards fit but the copied tokenizer does not: a failure outside the shard writer, still exit 3."""
    src = tmp_path / "src"
    src.mkdir()
    for f in medium.iterdir():
        (src / f.name).symlink_to(f)
    (src / "tokenizer.json").write_bytes(b" " * (5 << 20))
    out = tmp_path / "out"
    log = tmp_path / "log"
    pid = fork_cli(["convert", "-q", *CONVERT_OPTS, src, out], log, fsize_limit=2 << 20)
    code = wait_exit(pid)
    assert_one_line_error(code, log.read_text(), EXIT_IO, "I/O error while writing", "File too large",
                          "tokenizer.json")
    assert not out.exists() and leftovers(out) == []


# -- 5. concurrency ------------------------------------------------------------------------------------------------
def test_second_writer_is_refused(medium, reference, tmp_path):
    """B starts while A is writing (A is stopped mid-write, so the overlap is certain): B fails at once, A
    finishes untouched."""
    out = tmp_path / "out"
    a = fork_cli(["convert", "-q", *CONVERT_OPTS, medium, out], tmp_path / "a.log")
    assert stop_when(a, lambda: files_in(tmp_of(out, a)) >= 5)
    try:
        b = fork_cli(["convert", "-q", *CONVERT_OPTS, medium, out], tmp_path / "b.log")
        assert wait_exit(b) == 2
    finally:
        os.kill(a, signal.SIGCONT)
    assert_one_line_error(2, (tmp_path / "b.log").read_text(), 2, f"another fmconvert is writing {out} (pid {a})")
    assert wait_exit(a) == 0, (tmp_path / "a.log").read_text()
    assert_valid(out)
    same_bytes(out, reference)
    assert leftovers(out) == []


def test_two_conversions_at_once(medium, reference, tmp_path):
    """Two `python -m fmconvert convert` into one OUT_DIR, started together: one wins, the other is refused."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fmconvert", "convert", "-q", *CONVERT_OPTS, str(medium), str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(r[0] for r in results) == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert_one_line_error(2, err, 2)
    assert "another fmconvert is writing" in err or "already exists" in err, err
    assert_valid(out)
    same_bytes(out, reference)
    assert leftovers(out) == []


# -- 6. determinism ------------------------------------------------------------------------------------------------
def test_byte_identical_across_runs(medium, reference, tmp_path, capsys):
    out = tmp_path / "again"
    code, _, err = run_main(capsys, "convert", "-q", *CONVERT_OPTS, medium, out)
    assert code == 0, err
    same_bytes(out, reference)
    workers = [f.name for f in fields(Options) if f.name in ("workers", "jobs", "num_workers")]
    for name in workers:  # conversion is parallel: the worker count must not change a byte
        for n in (1, 2):
            from fmconvert.pipeline import convert
            dst = tmp_path / f"{name}{n}"
            convert(medium, dst, Options(tp=2, int8=True, max_shard_size="64KB", **{name: n}), progress=False)
            same_bytes(dst, reference)
