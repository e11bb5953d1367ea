"""GPU benchmark of the fmconvert Triton kernels against torch baselines.

    PYTHONPATH=$PWD python3 benchmarks/gpu_kernels.py           # table of all kernels
    PYTHONPATH=$PWD python3 benchmarks/gpu_kernels.py --sweep   # time every int8 GEMV config

`run(report)` returns rows of dicts (name, shape, ms_kernel, ms_baseline, GB/s, speedup, ok) and
fills `report` with the device, the measured copy bandwidth and the rows. Each int8 shape is
checked against the reference before it is timed. Weights rotate through enough copies
(> 200 MB together) that timings read HBM, not the 50-60 MB L2. Needs CUDA; imports anywhere.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

LINEAR_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
LINEAR_MS = [1, 4, 8, 32, 2048]
GROUP = 128
ROTATE_BYTES = 256 << 20


def _bench(fn, warmup=10, rep=40):
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def _bench_graph(call, n_calls, rep=40):
    """GPU ms per call of call(i), i = 0..n_calls-1, replayed from one CUDA graph: no Python
    launch overhead (as in a graph-captured decode step). Falls back to eager timing."""
    try:
        for i in range(n_calls):  # compile / autotune outside the capture
            call(i)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_calls):
                call(i)
        return _bench(g.replay, rep=rep) / n_calls
    except Exception as exc:
        print(f"graph timing failed ({exc!r:.80}); eager timing", file=sys.stderr)
        state = {"i": 0}

        def step():
            state["i"] += 1
            call(state["i"] % n_calls)

        return _bench(step)


def _rotating(make, nbytes_each):
    """Call make() enough times that the copies exceed ROTATE_BYTES; return (copies, next())."""
    n = max(2, math.ceil(ROTATE_BYTES / max(1, nbytes_each)))
    return [make() for _ in range(n)]


def _calls(n_copies, at_least=24):
    return n_copies * math.ceil(at_least / n_copies)


def _row(name, shape, ms_kernel, ms_baseline, nbytes=None, ok=True, **extra):
    row = {
        "name": name,
        "shape": shape,
        "ms_kernel": round(ms_kernel, 5),
        "ms_baseline": round(ms_baseline, 5) if ms_baseline is not None else None,
        "GB/s": round(nbytes / ms_kernel / 1e6, 1) if nbytes else None,
        "speedup": round(ms_baseline / ms_kernel, 3) if ms_baseline else None,
        "ok": ok,
    }
    row.update(extra)
    return row


def _quantize(w, group):
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    s = (g.abs().amax(-1) / 127.0).clamp_min(1e-8)
    q = torch.round(g / s[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)
    return q, s.to(torch.bfloat16)


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6  # GB/s, bytes read + written


def _weights(N, K, dt):
    """One random [N, K] weight: int8 q, scale, their bytes, and rotated copies of (q, scale) and of the float
    weight in dt, enough of each that timings read HBM."""
    w0 = torch.randn(N, K, device="cuda") * 0.02
    q0, s0 = _quantize(w0, GROUP)
    wb0 = w0.to(dt)
    del w0
    int8_bytes = q0.numel() + s0.numel() * s0.element_size()
    qs = _rotating(lambda: (q0.clone(), s0.clone()), int8_bytes)
    ws = _rotating(lambda: wb0.clone(), wb0.numel() * 2)
    return q0, s0, int8_bytes, qs, ws


def bench_linear(rows, ms_list=None, shapes=LINEAR_SHAPES):
    from fmconvert.kernels import int8_linear, int8_linear_reference

    dev, dt = "cuda", torch.bfloat16
    ms_list = ms_list or LINEAR_MS
    for N, K in shapes:
        q0, s0, int8_bytes, qs, ws = _weights(N, K, dt)
        for M in ms_list:
            x = torch.randn(M, K, device=dev, dtype=dt)
            y = int8_linear(x, q0, s0, GROUP)  # also autotunes
            ref = int8_linear_reference(x, q0, s0, GROUP)
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
            ok = err < 2e-2
            ms_fp = _bench_graph(lambda i: F.linear(x, ws[i % len(ws)]), _calls(len(ws)))
            ms_q = _bench_graph(lambda i: int8_linear(x, *qs[i % len(qs)], GROUP), _calls(len(qs)))
            ms_q_eager = _bench(lambda: int8_linear(x, q0, s0, GROUP))
            extra = {}
            if M == 1:      # the autotuner's choice, and the two load orders on their own (EARLY, the old one)
                from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS
                old = next(c for c in _GEMV_CONFIGS if not c.kwargs["EARLY"])
                chain = next(c for c in _GEMV_CONFIGS if c.kwargs["CHAIN"])
                _gemv_configs(extra, x, qs, N, None, (("early", _GEMV_CONFIGS[0]), ("old_order", old),
                                                      ("chain", chain)))
            if M <= 4:      # a decode step: the GEMV and the 16-row tensor-core GEMM; int8_linear keeps the faster
                from fmconvert.kernels.int8_matmul import _DECODE_CHOICE
                for path in ("decode", "gemm"):
                    extra[f"{path}_ms"] = round(_bench_graph(
                        lambda i: int8_linear(x, *qs[i % len(qs)], GROUP, _path=path), _calls(len(qs))), 5)
                extra["decode_choice"] = next((v for k, v in _DECODE_CHOICE.items() if k[:3] == (M, N, K)), None)
            if M >= 64:     # the long-prompt choice: the Triton GEMM against dequantize + cuBLAS (the "dense" path)
                for path in ("gemm", "dense"):
                    extra[f"{path}_ms"] = round(_bench_graph(
                        lambda i: int8_linear(x, *qs[i % len(qs)], GROUP, _path=path), _calls(len(qs))), 4)
            rows.append(_row("int8_linear", f"M={M} N={N} K={K}", ms_q, ms_fp, int8_bytes, ok,
                             bf16_GBps=round(2 * N * K / ms_fp / 1e6, 1), rel_err=round(err, 5),
                             eager_ms=round(ms_q_eager, 4), **extra))
        del qs, ws
        torch.cuda.empty_cache()


def _gemv_configs(extra, x, qs, n_out, activation, labelled):
    """Into extra: the config the autotuner chose for this GEMV shape, then each labelled config timed on its own
    (same rotated weights qs as the tuned timing)."""
    from fmconvert.kernels._common import ACTIVATIONS
    from fmconvert.kernels.int8_matmul import _decode, _gemv_tuned

    K, swiglu = x.shape[1], activation == "swiglu"
    chosen = [str(c) for key, c in _gemv_tuned.cache.items()          # key: M, N_OUT, K, SWIGLU
              if key[1:4] == (n_out, K, swiglu)]
    extra["tuned_config"] = chosen[-1] if chosen else None
    for label, cfg in labelled:
        out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
        try:
            extra[f"{label}_ms"] = round(_bench_graph(
                lambda i: _decode(x, *qs[i % len(qs)], GROUP, None, ACTIVATIONS[activation], out, split_k=1,
                                  config=cfg), _calls(len(qs))), 5)
        except Exception as exc:
            extra[f"{label}_error"] = repr(exc)[:120]


def bench_swiglu(rows, N=11008, K=4096):
    """LLaMA-7B's gate|up at batch 1: int8 with SwiGLU fused (autotuned, then the default config and the first
    one-pass "PAIR" config on their own) against bf16 cuBLAS plus silu * up."""
    from fmconvert.kernels import int8_linear, int8_linear_reference
    from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS

    dev, dt = "cuda", torch.bfloat16
    q0, s0, int8_bytes, qs, ws = _weights(2 * N, K, dt)
    x = torch.randn(1, K, device=dev, dtype=dt)
    ref = int8_linear_reference(x, q0, s0, GROUP, activation="swiglu").float()

    def fp(i):
        y = F.linear(x, ws[i % len(ws)])
        return F.silu(y[:, :N]) * y[:, N:]

    ms_fp = _bench_graph(fp, _calls(len(ws)))
    y = int8_linear(x, q0, s0, GROUP, activation="swiglu")          # autotunes
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    ms_q = _bench_graph(lambda i: int8_linear(x, *qs[i % len(qs)], GROUP, activation="swiglu"), _calls(len(qs)))
    extra = {"rel_err": round(err, 5)}
    extra["gemm_ms"] = round(_bench_graph(lambda i: int8_linear(x, *qs[i % len(qs)], GROUP, activation="swiglu",
                                                                _path="gemm"), _calls(len(qs))), 5)
    from fmconvert.kernels.int8_matmul import _DECODE_CHOICE
    extra["decode_choice"] = next((v for k, v in _DECODE_CHOICE.items() if k[:3] == (1, 2 * N, K)), None)
    pair = next(c for c in _GEMV_CONFIGS if c.kwargs["PAIR"])
    pair_chain = next(c for c in _GEMV_CONFIGS if c.kwargs["PAIR"] and c.kwargs["CHAIN"])
    _gemv_configs(extra, x, qs, N, "swiglu", (("default", _GEMV_CONFIGS[0]), ("pair", pair),
                                              ("pair_chain", pair_chain)))
    rows.append(_row("int8_swiglu", f"M=1 N=2x{N} K={K}", ms_q, ms_fp, int8_bytes, err < 2e-2, **extra))
    del qs, ws
    torch.cuda.empty_cache()


def bench_float_gemv(rows):
    """bf16 weights at batch 1: kernels/float_linear.py (autotuned) against cuBLAS F.linear, the two paths the
    runtime times per shape before keeping one; the gate|up row adds SwiGLU (cuBLAS, then the swiglu kernel)."""
    from fmconvert.kernels import float_gemv, float_gemv_reference, gated
    from fmconvert.kernels.float_linear import _gemv_tuned

    dt = torch.bfloat16
    for N, K, act in [(n, k, None) for n, k in LINEAR_SHAPES] + [(12288, 4096, None), (2 * 11008, 4096, "swiglu")]:
        w0 = (torch.randn(N, K, device="cuda") * 0.02).to(dt)
        ws = _rotating(lambda: w0.clone(), w0.numel() * 2)
        x = torch.randn(1, K, device="cuda", dtype=dt)
        ref = float_gemv_reference(x, w0, None, act).float()
        y = float_gemv(x, w0, None, act)                                   # autotunes
        ok = ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
        base = (lambda i: gated(F.linear(x, ws[i % len(ws)]), act)) if act else (lambda i: F.linear(x, ws[i % len(ws)]))
        ms_t = _bench_graph(base, _calls(len(ws)))
        ms_k = _bench_graph(lambda i: float_gemv(x, ws[i % len(ws)], None, act), _calls(len(ws)))
        chosen = [str(c) for key, c in _gemv_tuned.cache.items() if key[1:3] == (N // 2 if act else N, K)]
        rows.append(_row("float_gemv", f"M=1 N={N} K={K}" + (f" {act}" if act else ""), ms_k, ms_t, N * K * 2, ok,
                         baseline="cuBLAS bf16" + (" + swiglu kernel" if act else ""),
                         tuned_config=chosen[-1] if chosen else None))
        del ws
        torch.cuda.empty_cache()


def bench_glu(rows):
    """The float path's SwiGLU after cuBLAS: one kernel against torch's silu and product."""
    from fmconvert.kernels import swiglu, swiglu_reference

    for M in (1, 32):
        y = torch.randn(M, 2 * 11008, device="cuda", dtype=torch.bfloat16)
        ok = (swiglu(y).float() - swiglu_reference(y).float()).abs().max().item() < 0.1
        ms_k = _bench_graph(lambda i: swiglu(y), 16)
        ms_t = _bench_graph(lambda i: torch.nn.functional.silu(y[:, :11008]) * y[:, 11008:], 16)
        rows.append(_row("swiglu", f"{M}x2x11008", ms_k, ms_t, 3 * M * 11008 * 2, ok, baseline="silu * up"))


def bench_rope_append(rows):
    """The decode step's fused RoPE + KV-cache append against the path it replaced (RoPE kernel + two index_copy_)."""
    from fmconvert.kernels import apply_rope, rope_append, rope_append_reference

    H, D, S = 32, 128, 4096
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    ang = torch.arange(S, device="cuda").float()[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    for B in (1, 8):
        qkv = torch.randn(B, 1, 3 * H * D, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.view(B, 1, H, D) for t in qkv.split(H * D, -1))
        kc, vc = (torch.zeros(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pos = torch.tensor([S // 2], device="cuda")
        kr, vr = kc.clone(), vc.clone()
        ok = (rope_append(q, k, v, kc, vc, pos, cos, sin).float()
              - rope_append_reference(q, k, v, kr, vr, pos, cos, sin).float()).abs().max().item() < 0.1
        # within rounding: the GPU's fused multiply-add can round a rotated bf16 element one ulp off torch's
        ok = ok and (kc.float() - kr.float()).abs().max().item() < 0.1 and torch.equal(vc, vr)
        positions = pos.view(1, 1).expand(B, 1)

        def unfused(i):
            qo, ko = apply_rope(q, k, cos, sin, positions)
            kc.index_copy_(2, pos, ko.transpose(1, 2))
            vc.index_copy_(2, pos, v.transpose(1, 2))

        ms_f = _bench_graph(lambda i: rope_append(q, k, v, kc, vc, pos, cos, sin), 16)
        ms_u = _bench_graph(unfused, 16)
        rows.append(_row("rope_append", f"B={B} H={H} D={D} S={S}", ms_f, ms_u, None, ok,
                         baseline="rope+2 index_copy_"))


def bench_norm(rows):
    from fmconvert.kernels import add_norm, add_norm_reference

    for R, N in [(1, 4096), (32, 4096), (4096, 8192)]:
        x, r = (torch.randn(R, N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w = torch.ones(N, device="cuda", dtype=torch.bfloat16)
        y, _ = add_norm(x, r, w, None, 1e-6, "rms")
        ok = (y.float() - add_norm_reference(x, r, w, None, 1e-6, "rms")[0].float()).abs().max().item() < 0.1
        ms_k = _bench_graph(lambda i: add_norm(x, r, w, None, 1e-6, "rms"), 16)
        ms_t = _bench_graph(lambda i: add_norm_reference(x, r, w, None, 1e-6, "rms"), 16)
        rows.append(_row("add_norm_rms", f"{R}x{N}", ms_k, ms_t, 4 * R * N * 2, ok))


def bench_rope(rows):
    from fmconvert.kernels import apply_rope, apply_rope_reference

    HQ, HKV, D = 32, 8, 128
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    ang = torch.arange(8192, device="cuda").float()[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    for B, T in [(1, 1), (8, 1), (1, 2048)]:
        qkv = torch.randn(B, T, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        q = qkv[..., : HQ * D].view(B, T, HQ, D)
        k = qkv[..., HQ * D: (HQ + HKV) * D].view(B, T, HKV, D)
        pos = torch.arange(T, device="cuda").expand(B, T).contiguous() + 100
        qo, ko = apply_rope(q, k, cos, sin, pos)
        qr, kr = apply_rope_reference(q, k, cos, sin, pos)
        ok = max((qo.float() - qr.float()).abs().max().item(), (ko.float() - kr.float()).abs().max().item()) < 0.05
        ms_k = _bench_graph(lambda i: apply_rope(q, k, cos, sin, pos), 16)
        ms_t = _bench_graph(lambda i: apply_rope_reference(q, k, cos, sin, pos), 16)
        rows.append(_row("rope_neox", f"B={B} T={T} Hq={HQ} Hkv={HKV} D={D}", ms_k, ms_t,
                         2 * B * T * (HQ + HKV) * D * 2, ok))


def bench_decode_attention(rows):
    from fmconvert.kernels import decode_attention, decode_attention_reference, decode_attention_workspace

    D, dt = 128, torch.bfloat16
    for HQ, HKV in [(32, 8), (32, 32)]:
        for S in [128, 1024, 4096]:
            B = 1
            q = torch.randn(B, HQ, D, device="cuda", dtype=dt)
            kc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
            vc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
            lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
            ws = decode_attention_workspace(q, kc)
            scale = 1 / math.sqrt(D)
            o = decode_attention(q, kc, vc, lens, scale, workspace=ws)
            ok = (o.float() - decode_attention_reference(q, kc, vc, lens, scale).float()).abs().max().item() < 0.03
            ms_k = _bench_graph(lambda i: decode_attention(q, kc, vc, lens, scale, workspace=ws), 16)
            # the same on 8 warps: 72 registers instead of 80 on sm_90 (sass_report.py), one more candidate
            from fmconvert.kernels import attention
            warps, attention._DECODE_WARPS = attention._DECODE_WARPS, 8
            try:
                ms_8w = _bench_graph(lambda i: decode_attention(q, kc, vc, lens, scale, workspace=ws), 16)
            finally:
                attention._DECODE_WARPS = warps
            q4 = q[:, :, None]
            if HQ == HKV:
                base = lambda: F.scaled_dot_product_attention(q4, kc, vc, scale=scale)
            else:
                base = lambda: F.scaled_dot_product_attention(q4, kc, vc, scale=scale, enable_gqa=True)
            try:
                ms_t = _bench_graph(lambda i: base(), 16)
            except TypeError:
                ms_t = None
            rows.append(_row("decode_attention", f"B={B} Hq={HQ} Hkv={HKV} S={S} D={D}", ms_k, ms_t,
                             2 * B * HKV * S * D * 2, ok, baseline="sdpa", ms_8_warps=round(ms_8w, 5)))


def bench_block_sparse_decode(rows):
    """MiniMax-M3's sparse layers at tp 8 (8 q heads over 1 kv head of 128 a rank): each kv head keeps 16 blocks of
    128 keys; the kernel skips the others' tiles. Baseline: the same kernel over every key (dense)."""
    from fmconvert.kernels import decode_attention, decode_attention_reference, decode_attention_workspace

    D, dt, blk, kept = 128, torch.bfloat16, 128, 16
    for S in [8192, 32768]:
        B, HQ, HKV = 1, 8, 1
        q = torch.randn(B, HQ, D, device="cuda", dtype=dt)
        kc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
        vc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
        lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
        nb = S // blk
        keep = torch.zeros(B, HKV, nb, dtype=torch.bool, device="cuda")
        keep[..., torch.randperm(nb - 1, device="cuda")[:kept - 1]] = True
        keep[..., nb - 1] = True                                   # the query's own block
        ws = decode_attention_workspace(q, kc)
        scale = 1 / math.sqrt(D)
        o = decode_attention(q, kc, vc, lens, scale, workspace=ws, keep=keep, keep_block=blk)
        ref = decode_attention_reference(q, kc, vc, lens, scale, keep=keep, keep_block=blk)
        ok = (o.float() - ref.float()).abs().max().item() < 0.03
        ms_k = _bench_graph(lambda i: decode_attention(q, kc, vc, lens, scale, workspace=ws, keep=keep,
                                                       keep_block=blk), 16)
        ms_d = _bench_graph(lambda i: decode_attention(q, kc, vc, lens, scale, workspace=ws), 16)
        rows.append(_row("block_sparse_decode", f"B={B} Hq={HQ} Hkv={HKV} S={S} D={D} keep {kept}x{blk}", ms_k,
                         ms_d, 2 * B * HKV * kept * blk * D * 2, ok, baseline="dense decode kernel"))


def bench_mla_decode(rows):
    """DeepSeek-V3's absorbed MLA decode at tp 8: 16 heads over one shared latent cache row of kv_rank 512 + rope 64
    (K = the row, V = its first 512 columns). Against the reference, and against the expanded form a naive runtime
    runs: SDPA with the latent broadcast to every head by expand (no copy). GB/s counts the cache bytes read once.
    Caches rotate through > 256 MB of copies so B = 1 (4.7 MB) reads HBM, not L2."""
    from fmconvert.kernels import mla_decode, mla_decode_reference, mla_decode_workspace

    H, R, P, S, dt = 16, 512, 64, 4096, torch.bfloat16
    scale = 1 / math.sqrt(128 + P)          # qk_nope_head_dim + qk_rope_head_dim
    for B in (1, 8, 32):
        q = torch.randn(B, H, R + P, device="cuda", dtype=dt)
        c0 = torch.randn(B, 1, S, R + P, device="cuda", dtype=dt)
        lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
        ws = mla_decode_workspace(q, c0, R)
        o = mla_decode(q, c0, lens, scale, R, workspace=ws)
        ok = (o.float() - mla_decode_reference(q, c0, lens, scale, R).float()).abs().max().item() < 0.03
        caches = _rotating(lambda: c0.clone(), c0.numel() * 2)
        n = _calls(len(caches))
        nbytes = B * S * (R + P) * 2
        ms_k = _bench_graph(lambda i: mla_decode(q, caches[i % len(caches)], lens, scale, R, workspace=ws), n)
        ms_ref = _bench_graph(lambda i: mla_decode_reference(q, caches[i % len(caches)], lens, scale, R), n)

        def expanded(i):
            c = caches[i % len(caches)]
            return F.scaled_dot_product_attention(q[:, :, None], c.expand(B, H, S, R + P),
                                                  c[..., :R].expand(B, H, S, R), scale=scale)

        extra = {"ref_ms": round(ms_ref, 5), "ref_GBps": round(nbytes / ms_ref / 1e6, 1)}
        try:
            ms_t = _bench_graph(expanded, n)
            extra["sdpa_GBps"] = round(nbytes / ms_t / 1e6, 1)
        except Exception as exc:
            ms_t, extra["sdpa_error"] = None, repr(exc)[:120]
        rows.append(_row("mla_decode", f"B={B} H={H} kv_rank={R} rope={P} S={S}", ms_k, ms_t, nbytes, ok,
                         baseline="sdpa on expanded latent", **extra))
        del caches
        torch.cuda.empty_cache()


def bench_gated_delta(rows):
    """Gated DeltaNet's step (Qwen3.5: 16 q/k heads, 32 v heads of 128, the state fp32): a decode step reads and
    writes every value head's [128, 128] state once, so GB/s counts the state twice plus q, k, v. Against the
    torch backend's step (the same math in a few torch ops). A 1024-token prompt through the kernel (sequential in
    T) against the chunked torch form."""
    from fmconvert.kernels import gated_delta, gated_delta_reference
    from fmconvert.runtime.ops import TorchOps, gated_delta_chunked

    Hk, Hv, D, dt = 16, 32, 128, torch.bfloat16
    torch_ops = TorchOps()
    for B in (1, 8, 32):
        q, k = (torch.randn(B, 1, Hk, D, device="cuda", dtype=dt) for _ in range(2))
        v = torch.randn(B, 1, Hv, D, device="cuda", dtype=dt)
        g = -torch.rand(B, 1, Hv, device="cuda")
        beta = torch.rand(B, 1, Hv, device="cuda")
        s0 = torch.randn(B, Hv, D, D, device="cuda") * 0.1
        want = gated_delta_reference(q, k, v, g, beta, s0.clone(), D ** -0.5).float()
        ok = (gated_delta(q, k, v, g, beta, s0.clone(), D ** -0.5).float() - want).abs().max().item() < 0.05
        states = _rotating(lambda: s0.clone(), s0.numel() * 4)
        n = _calls(len(states))
        nbytes = 2 * s0.numel() * 4 + (2 * q.numel() + v.numel()) * 2
        ms_k = _bench_graph(lambda i: gated_delta(q, k, v, g, beta, states[i % len(states)], D ** -0.5), n)
        ms_t = _bench_graph(lambda i: torch_ops.gated_delta(q, k, v, g, beta, states[i % len(states)], D ** -0.5),
                            n)
        rows.append(_row("gated_delta_step", f"B={B} Hk={Hk} Hv={Hv} D={D} state fp32", ms_k, ms_t, nbytes, ok,
                         baseline="torch step"))
        del states
    T = 1024
    q, k = (torch.randn(1, T, Hk, D, device="cuda", dtype=dt) for _ in range(2))
    v = torch.randn(1, T, Hv, D, device="cuda", dtype=dt)
    g, beta = -torch.rand(1, T, Hv, device="cuda") * 0.1, torch.rand(1, T, Hv, device="cuda")
    s0 = torch.zeros(1, Hv, D, D, device="cuda")
    o = gated_delta(q, k, v, g, beta, s0.clone(), D ** -0.5)
    ok = (o.float() - gated_delta_chunked(q, k, v, g, beta, s0.clone(), D ** -0.5).float()).abs().max().item() < 0.05
    rows.append(_row("gated_delta_prompt", f"T={T} Hk={Hk} Hv={Hv} D={D}",
                     _bench(lambda: gated_delta(q, k, v, g, beta, s0.clone(), D ** -0.5)),
                     _bench(lambda: gated_delta_chunked(q, k, v, g, beta, s0.clone(), D ** -0.5)), None, ok,
                     baseline="chunked torch form"))


def bench_ssm_scan(rows):
    """Mamba2's step (Granite 4.0-H Small: 128 heads of 64, one group, state 128, fp32): a decode step reads and
    writes each head's [64, 128] state once. Against the torch backend's step; a 1024-token prompt through the kernel
    (sequential in T) against the chunked torch form."""
    from fmconvert.kernels import ssm_scan, ssm_scan_reference
    from fmconvert.runtime.ops import TorchOps, ssm_scan_chunked

    H, P, N, G, dt_ = 128, 64, 128, 1, torch.bfloat16
    torch_ops = TorchOps()
    A = -torch.rand(H, device="cuda") - 0.5
    D = torch.randn(H, device="cuda")
    for B in (1, 8, 32):
        x = torch.randn(B, 1, H, P, device="cuda", dtype=dt_)
        b, c = (torch.randn(B, 1, G, N, device="cuda", dtype=dt_) for _ in range(2))
        dt = torch.rand(B, 1, H, device="cuda") * 0.1
        s0 = torch.randn(B, H, P, N, device="cuda") * 0.1
        want = ssm_scan_reference(x, dt, A, b, c, D, s0.clone()).float()
        ok = (ssm_scan(x, dt, A, b, c, D, s0.clone()).float() - want).abs().max().item() < 0.05
        states = _rotating(lambda: s0.clone(), s0.numel() * 4)
        n = _calls(len(states))
        nbytes = 2 * s0.numel() * 4 + (x.numel() + 2 * b.numel()) * 2
        ms_k = _bench_graph(lambda i: ssm_scan(x, dt, A, b, c, D, states[i % len(states)]), n)
        ms_t = _bench_graph(lambda i: torch_ops.ssm_scan(x, dt, A, b, c, D, states[i % len(states)]), n)
        rows.append(_row("ssm_scan_step", f"B={B} H={H} P={P} N={N} G={G} state fp32", ms_k, ms_t, nbytes, ok,
                         baseline="torch step"))
        del states
    T = 1024
    x = torch.randn(1, T, H, P, device="cuda", dtype=dt_)
    b, c = (torch.randn(1, T, G, N, device="cuda", dtype=dt_) for _ in range(2))
    dt = torch.rand(1, T, H, device="cuda") * 0.1
    s0 = torch.zeros(1, H, P, N, device="cuda")
    o = ssm_scan(x, dt, A, b, c, D, s0.clone())
    want = ssm_scan_chunked(x, dt, A, b, c, D, s0.clone()).float()
    ok = ((o.float() - want).norm() / want.norm()).item() < 1e-2       # bf16 outputs that grow over 1024 steps
    rows.append(_row("ssm_scan_prompt", f"T={T} H={H} P={P} N={N}",
                     _bench(lambda: ssm_scan(x, dt, A, b, c, D, s0.clone())),
                     _bench(lambda: ssm_scan_chunked(x, dt, A, b, c, D, s0.clone())), None, ok,
                     baseline="chunked torch form"))


def bench_mamba_scan(rows):
    """Mamba1's decode step at batch 1 (FalconMamba-7B: 8192 channels, state 16, fp32 state): reads and writes the
    [8192, 16] state once and reads the layer's A [8192, 16]; x | z are views of in_proj's output and B | C of
    x_proj's, as the mixer passes them. State and A rotate together (each layer has its own), so both come from HBM.
    Against the torch reference step (the backend has no other Mamba1 step yet)."""
    from fmconvert.kernels import mamba_scan, mamba_scan_reference

    B, Dc, N, R, dt_ = 1, 8192, 16, 256, torch.bfloat16
    A0 = -torch.exp(torch.rand(Dc, N, device="cuda") * 2.5)
    D = torch.randn(Dc, device="cuda")
    proj = torch.randn(B, 1, 2 * Dc, device="cuda", dtype=dt_)
    x, z = proj[..., :Dc], proj[..., Dc:]
    xp = torch.randn(B, 1, R + 2 * N, device="cuda", dtype=dt_)
    b, c = xp[..., R:R + N], xp[..., R + N:]
    dt = torch.randn(B, 1, Dc, device="cuda", dtype=dt_) - 3.0         # raw, with dt_proj's bias: softplus ~0.05
    s0 = torch.randn(B, Dc, N, device="cuda") * 0.1
    want = mamba_scan_reference(x, dt, A0, b, c, D, z, s0.clone()).float()
    ok = (mamba_scan(x, dt, A0, b, c, D, z, s0.clone()).float() - want).abs().max().item() < 0.05
    layers = _rotating(lambda: (s0.clone(), A0.clone()), 2 * s0.numel() * 4)
    n = _calls(len(layers))
    nbytes = 3 * s0.numel() * 4 + (4 * x.numel() + 2 * b.numel()) * 2    # state in and out, A; x, z, dt, y, B, C

    def step(fn, i):
        state, A = layers[i % len(layers)]
        return fn(x, dt, A, b, c, D, z, state)

    ms_k = _bench_graph(lambda i: step(mamba_scan, i), n)
    ms_t = _bench_graph(lambda i: step(mamba_scan_reference, i), n)
    rows.append(_row("mamba_scan_step", f"B={B} Dc={Dc} N={N} state fp32", ms_k, ms_t, nbytes, ok,
                     baseline="torch reference step"))
    del layers


def bench_rglru_scan(rows):
    """RecurrentGemma-9B's RG-LRU recurrence (4096 channels, fp32 state): a 2048-token prompt in one launch against
    the torch backend's token-by-token loop (2048 small launches), and a decode step against the loop's one step."""
    from fmconvert.kernels import linear_scan, linear_scan_reference
    from fmconvert.runtime.ops import TorchOps

    B, W, dt_ = 1, 4096, torch.bfloat16
    for T in (2048, 1):
        a = torch.rand(B, T, W, device="cuda", dtype=dt_)
        x = torch.randn(B, T, W, device="cuda", dtype=dt_)
        s0 = torch.randn(B, W, device="cuda")
        want = linear_scan_reference(a, x, s0.clone()).float()
        ok = (linear_scan(a, x, s0.clone()).float() - want).abs().max().item() < 0.05
        torch_ops = TorchOps()
        ms_k = _bench(lambda: linear_scan(a, x, s0.clone()))
        ms_t = _bench(lambda: torch_ops.linear_scan(a, x, s0.clone()), warmup=2, rep=5 if T > 1 else 40)
        nbytes = 3 * a.numel() * 2 + 2 * s0.numel() * 4                 # a, x, y; the state in and out
        rows.append(_row("rglru_scan", f"B={B} T={T} W={W} bf16, state fp32", ms_k, ms_t, nbytes, ok,
                         baseline="torch backend loop"))


def bench_mlstm_scan(rows):
    """xLSTM-7B's mLSTM recurrence (8 heads, q/k 256 and v 512 wide, fp32 state): a 2048-token prompt in one launch
    against the torch backend's chunked form (runtime.ops.mlstm_chunked), and a decode step against its one step."""
    from fmconvert.kernels import mlstm_scan, mlstm_scan_reference
    from fmconvert.runtime.ops import TorchOps

    B, H, DK, DV, dt_ = 1, 8, 256, 512, torch.bfloat16
    for T in (2048, 1):
        q, k = (torch.randn(B, T, H, DK, device="cuda", dtype=dt_) for _ in range(2))
        v = torch.randn(B, T, H, DV, device="cuda", dtype=dt_)
        i, f = ((torch.tanh(torch.randn(B, T, H, device="cuda")) * 15).to(dt_) for _ in range(2))
        s0 = torch.zeros(B, H, DK + 1, DV + 1, device="cuda")
        want = mlstm_scan_reference(q, k, v, i, f, s0.clone()).float()
        ok = (mlstm_scan(q, k, v, i, f, s0.clone()).float() - want).abs().max().item() < 0.05
        torch_ops = TorchOps()
        ms_k = _bench(lambda: mlstm_scan(q, k, v, i, f, s0.clone()))
        ms_t = _bench(lambda: torch_ops.mlstm(q, k, v, i, f, s0.clone(), 1e-6), warmup=1, rep=3 if T > 1 else 40)
        nbytes = (2 * q.numel() + 2 * v.numel()) * 2 + 2 * s0.numel() * 4     # q, k, v, y; the state in and out
        rows.append(_row("mlstm_scan", f"B={B} T={T} H={H} dk={DK} dv={DV} bf16, state fp32", ms_k, ms_t, nbytes, ok,
                         baseline="torch backend"))


def bench_prefill_attention(rows):
    from fmconvert.kernels import prefill_attention, prefill_attention_reference

    B, H, T, D, dt = 1, 32, 2048, 128, torch.bfloat16
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt) for _ in range(3))
    scale = 1 / math.sqrt(D)
    o = prefill_attention(q, k, v, scale, causal=True)
    ref = prefill_attention_reference(q[:, :4], k[:, :4], v[:, :4], scale)
    ok = (o[:, :4].float() - ref.float()).abs().max().item() < 0.03
    ms_k = _bench(lambda: prefill_attention(q, k, v, scale, causal=True))
    ms_t = _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    flops = 4 * B * H * T * T * D / 2
    rows.append(_row("prefill_attention", f"B={B} H={H} T={T} D={D} causal", ms_k, ms_t, None, ok,
                     TFLOPs=round(flops / ms_k / 1e9, 1), baseline="sdpa"))


def bench_window_attention(rows):
    """Sliding windows (Mistral 7B v0.1: window 4096) at a 32k context: a decode step over the whole cache with
    the window clamped in the kernel, and over the window's ring buffer (what the runtime keeps), against a plain
    decode over all 32k keys; a windowed 8k prefill against causal SDPA over everything; Gemma 2's soft-cap."""
    from fmconvert.kernels import (decode_attention, decode_attention_reference, prefill_attention,
                                   prefill_attention_reference)
    D, HQ, HKV, S, W, dt = 128, 32, 8, 32768, 4096, torch.bfloat16
    scale = 1 / math.sqrt(D)
    q = torch.randn(1, HQ, D, device="cuda", dtype=dt)
    kc, vc = (torch.randn(1, HKV, S, D, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.full((1,), S, device="cuda", dtype=torch.int32)
    ring_k, ring_v = kc[:, :, -W:].contiguous(), vc[:, :, -W:].contiguous()
    ring_lens = torch.full((1,), W, device="cuda", dtype=torch.int32)
    want = decode_attention_reference(q, ring_k, ring_v, ring_lens, scale).float()
    full = _bench_graph(lambda i: decode_attention(q, kc, vc, lens, scale), 16)
    for name, call in (("clamped", lambda: decode_attention(q, kc, vc, lens, scale, window=W)),
                       ("ring", lambda: decode_attention(q, ring_k, ring_v, ring_lens, scale))):
        ok = (call().float() - want).abs().max().item() < 0.03
        ms = _bench_graph(lambda i: call(), 16)
        rows.append(_row("decode_attention_window", f"S={S} window={W} {name} Hq={HQ} Hkv={HKV} D={D}", ms, full,
                         2 * HKV * W * D * 2, ok, baseline="no window, all S keys"))
    T = 8192
    qp, kp, vp = (torch.randn(1, HQ, T, D, device="cuda", dtype=dt) for _ in range(3))
    o = prefill_attention(qp, kp, vp, scale, window=W)
    tail = slice(T - 64, T)        # the reference on the last 64 queries only (it materialises T x S scores)
    ref = prefill_attention_reference(qp[:, :2, tail], kp[:, :2], vp[:, :2], scale, window=W)
    ok = (o[:, :2, tail].float() - ref.float()).abs().max().item() < 0.03
    base = _bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale))
    rows.append(_row("prefill_attention_window", f"T={T} window={W} H={HQ} D={D}",
                     _bench(lambda: prefill_attention(qp, kp, vp, scale, window=W)), base, None, ok,
                     baseline="sdpa causal, no window"))
    ocap = prefill_attention(qp, kp, vp, scale, window=W, softcap=50.0)
    refc = prefill_attention_reference(qp[:, :2, tail], kp[:, :2], vp[:, :2], scale, window=W, softcap=50.0)
    okc = (ocap[:, :2, tail].float() - refc.float()).abs().max().item() < 0.03
    rows.append(_row("prefill_attention_window_softcap", f"T={T} window={W} softcap=50 H={HQ} D={D}",
                     _bench(lambda: prefill_attention(qp, kp, vp, scale, window=W, softcap=50.0)), base, None, okc,
                     baseline="sdpa causal, no window"))


def bench_gemv(rows):
    """The int8 GEMV at one row on the four LLaMA shapes only (issue #5's first target): bench_linear's M=1 rows."""
    bench_linear(rows, ms_list=[1])


def run(report: dict, parts=None) -> list:
    """Benchmark every kernel on CUDA (or the named parts: "linear", "float_gemv", ...); returns the rows and stores
    them in report["rows"]."""
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/gpu_kernels.py needs a CUDA device")
    import triton

    t0 = time.time()
    report["device"] = torch.cuda.get_device_name()
    report["torch"], report["triton"] = torch.__version__, triton.__version__
    report["copy_GBps"] = round(copy_bandwidth(), 1)
    rows: list = []
    for part in (bench_linear, bench_gemv, bench_swiglu, bench_float_gemv, bench_norm, bench_glu, bench_rope, bench_rope_append,
                 bench_decode_attention, bench_block_sparse_decode, bench_mla_decode, bench_gated_delta, bench_ssm_scan, bench_mamba_scan,
                 bench_rglru_scan, bench_mlstm_scan, bench_prefill_attention, bench_window_attention):
        if parts and part.__name__.removeprefix("bench_") not in parts:
            continue
        t = time.time()
        try:
            part(rows)
        except Exception as exc:  # keep the other parts' numbers
            rows.append({"name": part.__name__, "shape": "-", "ok": False, "error": repr(exc)[:300]})
        report.setdefault("seconds", {})[part.__name__] = round(time.time() - t, 1)
    report["rows"] = rows
    report["total_s"] = round(time.time() - t0, 1)
    return rows


def sweep(shapes=LINEAR_SHAPES, M=1):
    """Time each candidate int8 GEMV config (no autotuning) at batch M; print ms and GB/s."""
    from fmconvert.kernels.int8_matmul import _GEMV_CONFIGS, _decode, _gemv_cfg, int8_linear_reference

    def cfg(bn, bk, w, magic, st=1):
        return _gemv_cfg(bn, bk, w, magic=magic, stages=st)

    cands = list(_GEMV_CONFIGS) + [
        cfg(2, 4096, 8, 3), cfg(1, 4096, 4, 3), cfg(16, 512, 8, 3), cfg(8, 512, 4, 3),
        cfg(4, 1024, 4, 2), cfg(1, 1024, 1, 3), cfg(2, 512, 2, 3),
        # software-pipelined loads (every candidate above is num_stages=1)
        cfg(2, 2048, 4, 3, st=2), cfg(4, 1024, 4, 3, st=3), cfg(2, 1024, 4, 3, st=3),
    ]
    dt = torch.bfloat16
    print("config".ljust(44) + "".join(f"{n}x{k}".rjust(22) for n, k in shapes))
    data = {}
    for n, k in shapes:
        q0, s0, nbytes, qs, ws = _weights(n, k, dt)
        x = torch.randn(M, k, device="cuda", dtype=dt)
        ref = int8_linear_reference(x, q0, s0, GROUP).float()
        ms_fp = _bench_graph(lambda i: F.linear(x, ws[i % len(ws)]), _calls(len(ws)))
        data[("cublas_bf16", n, k)] = (ms_fp, 2 * n * k / ms_fp / 1e6)
        for c in cands:
            out = torch.empty(M, n, dtype=dt, device="cuda")
            try:
                _decode(x, q0, s0, GROUP, None, 0, out, split_k=1, config=c)
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                ms = _bench_graph(lambda i: _decode(x, *qs[i % len(qs)], GROUP, None, 0, out, split_k=1, config=c),
                                  _calls(len(qs)), rep=20)
                data[(str(c), n, k)] = (ms, nbytes / ms / 1e6, err)
            except Exception as exc:
                data[(str(c), n, k)] = (float("nan"), 0.0, repr(exc)[:80])
        for sp in (2, 4):
            out = torch.empty(M, n, dtype=dt, device="cuda")
            ms = _bench_graph(lambda i: _decode(x, *qs[i % len(qs)], GROUP, None, 0, out, split_k=sp),
                              _calls(len(qs)), rep=20)
            data[(f"split_k={sp}", n, k)] = (ms, nbytes / ms / 1e6)
        del qs, ws
        torch.cuda.empty_cache()
    names = ["cublas_bf16"] + [str(c) for c in cands] + ["split_k=2", "split_k=4"]
    labels = dict(zip(names, ["cublas_bf16"] + [_cfg_label(c) for c in cands] + names[-2:]))
    for name in names:
        cells = []
        for n, k in shapes:
            v = data.get((name, n, k))
            cells.append(f"{v[0] * 1000:8.2f}us {v[1]:7.0f}GB/s".rjust(22) if v else "-".rjust(22))
        print(labels[name][:44].ljust(44) + "".join(cells))
    bad = [(k, v[2]) for k, v in data.items() if len(v) > 2 and not (isinstance(v[2], float) and v[2] < 2e-2)]
    print("config errors:", bad[:10])
    return data


def _cfg_label(c) -> str:
    kw = c.kwargs
    flags = [f"magic{kw['MAGIC']}"] + [f for f, on in (("pair", kw["PAIR"]), ("chain", kw.get("CHAIN")),
                                                      ("old_order", not kw["EARLY"])) if on]
    return f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages} " + " ".join(flags)


def _print_table(report, rows):
    print(f"device: {report.get('device')}  torch {report.get('torch')}  triton {report.get('triton')}  "
          f"copy bandwidth {report.get('copy_GBps')} GB/s (read+write)")
    cols = ["name", "shape", "ms_kernel", "ms_baseline", "GB/s", "speedup", "ok"]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, [18, 34, 10, 11, 8, 8, 5])))
    for r in rows:
        cells = [str(r.get(c, "")) for c in cols]
        extra = {k: v for k, v in r.items() if k not in cols}
        print(" | ".join(c.ljust(w) for c, w in zip(cells, [18, 34, 10, 11, 8, 8, 5])), extra or "")
    print("seconds per part:", report.get("seconds"), "total", report.get("total_s"))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device; nothing to benchmark.")
        sys.exit(0)
    if "--sweep" in sys.argv:
        sweep()
    else:
        rep: dict = {}
        _print_table(rep, run(rep))
