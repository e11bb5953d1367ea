"""Helpers shared by the kernel files: interpreter detection, device queries, activations."""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swiglu": 5, "geglu": 6, "relu2": 8,
               "geglu_erf": 9, "reglu2": 10, "quick_gelu": 12}
# Gated activations act on the first half of a fused gate|up output and multiply by the second half.
GATED = ("swiglu", "geglu", "geglu_erf", "reglu2")   # geglu: the tanh GELU; geglu_erf: the exact one; reglu2: ReLU²
# ("swiglu_oai", alpha, limit): GPT-OSS's clamped SwiGLU; ("swiglu_limit", limit): the same clamps before a plain
# SwiGLU (HY-V4's experts). The activations with parameters.
SWIGLU_OAI = 7
SWIGLU_LIMIT = 11
GATED_CODES = (ACTIVATIONS["swiglu"], ACTIVATIONS["geglu"], ACTIVATIONS["geglu_erf"], ACTIVATIONS["reglu2"],
               SWIGLU_OAI, SWIGLU_LIMIT)


def epilogue(activation) -> tuple[int, float, float]:
    """(ACT, ALPHA, LIMIT), the kernels' constexprs for an activation: None, a name of ACTIVATIONS, or
    ("swiglu_oai", alpha, limit). ALPHA and LIMIT are 0 for the others, so they compile once, as before."""
    if isinstance(activation, tuple) and len(activation) == 3 and activation[0] == "swiglu_oai":
        alpha, limit = float(activation[1]), float(activation[2])
        if not (math.isfinite(alpha) and math.isfinite(limit) and limit > 0):
            raise ValueError(f"swiglu_oai needs a finite alpha and a finite limit > 0, got {activation!r}")
        return SWIGLU_OAI, alpha, limit
    if isinstance(activation, tuple) and len(activation) == 2 and activation[0] == "swiglu_limit":
        limit = float(activation[1])
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"swiglu_limit needs a finite limit > 0, got {activation!r}")
        return SWIGLU_LIMIT, 0.0, limit
    if (activation is None or isinstance(activation, str)) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation], 0.0, 0.0
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, ('swiglu_oai', alpha, limit) or "
                     f"('swiglu_limit', limit), "
                     f"got {activation!r}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def configs(gpu: list, interp: "triton.Config") -> list:
    # The interpreter cannot autotune over more than one config. FMCONVERT_AUTOTUNE=0 keeps the
    # first (default) GPU config only: quick compiles for tests.
    if interpreting():
        return [interp]
    return gpu[:1] if os.environ.get("FMCONVERT_AUTOTUNE") == "0" else gpu


_FLUSH = {}


def _graph(fn, reps):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    return g


def _replay_ms(g, events) -> float:
    start, end = events
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def tuner_bench(kernel_call, quantiles, samples=9):
    """Autotuner timing of one config: GPU time of kernel_call with a cold L2 and no host launch
    overhead (decode kernels run for a few microseconds, less than a Python launch). A CUDA graph
    of [L2 flush, kernel] x reps minus a graph of flushes alone. The flush is most of each graph's
    time, so the two are replayed in alternation and the median of the paired differences taken
    (before: the medians of 5 replays each, subtracted). Not yet timed on a GPU: on an H200 the
    tuner had kept, at 14336 x 4096, a GEMV config timed at 22.0 us where another had run in 19.4 us."""
    reps = 8
    try:
        kernel_call()  # compile and load outside the capture
    except Exception as exc:
        # A candidate this compiler or card cannot build or run (a config read off one Triton's output, met by
        # another): never chosen, and said once, instead of failing the whole load.
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"fmconvert: an autotune candidate was skipped: {type(exc).__name__}: {first}", stacklevel=2)
        return [math.inf] * len(quantiles) if quantiles else math.inf
    try:
        dev = torch.cuda.current_device()
        if dev not in _FLUSH:
            _FLUSH[dev] = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        buf = _FLUSH[dev]
        both = _graph(lambda: (buf.zero_(), kernel_call()), reps)
        flush = _graph(buf.zero_, reps)
        torch.cuda.synchronize()
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        diffs = sorted(_replay_ms(both, events) - _replay_ms(flush, events) for _ in range(samples))
        ms = max(diffs[samples // 2], 1e-4) / reps
        return [ms] * len(quantiles) if quantiles else ms
    except Exception:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def candidate_wins(reference, candidate, time_ms) -> bool:
    """Whether `candidate` (a call returning its output) should replace `reference` for one shape: its output is
    finite and agrees with the reference's within 1% of the largest magnitude, and it ran faster under time_ms (the
    autotuners' cold-L2 timing). Each runs once first, so both are compiled and autotuned before they are timed."""
    a, b = candidate().float(), reference().float()
    if not (torch.isfinite(a).all() and (a - b).abs().max().item() <= 1e-2 * max(1.0, b.abs().max().item())):
        return False
    return time_ms(candidate) < time_ms(reference)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def lowbit(n: int) -> int:
    return n & -n


def float_dtype_check(name: str, t: torch.Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32)):
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def linear_epilogue(n_rows: int, bias, activation, tensors) -> tuple[int, float, float]:
    """The checks a linear launcher shares once its weight is checked: the bias's shape, the activation (a gated one
    needs gate and up rows, an even count), one device for every tensor. Returns the activation's epilogue()."""
    if bias is not None:
        float_dtype_check("bias", bias)
        if tuple(bias.shape) != (n_rows,):
            raise ValueError(f"bias must have shape ({n_rows},), got {tuple(bias.shape)}")
    ep = epilogue(activation)
    if ep[0] in GATED_CODES and n_rows % 2:
        raise ValueError(f"{activation} needs an even number of weight rows (gate; up), got {n_rows}")
    devs = {t.device for t in tuple(tensors) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    return ep


@triton.jit
def sigmoid(v):
    # exp of a non-positive argument only: no overflow for large |v|.
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def activate(v, ACT: tl.constexpr):
    # v: fp32. ACT codes follow ACTIVATIONS (the gated ones are paired by the caller: silu, gelu_tanh, gelu, relu2
    # here).
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2 or ACT == 9:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 3 or ACT == 6:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (1.0 + (2.0 * sigmoid(2.0 * u) - 1.0))
    elif ACT == 4 or ACT == 5:
        v = v * sigmoid(v)
    elif ACT == 8 or ACT == 10:
        v = tl.maximum(v, 0.0)
        v = v * v
    elif ACT == 12:                 # CLIP's x sigmoid(1.702 x)
        v = v * sigmoid(1.702 * v)
    return v


@triton.jit
def gated_product(gate, up, ACT: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    # gate, up: fp32 halves of a gated activation (ACT in GATED_CODES).
    if ACT == 7:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        y = gate * sigmoid(ALPHA * gate) * (up + 1.0)
    elif ACT == 11:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        y = gate * sigmoid(gate) * up
    else:
        y = activate(gate, ACT) * up
    return y


# The torch epilogues are the runtime's own: one definition of every activation.
from ..runtime.ops import activate as activate_reference  # noqa: E402
