"""Conversion: wall time against `cp -r` + sync and against a transformers round trip, and peak RSS.

    python benchmarks/bench_convert.py [--runs 3] [--smoke] [--json FILE]

Per round, in rotating order: cp -r + sync, `fmconvert convert --tp 2 --int8` + sync, transformers
from_pretrained + save_pretrained + sync, and the conversion of the twice-as-deep model. Every command is a fresh
process; the output directory is removed and `sync` run before each (outside the timing). Peak RSS is GNU time's
maximum resident set size. Source files stay in the page cache between rounds (caches cannot be dropped here).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import synth  # noqa: E402

MIB = 1 << 20


def layer_bytes(shape: dict, itemsize: int = 2) -> int:
    h, i, a, kv = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads"))
    hd = h // a
    return itemsize * (h * h + 2 * kv * hd * h + h * h + 3 * h * i + 2 * h)


def run(ctx: dict) -> list[dict]:
    shape = dict(synth.SMOKE if ctx["smoke"] else synth.LLAMA_1B)
    deep = {**shape, "num_hidden_layers": 2 * shape["num_hidden_layers"]}
    src, deep_src = synth.build(shape, ctx["cache"]), synth.build(deep, ctx["cache"])
    work = ctx["cache"] / "work"
    work.mkdir(parents=True, exist_ok=True)
    out = {k: work / f"convert-{k}" for k in ("cp", "fm", "hf", "deep")}
    cmds = {
        "cp": ["sh", "-c", f"cp -r '{src}' '{out['cp']}' && sync"],
        "fm": ["sh", "-c", f"'{C.FMCONVERT}' convert -q --tp 2 --int8 '{src}' '{out['fm']}' && sync"],
        "hf": ["sh", "-c", f"'{C.PY}' '{C.ROOT / 'benchmarks' / 'workers.py'}' roundtrip '{src}' '{out['hf']}'"
                           " >/dev/null && sync"],
        "deep": ["sh", "-c", f"'{C.FMCONVERT}' convert -q --tp 2 --int8 '{deep_src}' '{out['deep']}' && sync"],
    }
    res = {k: [] for k in cmds}
    order = list(cmds)
    for i in range(ctx["runs"]):
        for k in order[i % len(order):] + order[:i % len(order)]:
            C.rmtree(out[k])
            C.sync()
            r = C.run_timed(cmds[k])
            res[k].append(r)
            C.log(f"convert round {i + 1}: {k:4s} {r['wall_s']:6.2f} s  {r['rss_mib']:7.0f} MiB")
    for k in ("cp", "hf"):
        C.rmtree(out[k])
    C.rmtree(out["deep"])
    ctx["fm_out"] = out["fm"]          # the load benchmark reads this one
    wall = {k: C.med([r["wall_s"] for r in v]) for k, v in res.items()}
    rss = {k: C.med([r["rss_mib"] for r in v]) for k, v in res.items()}
    size = synth.dir_bytes(src) / MIB
    grow_limit = layer_bytes(shape) / MIB
    ctx["raw"]["convert"] = {"runs": {k: [{"wall_s": r["wall_s"], "rss_mib": r["rss_mib"]} for r in v]
                                      for k, v in res.items()},
                             "model_mib": size, "deep_model_mib": synth.dir_bytes(deep_src) / MIB,
                             "layer_mib": grow_limit, "shape": shape}
    tag = f"{shape['num_hidden_layers']}-layer synthetic LLaMA, {size / 1024:.2f} GiB bf16"
    rows = [
        C.figure("convert --tp 2 --int8 wall", wall["fm"], "s", "cp -r + sync", wall["cp"],
                 wall["fm"] / wall["cp"], "<= 2.0x", wall["fm"] / wall["cp"] <= 2.0,
                 note=f"{tag}; `+ sync` on both sides"),
        C.figure("convert --tp 2 --int8 wall", wall["fm"], "s", "HF from_pretrained+save_pretrained", wall["hf"],
                 wall["fm"] / wall["hf"], "<= 0.4x", wall["fm"] / wall["hf"] <= 0.4,
                 note=f"HF round trip peak RSS {rss['hf']:.0f} MiB"),
        C.figure("convert peak RSS", rss["fm"], "MiB", "model size", size, rss["fm"] / size, "<= 600 MiB",
                 rss["fm"] <= 600, baseline_unit="MiB"),
        C.figure("convert peak RSS, 2x deep model", rss["deep"], "MiB", "same, 1x deep", rss["fm"],
                 rss["deep"] / rss["fm"], f"growth <= 1 layer ({grow_limit:.0f} MiB)",
                 rss["deep"] - rss["fm"] <= grow_limit, baseline_unit="MiB",
                 note=f"deep model {synth.dir_bytes(deep_src) / 2**30:.2f} GiB, converted in "
                      f"{wall['deep']:.2f} s; growth {rss['deep'] - rss['fm']:+.0f} MiB"),
    ]
    return rows


def main(argv=None):
    ctx = C.parse_args("conversion speed and memory", argv)
    C.main_one(ctx, run)


if __name__ == "__main__":
    main()
