"""Read the Triton kernels' machine code for an H100/H200 without a GPU: registers, spills, and the int8 GEMV's
order of loads and barriers.

    .venv/bin/python benchmarks/sass_report.py [--gemv-only]

Triton compiles for sm_90 on any machine (its wheel carries ptxas' output and cuobjdump), so the questions that need
no timing are answered here, at no device time: does a kernel spill registers to local memory at the configuration
its launcher uses, how many registers does it take (how many programs fit on a multiprocessor), does each GEMV
step issue its weight, scale and x loads together, are the int8 loads 16 bytes wide (LDG.E.128). This is how the
GEMV's load order (EARLY), the GEMM's scale prefetch and its candidate tiles were chosen. Timings still need the card
(`make gpu-check`).

Each row mirrors one launch of a Llama-2-7B-shaped model (hidden 4096, 32 heads of 128, a 193-position cache): the
launcher's own constants, and the integer arguments that launch passes, specialized as Triton's JIT does (a value of
1 becomes a constant, a multiple of 16 is marked divisible by 16, tensors are 16-byte aligned). Compiling with plain
integers instead describes a different kernel: unit strides unknown, the attention kernels load one element at a
time and spill.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FLOAT_SCALARS = ("eps", "qk_scale", "cap", "xs", "scale")
OP = r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)"


@dataclass
class Case:
    name: str
    fn: object                      # the @triton.jit function
    const: dict                     # constexpr arguments
    warps: int
    stages: int = 1
    ptrs: dict = field(default_factory=dict)      # pointer argument -> type; other *_ptr are bf16
    ints: dict = field(default_factory=dict)      # integer arguments of a representative launch
    gemv: bool = False
    loop_bytes: int = 0             # weight bytes one thread handles per GEMV step (instructions per byte)
    one_pass: bool = False          # no loop: report the kernel's loads before its first barrier


# Constexprs a case may leave out: the features it does not use (GPT-OSS's and HY-V4's sinks, clamped SwiGLU,
# expert biases, KDA's per-channel decay and sigmoid gate).
OFF = {"ALPHA": 0.0, "LIMIT": 0.0, "SINKS": False, "HAS_SINKS": False, "HAS_BIAS": False, "CHUNKED": False,
       "G_PER_K": False, "SIGMOID": False, "KEEP": False}


def compile_sm90(case: Case):
    names = case.fn.arg_names
    const = {**{n: v for n, v in OFF.items() if n in names}, **case.const}
    const.update({n: 1 for n, v in case.ints.items() if v == 1})          # the JIT turns a 1 into a constant
    aligned = [n for n in names if n.endswith("_ptr")]                      # fresh torch tensors: 16-byte aligned
    aligned += [n for n, v in case.ints.items() if v != 1 and v % 16 == 0]
    missing = [n for n in names if n not in const and not n.endswith("_ptr") and n not in case.ints
               and n not in FLOAT_SCALARS]
    if missing:
        raise ValueError(f"{case.name}: no representative value for {missing}")
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = case.ptrs.get(n, "*bf16")
        else:
            sig[n] = "fp32" if n in FLOAT_SCALARS else "i32"
    src = ASTSource(case.fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": case.warps, "num_stages": case.stages})


def report(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    num = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", usage)) else None  # noqa: E731
    ops = [(int(a, 16), op) for a, op in re.findall(OP, sass)]
    loop = []          # the innermost loop: from the target of the first backward branch to that branch
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4})\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            lo, hi = int(m.group(2), 16), int(m.group(1), 16)
            loop = [op for a, op in ops if lo <= a <= hi]
            break
    whole = [op for _, op in ops if op.startswith(("LDG", "BAR"))]
    order = [op for op in loop if op.startswith(("LDG", "BAR"))]
    bar = next((i for i, op in enumerate(order) if op.startswith("BAR")), len(order))
    mma = next((i for i, op in enumerate(loop) if "MMA" in op), len(loop))
    first_bar = next((i for i, op in enumerate(whole) if op.startswith("BAR")), len(whole))
    return {"regs": num("REG"), "stack": num("STACK"), "local": num("LOCAL"), "instructions": len(ops),
            "loop_instructions": len(loop),
            "kernel_loads": sum(op.startswith("LDG") for op in whole),
            "kernel_loads_before_barrier": sum(op.startswith("LDG") for op in whole[:first_bar]),
            "loop_loads": sum(op.startswith("LDG") for op in order),
            "loads_before_barrier": sum(op.startswith("LDG") for op in order[:bar]),
            "wide_loads": sum(op == "LDG.E.128" for op in loop),
            # loads the pipeliner does not stage (plain LDG, e.g. the GEMM's scales) issued before the step's MMAs
            "plain_loads_before_mma": sum(op.startswith("LDG.") for op in loop[:mma]),
            "plain_loads": sum(op.startswith("LDG.") for op in loop), "mma": mma < len(loop)}


def gemv_cases(swiglu: bool, K: int = 4096, group: int = 128):
    from fmconvert.kernels import int8_matmul as im
    n_out = 11008 if swiglu else 4096
    ints = dict(M=1, N_OUT=n_out, K=K, K_CHUNK=K, stride_xm=K, stride_wn=K, stride_sn=K // group,
                stride_om=n_out)
    for cfg in im._prune_gemv(im._GEMV_CONFIGS, {}, SWIGLU=swiglu):
        kw = cfg.kwargs
        gs = im._sub_group({"GROUP": group, **kw})
        const = dict(GROUP=group, GS=gs, NG=kw["BLOCK_K"] // gs, HAS_BIAS=False, ACT=5 if swiglu else 0,
                     SWIGLU=swiglu, SPLIT=False, EVEN_K=K % kw["BLOCK_K"] == 0, **kw)
        name = (f"int8 GEMV{' swiglu' if swiglu else ''} {kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} "
                f"magic{kw['MAGIC']} pair{int(kw['PAIR'])} early{int(kw['EARLY'])}{' chain' if kw['CHAIN'] else ''}")
        rows = kw["BLOCK_N"] * (2 if kw["PAIR"] else 1)         # one K walk: gate and up rows together
        yield Case(name, im._int8_gemv_kernel, const, cfg.num_warps, cfg.num_stages,
                   ptrs={"w_ptr": "*i8", "b_ptr": "*i8"}, ints=ints, gemv=True,
                   loop_bytes=rows * kw["BLOCK_K"] // (32 * cfg.num_warps))


def other_cases(D: int = 128, hidden: int = 4096, S: int = 193, T: int = 2048):
    from fmconvert.kernels import attention as at
    from fmconvert.kernels import glu, norm, rope
    from fmconvert.kernels import int8_matmul as im
    H = hidden // D
    # Mixtral-8x7B's experts_in (gate; up of 14336 each) over (token, expert) pairs, as a decode step launches it, int8
    # and bf16 (expert_linear: no scales, so GROUP, GS, NG, MAGIC and the scale strides are unused).
    for w in ("int8", "bf16"):
        int8 = w == "int8"
        for swiglu, n_out, k in ((True, 14336, hidden), (False, hidden, 14336)):
            rows = n_out * (2 if swiglu else 1)
            yield Case(f"{w} expert GEMV{' swiglu' if swiglu else ''} 2x2048 w4", im._int8_expert_gemv_kernel,
                       dict(GROUP=128 if int8 else 1, GS=128 if int8 else 1, NG=16 if int8 else 1,
                            ACT=5 if swiglu else 0, SWIGLU=swiglu, MAGIC=3 if int8 else 0, EVEN_K=True, BLOCK_N=2,
                            BLOCK_K=2048), 4, ptrs={"w_ptr": "*i8" if int8 else "*bf16", "e_ptr": "*i64"},
                       ints=dict(N_OUT=n_out, K=k, X_EVERY=2 if swiglu else 1, stride_xm=k, stride_we=rows * k,
                                 stride_wn=k, stride_se=rows * k // 128 if int8 else 0,
                                 stride_sn=k // 128 if int8 else 0, stride_be=rows, stride_om=n_out))
    # GPT-OSS-20B's experts_in (gate; up of 2880, K 2880 in groups of 64), biased, clamped SwiGLU
    yield Case("int8 expert GEMV swiglu_oai bias 2x2048 w4", im._int8_expert_gemv_kernel,
               dict(GROUP=64, GS=64, NG=32, HAS_BIAS=True, ACT=7, ALPHA=1.702, LIMIT=7.0, SWIGLU=True, MAGIC=3,
                    EVEN_K=False, BLOCK_N=2, BLOCK_K=2048), 4, ptrs={"w_ptr": "*i8", "e_ptr": "*i64"},
               ints=dict(N_OUT=2880, K=2880, X_EVERY=4, stride_xm=2880, stride_we=5760 * 2880, stride_wn=2880,
                         stride_se=5760 * 45, stride_sn=45, stride_be=5760, stride_om=2880))
    i8 = {"w_ptr": "*i8", "b_ptr": "*i8"}
    gemm = dict(M=32, N_OUT=hidden, K=hidden, M_BUCKET=32, stride_xm=hidden, stride_wn=hidden,
                stride_sn=hidden // 128, stride_om=hidden)                        # batch-32 decode
    for cfg in im._GEMM_CONFIGS:
        kw = cfg.kwargs
        for swiglu in (False, True) if im._swiglu_fits(cfg) else (False,):       # what the tuner may choose
            const = dict(GROUP=128, HAS_BIAS=False, ACT=5 if swiglu else 0, SWIGLU=swiglu,
                         SCALE_AFTER=128 % kw["BLOCK_K"] == 0, DOT_F32=False, PREC="tf32", **kw)
            yield Case(f"int8 GEMM{' swiglu' if swiglu else ''} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} "
                       f"w{cfg.num_warps} s{cfg.num_stages}", im._int8_gemm_kernel, const, cfg.num_warps,
                       cfg.num_stages, ptrs=i8, ints=gemm)
    yield Case("int8 dequantize 32x256", im._dequant_kernel, dict(GROUP=128, GS=128, NG=2, BLOCK_N=32, BLOCK_K=256),
               4, ptrs={"w_ptr": "*i8"}, ints=dict(N=hidden, K=hidden, stride_wn=hidden, stride_sn=hidden // 128,
                                                   stride_on=hidden))
    yield Case("int8 split-K epilogue", im._splitk_epilogue_kernel, dict(HAS_BIAS=False, ACT=5, SWIGLU=True,
               BLOCK=1024), 4, ptrs={"acc_ptr": "*fp32"}, ints=dict(N_OUT=hidden, stride_am=2 * hidden,
                                                                      stride_om=hidden))
    dec = {"lens_ptr": "*i32", "ws_ptr": "*fp32"}
    cache = dict(skb=H * S * D, skh=S * D, sks=D, skd=1, svb=H * S * D, svh=S * D, svs=D, svd=1)
    q1 = dict(sqb=H * D, sqh=D, sqd=1, sob=H * D, soh=D, KEEP_BLOCK=128, sxb=H * 32, sxh=32)   # keep: M3's blocks
    # (direct, alibi, windowed + soft-capped as in Gemma 2)
    for direct, alibi, gemma2, sinks in ((False, False, False, False), (False, True, False, False),
                                         (True, False, False, False), (True, True, False, False),
                                         (False, False, True, False), (True, False, False, True)):
        yield Case(f"decode attention {'direct' if direct else 'split-K'}{' alibi' if alibi else ''}"
                   f"{' window softcap' if gemma2 else ''}{' sinks' if sinks else ''} d{D}",
                   at._decode_partial_kernel, dict(ALIBI=alibi, DOT_F32=False, PREC="tf32", DIRECT=direct,
                   WINDOWED=gemma2, SOFTCAP=gemma2, SINKS=sinks, BLOCK_G=16, BLOCK_N=at._DECODE_BLOCK_N,
                   BLOCK_D=D),
                   at._DECODE_WARPS, at._DECODE_STAGES, ptrs=dec,
                   ints=dict(HQ=H, HKV=H, GQA=1, D=D, CHUNK=64, NSPLIT=4, WINDOW=4096, **q1, **cache))
    # MiniMax-M3's block-sparse layers: a table of kept 128-key blocks per kv head, unkept tiles skipped
    yield Case(f"decode attention split-K block-sparse d{D}", at._decode_partial_kernel,
               dict(ALIBI=False, DOT_F32=False, PREC="tf32", DIRECT=False, WINDOWED=False, SOFTCAP=False, KEEP=True,
                    BLOCK_G=16, BLOCK_N=at._DECODE_BLOCK_N, BLOCK_D=D), at._DECODE_WARPS, at._DECODE_STAGES,
               ptrs={**dec, "keep_ptr": "*i8"}, ints=dict(HQ=H, HKV=H, GQA=1, D=D, CHUNK=64, NSPLIT=4, WINDOW=0,
                                                           **q1, **cache))
    # Llama 4's chunked attention: WINDOW carries the chunk size (its attention_chunk_size, 8192)
    yield Case(f"decode attention split-K chunked d{D}", at._decode_partial_kernel,
               dict(ALIBI=False, DOT_F32=False, PREC="tf32", DIRECT=False, WINDOWED=False, CHUNKED=True, SOFTCAP=False,
                    BLOCK_G=16, BLOCK_N=at._DECODE_BLOCK_N, BLOCK_D=D), at._DECODE_WARPS, at._DECODE_STAGES, ptrs=dec,
               ints=dict(HQ=H, HKV=H, GQA=1, D=D, CHUNK=64, NSPLIT=4, WINDOW=8192, **q1, **cache))
    yield Case("decode attention merge chunked", at._decode_reduce_kernel,
               dict(WINDOWED=False, CHUNKED=True, BLOCK_S=8, BLOCK_D=D), 4, ptrs=dec,
               ints=dict(HQ=H, D=D, CHUNK=64, NSPLIT=4, WINDOW=8192, sob=H * D, soh=D))
    for windowed, sinks in ((False, False), (True, False), (True, True)):
        yield Case(f"decode attention merge{' window' if windowed else ''}{' sinks' if sinks else ''}",
                   at._decode_reduce_kernel, dict(WINDOWED=windowed, SINKS=sinks, BLOCK_S=8, BLOCK_D=D), 4, ptrs=dec,
                   ints=dict(HQ=H, D=D, CHUNK=64, NSPLIT=4, WINDOW=4096, sob=H * D, soh=D))
    bm, bn, warps, stages = at._prefill_config(None, D)
    # q, k, v: [B, H, T, D] views of the fused [B, T, 3 * H * D] projection
    seq = {f"s{t}{a}": v for t in "qkvo" for a, v in (("b", T * 3 * H * D), ("h", D), ("t", 3 * H * D), ("d", 1))}
    seq = {k.replace("kt", "ks").replace("vt", "vs"): v for k, v in seq.items() if k != "sod"}
    seq.update(sob=T * H * D, sot=H * D)
    for causal, kpm, alibi, gemma2, sinks in ((True, False, False, False, False), (False, True, False, False, False),
                                              (True, False, True, False, False), (True, False, False, True, False),
                                              (True, False, False, False, True)):
        yield Case(f"prefill attention {'causal' if causal else 'padded'}{' alibi' if alibi else ''}"
                   f"{' window softcap' if gemma2 else ''}{' sinks' if sinks else ''} d{D}",
                   at._prefill_kernel, dict(CAUSAL=causal, ALIBI=alibi, HAS_KPM=kpm, DOT_F32=False, PREC="tf32",
                                            WINDOWED=gemma2, SOFTCAP=gemma2, SINKS=sinks, BLOCK_M=bm, BLOCK_N=bn,
                                            BLOCK_D=D),
                   warps, stages, ptrs={"kpm_ptr": "*u8"},
                   ints=dict(T=T, S=T, HQ=H, GQA=1, D=D, WINDOW=4096, skpb=T, **seq))
    yield Case(f"prefill attention causal chunked d{D}", at._prefill_kernel,
               dict(CAUSAL=True, ALIBI=False, HAS_KPM=False, DOT_F32=False, PREC="tf32", WINDOWED=False, CHUNKED=True,
                    SOFTCAP=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D), warps, stages, ptrs={"kpm_ptr": "*u8"},
               ints=dict(T=T, S=T, HQ=H, GQA=1, D=D, WINDOW=8192, skpb=T, **seq))
    r = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64"}
    qkv = dict(sqb=3 * H * D, sqh=D, sqd=1, skb=3 * H * D, skh=D, skd=1)
    for use, qk_norm, v_norm in ((True, False, False), (False, False, False), (True, True, False), (True, True, True)):
        name = f"rope_append{'' if use else ' (no RoPE)'}{' qk_norm' if qk_norm else ''}{' v_norm' if v_norm else ''}"
        yield Case(f"{name} d{D}", rope._rope_append_kernel,
                   dict(ROPE=use, GPTJ=False, QK_NORM=qk_norm, PLUS_ONE=False, V_NORM=v_norm, RING=False, BLOCK_H=16,
                        BLOCK_HALF=D // 2, BLOCK_D=D), 4, ptrs=r,
                   ints=dict(HQ=H, HKV=H, D=D, R=D, HALF=D // 2, S_MAX=S, N_POS=4096, svb=3 * H * D, svh=D, svd=1,
                             oqb=H * D, oqh=D, skcb=H * S * D, skch=S * D, skcs=D, svcb=H * S * D, svch=S * D,
                             svcs=D, scp=D // 2, **qkv))
    yield Case(f"apply_rope d{D}", rope._rope_kernel, dict(GPTJ=False, BLOCK_H=16, BLOCK_HALF=D // 2, BLOCK_D=D), 4,
               ptrs=r, ints=dict(T=T, HQ=H, HKV=H, D=D, R=D, HALF=D // 2, sqt=3 * H * D, skt=3 * H * D,
                                 oqb=T * H * D, oqt=H * D, oqh=D, okb=T * H * D, okt=H * D, okh=D, spb=T, spt=1,
                                 scp=D // 2, **{k: v * T if k.endswith("b") else v for k, v in qkv.items()}))
    for n, gemma4 in ((hidden, False), (2 * hidden, False), (5376, True)):
        block = triton.next_power_of_2(n)     # Gemma 4: the output norm and the layer's gain on the stream folded in
        yield Case(f"add+rmsnorm {n}{' pre+gain' if gemma4 else ''}", norm._add_norm_kernel,
                   dict(HAS_RES=True, HAS_W=True, HAS_BIAS=False, IS_RMS=True, PLUS_ONE=False, PRE=gemma4,
                        HAS_GAIN=gemma4, BLOCK=block), min(16, max(1, block // 512)), ints=dict(N=n), one_pass=True)
    yield Case("swiglu", glu._glu_kernel, dict(ACT=5, BLOCK=1024), 4, ints=dict(N=11008, stride_y=22016,
                                                                          stride_o=11008))
    yield Case("swiglu_oai", glu._glu_kernel, dict(ACT=7, ALPHA=1.702, LIMIT=7.0, BLOCK=1024), 4,
               ints=dict(N=2880, stride_y=5760, stride_o=2880))


def mla_cases(H: int = 16, R: int = 512, P: int = 64, S: int = 4096):
    """DeepSeek-V3's absorbed decode at tp 8: 16 heads over a latent cache of rows 512 + 64 wide (bf16)."""
    import torch

    from fmconvert.kernels import mla
    block_n, warps, stages = mla._mla_config(R, torch.bfloat16)
    ptrs = {"lens_ptr": "*i32", "ws_ptr": "*fp32"}
    for direct in (False, True):
        yield Case(f"mla decode {'direct' if direct else 'split-K'} h{H} r{R}+{P}", mla._mla_decode_partial_kernel,
                   dict(DOT_F32=False, PREC="tf32", DIRECT=direct, BLOCK_H=mla._MLA_BLOCK_H, BLOCK_N=block_n,
                        BLOCK_C=R, BLOCK_R=P), warps, stages, ptrs=ptrs,
                   ints=dict(H=H, NHB=H // mla._MLA_BLOCK_H, R=R, ROPE=P, S_MAX=S, CHUNK=256, NSPLIT=S // 256,
                             sqb=H * (R + P), sqh=R + P, scb=S * (R + P), scs=R + P, sob=H * R, soh=R))
    nsplit = S // 256
    yield Case(f"mla decode merge h{H} r{R}", mla._mla_decode_reduce_kernel,
               dict(BLOCK_S=nsplit, BLOCK_V=mla._reduce_block_v(nsplit, R)), 4, ptrs=ptrs,
               ints=dict(H=H, R=R, CHUNK=256, NSPLIT=nsplit, sob=H * R, soh=R))


def linear_cases():
    """A hybrid's linear layers at their launchers' configurations: Qwen3.5's gated delta rule (32 v heads over 16
    q/k heads of 128) and Kimi Linear 48B's KDA (32 heads of 128, a decay per key channel), Granite 4.0-H's Mamba2
    scan (head_dim 64, state 128), FalconMamba-7B's Mamba1 scan (8192 channels, state 16), the conv over a decode
    step's x|B|C and over a prompt, and the three gated norms (Qwen3.5's, Mamba2's, KDA's sigmoid one)."""
    from fmconvert.kernels import conv1d, delta_rule, gated_norm, mamba1_scan, mlstm, rglru_scan, selective_scan
    f32 = {"g_ptr": "*fp32", "beta_ptr": "*fp32", "s_ptr": "*fp32", "dt_ptr": "*fp32", "a_ptr": "*fp32",
           "d_ptr": "*fp32"}
    bv = delta_rule._block_v(128)
    yield Case("gated delta step hv32 d128", delta_rule._gated_delta_kernel, dict(BK=128, BV=bv),
               max(1, min(8, 128 * bv // 1024)), ptrs=f32,
               ints=dict(T=1, HV=32, GROUP=2, DK=128, DV=128, sqb=16 * 128 * 2, sqt=16 * 128 * 2, sqh=128,
                         skb=16 * 128 * 2, skt=16 * 128 * 2, skh=128, svb=12352, svt=12352, svh=128, sgb=32, sgt=32,
                         sgh=1, sgk=1, sbb=32, sbt=32, sbh=1, ssb=32 * 128 * 128, ssh=128 * 128, ssk=128, sob=4096,
                         sot=4096, soh=128))
    # q | k | v: slices of the fused [3 * 4096] projection (after the short conv); g: the [32 * 128] f_b_proj
    # output after its gate activation, one log decay per key channel; beta [32]
    yield Case("gated delta step per-channel (KDA) hv32 d128", delta_rule._gated_delta_kernel,
               dict(G_PER_K=True, BK=128, BV=bv), max(1, min(8, 128 * bv // 1024)), ptrs=f32,
               ints=dict(T=1, HV=32, GROUP=1, DK=128, DV=128, sqb=3 * 4096, sqt=3 * 4096, sqh=128, skb=3 * 4096,
                         skt=3 * 4096, skh=128, svb=3 * 4096, svt=3 * 4096, svh=128, sgb=4096, sgt=4096, sgh=128,
                         sgk=1, sbb=32, sbt=32, sbh=1, ssb=32 * 128 * 128, ssh=128 * 128, ssk=128, sob=4096,
                         sot=4096, soh=128))
    bp = selective_scan._block_p(64)
    yield Case("mamba2 scan step h64 p64 n128", selective_scan._ssm_scan_kernel, dict(HAS_D=True, BP=bp, BN=128),
               max(1, min(8, bp * 128 // 1024)), ptrs=f32,
               ints=dict(T=1, H=64, GROUP=64, P=64, N=128, sxb=8512, sxt=8512, sxh=64, sdb=64, sdt=64, sdh=1, sa=1,
                         sd=1, sbb=8512, sbt=8512, sbg=128, scb=8512, sct=8512, scg=128, ssb=64 * 64 * 128,
                         ssh=64 * 128, ssp=128, syb=4096, syt=4096, syh=64))
    # x | z: slices of in_proj's [2 * 8192] output; dt: dt_proj's [8192] (bf16, its bias added); B | C: slices of
    # x_proj's [dt_rank 256 + 16 + 16] output
    bd = mamba1_scan._block_d(16)
    yield Case("mamba1 scan step d8192 n16", mamba1_scan._mamba_scan_kernel,
               dict(HAS_D=True, HAS_Z=True, SOFTPLUS=True, BD=bd, BN=16), mamba1_scan._num_warps(bd, 16),
               ptrs={**f32, "dt_ptr": "*bf16"},
               ints=dict(T=1, DC=8192, N=16, sxb=16384, sxt=16384, sdb=8192, sdt=8192, sa=16, sbb=288, sbt=288,
                         scb=288, sct=288, szb=16384, szt=16384, ssb=8192 * 16, ssd=16, syb=8192, syt=8192))
    # RecurrentGemma-9B's RG-LRU recurrence at tp 1: its 4096 channels, a step (decode) reading bf16 a and x
    bd = min(rglru_scan.BLOCK, 4096)
    yield Case("rglru scan step w4096", rglru_scan._linear_scan_kernel, dict(BD=bd), max(1, min(4, bd // 64)),
               ptrs={"a_ptr": "*bf16", "x_ptr": "*bf16", "s_ptr": "*fp32", "y_ptr": "*bf16"},
               ints=dict(T=1, W=4096, sab=4096, sat=4096, sxb=4096, sxt=4096, ssb=4096, syb=4096, syt=4096))
    # xLSTM-7B's mLSTM at tp 1: 8 heads, q/k 256 and v 512 wide, a decode step reading bf16 q, k, v and gates
    bv = mlstm.BLOCK_V
    yield Case("mlstm scan step h8 dk256 dv512", mlstm._mlstm_kernel, dict(BK=256, BV=bv),
               max(1, min(8, 256 * bv // 1024)), ptrs={"s_ptr": "*fp32", "nm_ptr": "*fp32"},
               ints=dict(T=1, H=8, DK=256, DV=512, sqb=6144, sqt=6144, sqh=256, skb=6144, skt=6144, skh=256,
                         svb=6144, svt=6144, svh=512, sgb=16, sgt=16, sgh=1, ssb=8 * 257 * 513, ssh=257 * 513,
                         ssk=513, syb=4096, syt=4096, syh=512))
    for T, bt in ((1, 1), (2048, 16)):
        yield Case(f"causal conv1d T={T} c4352 k4", conv1d._causal_conv1d_kernel,
                   dict(K=4, HAS_BIAS=True, HAS_STATE=True, SILU=True, BT=bt, BC=64, BS=4),
                   max(1, min(4, bt * 64 // 256)),
                   ints=dict(T=T, C=4352, sxb=T * 8512, sxt=8512, sxc=1, swc=4, swk=1, ssb=4352 * 3, ssc=3, ssk=1,
                             sob=T * 4352, sot=4352))
    for name, gate_first, H, D, gs in (("qwen3.5 per head", False, 32, 128, 128), ("mamba2 group", True, 1, 4096, 4096)):
        block = min(4096, 1 << (gs - 1).bit_length())
        yield Case(f"gated norm {name} d{gs}", gated_norm._gated_rms_norm_kernel,
                   dict(GATE_FIRST=gate_first, ROUND_PROD=True, BLOCK=block, ONE_BLOCK=block >= gs),
                   max(1, min(8, block // 256)),
                   ints=dict(H=H, NG=D // gs, D=D, GS=gs, sxo=H * D, sxh=D, sxd=1, szo=12352, szh=D, szd=1))
    # Kimi Linear's output norm: 32 heads of 128, gated by its own [32 * 128] g_b_proj output, fp32 throughout
    yield Case("gated norm kda sigmoid per head d128", gated_norm._gated_rms_norm_kernel,
               dict(GATE_FIRST=False, ROUND_PROD=False, SIGMOID=True, BLOCK=128, ONE_BLOCK=True), 1,
               ints=dict(H=32, NG=1, D=128, GS=128, sxo=4096, sxh=128, sxd=1, szo=4096, szh=128, szd=1))


def float_gemv_cases(K: int = 4096):
    """The float GEMV (kernels/float_linear.py) at every autotuning candidate: with the gate fused (gate and up rows
    in one tile, the largest register footprint) where the tuner may pick it for a gated MLP, else without."""
    from fmconvert.kernels import float_linear as fl
    ints = dict(M=1, N_OUT=11008, K=K, stride_xm=K, stride_wn=K, stride_om=11008)
    for i, cfg in enumerate(fl._FLOAT_GEMV_CONFIGS):
        for gated in (True, False) if i == 0 else (True,) if fl._gated_fits(cfg) else (False,):
            kw = cfg.kwargs
            yield Case(f"float GEMV{' swiglu' if gated else ''} {kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps}",
                       fl._float_gemv_kernel, dict(HAS_BIAS=False, ACT=5 if gated else 0, GATED=gated,
                                                   EVEN_K=K % kw["BLOCK_K"] == 0, **kw), cfg.num_warps, ints=ints)


_CASES: list = []


def _one(i: int):
    case = _CASES[i]
    try:
        return report(compile_sm90(case)), None
    except Exception as exc:        # a kernel that does not compile for sm_90 is a finding too
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def rows(gemv_only: bool = False, jobs: int = 1):
    cases = list(gemv_cases(False)) + list(gemv_cases(True))
    if not gemv_only:
        cases += list(other_cases(D=128))
        cases += [c for c in other_cases(D=64) if "attention" in c.name or "rope" in c.name]  # GPT-2/BERT/GPT-OSS
        cases += [c for c in other_cases(D=256) if "window softcap" in c.name]                  # Gemma 2/3 heads
        cases += [c for c in other_cases(D=512) if c.name in (                                  # Gemma 4's global
            "decode attention split-K d512", "rope_append qk_norm v_norm d512", "prefill attention causal d512")]
        cases += list(mla_cases())
        cases += list(linear_cases())
        cases += list(float_gemv_cases())
    _CASES[:] = cases
    if jobs > 1:
        # Forked workers compile by index (a case holds a jit function, which does not pickle); results in order.
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            for case, (r, err) in zip(cases, pool.imap(_one, range(len(cases)))):
                yield case, r, err
        return
    for i, case in enumerate(cases):
        yield (case, *_one(i))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemv-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiles at once (processes)")
    args = ap.parse_args()
    for case, r, err in rows(args.gemv_only, args.jobs):
        if err:
            print(f"{case.name}: FAILED {err}")
            continue
        line = f"{case.name}: {r['regs']} regs, {r['stack']} B stack, {r['local']} B local"
        if case.gemv:
            line += (f", {r['loads_before_barrier']}/{r['loop_loads']} loads before the first barrier, "
                     f"{r['wide_loads']} 16-byte, {r['loop_instructions'] / case.loop_bytes:.2f} instructions a "
                     f"weight byte")
        elif case.one_pass:
            line += f", {r['kernel_loads_before_barrier']}/{r['kernel_loads']} loads before the first barrier"
        elif r["mma"]:
            line += f", {r['plain_loads_before_mma']}/{r['plain_loads']} plain loads before the first MMA"
        print(line, flush=True)


if __name__ == "__main__":
    main()
