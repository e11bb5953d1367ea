"""Run under torchrun: each rank loads its shards of every OUT_DIR given and rank 0 saves the outputs."""

import sys

import torch

from fmconvert.runtime.comm import shutdown
from fmconvert.runtime.load import load

if __name__ == "__main__":
    torch.manual_seed(0)
    ids_path, result_path, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    ids = torch.load(ids_path)
    results = {}
    for d in dirs:
        m = load(d)
        out = m(ids)
        results[d] = out[0] if isinstance(out, tuple) else out
        cache = m.new_cache(ids.shape[0], ids.shape[1]) if m.spec["kind"] == "decoder" else None
        if cache is not None:  # incremental decode across real ranks too
            steps = [m(ids[:, :3], cache)] + [m(ids[:, j:j + 1], cache) for j in range(3, ids.shape[1])]
            results[d + ":incremental"] = torch.cat(steps, dim=1)
    if m.rank == 0:
        torch.save(results, result_path)
    shutdown()
