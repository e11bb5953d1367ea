"""The kernels the fmconvert runtime runs: Triton kernels for CUDA (and for CPU under TRITON_INTERPRET=1), and
`int8_gemv_cpu`, a TorchInductor-generated int8 GEMV for CPU decode.

Every kernel file has the same anatomy: the kernel(s), a plain launcher, and a pure-torch `*_reference` beside it.
The Triton kernels need triton and import on first use; check `triton_available()` first when the caller may run
without it.
"""
from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when triton imports and can run here: on CUDA, or on CPU through TRITON_INTERPRET=1."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


_LAZY = {
    "decode_attention": "attention", "decode_attention_reference": "attention",
    "decode_attention_workspace": "attention", "prefill_attention": "attention",
    "prefill_attention_reference": "attention",
    "dequantize": "int8_matmul", "int8_linear": "int8_matmul", "int8_linear_reference": "int8_matmul",
    "int8_expert_linear": "int8_matmul", "int8_expert_linear_reference": "int8_matmul",
    "expert_linear": "int8_matmul", "expert_linear_reference": "int8_matmul",
    "float_gemv": "float_linear", "float_gemv_reference": "float_linear",
    "add_norm": "norm", "add_norm_reference": "norm",
    "apply_rope": "rope", "apply_rope_reference": "rope", "rope_append": "rope", "rope_append_reference": "rope",
    "swiglu": "glu", "swiglu_reference": "glu", "gated": "glu", "gated_reference": "glu",
    "mla_decode": "mla", "mla_decode_reference": "mla", "mla_decode_workspace": "mla",
    "gated_delta": "delta_rule", "gated_delta_reference": "delta_rule",
    "causal_conv1d": "conv1d", "causal_conv1d_reference": "conv1d",
    "gated_rms_norm": "gated_norm", "gated_rms_norm_reference": "gated_norm",
    "ssm_scan": "selective_scan", "ssm_scan_reference": "selective_scan",
    "mamba_scan": "mamba1_scan", "mamba_scan_reference": "mamba1_scan",
    "linear_scan": "rglru_scan", "linear_scan_reference": "rglru_scan",
    "mlstm_scan": "mlstm", "mlstm_scan_reference": "mlstm",
}


def __getattr__(name):
    """The Triton kernels import on first use, so the CPU runtime (which needs int8_gemv_cpu only) never pays for
    importing triton."""
    mod = _LAZY.get(name)
    if mod is None or importlib.util.find_spec("triton") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "triton_available", "int8_gemv_cpu",
    "add_norm", "add_norm_reference",
    "int8_linear", "int8_linear_reference", "dequantize", "int8_expert_linear", "int8_expert_linear_reference",
    "expert_linear", "expert_linear_reference", "float_gemv", "float_gemv_reference",
    "apply_rope", "apply_rope_reference", "rope_append", "rope_append_reference", "swiglu", "swiglu_reference",
    "gated", "gated_reference",
    "prefill_attention", "prefill_attention_reference",
    "decode_attention", "decode_attention_reference", "decode_attention_workspace",
    "mla_decode", "mla_decode_reference", "mla_decode_workspace",
    "gated_delta", "gated_delta_reference", "causal_conv1d", "causal_conv1d_reference",
    "gated_rms_norm", "gated_rms_norm_reference", "ssm_scan", "ssm_scan_reference",
    "mamba_scan", "mamba_scan_reference", "linear_scan", "linear_scan_reference",
    "mlstm_scan", "mlstm_scan_reference",
]
