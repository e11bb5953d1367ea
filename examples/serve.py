"""Serve a converted checkpoint: read prompts on stdin (one per line), answer each on stdout.

    python examples/serve.py OUT_DIR                                   # tp=1
    torchrun --standalone --nproc-per-node 2 examples/serve.py OUT_DIR  # tp=2: rank 0 reads and prints

Only rank 0 touches stdin/stdout; it broadcasts each prompt's token ids, every rank runs its shard, and the
sampled tokens are broadcast back inside `generate`, so ranks stay in lockstep.
"""

import argparse
import sys

import torch

import fmconvert
from fmconvert.runtime.comm import shutdown
from fmconvert.runtime.generate import generate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()

    model = fmconvert.load(args.out_dir)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.out_dir, local_files_only=True)
    lead = model.rank == 0
    if lead:
        print(f"ready: {model.spec['architecture']} tp={model.tp}; one prompt per line, EOF to quit", file=sys.stderr,
              flush=True)
    while True:
        box = [None]
        if lead:
            line = sys.stdin.readline()
            box[0] = tok(line.rstrip("\n")).input_ids if line else None
        if model.tp > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        ids = torch.tensor([box[0]], device=model.device)
        out, stats = generate(model, ids, args.max_new_tokens, args.temperature,
                              eos_token_id=model.spec.get("eos_token_id"))
        if lead:
            print(tok.decode(out[0], skip_special_tokens=True), flush=True)
            print(f"[{stats.new_tokens} tokens, {stats.decode_tok_s:.1f} tok/s]", file=sys.stderr, flush=True)
    shutdown()


if __name__ == "__main__":
    main()
