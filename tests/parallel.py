"""`make test`: the suite as two pytest processes side by side, one a core (each with one OpenMP thread): most of
the Triton interpreter's kernel tests and the slowest scripts in one, everything else in the other. A shard stops at its
first failure (-x), as the whole run did; the exit status is the first failing shard's. The second shard's output is
kept in a file and printed after the first's, so the two never interleave. Extra arguments go to both pytest runs.

    python tests/parallel.py [pytest args]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# About half the suite each (a 2-vCPU Xeon: 20.5 min in one process; side by side 13.1 and 11.6 min, the two
# vCPUs slowing each other): the kernel tests under the interpreter, less the model-backend forwards, with the
# benchmark and GPU-check scripts' dry runs; then the rest with those forwards.
SCRIPTS = ["tests/test_bench_smoke.py", "tests/test_gpu_check_script.py"]
MOVED = "tests/kernels/test_model_backend.py::test_triton_backend_matches_torch_backend"
FIRST = ["tests/kernels", f"--deselect={MOVED}", *SCRIPTS]
SECOND = [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if str(p.relative_to(ROOT)) not in SCRIPTS), MOVED]


def main(argv: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", *argv]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        other = subprocess.Popen([*cmd, *FIRST], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            mine = subprocess.call([*cmd, *SECOND], cwd=ROOT, env=env)
            theirs = other.wait()
        except KeyboardInterrupt:
            other.terminate()
            raise
        log.seek(0)
        sys.stdout.write(f"\n--- the kernel tests and scripts ---\n{log.read()}")
    print(f"\n[two shards in {time.perf_counter() - t0:.0f} s: the rest {'passed' if mine == 0 else 'FAILED'}, the "
          f"kernels and scripts {'passed' if theirs == 0 else 'FAILED'}]")
    return mine or theirs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
